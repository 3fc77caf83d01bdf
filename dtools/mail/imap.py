"""The IMAP relay (``imaps://`` with verified TLS, ``imap://`` on loopback or with STARTTLS).

Errors become the exit codes of DESIGN: unreachable server 69 (naming the host), refused
login 2 (naming the setting to check), a connection lost midway 75 (a rerun finishes).
"""

from __future__ import annotations

import functools
import imaplib
import re
import socket
import ssl
import time
from typing import Any, Callable

from imapclient import IMAPClient
from imapclient import exceptions as imapexc

from ..errors import ConfigError, RemoteError, TempFailure
from .message import HEADER_FIELDS
from .relay import RelayURL

_FETCH_BATCH = 500
_HEADER_ITEM = "BODY.PEEK[HEADER.FIELDS (" + " ".join(h.upper() for h in HEADER_FIELDS) + ")]"


def _guard(method: Callable) -> Callable:
    """Turn a connection lost midway into TempFailure and a refused command into RemoteError."""

    @functools.wraps(method)
    def wrapper(self: "ImapMailbox", *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (imaplib.IMAP4.abort, imapexc.IMAPClientAbortError, OSError, EOFError) as exc:
            self.broken = True
            raise TempFailure(f"connection to {self.url.host}:{self.url.port} lost ({_why(exc)}); "
                              "run the command again to finish") from None
        except imaplib.IMAP4.error as exc:
            raise RemoteError(f"IMAP server {self.url.host} refused {method.__name__} ({_why(exc)})") from None

    return wrapper


def _why(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, socket.timeout):
        text = "timed out"
    return text.replace("\r", " ").replace("\n", " ")[:200]


_QUOTA = re.compile(rb'^\s*("(?:[^"\\]|\\.)*"|\S+)\s*\((.*)\)\s*$')


def _parse_quota(lines: list) -> list[dict]:
    """RFC 9208 QUOTA responses, as imaplib returns them: root (RESOURCE usage limit ...)."""
    out = []
    for line in lines or []:
        m = _QUOTA.match(line) if isinstance(line, bytes) else None
        if not m:
            continue
        root = m.group(1).strip(b'"').decode("utf-8", "replace")
        words = m.group(2).split()
        for i in range(0, len(words) - 2, 3):
            try:
                out.append({"root": root, "resource": words[i].decode("ascii", "replace"),
                            "usage": int(words[i + 1]), "limit": int(words[i + 2])})
            except ValueError:
                continue
    return out


class ImapMailbox:
    def __init__(self, url: RelayURL, password: str, insecure: bool = False, timeout: float = 60.0):
        self.url = url
        self.broken = False
        self.current: str | None = None
        host, port = url.host or "", url.port or 993
        ctx = ssl.create_default_context()
        if insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        try:
            self.client = IMAPClient(host, port=port, ssl=url.scheme == "imaps", ssl_context=ctx, timeout=timeout)
            if url.scheme == "imap" and not url.loopback:
                if not self.client.has_capability("STARTTLS"):
                    raise RemoteError(f"IMAP server {host}:{port} offers no STARTTLS; use imaps:// in relay.url")
                self.client.starttls(ctx)
        except ssl.SSLCertVerificationError as exc:
            raise RemoteError(
                f"TLS certificate of {host} is not trusted ({exc.verify_message}); install its CA certificate, "
                "or for a test server only pass --insecure-skip-verify") from None
        except (ssl.SSLError, socket.timeout, OSError, imaplib.IMAP4.error, imapexc.IMAPClientError) as exc:
            raise RemoteError(f"cannot reach IMAP server {host}:{port} ({_why(exc)}); "
                              "check relay.url and that the server is up") from None
        try:
            self.client.login(url.user, password)
        except imapexc.LoginError:
            raise ConfigError(
                f"IMAP server {host} refused login for user {url.user}; check relay.password_file "
                "(or DTOOLS_RELAY_PASSWORD) and the user in relay.url") from None
        except (OSError, imaplib.IMAP4.abort) as exc:
            raise RemoteError(f"IMAP server {host}:{port} dropped the connection at login ({_why(exc)})") from None
        caps = self._caps()
        self.literal_plus = b"LITERAL+" in caps
        self.append_limit: int | None = None
        for cap in caps:
            if cap.startswith(b"APPENDLIMIT="):
                try:
                    self.append_limit = int(cap.split(b"=", 1)[1]) or None
                except ValueError:
                    pass
        self.delimiter = self._delimiter()
        self._known: set[str] = set()

    def _caps(self) -> tuple[bytes, ...]:
        try:
            return tuple(self.client.capabilities())
        except (imaplib.IMAP4.error, OSError):
            return ()

    @_guard
    def _delimiter(self) -> str:
        listing = self.client.list_folders("", "")
        if listing and listing[0][1]:
            d = listing[0][1]
            return d.decode() if isinstance(d, bytes) else str(d)
        return "/"

    def _name(self, folder: str) -> str:
        return folder.replace("/", self.delimiter)

    @_guard
    def _ensure(self, folder: str) -> str:
        name = self._name(folder)
        if name in self._known:
            return name
        if not self.client.folder_exists(name):
            try:
                self.client.create_folder(name)
            except imaplib.IMAP4.error:
                if not self.client.folder_exists(name):  # not a race with another site: a real refusal
                    raise
        self._known.add(name)
        return name

    # -- sending ------------------------------------------------------------------
    @_guard
    def append(self, folder: str, data: bytes | bytearray) -> None:
        name = self._ensure(folder)
        if not self.literal_plus:
            self.client.append(name, bytes(data))
            return
        # imaplib's append copies the message twice (CRLF rewrite); ours is CRLF already,
        # so send the literal ourselves, the way IMAPClient sends its own literals.
        imap = self.client._imap
        tag = imap._new_tag()
        quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        imap.send(tag + f" APPEND {quoted} {{{len(data)}+}}\r\n".encode("ascii"))
        view = memoryview(data)
        for start in range(0, len(view), 1 << 20):
            imap.send(view[start:start + (1 << 20)])
        imap.send(b"\r\n")
        typ, resp = imap._command_complete("APPEND", tag)
        if typ != "OK":
            raise RemoteError(f"IMAP server {self.url.host} refused to store a message "
                              f"({_why(Exception(resp))}); check the account's quota and size limit")

    @_guard
    def present(self, folder: str, envelope_id: str, message_ids: list[str]) -> set[str]:
        name = self._ensure(folder)
        self.client.select_folder(name, readonly=True)
        self.current = None
        uids = self.client.search(["HEADER", "X-Dtools-Envelope", envelope_id])
        found: set[str] = set()
        for start in range(0, len(uids), _FETCH_BATCH):
            resp = self.client.fetch(uids[start:start + _FETCH_BATCH], ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"])
            for data in resp.values():
                for key, value in data.items():
                    if key.startswith(b"BODY[HEADER") and value:
                        for line in value.decode("ascii", "replace").splitlines():
                            if line.lower().startswith("message-id:"):
                                found.add(line.split(":", 1)[1].strip())
        return found & set(message_ids)

    # -- receiving ----------------------------------------------------------------
    @_guard
    def select(self, folder: str) -> int:
        name = self._ensure(folder)
        info = self.client.select_folder(name)
        self.current = name
        # Flagged by a run killed before its EXPUNGE; only we flag, and only after storing.
        leftover = self.client.search(["DELETED"])
        if leftover:
            if self.client.has_capability("UIDPLUS"):
                self.client.uid_expunge(leftover)
            else:
                self.client.expunge()
        return int(info.get(b"UIDVALIDITY", 0))

    @_guard
    def list_messages(self) -> list[tuple[str, int, bytes]]:
        uids = self.client.search(["NOT", "DELETED"])
        out = []
        for start in range(0, len(uids), _FETCH_BATCH):
            resp = self.client.fetch(uids[start:start + _FETCH_BATCH], ["RFC822.SIZE", _HEADER_ITEM])
            for uid, data in sorted(resp.items()):
                head = next((v for k, v in data.items() if k.startswith(b"BODY[HEADER")), b"") or b""
                out.append((str(uid), int(data.get(b"RFC822.SIZE", 0)), head))
        return out

    @_guard
    def fetch(self, uid: str) -> bytes:
        resp = self.client.fetch([int(uid)], ["BODY.PEEK[]"])
        data = resp.get(int(uid))
        if not data or data.get(b"BODY[]") is None:
            raise TempFailure(f"message {uid} vanished from {self.current}; another reader took it. Run again")
        return data[b"BODY[]"]

    @_guard
    def delete(self, uids: list[str]) -> None:
        if not uids:
            return
        ids = [int(u) for u in uids]
        self.client.delete_messages(ids)
        if self.client.has_capability("UIDPLUS"):
            self.client.uid_expunge(ids)
        else:
            self.client.expunge()

    @_guard
    def move(self, uids: list[str], folder: str) -> None:
        if not uids:
            return
        name = self._ensure(folder)
        self.client.select_folder(self.current)
        ids = [int(u) for u in uids]
        if self.client.has_capability("MOVE"):
            self.client.move(ids, name)
        else:
            self.client.copy(ids, name)
            self.delete(uids)

    # -- inspection (dstatus --check-relay) ------------------------------------------
    @_guard
    def folder_status(self, folder: str) -> tuple[int, int] | None:
        """(messages, bytes) in a folder, None if it does not exist; never creates it."""
        name = self._name(folder)
        if not self.client.folder_exists(name):
            return None
        if self.client.has_capability("STATUS=SIZE"):
            st = self.client.folder_status(name, ["MESSAGES", "SIZE"])
            return int(st.get(b"MESSAGES", 0)), int(st.get(b"SIZE", 0))
        self.client.select_folder(name, readonly=True)
        self.current = None
        uids = self.client.search("ALL")
        size = 0
        for start in range(0, len(uids), _FETCH_BATCH):
            for data in self.client.fetch(uids[start:start + _FETCH_BATCH], ["RFC822.SIZE"]).values():
                size += int(data.get(b"RFC822.SIZE", 0))
        return len(uids), size

    @_guard
    def server_info(self) -> dict:
        """What the server advertises that bears on the relay: size limit and quota."""
        info: dict = {"append_limit": self.append_limit, "quota": None}
        if self.client.has_capability("QUOTA"):
            # imaplib's GETQUOTAROOT: IMAPClient 3.x/4.x's get_quota_root fails with an
            # IndexError when the server names no quota root (Dovecot without limits).
            typ, data = self.client._imap.getquotaroot("INBOX")
            if typ == "OK" and len(data) > 1:
                info["quota"] = _parse_quota(data[1])
        return info

    @_guard
    def wait(self, timeout: float, poll: float | None = None) -> bool:
        """IMAP IDLE until something arrives or ``timeout`` seconds pass.

        With ``poll``, a NOOP every ``poll`` seconds instead: servers announce new mail to
        an IDLE client after a delay of their own (Dovecot: about half a second), which a
        command waiting seconds for one answer should not pay."""
        if poll is not None:
            deadline = time.monotonic() + timeout
            while True:
                _, responses = self.client.noop()
                if any(len(r) > 1 and r[1] in (b"EXISTS", b"RECENT") for r in responses):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                time.sleep(min(poll, left))
        if not self.client.has_capability("IDLE"):
            time.sleep(min(timeout, 30))
            return True
        self.client.idle()
        try:
            responses = self.client.idle_check(timeout=timeout)
        finally:
            self.client.idle_done()
        return any(len(r) > 1 and r[1] in (b"EXISTS", b"RECENT") for r in responses)

    def close(self) -> None:
        if self.broken:
            try:
                self.client.shutdown()
            except Exception:
                pass
            return
        try:
            self.client.logout()
        except Exception:
            try:
                self.client.shutdown()
            except Exception:
                pass
