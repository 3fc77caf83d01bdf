"""The dtools envelope format, version 1 (see dtools-envelope(5)): writing and reading.

A clear-text header (ids, sender, recipients, version) followed by a STREAM-style chunked
AES-256-GCM ciphertext and a trailer: the sender's Ed25519 signature (or, in passphrase
mode, an HMAC) over the header and the whole ciphertext. Memory stays constant: data moves
in chunks, and hashing runs on a worker thread beside the cipher.
"""

from __future__ import annotations

import base64
import binascii
import os
import queue
import re
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Iterator

import orjson
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hpke import AEAD as HPKE_AEAD
from cryptography.hazmat.primitives.hpke import KDF as HPKE_KDF
from cryptography.hazmat.primitives.hpke import KEM as HPKE_KEM
from cryptography.hazmat.primitives.hpke import Suite
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..dicom.archive import check_relative_name, check_uid
from ..errors import InputError
from .keys import Identity, PeerKey, check_name

MAGIC = b"DTENV\x00"
VERSION = 1
PRELUDE = struct.Struct(">6sBBI")  # magic, version, reserved (0), header length
MAX_HEADER = 64 * 1024
CHUNK = 1 << 20  # plaintext bytes per chunk
TAG = 16
MIN_CHUNK, MAX_CHUNK = 1 << 12, 1 << 24
SIG_LEN = 64  # Ed25519
MAC_LEN = 32  # HMAC-SHA256
MODE_KEYS = "x25519"
MODE_PASSPHRASE = "passphrase"
AEAD_NAME = "AES-256-GCM"
SUFFIX = ".dtenv"

WRAP_INFO = b"dtools-envelope v1 wrap "
PAYLOAD_INFO = b"dtools-envelope v1 payload key"
MAC_INFO = b"dtools-envelope v1 mac key"
SIG_CONTEXT = b"dtools-envelope v1 signature\x00"
HPKE_SUITE = Suite(HPKE_KEM.X25519, HPKE_KDF.HKDF_SHA256, HPKE_AEAD.CHACHA20_POLY1305)

# Argon2id, RFC 9106 second recommended option (64 MiB, 3 passes, 4 lanes).
ARGON2 = {"alg": "argon2id", "t": 3, "m": 65536, "p": 4}
_ARGON2_LIMITS = {"t": (1, 16), "m": (8192, 1 << 20), "p": (1, 16)}

ENTRY_LEN = struct.Struct(">I")
MAX_ENTRY = 64 * 1024
MAX_FILE = 1 << 42
_HEX_ID = re.compile(r"^[0-9a-f]{32}$")
_FP = re.compile(r"^[0-9a-f]{32}$")


def new_envelope_id() -> str:
    return os.urandom(16).hex()


def _sha256() -> hashes.Hash:
    return hashes.Hash(hashes.SHA256())


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise InputError(f"envelope header: {what} is missing")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"envelope header: {what} is not valid base64") from None


