"""The dtools envelope format, version 1 (see dtools-envelope(5)): its constants, the clear-text
header, the payload entries, and the key schedule.

What is read and written here never depends on how fast it is done; the streaming
machinery is in dtools.seal.pipeline, sealing and opening in dtools.seal.envelope.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import orjson
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.hpke import AEAD as HPKE_AEAD
from cryptography.hazmat.primitives.hpke import KDF as HPKE_KDF
from cryptography.hazmat.primitives.hpke import KEM as HPKE_KEM
from cryptography.hazmat.primitives.hpke import Suite
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..dicom.archive import check_relative_name, check_uid
from ..errors import InputError
from .keys import check_name

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
MAX_MESSAGE = 1 << 30
MESSAGE_NAME = "message.json"
_KIND = re.compile(r"^[a-z][a-z-]{0,31}$")
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

# -- the payload entries ---------------------------------------------------------------
@dataclass
class Entry:
    """One item in an envelope: a DICOM file (``name`` is its place in the archive layout) or,
    with ``type`` "message", a JSON message of some ``kind`` (a catalog update, a query, an
    answer...), which has no name in any file system."""

    StudyInstanceUID: str
    SeriesInstanceUID: str
    SOPInstanceUID: str
    size: int
    name: str = ""
    source: Path | None = None  # seal side: where the bytes come from
    mtime_ns: int = 0  # seal side: the source's mtime, for the per-peer memory of what was sealed
    type: str = "file"
    kind: str = ""  # messages: what they are
    data: bytes | None = None  # seal side, messages: the bytes themselves

    def __post_init__(self) -> None:
        if not self.name:
            self.name = (MESSAGE_NAME if self.type == "message"
                         else f"{self.StudyInstanceUID}/{self.SeriesInstanceUID}/{self.SOPInstanceUID}.dcm")

    @classmethod
    def message(cls, kind: str, data: bytes) -> "Entry":
        if not _KIND.match(kind):
            raise ValueError(f"bad message kind {kind!r}")
        return cls("", "", "", len(data), type="message", kind=kind, data=data)

    @property
    def is_message(self) -> bool:
        return self.type == "message"

    def to_json(self) -> bytes:
        if self.is_message:
            return orjson.dumps({"type": "message", "kind": self.kind, "name": self.name, "size": self.size},
                                option=orjson.OPT_SORT_KEYS)
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
        size = obj.get("size")
        if kind == "message":
            what = obj.get("kind")
            if not isinstance(what, str) or not _KIND.match(what) or name != MESSAGE_NAME:
                raise InputError("payload message entry has no valid kind or name")
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_MESSAGE:
                raise InputError(f"payload {what} message has an invalid size")
            return cls("", "", "", size, MESSAGE_NAME, type="message", kind=what)
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
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_FILE:
            raise InputError(f"payload entry {name[:80]!r} has an invalid size")
        return cls(study, series, sop, size, name)


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


