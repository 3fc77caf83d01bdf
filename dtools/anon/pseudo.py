"""Stable keyed pseudonyms: the same original always maps to the same value under one key.

The key is 32 random bytes in HOME/keys/anon.key (mode 0600, made on first use), or the
bytes of a ``--salt FILE`` for another project. UIDs become ``2.25.`` + a 128-bit keyed
hash (HMAC-SHA256, shaped as a version 8 UUID); patients become ``ANON`` + 16 base32
characters; the per-patient date shift is drawn from the same hash.
"""

from __future__ import annotations

import base64
import hmac
import os
import secrets
import stat
from pathlib import Path

from ..config import Config
from ..errors import ConfigError, UsageError

KEY_FILE = "anon.key"
MIN_KEY_BYTES = 16
MAX_SHIFT_DAYS = 3650  # dates move back by 1 to 3650 days, the same for all of a patient's studies


class Keyring:
    """One key and the pseudonyms it makes."""

    __slots__ = ("key", "key_id")

    def __init__(self, key: bytes):
        if len(key) < MIN_KEY_BYTES:
            raise ValueError("key too short")
        self.key = key
        # names the key in the mapping table without revealing it
        self.key_id = self._mac(b"key-id").hex()[:16]

    def _mac(self, message: bytes) -> bytes:
        return hmac.digest(self.key, message, "sha256")

    def uid(self, original: str) -> str:
        b = bytearray(self._mac(b"uid\0" + original.strip("\0 ").encode("ascii", "replace"))[:16])
        b[6] = (b[6] & 0x0F) | 0x80  # UUID version 8 (custom), so that 2.25 holds a UUID as PS3.5 B.2 asks
        b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
        return "2.25." + str(int.from_bytes(b, "big"))

    def patient(self, identity: str) -> str:
        digest = self._mac(b"patient\0" + identity.encode("utf-8", "surrogateescape"))
        return "ANON" + base64.b32encode(digest[:10]).decode("ascii")

    def shift_days(self, identity: str) -> int:
        digest = self._mac(b"shift\0" + identity.encode("utf-8", "surrogateescape"))
        return 1 + int.from_bytes(digest[:4], "big") % MAX_SHIFT_DAYS


def load_keyring(config: Config, salt_file: str | None, warn=None) -> Keyring:
    """The site's key (created on first use), or the key in ``salt_file``."""
    if salt_file is not None:
        return Keyring(_read_salt(Path(salt_file).expanduser(), warn))
    keys = config.dir("keys")
    path = keys / KEY_FILE
    if not path.exists():
        _create_key(path)
    try:
        text = path.read_text(encoding="ascii").strip()
        key = bytes.fromhex(text)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a danon key ({getattr(exc, 'strerror', None) or exc}); restore it from "
                          "a backup: a new key gives every patient and study new pseudonyms") from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"{path}: the key has only {len(key)} bytes; restore it from a backup")
    return Keyring(key)


def _create_key(path: Path) -> None:
    """Write a new key; when two runs race, both end up with the one that was linked first."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secrets.token_bytes(32).hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create the danon key ({exc.strerror}); check --home") from None
    finally:
        try:
            tmp.unlink()
        except OSError:
            pass


def _read_salt(path: Path, warn) -> bytes:
    try:
        data = path.read_bytes().rstrip(b"\r\n")
        st = path.stat()
    except IsADirectoryError:
        raise UsageError(f"--salt {path}: is a directory; give the file that holds the project's key") from None
    except OSError as exc:
        raise UsageError(f"--salt {path}: cannot read ({exc.strerror})") from None
    if len(data) < MIN_KEY_BYTES:
        raise UsageError(f"--salt {path}: has {len(data)} bytes; a key needs at least {MIN_KEY_BYTES} random "
                         f"bytes (make one with: head -c 32 /dev/urandom > {path}; chmod 600 {path})")
    if warn is not None and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        warn(f"warning: --salt {path} can be read by others; whoever has it can re-create the pseudonyms "
             f"(chmod 600 {path})")
    return data
