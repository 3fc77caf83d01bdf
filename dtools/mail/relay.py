"""Relay addresses (``imaps://``, ``imap://``, ``maildir:``) and opening the mailbox they name.

Layout on the relay: one folder per addressee site under a base folder, ``dtools/site-b``.
The password comes from ``relay.password_file`` or ``DTOOLS_RELAY_PASSWORD``, never from argv.
"""

from __future__ import annotations

import ipaddress
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..config import Config
from ..errors import ConfigError, UsageError

DEFAULT_BASE = "dtools"


@dataclass(frozen=True)
class RelayURL:
    scheme: str  # imaps, imap or maildir
    base: str  # folder prefix; an addressee's folder is BASE/SITE
    user: str | None = None
    host: str | None = None
    port: int | None = None
    path: Path | None = None  # maildir root

    @property
    def display(self) -> str:
        """The address without any secret, for messages and records."""
        if self.scheme == "maildir":
            return f"maildir:{self.path}"
        user = urllib.parse.quote(self.user or "", safe="") + "@" if self.user else ""
        return f"{self.scheme}://{user}{self.host}:{self.port}/{self.base}"

    @property
    def loopback(self) -> bool:
        if not self.host:
            return False
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False

    def folder(self, site: str) -> str:
        return f"{self.base}/{site}" if self.base else site


def parse_url(text: str, home: Path | None = None) -> RelayURL:
    """Parse a relay address; UsageError says what a valid one looks like."""
    hint = "use imaps://USER@HOST[:PORT]/FOLDER, imap://USER@HOST[:PORT]/FOLDER or maildir:/PATH"
    text = (text or "").strip()
    if text.startswith("maildir:"):
        rest = text[len("maildir:"):]
        if rest.startswith("//"):
            rest = rest[2:]
        if not rest:
            raise UsageError(f"relay {text!r} has no path; {hint}")
        path = Path(rest).expanduser()
        if not path.is_absolute():
            path = (home or Path.cwd()) / path
        return RelayURL("maildir", DEFAULT_BASE, path=path)
    u = urllib.parse.urlsplit(text)
    if u.scheme not in ("imaps", "imap"):
        raise UsageError(f"relay {text!r}: unknown scheme {u.scheme or '(none)'!r}; {hint}")
    if u.password is not None:
        raise UsageError("relay address must not hold the password; put it in the file named by "
                         "relay.password_file or in DTOOLS_RELAY_PASSWORD")
    if not u.hostname:
        raise UsageError(f"relay {text!r} has no host; {hint}")
    if not u.username:
        raise UsageError(f"relay {text!r} has no user; {hint}")
    try:
        port = u.port or (993 if u.scheme == "imaps" else 143)
    except ValueError:
        raise UsageError(f"relay {text!r} has a bad port; {hint}") from None
    base = urllib.parse.unquote(u.path.strip("/")) or DEFAULT_BASE
    if any(p in ("", ".", "..") for p in base.split("/")) or any(c in base for c in '*%"\\\r\n'):
        raise UsageError(f"relay {text!r}: bad folder name {base!r}")
    return RelayURL(u.scheme, base, user=urllib.parse.unquote(u.username), host=u.hostname, port=port)


class Mailbox(Protocol):
    url: RelayURL
    append_limit: int | None

    def append(self, folder: str, data: bytes | bytearray) -> None: ...
    def present(self, folder: str, envelope_id: str, message_ids: list[str]) -> set[str]: ...
    def select(self, folder: str) -> int: ...
    def list_messages(self) -> list[tuple[str, int, bytes]]: ...
    def fetch(self, uid: str) -> bytes: ...
    def delete(self, uids: list[str]) -> None: ...
    def move(self, uids: list[str], folder: str) -> None: ...
    def wait(self, timeout: float, poll: float | None = None) -> bool: ...
    def folder_status(self, folder: str) -> tuple[int, int] | None: ...
    def server_info(self) -> dict: ...
    def close(self) -> None: ...


def relay_for(config: Config, flag: str | None = None, peer: str | None = None) -> tuple[RelayURL, str]:
    """The relay address to use and the setting key of its password.

    A peer may have its own account (``[peers.NAME] relay = URL``); otherwise every site
    shares ``relay.url``. With nothing configured the relay is a Maildir in the home.
    """
    if flag:
        return parse_url(flag, config.home), "relay.password"
    if peer:
        peer_url = config.file_value(f"peers.{peer}.relay")
        if peer_url:
            return parse_url(str(peer_url), config.home), f"peers.{peer}.relay_password"
    url = config.get("relay.url")
    if not url:
        return RelayURL("maildir", DEFAULT_BASE, path=config.home / "relay"), "relay.password"
    return parse_url(str(url), config.home), "relay.password"


def open_mailbox(config: Config, url: RelayURL, password_key: str = "relay.password",
                 insecure: bool = False) -> Mailbox:
    if url.scheme == "maildir":
        from .maildir import MaildirMailbox

        return MaildirMailbox(url)
    from .imap import ImapMailbox

    password = config.secret(password_key)
    if password is None:
        env = "DTOOLS_" + password_key.upper().replace(".", "_").replace("-", "_")
        raise ConfigError(f"no password for relay user {url.user}; set {password_key}_file in config.toml "
                          f"or {env}")
    timeout = config.get("relay.timeout", 60.0, type=float)
    if insecure or _truthy(config.get("relay.insecure", False)):
        _warn_insecure(config, url, insecure)
        insecure = True
    return ImapMailbox(url, password, insecure=insecure, timeout=timeout)


def _warn_insecure(config: Config, url: RelayURL, flag: bool) -> None:
    """On every run, -q or not: verification off is fine for a test server and a hazard anywhere else."""
    from ..security import warn_once

    if flag:
        how = "--insecure-skip-verify"
    elif os.environ.get("DTOOLS_RELAY_INSECURE"):
        how = "DTOOLS_RELAY_INSECURE"
    else:
        how = f"relay.insecure in {config.path}"
    warn_once(f"insecure:{url.display}", f"warning: TLS certificate checks are OFF for {url.display} ({how}); "
              "anyone on the network path can read the relay password and impersonate the server. "
              "Use it only with a test server")


def _truthy(value: object) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")
