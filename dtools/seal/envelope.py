"""Sealing and opening envelopes (see dtools-envelope(5) and dtools.seal.format).

A clear-text header (ids, sender, recipients, version) followed by a STREAM-style chunked
AES-256-GCM ciphertext and a trailer: the sender's Ed25519 signature (or, in passphrase
mode, an HMAC) over the header and the whole ciphertext. Memory stays constant: data moves
in chunks, and hashing runs on a worker thread beside the cipher.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Iterator

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import InputError
from .format import (  # noqa: F401  (the format's names are part of this module's interface)
    AEAD_NAME, ARGON2, CHUNK, ENTRY_LEN, HPKE_SUITE, MAC_INFO, MAC_LEN, MAGIC, MAX_CHUNK, MAX_ENTRY, MAX_FILE,
    MAX_HEADER, MIN_CHUNK, MODE_KEYS, MODE_PASSPHRASE, PAYLOAD_INFO, PRELUDE, SIG_CONTEXT, SIG_LEN, SUFFIX, TAG,
    VERSION, WRAP_INFO, _HEX_ID, Entry, Header, _b64, _header_digest, _hkdf, _nonce, _sha256, _unb64, build_header,
    new_envelope_id, passphrase_key, read_header,
)
from .keys import Identity, PeerKey
from .pipeline import RING, SYNC_DEPTH, Flusher, Ring, Stage, drop_cached, write_all

# -- sealing ---------------------------------------------------------------------------
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



class _PlainReader:
    """Verified plaintext chunks in; exact reads and bounded file streams out.

    ``chunks`` yields (view, release); release() is called once the reader has moved past
    a chunk and handed every slice of it on.
    """

    def __init__(self, chunks: Iterator[tuple[memoryview, Callable[[], None]]]):
        self.chunks = chunks
        self.cur = memoryview(b"")
        self.release: Callable[[], None] | None = None

    def _fill(self) -> bool:
        while not self.cur:
            if self.release is not None:
                self.release()
                self.release = None
            nxt = next(self.chunks, None)
            if nxt is None:
                return False
            self.cur, self.release = nxt
        return True

    def read_exact(self, n: int) -> bytes:
        parts = []
        while n:
            if not self._fill():
                raise InputError("payload ends early (damaged envelope)")
            take = self.cur[:n]
            parts.append(bytes(take))
            self.cur = self.cur[len(take):]
            n -= len(take)
        return b"".join(parts)

    def stream(self, n: int) -> Iterator[memoryview]:
        while n:
            if not self._fill():
                raise InputError("payload ends early (damaged envelope)")
            take = self.cur[:n]
            self.cur = self.cur[len(take):]
            n -= len(take)
            yield take

    def at_end(self) -> bool:
        return not self._fill()


@dataclass
class Opened:
    """A verified envelope: its header and the staged files, ready to move into the archive."""

    header: Header
    sha256: str
    bytes: int
    files: list[tuple[Entry, Path, str]]  # entry, staged temporary, sha256
    peer: str


def find_sender(header: Header, identity: Identity | None, peers: dict[str, PeerKey]) -> PeerKey:
    """The configured peer that sealed a key-mode envelope; InputError if unknown or mismatched."""
    candidates = dict(peers)
    if identity is not None:
        candidates.setdefault(identity.name, identity.public())
    peer = candidates.get(header.sender)
    if peer is None:
        by_fp = [p for p in candidates.values() if p.fingerprint == header.sender_fp]
        if not by_fp:
            raise InputError(
                f"sender {header.sender!r} is not a known peer; add its public identity under "
                f"[peers.{header.sender}] in config.toml if you trust it"
            )
        peer = by_fp[0]
    if peer.fingerprint != header.sender_fp:
        raise InputError(
            f"sender {header.sender!r} does not match the keys configured for peer {peer.name} "
            f"(envelope says {header.sender_fp}, config has {peer.fingerprint}); it may be forged"
        )
    return peer


def open_envelope(f: IO[bytes], size: int, staging: Path, *, identity: Identity | None,
                  peers: dict[str, PeerKey], passphrase: bytes | None = None,
                  advance: Callable[[int], None] = lambda n: None) -> Opened:
    """Verify and decrypt an envelope into ``staging`` (one temporary per file).

    Nothing is trusted until the trailer verifies: the caller moves the files into the
    archive only after this returns. On any error the caller removes ``staging``.
    """
    header = read_header(f)
    eid = bytes.fromhex(header.envelope_id)
    if header.mode == MODE_KEYS:
        if identity is None:
            raise InputError("this site has no identity to open envelopes with; run 'dseal keygen NAME'")
        sender = find_sender(header, identity, peers)
        mine = identity.public().fingerprint
        slot = next((r for r in header.recipients if r["fp"] == mine), None)
        if slot is None:
            names = ", ".join(header.recipient_names)
            raise InputError(f"not sealed for this site ({identity.name}, {mine}); it was sealed for: {names}")
        try:
            content_key = HPKE_SUITE.decrypt(_unb64(slot["wrap"], "wrapped key"), identity.enc_private, WRAP_INFO + eid)
        except (InvalidTag, ValueError):
            raise InputError("cannot unwrap the content key: the envelope is damaged or not for this key") from None
        if len(content_key) != 32:
            raise InputError("wrapped content key has the wrong length")
        trailer_len = SIG_LEN
        peer_name = sender.name
        mac_key = None
    else:
        if passphrase is None:
            raise InputError("envelope is sealed with a passphrase; give --passphrase-file to open it")
        assert header.kdf is not None
        content_key = passphrase_key(passphrase, header.kdf)
        mac_key = _hkdf(content_key, eid, MAC_INFO)
        trailer_len = MAC_LEN
        sender = None
        peer_name = header.sender
    payload_key = _hkdf(content_key, eid, PAYLOAD_INFO)
    aad = _header_digest(header.raw)

    ct_len = size - len(header.raw) - trailer_len
    step = header.chunk + TAG
    if ct_len <= TAG:
        raise InputError("envelope is truncated (no complete ciphertext)")
    n_chunks = -(-ct_len // step)
    last_len = ct_len - (n_chunks - 1) * step
    if last_len <= TAG:
        raise InputError("envelope is truncated or damaged (ciphertext does not end on a chunk)")

    file_digest = _sha256()
    file_digest.update(header.raw)
    aead = AESGCM(payload_key)
    ct_ring = Ring(RING, step)
    pt_ring = Ring(RING, header.chunk)
    ct_stage = Stage("dseal-hash-ct", RING - 2)
    file_stage = Stage("dseal-hash", 4 * RING)  # SHA-256 of each file, then hands on to write_stage
    write_stage = Stage("dseal-write", 4 * RING)
    # fsync waits on the disk, not the CPU: on its own thread it overlaps the writes of the
    # next files instead of stalling the whole pipeline once per file.
    sync_stage = Stage("dseal-sync", SYNC_DEPTH)
    flusher = Flusher(None, sync_stage)

    def chunks() -> Iterator[tuple[memoryview, Callable[[], None]]]:
        for i in range(n_chunks):
            last = i == n_chunks - 1
            want = last_len if last else step
            j, cv = ct_ring.take()
            got = f.readinto(cv[:want])
            if got != want:
                ct_stage.submit(ct_ring.give, j, always=True)
                raise InputError("envelope is truncated (file shrank while reading)")
            ct_stage.submit(file_digest.update, cv[:want])
            k, pv = pt_ring.take()
            try:
                aead.decrypt_into(_nonce(i, last), cv[:want], aad, pv[: want - TAG])
            except InvalidTag:
                pt_ring.give(k)
                if i == 0 and mac_key is not None:
                    raise InputError("cannot decrypt: the passphrase differs or the envelope is damaged") from None
                raise InputError(
                    f"envelope is damaged, truncated or tampered with (chunk {i + 1} of {n_chunks} fails authentication)"
                ) from None
            finally:
                ct_stage.submit(ct_ring.give, j, always=True)
            advance(want)
            yield pv[: want - TAG], (lambda k=k: file_stage.submit(release_pt, k, always=True))

    def release_pt(k: int) -> None:
        write_stage.submit(pt_ring.give, k, always=True)

    def hash_piece(out: IO[bytes], h: hashes.Hash, piece: memoryview) -> None:
        h.update(piece)
        write_stage.submit(write_piece, out, piece)

    def write_piece(out: IO[bytes], piece: memoryview) -> None:
        write_all(out, piece)
        flusher.wrote(len(piece), out.fileno())  # a big file starts its writeback early

    def finish_hash(out: IO[bytes], h: hashes.Hash, expected: bytes, entry: Entry, tmp: Path) -> None:
        digest = h.finalize()
        if digest != expected:
            raise InputError(f"digest of {entry.name} does not match (damaged or forged payload)")
        write_stage.submit(finish_file, out, digest, entry, tmp)

    def finish_file(out: IO[bytes], digest: bytes, entry: Entry, tmp: Path) -> None:
        flusher.reset()
        sync_stage.submit(sync_file, out, digest, entry, tmp)

    def sync_file(out: IO[bytes], digest: bytes, entry: Entry, tmp: Path) -> None:
        out.flush()
        os.fsync(out.fileno())
        drop_cached(out.fileno())
        out.close()
        files.append((entry, tmp, digest.hex()))

    files: list[tuple[Entry, Path, str]] = []
    seen: set[str] = set()
    opened_files: list[IO[bytes]] = []
    try:
        reader = _PlainReader(chunks())
        index = 0
        while True:
            (mlen,) = ENTRY_LEN.unpack(reader.read_exact(ENTRY_LEN.size))
            if mlen == 0:
                break
            if mlen > MAX_ENTRY:
                raise InputError("payload entry header is too long (damaged envelope)")
            entry = Entry.from_json(reader.read_exact(mlen))
            if not entry.is_message:
                if entry.SOPInstanceUID in seen:
                    raise InputError(f"payload holds SOPInstanceUID {entry.SOPInstanceUID} twice")
                seen.add(entry.SOPInstanceUID)
            tmp = staging / f"{index:06d}.part"
            index += 1
            h = _sha256()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
            out = os.fdopen(fd, "wb", buffering=0)
            opened_files.append(out)
            for piece in reader.stream(entry.size):
                file_stage.submit(hash_piece, out, h, piece)
            file_stage.submit(finish_hash, out, h, reader.read_exact(32), entry, tmp)
        if not reader.at_end():
            raise InputError("payload has data after its end marker (damaged envelope)")
        ct_stage.close()
        file_stage.close()
        write_stage.close()
        sync_stage.close()
    except BaseException:
        ct_stage.abort()
        file_stage.abort()
        write_stage.abort()
        sync_stage.abort()
        raise
    finally:
        for out in opened_files:
            if not out.closed:
                out.close()
    trailer = f.read(trailer_len)
    if len(trailer) != trailer_len or f.read(1):
        raise InputError("envelope is truncated or has trailing data")
    signed = SIG_CONTEXT + file_digest.copy().finalize()
    if sender is not None:
        try:
            sender.sign_public.verify(trailer, signed)
        except InvalidSignature:
            raise InputError(f"signature of sender {sender.name} does not verify; the envelope is forged or damaged") from None
    else:
        assert mac_key is not None
        m = hmac.HMAC(mac_key, hashes.SHA256())
        m.update(signed)
        try:
            m.verify(trailer)
        except InvalidSignature:
            raise InputError("passphrase MAC does not verify; the envelope is damaged or the passphrase differs") from None
    file_digest.update(trailer)
    return Opened(header, file_digest.finalize().hex(), size, files, peer_name)