def _hkdf(key: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(key)


def passphrase_key(passphrase: bytes, kdf: dict) -> bytes:
    """The 32-byte master key of a passphrase envelope (Argon2id with the header's salt)."""
    salt = _unb64(kdf.get("salt"), "kdf salt")
    return Argon2id(salt=salt, length=32, iterations=kdf["t"], lanes=kdf["p"], memory_cost=kdf["m"]).derive(passphrase)


def _nonce(counter: int, last: bool) -> bytes:
    # STREAM (Hoang, Reyhanitabar, Rogaway, Vizár): 88-bit big-endian counter, then the last-chunk flag.
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


class _Stage:
    """A worker thread that runs submitted calls in order (hashing, writing).

    SHA-256 and file writes release the GIL, so a stage runs beside AES on another core.
    The queue is bounded, so memory stays constant. After a failure the stage still runs
    the calls marked ``always`` (buffer releases), so the main thread never waits forever.
    """

    _STOP = object()

    def __init__(self, name: str, depth: int = 8):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is self._STOP:
                return
            fn, args, always = item
            if self.error is not None and not always:
                continue
            try:
                fn(*args)
            except BaseException as exc:  # handed to the main thread at the next submit/close
                if self.error is None:
                    self.error = exc

    def submit(self, fn: Callable, *args, always: bool = False) -> None:
        if self.error is not None and not always:
            raise self.error
        self.q.put((fn, args, always))

    def call(self, fn: Callable):
        """Run ``fn`` after everything submitted so far and return its result."""
        done = threading.Event()
        box: list = []
        self.submit(lambda: box.append(fn()))
        self.submit(done.set, always=True)
        done.wait()
        if self.error is not None:
            raise self.error
        return box[0]

    def close(self) -> None:
        self.q.put(self._STOP)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def abort(self, wait: float = 2.0) -> None:
        """Stop after the current call. Waits at most ``wait`` seconds: an fsync stuck behind
        other processes' writes must not hold up Ctrl-C or SIGTERM. A call still running
        touches only its own open file, which the caller's cleanup unlinks."""
        if self.thread.is_alive():
            self.error = self.error or InputError("aborted")
            try:  # drop what is queued so the stop marker fits
                while True:
                    self.q.get_nowait()
            except queue.Empty:
                pass
            try:
                self.q.put(self._STOP, timeout=wait)
            except queue.Full:
                return
            self.thread.join(wait)


def _write_all(out: IO[bytes], view: memoryview) -> None:
    while view:  # an unbuffered write may be partial
        n = out.write(view)
        view = view[n:]


class _Ring:
    """Reusable chunk buffers. Fresh 1 MiB allocations cost page faults on every chunk;
    a buffer returns to the ring only when the stage that reads it is done with it."""

    def __init__(self, count: int, size: int):
        self.bufs = [bytearray(size) for _ in range(count)]
        self.views = [memoryview(b) for b in self.bufs]
        self.free: queue.Queue = queue.Queue()
        for i in range(count):
            self.free.put(i)

    def take(self) -> tuple[int, memoryview]:
        i = self.free.get()
        return i, self.views[i]

    def give(self, i: int) -> None:
        self.free.put(i)


RING = 6  # buffers per ring: stage queue depth and what is in flight
SYNC_DEPTH = 16  # written files (open descriptors, no buffers) waiting for their fsync
FLUSH_EVERY = 32 << 20  # bytes written to a file between two early writebacks


class _Flusher:
    """Early writeback of a file being written, so that its final fsync finds little left.

    Writing 1 GiB and then calling fsync waits for the whole writeback at the end; a
    ``fdatasync`` every FLUSH_EVERY bytes, on its own thread, lets the disk work while the
    CPU encrypts and hashes. It never replaces the final fsync: it only makes it short.
    ``wrote`` is called by one thread only; at most one writeback waits behind the running one.
    """

    def __init__(self, fd: int | None, stage: _Stage | None = None, every: int | None = None):
        self.fd = fd
        self.own = stage is None and fd is not None
        self.stage = _Stage("dseal-flush", 2) if self.own else stage
        self.every = FLUSH_EVERY if every is None else every
        self.pending = 0

    @classmethod
    def for_file(cls, out: IO[bytes]) -> "_Flusher":
        try:
            fd = out.fileno()
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
            fd = None
        return cls(fd)

    def wrote(self, n: int, fd: int | None = None) -> None:
        fd = self.fd if fd is None else fd
        if self.stage is None or fd is None:
            return
        self.pending += n
        if self.pending >= self.every and self.stage.q.empty():
            self.pending = 0
            self.stage.submit(_early_writeback, fd)

    def reset(self) -> None:
        self.pending = 0

    def close(self) -> None:
        if self.own and self.stage is not None:
            self.stage.close()

    def abort(self) -> None:
        if self.own and self.stage is not None:
            self.stage.abort()


def _drop_cached(fd: int) -> None:
    """Let the kernel drop the (clean, fsynced) cached pages of a file just written.

    An archive receives studies for keeping, not for reading right away: without this a
    1 GiB envelope pushes 1 GiB of other cached data out, and every page of it is a fresh
    allocation. Dropped pages go straight back to the next files. Advice only: any
    failure is ignored.
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        try:
            advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def _early_writeback(fd: int) -> None:
    getattr(os, "fdatasync", os.fsync)(fd)


# -- the payload entries ---------------------------------------------------------------
@dataclass
class Entry:
    """One file in an envelope; ``name`` is its place in the archive layout."""

    StudyInstanceUID: str
    SeriesInstanceUID: str
    SOPInstanceUID: str
    size: int
    name: str = ""
    source: Path | None = None  # seal side: where the bytes come from
    mtime_ns: int = 0  # seal side: the source's mtime, for the per-peer memory of what was sealed

    def __post_init__(self) -> None:
        if not self.name:
            self.name = f"{self.StudyInstanceUID}/{self.SeriesInstanceUID}/{self.SOPInstanceUID}.dcm"

    def to_json(self) -> bytes:
        return orjson.dumps({
            "type": "file",
            "name": self.name,
            "size": self.size,
            "StudyInstanceUID": self.StudyInstanceUID,
            "SeriesInstanceUID": self.SeriesInstanceUID,
            "SOPInstanceUID": self.SOPInstanceUID,
        }, option=orjson.OPT_SORT_KEYS)

    @classmethod
    def from_json(cls, raw: bytes) -> "Entry":
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise InputError("payload entry is not valid JSON") from None
        if not isinstance(obj, dict):
            raise InputError("payload entry is not a JSON object")
        kind = obj.get("type")
        name = obj.get("name")
        if kind in ("link", "symlink", "hardlink"):
            raise InputError(f"payload entry {str(name)[:80]!r} is a link; links are not accepted")
        if kind != "file":
            raise InputError(f"payload entry {str(name)[:80]!r} has unknown type {str(kind)[:20]!r}")
        if not isinstance(name, str):
            raise InputError("payload entry has no name")
        name = check_relative_name(name)
        study = check_uid(obj.get("StudyInstanceUID"), "StudyInstanceUID")
        series = check_uid(obj.get("SeriesInstanceUID"), "SeriesInstanceUID")
        sop = check_uid(obj.get("SOPInstanceUID"), "SOPInstanceUID")
        if name != f"{study}/{series}/{sop}.dcm":
            raise InputError(f"payload entry name {name[:80]!r} does not match its UIDs")
        size = obj.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_FILE:
            raise InputError(f"payload entry {name[:80]!r} has an invalid size")
        return cls(study, series, sop, size, name)


# -- sealing ---------------------------------------------------------------------------
class _ChunkWriter:
    """Plaintext in, STREAM chunks out; a full chunk is held back until more data proves it is not last.

    Plaintext hashing runs on ``hasher``, ciphertext hashing on ``sink`` and writing on
    ``writer``, each on its own thread: three streams of work beside AES on the main thread.
    """

    def __init__(self, key: bytes, aad: bytes, sink: _Stage, hasher: _Stage, digest: hashes.Hash,
                 out: IO[bytes], chunk: int = CHUNK, writer: _Stage | None = None,
                 flusher: _Flusher | None = None):
        self.aead = AESGCM(key)
        self.flusher = flusher
        self.aad = aad
        self.sink = sink
        self.writer = writer
        self.hasher = hasher
        self.digest = digest
        self.out = out
        self.chunk = chunk
        self.plain = _Ring(RING, chunk)
        self.cipher = _Ring(RING, chunk + TAG)
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


def build_header(envelope_id: str, sender: str, recipients: list[str], *, mode: str,
                 from_fp: str | None = None, wraps: list[dict] | None = None, kdf: dict | None = None,
                 chunk: int = CHUNK) -> bytes:
    header: dict = {"v": VERSION, "id": envelope_id, "mode": mode, "aead": AEAD_NAME, "chunk": chunk,
                    "from": sender}
    if mode == MODE_KEYS:
        header["from_fp"] = from_fp
        header["to"] = wraps
    else:
        header["to"] = [{"name": n} for n in recipients]
        header["kdf"] = kdf
    body = orjson.dumps(header, option=orjson.OPT_SORT_KEYS)
    return PRELUDE.pack(MAGIC, VERSION, 0, len(body)) + body


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
    sink = _Stage("dseal-hash-ct", RING - 2)
    write_stage = _Stage("dseal-write", RING - 2)
    hasher = _Stage("dseal-hash", 4 * RING)
    flusher = _Flusher.for_file(out)
    digests: list[str] = []
    try:
        writer = _ChunkWriter(payload_key, aad, sink, hasher, file_digest, out, chunk, write_stage, flusher)
        for entry in entries:
            meta = entry.to_json()
            writer.write(ENTRY_LEN.pack(len(meta)) + meta)
            h = _sha256()
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


def _header_digest(head: bytes) -> bytes:
    h = _sha256()
    h.update(head)
    return h.finalize()


# -- reading -----------------------------------------------------------------------------
@dataclass
class Header:
    raw: bytes
    envelope_id: str
    mode: str
    sender: str
    sender_fp: str | None
    recipients: list[dict]
    chunk: int
    kdf: dict | None

    @property
    def recipient_names(self) -> list[str]:
        return [r["name"] for r in self.recipients]


def read_header(f: IO[bytes]) -> Header:
    """Parse and check the clear-text header; raises InputError for anything else."""
    pre = f.read(PRELUDE.size)
    if len(pre) < PRELUDE.size or pre[:6] != MAGIC:
        raise InputError("not a dtools envelope (bad magic)")
    _magic, version, reserved, hlen = PRELUDE.unpack(pre)
    if version != VERSION:
        raise InputError(f"envelope format version {version} is not supported by this dtools; upgrade dtools")
    if reserved != 0 or not 2 <= hlen <= MAX_HEADER:
        raise InputError("envelope header is damaged")
    body = f.read(hlen)
    if len(body) != hlen:
        raise InputError("envelope is truncated inside its header")
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InputError("envelope header is damaged (not JSON)") from None
    if not isinstance(obj, dict):
        raise InputError("envelope header is damaged")
    if obj.get("v") != VERSION:
        raise InputError("envelope header version does not match its prelude")
    eid = obj.get("id")
    if not isinstance(eid, str) or not _HEX_ID.match(eid):
        raise InputError("envelope header has no valid envelope id")
    if obj.get("aead") != AEAD_NAME:
        raise InputError(f"envelope uses cipher {str(obj.get('aead'))[:20]!r}, which this dtools does not know")
    chunk = obj.get("chunk")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or not MIN_CHUNK <= chunk <= MAX_CHUNK:
        raise InputError("envelope header has an invalid chunk size")
    mode = obj.get("mode")
    try:
        sender = check_name(obj.get("from"), "sender")
    except Exception:
        raise InputError("envelope header has no valid sender") from None
    to = obj.get("to")
    if not isinstance(to, list) or not to or len(to) > 1000 or not all(isinstance(r, dict) for r in to):
        raise InputError("envelope header has no valid recipient list")
    for r in to:
        try:
            check_name(r.get("name"), "recipient")
        except Exception:
            raise InputError("envelope header has an invalid recipient name") from None
    kdf = None
    fp = None
    if mode == MODE_KEYS:
        fp = obj.get("from_fp")
        if not isinstance(fp, str) or not _FP.match(fp):
            raise InputError("envelope header has no valid sender fingerprint")
        for r in to:
            if not isinstance(r.get("fp"), str) or not _FP.match(r["fp"]) or not isinstance(r.get("wrap"), str):
                raise InputError("envelope header has an invalid recipient entry")
    elif mode == MODE_PASSPHRASE:
        kdf = obj.get("kdf")
        if not isinstance(kdf, dict) or kdf.get("alg") != "argon2id":
            raise InputError("envelope header has an unknown key derivation")
        for k, (lo, hi) in _ARGON2_LIMITS.items():
            v = kdf.get(k)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise InputError("envelope header has out-of-range key derivation parameters")
        if len(_unb64(kdf.get("salt"), "kdf salt")) < 16:
            raise InputError("envelope header has a short key derivation salt")
    else:
        raise InputError(f"envelope header has unknown mode {str(mode)[:20]!r}")
    return Header(pre + body, eid, mode, sender, fp, to, chunk, kdf)


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
    ct_ring = _Ring(RING, step)
    pt_ring = _Ring(RING, header.chunk)
    ct_stage = _Stage("dseal-hash-ct", RING - 2)
    file_stage = _Stage("dseal-hash", 4 * RING)  # SHA-256 of each file, then hands on to write_stage
    write_stage = _Stage("dseal-write", 4 * RING)
    # fsync waits on the disk, not the CPU: on its own thread it overlaps the writes of the
    # next files instead of stalling the whole pipeline once per file.
    sync_stage = _Stage("dseal-sync", SYNC_DEPTH)
    flusher = _Flusher(None, sync_stage)

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
        _write_all(out, piece)
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
        _drop_cached(out.fileno())
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
