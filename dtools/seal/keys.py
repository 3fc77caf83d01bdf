"""Site identities and peers: an X25519 key to open envelopes, an Ed25519 key to sign them.

A site's private keys live in HOME/keys/ (mode 0600); a peer is known only by the one-line
public identity it printed with ``dseal keygen`` and that we pasted into ``[peers.NAME]``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)

from ..config import Config
from ..settings import valid_name
from ..errors import ConfigError, InputError

IDENTITY_TAG = "dtools1"
ENC_KEY_FILE = "x25519.key"
SIGN_KEY_FILE = "ed25519.key"
PUBLIC_FILE = "identity.pub"



def check_name(name: object, what: str = "site name") -> str:
    """A site or peer name: letters, digits, '.', '_', '-'; at most 64 characters."""
    if not valid_name(name):  # the same rule as [site] name and [peers.NAME] in the schema
        raise ConfigError(
            f"{what} {str(name)[:80]!r} is not valid; use letters, digits, '.', '_' or '-' (at most 64)"
        )
    return name


def _raw_public(key: X25519PublicKey | Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint_of(enc_public: X25519PublicKey, sign_public: Ed25519PublicKey) -> str:
    """First 16 bytes of SHA-256 over both raw public keys, as 32 lowercase hex digits."""
    return hashlib.sha256(_raw_public(enc_public) + _raw_public(sign_public)).hexdigest()[:32]


@dataclass
class PeerKey:
    """A peer's public identity."""

    name: str
    enc_public: X25519PublicKey
    sign_public: Ed25519PublicKey
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        self.fingerprint = fingerprint_of(self.enc_public, self.sign_public)

    @property
    def enc_raw(self) -> bytes:
        return _raw_public(self.enc_public)

    @property
    def sign_raw(self) -> bytes:
        return _raw_public(self.sign_public)

    def verify(self, signature: bytes, data: bytes) -> None:
        """Check an Ed25519 signature by this peer; raises InputError if it does not verify."""
        try:
            self.sign_public.verify(signature, data)
        except InvalidSignature:
            raise InputError(f"signature does not verify for peer {self.name}") from None

    def same_keys(self, other: "PeerKey") -> bool:
        return self.enc_raw == other.enc_raw and self.sign_raw == other.sign_raw


@dataclass
class Identity:
    """This site's private identity."""

    name: str
    enc_private: X25519PrivateKey
    sign_private: Ed25519PrivateKey

    def public(self) -> PeerKey:
        return PeerKey(self.name, self.enc_private.public_key(), self.sign_private.public_key())

    def sign(self, data: bytes) -> bytes:
        return self.sign_private.sign(data)


# -- text form of a public identity ------------------------------------------------
def format_public_identity(key: PeerKey) -> str:
    """One line a peer pastes into config.toml: ``dtools1 NAME <x25519-b64> <ed25519-b64>``."""
    enc = base64.b64encode(key.enc_raw).decode("ascii")
    sig = base64.b64encode(key.sign_raw).decode("ascii")
    return f"{IDENTITY_TAG} {key.name} {enc} {sig}"


def parse_public_identity(text: str) -> PeerKey:
    """The PeerKey in a line made by format_public_identity; ConfigError if malformed."""
    if not isinstance(text, str):
        raise ConfigError("public identity must be a string like 'dtools1 NAME <x25519> <ed25519>'")
    parts = text.strip().split()
    if len(parts) != 4 or parts[0] != IDENTITY_TAG:
        raise ConfigError(
            f"malformed public identity {text.strip()[:60]!r}; paste the whole line printed by 'dseal keygen' "
            f"(it starts with '{IDENTITY_TAG} ')"
        )
    name = check_name(parts[1], "name in public identity")
    try:
        enc = base64.b64decode(parts[2], validate=True)
        sig = base64.b64decode(parts[3], validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"public identity of {name}: keys are not valid base64; paste the line again") from None
    if len(enc) != 32 or len(sig) != 32:
        raise ConfigError(f"public identity of {name}: keys must be 32 bytes each; paste the line again")
    try:
        return PeerKey(name, X25519PublicKey.from_public_bytes(enc), Ed25519PublicKey.from_public_bytes(sig))
    except ValueError:
        raise ConfigError(f"public identity of {name}: not a valid public key; paste the line again") from None


