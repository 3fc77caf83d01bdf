"""Who may read a site's files, and the security warnings that -q does not hide.

Patient data at rest (archive, index, envelopes, ledgers, spool) is readable by the
owner only, or also by one group named by ``[site] group``. Every command sets the
process umask from this policy when it starts, so whatever creates a file (SQLite's
-wal and -shm, a library's temporary) gets at most these bits, whatever the user's
umask; code that creates files passes ``file_mode()`` and ``dir_mode()`` as well, so
the library used without the command layer is safe too. With a group, directories are
setgid, so what is created in them inherits the group.
"""

from __future__ import annotations

import grp
import logging
import os
import stat
from pathlib import Path

from .errors import ConfigError

# Security warnings go through their own logger, whose level -q does not raise.
warnings_log = logging.getLogger("dtools.security")

_gid: int | None = None
_group_name: str | None = None
_warned: set[str] = set()


def file_mode() -> int:
    return 0o640 if _gid is not None else 0o600


def dir_mode() -> int:
    return 0o2750 if _gid is not None else 0o700


def umask() -> int:
    return 0o027 if _gid is not None else 0o077


def start() -> int:
    """Owner-only until the config names a group; returns the umask to restore at the end."""
    global _gid, _group_name
    _gid = _group_name = None
    _warned.clear()
    return os.umask(umask())


def end(old_umask: int) -> None:
    global _gid, _group_name
    _gid = _group_name = None
    os.umask(old_umask)


def set_group(name: object, where: str) -> None:
    """Share patient data with group ``name`` (``[site] group``); None keeps it owner-only."""
    global _gid, _group_name
    if name is None or name == "":
        _gid = _group_name = None
        os.umask(umask())
        return
    name = str(name)
    try:
        gid = grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            gid = int(name)
        else:
            raise ConfigError(f"[site] group {name!r}: no such group; create it (groupadd {name}) or fix {where}") from None
    if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
        raise ConfigError(f"[site] group {name!r}: this user is not a member, so cannot give files to it; "
                          f"add the user to the group (usermod -aG {name} $USER) or fix {where}")
    _gid, _group_name = gid, name
    os.umask(umask())


def group_name() -> str | None:
    return _group_name


# -- directories and files ----------------------------------------------------------------
def makedirs(path: str | os.PathLike) -> None:
    """Create ``path`` and its missing parents with the directory mode of the policy."""
    path = Path(path)
    missing = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, dir_mode() & 0o777)
        except FileExistsError:
            continue
        if _gid is not None:
            _apply_group(d, is_dir=True)


def _apply_group(path: Path, is_dir: bool) -> None:
    assert _gid is not None
    st = os.lstat(path)
    if st.st_gid != _gid:
        os.chown(path, -1, _gid, follow_symlinks=False)
    want = (dir_mode() if is_dir else file_mode()) | (stat.S_IMODE(st.st_mode) & 0o700)
    if stat.S_IMODE(st.st_mode) != want:
        os.chmod(path, want)


def tighten(path: str | os.PathLike, is_dir: bool, *, private: bool = False, follow: bool = False) -> str | None:
    """Bring an existing file or directory to the policy: no bits for others, and group
    bits only for the configured group. Returns a notice of what changed, or None.
    ``private`` (keys) stays owner-only even with a group. A link is left alone unless
    ``follow`` (the home itself, which the admin named).

    Raises OSError when the change is not allowed (not the owner)."""
    path = Path(path)
    try:
        st = os.stat(path, follow_symlinks=follow)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return None
    old = stat.S_IMODE(st.st_mode)
    group = _gid is not None and not private
    if group:
        new = (old & ~0o027 & ~0o7000) | (0o050 if is_dir else 0o040) | (0o2000 if is_dir else 0)
        new |= old & 0o1000  # a sticky bit someone set stays
    else:
        new = old & ~0o077 & ~0o2000
    changed = []
    if group and st.st_gid != _gid:
        os.chown(path, -1, _gid, follow_symlinks=follow)
        changed.append(f"group to {_group_name}")
    if new != old:
        os.chmod(path, new)
        changed.append(f"mode {old:04o} to {new:04o}")
    return f"{path}: changed {' and '.join(changed)}" if changed else None


def secure_home(home: Path, index: Path | None, log: logging.Logger) -> None:
    """Tighten an existing home, its directories and the index files to the policy.

    Files inside stay as they are: with the home closed to others they are out of their
    reach. A change is a notice; one that is not allowed is a warning (it survives -q)."""
    if not home.is_dir():
        return
    items: list[tuple[Path, bool, bool]] = [(home, True, False)]
    for name in ("archive", "outbox", "inbox", "spool", "relay"):
        items.append((home / name, True, False))
    items.append((home / "keys", True, True))
    if index is not None:
        for suffix in ("", "-wal", "-shm"):
            items.append((Path(f"{index}{suffix}"), False, False))
    for path, is_dir, private in items:
        try:
            notice = tighten(path, is_dir, private=private, follow=path == home)
        except OSError as exc:
            if private or _gid is None:
                want, fix = "owner only", f"chmod {'700' if is_dir else '600'} {path}"
            else:
                want = f"owner and group {_group_name}"
                fix = f"chgrp {_group_name} {path} && chmod {'2750' if is_dir else '640'} {path}"
            warn_once(str(path), f"warning: {path} holds patient data but is not {want}, and could not be "
                                 f"changed ({exc.strerror}); run: {fix}")
            continue
        if notice:
            log.warning("%s (patient data is readable by the owner%s only)", notice,
                        f" and group {_group_name}" if _gid is not None and not private else "")


def create_file(path: str | os.PathLike) -> None:
    """Create an empty file with the policy's mode unless it exists (an SQLite database
    before SQLite creates it with 0644 less the umask; its -wal and -shm copy this mode)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_CLOEXEC", 0), file_mode())
    except FileExistsError:
        return
    try:
        if _gid is not None:
            os.fchown(fd, -1, _gid)
        os.fchmod(fd, file_mode())
    finally:
        os.close(fd)


def secure_file(path: str | os.PathLike) -> None:
    """A file created outside a setgid directory of the home (an index elsewhere) still
    goes to the configured group; with no group this only strips bits for others."""
    try:
        tighten(path, False)
    except OSError:
        pass


# -- secrets and other warnings -----------------------------------------------------------
def warn_once(key: str, message: str) -> None:
    """A security warning, once per run for ``key``, even with -q."""
    if key in _warned:
        return
    _warned.add(key)
    warnings_log.warning("%s", message)


def check_secret_file(path: str | os.PathLike, st: os.stat_result, what: str) -> None:
    """Warn when a password or passphrase file can be read (or changed) by others."""
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        warn_once(f"secret:{path}", f"warning: {what} file {path} can be read or changed by other users "
                                    f"(mode {mode:04o}); run: chmod 600 {path}")
