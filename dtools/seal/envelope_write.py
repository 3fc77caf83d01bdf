"""Sealing an envelope (dtools-envelope(5)): header, chunked AES-256-GCM, signed trailer.

Memory stays constant: data moves in chunks, and hashing runs on a worker thread beside
the cipher. dtools.seal.envelope is the interface; this is its writing half.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import IO, Callable

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import InputError
from .format import (
    ARGON2, CHUNK, ENTRY_LEN, HPKE_SUITE, MAC_INFO, MODE_KEYS, MODE_PASSPHRASE, PAYLOAD_INFO, SIG_CONTEXT,
    TAG, WRAP_INFO, _HEX_ID, Entry, _b64, _header_digest, _hkdf, _nonce, _sha256, build_header,
    passphrase_key,
)
from .keys import Identity, PeerKey
from .pipeline import RING, Flusher, Ring, Stage


class _ChunkWriter:
    """Plaintext in, STREAM chunks out; a full chunk is held back until more data proves it is not last.

    Plaintext hashing runs on ``hasher``, ciphertext hashing on ``sink`` and writing on
    ``writer``, each on its own thread: three streams of work beside AES on the main thread.
    """

    def __init__(self, key: bytes, aad: bytes, sink: Stage, hasher: Stage, digest: hashes.Hash,
                 out: IO[bytes], chunk: int = CHUNK, writer: Stage | None = None,
                 flusher: Flusher | None = None):
        self.aead = AESGCM(key)
        self.flusher = flusher
        self.aad = aad
        self.sink = sink
        self.writer = writer
        self.hasher = hasher
        self.digest = digest
        self.out = out
        self.chunk = chunk
        self.plain = Ring(RING, chunk)
        self.cipher = Ring(RING, chunk + TAG)
        self.idx, self.mv = self.plain.take()
        self.fill = 0
        self.counter = 0
        self.written = 0

    def _write_ct(self, view: memoryview) -> None:
        self.digest.update(view)
        if self.writer is None:
            self._write_out(view)
        else:
            self.writer.submit(self._write_out, view)

    def _write_out(self, view: memoryview) -> None:
        self.out.write(view)
        if self.flusher is not None:
            self.flusher.wrote(len(view))

    def _release_ct(self, j: int) -> None:
        if self.writer is None:
            self.cipher.give(j)
        else:  # after the write stage is done with the buffer
            self.writer.submit(self.cipher.give, j, always=True)

    def _emit(self, last: bool) -> None:
        j, cv = self.cipher.take()
        n = self.fill + TAG
        self.aead.encrypt_into(_nonce(self.counter, last), self.mv[: self.fill], self.aad, cv[:n])
        self.sink.submit(self._write_ct, cv[:n])
        self.sink.submit(self._release_ct, j, always=True)
        self.hasher.submit(self.plain.give, self.idx, always=True)
        self.written += n
        self.counter += 1
        self.fill = 0
        if not last:
            self.idx, self.mv = self.plain.take()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.fill == self.chunk:
                self._emit(False)
            n = min(self.chunk - self.fill, len(view))
            self.mv[self.fill : self.fill + n] = view[:n]
            self.fill += n
            view = view[n:]

    def copy_from(self, f: IO[bytes], size: int, digest: hashes.Hash, advance: Callable[[int], None]) -> None:
        """Read exactly ``size`` bytes of ``f`` straight into the chunk buffers, hashing them."""
        remaining = size
        while remaining:
            if self.fill == self.chunk:
                self._emit(False)
            n = min(self.chunk - self.fill, remaining)
            got = f.readinto(self.mv[self.fill : self.fill + n])
            if not got:
                raise InputError("file became shorter while sealing; seal it again")
            self.hasher.submit(digest.update, self.mv[self.fill : self.fill + got])
            self.fill += got
            remaining -= got
            advance(got)
        if f.read(1):
            raise InputError("file grew while sealing; seal it again")

    def close(self) -> None:
        self._emit(True)


@dataclass
class Sealed:
    envelope_id: str
    sha256: str
    bytes: int
    entries: list[Entry] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)



def seal(out: IO[bytes], envelope_id: str, entries: list[Entry], *,
         identity: Identity | None = None, recipients: list[PeerKey] | None = None,
         sender: str | None = None, recipient_names: list[str] | None = None,
         passphrase: bytes | None = None, advance: Callable[[int], None] = lambda n: None,
         chunk: int = CHUNK) -> Sealed:
    """Write one envelope holding ``entries`` (read from ``entry.source``) to ``out``.

    Key mode: ``identity`` signs and ``recipients`` can open. Passphrase mode: ``passphrase``
    derives the key and an HMAC stands in for the signature.
    """
    if not _HEX_ID.match(envelope_id):
        raise ValueError("envelope id must be 32 lowercase hex digits")
    if passphrase is None:
        if identity is None or not recipients:
            raise ValueError("key mode needs the sender's identity and at least one recipient")
        content_key = os.urandom(32)
        info = WRAP_INFO + bytes.fromhex(envelope_id)
        wraps = [{"name": r.name, "fp": r.fingerprint, "wrap": _b64(HPKE_SUITE.encrypt(content_key, r.enc_public, info))}
                 for r in recipients]
        head = build_header(envelope_id, identity.name, [], mode=MODE_KEYS, from_fp=identity.public().fingerprint,
                            wraps=wraps, chunk=chunk)
        mac_key = None
    else:
        if not sender or not recipient_names:
            raise ValueError("passphrase mode needs a sender name and recipient names")
        kdf = dict(ARGON2, salt=_b64(os.urandom(16)))
        content_key = passphrase_key(passphrase, kdf)
        head = build_header(envelope_id, sender, recipient_names, mode=MODE_PASSPHRASE, kdf=kdf, chunk=chunk)
        mac_key = _hkdf(content_key, bytes.fromhex(envelope_id), MAC_INFO)
    payload_key = _hkdf(content_key, bytes.fromhex(envelope_id), PAYLOAD_INFO)
    aad = _header_digest(head)

    file_digest = _sha256()
    file_digest.update(head)
    out.write(head)
    sink = Stage("dseal-hash-ct", RING - 2)
    write_stage = Stage("dseal-write", RING - 2)
    hasher = Stage("dseal-hash", 4 * RING)
    flusher = Flusher.for_file(out)
    digests: list[str] = []
    try:
        writer = _ChunkWriter(payload_key, aad, sink, hasher, file_digest, out, chunk, write_stage, flusher)
        for entry in entries:
            meta = entry.to_json()
            writer.write(ENTRY_LEN.pack(len(meta)) + meta)
            h = _sha256()
            if entry.data is not None:  # a message: its bytes are in memory
                f = io.BytesIO(entry.data)
            else:
                assert entry.source is not None
                try:
                    f = open(entry.source, "rb")
                except OSError as exc:
                    raise InputError(f"{entry.source}: cannot read ({exc.strerror})") from None
            with f:
                try:
                    writer.copy_from(f, entry.size, h, advance)
                except InputError as exc:
                    raise InputError(f"{entry.source}: {exc}") from None
                except OSError as exc:
                    raise InputError(f"{entry.source}: cannot read ({exc.strerror})") from None
            d = hasher.call(h.finalize)
            digests.append(d.hex())
            writer.write(d)
        writer.write(ENTRY_LEN.pack(0))
        writer.close()
        hasher.close()
        sink.close()
        write_stage.close()
        flusher.close()
    except BaseException:
        hasher.abort()
        sink.abort()
        write_stage.abort()
        flusher.abort()
        raise
    written = [len(head) + writer.written]
    signed = SIG_CONTEXT + file_digest.copy().finalize()
    if mac_key is None:
        assert identity is not None
        trailer = identity.sign(signed)
    else:
        m = hmac.HMAC(mac_key, hashes.SHA256())
        m.update(signed)
        trailer = m.finalize()
    out.write(trailer)
    file_digest.update(trailer)
    return Sealed(envelope_id, file_digest.finalize().hex(), written[0] + len(trailer), list(entries), digests)
