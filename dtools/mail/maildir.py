"""The embedded relay: a real Maildir on a local or shared file system, so one machine needs no server.

Each folder (``dtools/site-b``) is a Maildir with tmp/, new/ and cur/. A message's file name
comes from its Message-ID, so depositing the same message twice keeps one copy.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from ..dicom.archive import fsync_dir
from ..errors import ConfigError, TempFailure
from .message import HEADER_ALLOWANCE, parse_header_fields
from .relay import RelayURL


def _name(message_id: str) -> str:
    return "dtools-" + hashlib.sha256(message_id.encode()).hexdigest()[:40]


class MaildirMailbox:
    append_limit = None

    def __init__(self, url: RelayURL):
        assert url.path is not None
        self.url = url
        self.root = url.path
        self.current: Path | None = None

    # -- folders ------------------------------------------------------------------
    def _dir(self, folder: str, create: bool = True) -> Path:
        parts = [p for p in folder.split("/") if p]
        if any(p in (".", "..") or p.startswith(".") for p in parts):
            raise ConfigError(f"bad relay folder name {folder!r}")
        path = self.root.joinpath(*parts)
        if create:
            try:
                for sub in ("tmp", "new", "cur"):
                    (path / sub).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"{path}: cannot create Maildir ({exc.strerror}); check relay.url") from None
        return path

    def append(self, folder: str, data: bytes | bytearray) -> None:
        head = bytes(data[:HEADER_ALLOWANCE * 4])
        mid = parse_header_fields(head.split(b"\r\n\r\n", 1)[0]).get("message-id", "")
        path = self._dir(folder)
        name = _name(mid) if mid else f"{time.time_ns()}.{os.getpid()}.dtools"
        self._clear_attempts(path, [name])
        if (path / "new" / name).exists() or any((path / "cur").glob(name + ":*")) or (path / "cur" / name).exists():
            return
        tmp = path / "tmp" / f"{name}.{os.getpid()}.{time.time_ns()}"
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path / "new" / name)  # fails if a rerun delivered it already
            except FileExistsError:
                pass
            fsync_dir(path / "new")
        except OSError as exc:
            raise TempFailure(f"{path}: cannot deliver to Maildir ({exc.strerror}); run again when fixed") from None
        finally:
            try:
                tmp.unlink()
            except OSError:
                pass

    @staticmethod
    def _clear_attempts(path: Path, names: list[str]) -> None:
        # Only earlier, killed attempts at these messages use these names; the send lock
        # keeps a second writer of the same message away.
        wanted = set(names)
        for entry in os.scandir(path / "tmp"):
            if entry.name.rsplit(".", 2)[0] in wanted:
                try:
                    os.unlink(entry.path)
                except OSError:
                    pass

    def present(self, folder: str, envelope_id: str, message_ids: list[str]) -> set[str]:
        path = self._dir(folder)
        self._clear_attempts(path, [_name(m) for m in message_ids])
        have = {n.split(":", 1)[0] for sub in ("new", "cur") for n in os.listdir(path / sub)}
        return {m for m in message_ids if _name(m) in have}

    def select(self, folder: str) -> int:
        self.current = self._dir(folder)
        # The Maildir rule: files left in tmp/ for 36 hours are debris of killed writers.
        cutoff = time.time() - 36 * 3600
        for p in (self.current / "tmp").iterdir():
            try:
                if p.stat().st_mtime < cutoff:
                    p.unlink()
            except OSError:
                pass
        return 1

    def _files(self) -> list[Path]:
        assert self.current is not None
        out: list[Path] = []
        for sub in ("new", "cur"):
            d = self.current / sub
            out.extend(d / n for n in sorted(os.listdir(d)) if not n.startswith("."))
        return out

    def list_messages(self) -> list[tuple[str, int, bytes]]:
        result = []
        for p in self._files():
            try:
                with open(p, "rb") as f:
                    head = f.read(HEADER_ALLOWANCE * 4)
                    size = os.fstat(f.fileno()).st_size
            except FileNotFoundError:
                continue
            end = head.find(b"\r\n\r\n")
            if end < 0:
                end = head.find(b"\n\n")
            result.append((f"{p.parent.name}/{p.name}", size, head[:end] if end >= 0 else head))
        return result

    def _path(self, uid: str) -> Path:
        assert self.current is not None
        sub, _, name = uid.partition("/")
        if sub not in ("new", "cur") or not name or "/" in name or name.startswith("."):
            raise ConfigError(f"bad Maildir key {uid!r}")
        return self.current / sub / name

    def fetch(self, uid: str) -> bytes:
        try:
            return self._path(uid).read_bytes()
        except FileNotFoundError:
            raise TempFailure(f"message {uid} vanished from {self.current}; another reader took it. Run again") from None

    def delete(self, uids: list[str]) -> None:
        for uid in uids:
            try:
                self._path(uid).unlink()
            except FileNotFoundError:
                pass
        if self.current is not None:
            fsync_dir(self.current / "new")
            fsync_dir(self.current / "cur")

    def move(self, uids: list[str], folder: str) -> None:
        target = self._dir(folder)
        for uid in uids:
            src = self._path(uid)
            try:
                os.replace(src, target / "cur" / (src.name.split(":", 1)[0] + ":2,S"))
            except FileNotFoundError:
                pass
        fsync_dir(target / "cur")

    def folder_status(self, folder: str) -> tuple[int, int] | None:
        """(messages, bytes) in a folder, None if it does not exist; never creates it."""
        path = self._dir(folder, create=False)
        if not (path / "new").is_dir():
            return None
        n = size = 0
        for sub in ("new", "cur"):
            for entry in os.scandir(path / sub):
                if not entry.name.startswith("."):
                    try:
                        size += entry.stat().st_size
                        n += 1
                    except FileNotFoundError:
                        pass
        return n, size

    def server_info(self) -> dict:
        return {"append_limit": None, "quota": None}

    def wait(self, timeout: float, poll: float | None = None) -> bool:
        """Poll for new files (a Maildir has no IDLE), every ``poll`` seconds (default 0.5)."""
        assert self.current is not None
        before = {p.name for p in self._files()}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(min(poll or 0.5, max(0.0, deadline - time.monotonic())))
            if {p.name for p in self._files()} - before:
                return True
        return False

    def close(self) -> None:
        pass
