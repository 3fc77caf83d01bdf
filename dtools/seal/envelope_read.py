"""Opening an envelope (dtools-envelope(5)): verify the sender, decrypt, stage the files.

Nothing is trusted until the trailer verifies. dtools.seal.envelope is the interface;
this is its reading half.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import InputError
from .format import (
    ENTRY_LEN, HPKE_SUITE, MAC_INFO, MAC_LEN, MAX_ENTRY, MODE_KEYS, PAYLOAD_INFO, SIG_CONTEXT, SIG_LEN, TAG,
    WRAP_INFO, Entry, Header, _header_digest, _hkdf, _nonce, _sha256, _unb64, passphrase_key, read_header,
)
from .keys import Identity, PeerKey
from .pipeline import RING, SYNC_DEPTH, Flusher, Ring, Stage, drop_cached, write_all


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