# -- files in HOME/keys ------------------------------------------------------------
def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def generate_identity(config: Config, name: str, force: bool = False) -> Identity:
    """Create the site identity in HOME/keys (private keys mode 0600); refuse to overwrite unless force."""
    check_name(name)
    keys = config.dir("keys")
    existing = [p for p in (keys / ENC_KEY_FILE, keys / SIGN_KEY_FILE) if p.exists()]
    if existing and not force:
        raise ConfigError(
            f"{keys}: a site identity exists already; peers know it, so replacing it breaks their "
            "envelopes. Use --force to replace it anyway"
        )
    ident = Identity(name, X25519PrivateKey.generate(), Ed25519PrivateKey.generate())
    pem = serialization.Encoding.PEM
    fmt = serialization.PrivateFormat.PKCS8
    none = serialization.NoEncryption()
    try:
        _write_private(keys / ENC_KEY_FILE, ident.enc_private.private_bytes(pem, fmt, none))
        _write_private(keys / SIGN_KEY_FILE, ident.sign_private.private_bytes(pem, fmt, none))
        _write_private(keys / PUBLIC_FILE, (format_public_identity(ident.public()) + "\n").encode())
        os.chmod(keys / PUBLIC_FILE, 0o644)
    except OSError as exc:
        raise ConfigError(f"{keys}: cannot write keys ({exc.strerror}); check permissions of the home") from None
    return ident


def load_identity(config: Config) -> Identity:
    """This site's identity from HOME/keys; ConfigError if there is none."""
    keys = config.dir("keys", create=False)
    paths = (keys / ENC_KEY_FILE, keys / SIGN_KEY_FILE, keys / PUBLIC_FILE)
    if not all(p.exists() for p in paths):
        raise ConfigError(f"no site identity in {keys}; run 'dseal keygen NAME'")
    try:
        enc = serialization.load_pem_private_key(paths[0].read_bytes(), password=None)
        sig = serialization.load_pem_private_key(paths[1].read_bytes(), password=None)
        public = parse_public_identity(paths[2].read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{keys}: cannot read site keys ({exc.strerror}); check permissions") from None
    except (ValueError, TypeError):
        raise ConfigError(f"{keys}: site keys are damaged; restore them from backup or run 'dseal keygen --force NAME'") from None
    if not isinstance(enc, X25519PrivateKey) or not isinstance(sig, Ed25519PrivateKey):
        raise ConfigError(f"{keys}: site keys are of the wrong type; run 'dseal keygen --force NAME'")
    ident = Identity(public.name, enc, sig)
    if not ident.public().same_keys(public):
        raise ConfigError(f"{keys}/{PUBLIC_FILE} does not match the private keys; run 'dseal keygen --force NAME'")
    return ident


def load_peers(config: Config) -> dict[str, PeerKey]:
    """Known peers from config.toml ``[peers.NAME] identity = "<line>"``, keyed by NAME.

    A [peers.NAME] table without ``identity`` (a passphrase-only peer) is left out.
    """
    peers: dict[str, PeerKey] = {}
    for name, section in config.section("peers").items():
        if not isinstance(section, dict):
            raise ConfigError(f"peers.{name} in {config.path} must be a [peers.{name}] table")
        if "identity" not in section:
            continue  # a peer reached by passphrase only, or configured for mail so far
        check_name(name, "peer name")
        try:
            key = parse_public_identity(section["identity"])
        except ConfigError as exc:
            raise ConfigError(f"[peers.{name}] in {config.path}: {exc}") from None
        # The local name is the one the user chose in config.toml.
        peers[name] = PeerKey(name, key.enc_public, key.sign_public)
    return peers
