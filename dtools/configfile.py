"""Changes to config.toml made by commands (dseal keygen, dseal peers add).

The file is edited with tomlkit, so everything else in it, comments and order included,
stays as it was; the result is checked against the schema before it replaces the file,
and it replaces it atomically (temporary file, fsync, rename), keeping its mode.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Callable

from . import settings
from .errors import ConfigError


def edit(path: Path, change: Callable[[Any], bool]) -> bool:
    """Apply ``change(document)`` to the config file at ``path`` (created if missing).

    ``change`` edits the tomlkit document in place and returns whether it changed
    anything; the file is written only then. Returns that answer.
    """
    import tomlkit
    from tomlkit.exceptions import TOMLKitError

    # Edit what a symlink points at, not the link: rename would replace the link.
    target = Path(os.path.realpath(path))
    try:
        text = target.read_text(encoding="utf-8")
        mode = target.stat().st_mode & 0o7777
    except FileNotFoundError:
        text, mode = "", None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        doc = tomlkit.parse(text)
    except TOMLKitError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); fix the file first") from None
    if not change(doc):
        return False
    try:
        settings.check(doc.unwrap(), str(path))
    except ValueError as exc:  # a bug in the change, or a file that was wrong already
        raise ConfigError(str(exc)) from None
    _write_atomic(target, tomlkit.dumps(doc).encode("utf-8"), mode)
    return True


def _write_atomic(target: Path, data: bytes, mode: int | None) -> None:
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if mode is not None:  # an existing file keeps its mode; a new one follows the umask
                    os.fchmod(f.fileno(), mode)
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
        dfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        raise ConfigError(f"{target}: cannot write config ({exc.strerror or exc}); check permissions") from None


def table(doc: Any, *names: str) -> Any:
    """The table ``[names...]`` of ``doc``, created (at the end of the file) if missing.

    A dotted table such as ``[peers.site-b]`` is created as its own header without an
    empty ``[peers]`` above it.
    """
    import tomlkit

    node = doc
    for i, name in enumerate(names):
        if name not in node:
            last = i == len(names) - 1
            node[name] = tomlkit.table(is_super_table=not last)
        node = node[name]
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(names[: i + 1])} in config.toml is not a table; fix the file first")
    return node
