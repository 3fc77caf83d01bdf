"""The archive layout ``archive/<Study>/<Series>/<SOP>.dcm`` and crash-safe writes into it.

Every name that arrives in a payload is checked here before it becomes a path.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import IO, Callable, Iterable

from .. import security
from ..errors import InputError

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def check_uid(value: object, what: str = "UID") -> str:
    """A DICOM UID safe to use as a file name: digits and dots, at most 64 characters."""
    if not isinstance(value, str):
        raise InputError(f"{what} is missing")
    uid = value.strip().rstrip("\0").strip()
    if not uid or len(uid) > 64 or not _UID.match(uid):
        raise InputError(f"{what} {value[:80]!r} is not a valid DICOM UID")
    return uid


def archive_path(root: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """Where an instance lives under ``root`` (the home's archive/)."""
    return (
        Path(root)
        / check_uid(study_uid, "StudyInstanceUID")
        / check_uid(series_uid, "SeriesInstanceUID")
        / (check_uid(sop_uid, "SOPInstanceUID") + ".dcm")
    )


def check_relative_name(name: str) -> str:
    """A relative name from a payload: no absolute path, no '..', no empty or odd parts."""
    if not name or "\0" in name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise InputError(f"unsafe name {name[:80]!r} in payload")
    parts = name.replace("\\", "/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise InputError(f"unsafe name {name[:80]!r} in payload")
    return "/".join(parts)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    """Make an already written file durable (its data; see fsync_dir for its name)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: Path) -> bool:
    """syncfs(2) on the file system holding `path`: one journal commit for a whole batch.
    False where it is not available (the caller then fsyncs file by file)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(path, os.O_RDONLY)
        try:
            return libc.syncfs(fd) == 0
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        return False


def pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AtomicFile:
    """A file written to a temporary name beside its target, fsynced, then renamed.

    Use as a context manager; on an exception (or SIGTERM/Ctrl-C) the temporary file is
    removed and the target is untouched. The target's directories are created, and
    must not be symlinks. With ``sync=False`` the caller makes the file and its
    directory durable later (``fsync_path``), e.g. a whole batch at once. The mode is
    the site's (``security.file_mode()``: owner only, or a configured group) unless given.
    """

    def __init__(self, target: Path, mode: int | None = None, sync: bool = True,
                 before_rename: Callable[[], None] | None = None):
        self.target = Path(target)
        self.mode = security.file_mode() if mode is None else mode
        self.sync = sync
        # Runs once the content is durable and before it appears under its name: a ledger
        # commit here means a crash leaves either nothing recorded, or a complete temporary
        # that recover_temporary() can put in place.
        self.before_rename = before_rename
        self.tmp = self.target.parent / f".{self.target.name}.{secrets.token_hex(6)}.tmp"
        self.file: IO[bytes] | None = None

    def __enter__(self) -> IO[bytes]:
        security.makedirs(self.target.parent)
        try:
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), self.mode)
            self.file = os.fdopen(fd, "wb")
        except BaseException:
            # A signal (SIGTERM, Ctrl-C) right after the file was created: __exit__ will not run.
            try:
                self.tmp.unlink()
            except OSError:
                pass
            raise
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.file is not None
        try:
            if exc_type is None:
                self.file.flush()
                if self.sync:
                    os.fsync(self.file.fileno())
            self.file.close()
            if exc_type is None:
                if self.before_rename is not None:
                    self.before_rename()
                os.replace(self.tmp, self.target)
                if self.sync:
                    fsync_dir(self.target.parent)
        finally:
            if self.tmp.exists():
                try:
                    self.tmp.unlink()
                except OSError:
                    pass


def recover_temporary(target: Path) -> bool:
    """Put in place the complete temporary of ``target`` left by a process killed between
    AtomicFile's ``before_rename`` and its rename; False if there is none."""
    target = Path(target)
    if target.exists():
        return True
    try:
        temps = sorted(target.parent.glob(f".{target.name}.*.tmp"), key=lambda p: p.stat().st_mtime)
    except OSError:
        return False
    if not temps:
        return False
    os.replace(temps[-1], target)
    fsync_dir(target.parent)
    return True


def write_atomic(target: Path, data: bytes | Iterable[bytes], mode: int | None = None) -> Path:
    """Write bytes (or an iterable of chunks) to ``target`` atomically and durably."""
    with AtomicFile(target, mode) as f:
        if isinstance(data, (bytes, bytearray, memoryview)):
            f.write(data)
        else:
            for chunk in data:
                f.write(chunk)
    return Path(target)


def clean_stale_temporaries(root: Path) -> int:
    """Remove ``.*.tmp`` files left by a killed process under ``root``; returns how many."""
    n = 0
    if not Path(root).exists():
        return 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.startswith(".") and name.endswith(".tmp"):
                try:
                    os.unlink(os.path.join(dirpath, name))
                    n += 1
                except OSError:
                    pass
    return n
