"""Opening the index: WAL mode, a busy timeout, and migrations to the current schema."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from .. import security
from ..dbutil import enable_wal
from ..errors import ConfigError
from .schema import MIGRATIONS, SCHEMA_VERSION

BUSY_TIMEOUT_MS = 30000


def open_index(path: str | Path, readonly: bool = False) -> sqlite3.Connection:
    """Open (and create or upgrade) the index at ``path``.

    The connection is in autocommit mode; writers wrap their batches in
    ``BEGIN IMMEDIATE ... COMMIT`` themselves.
    """
    path = Path(path)
    if readonly and not path.exists():
        raise ConfigError(f"{path}: no index here yet; run 'dindex PATH...' first (or check --home)")
    try:
        if not readonly:
            security.makedirs(path.parent)
            security.create_file(path)  # owner only (or the site's group); -wal and -shm copy its mode
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"{path}: index schema {version} is newer than this dtools understands ({SCHEMA_VERSION}); upgrade dtools"
            )
        if not readonly:
            enable_wal(conn)
            if security.group_name() is not None:  # an index outside the home's setgid directories
                for suffix in ("-wal", "-shm"):
                    security.secure_file(f"{path}{suffix}")
            conn.execute("PRAGMA synchronous = NORMAL")
            if version < SCHEMA_VERSION:
                migrate(conn, version)
        elif version < SCHEMA_VERSION:
            # a reader never changes the file; an old index is upgraded by the next writer
            conn.close()
            return open_index(path, readonly=False)
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA cache_size = -65536")
        conn.execute("PRAGMA temp_store = MEMORY")
        return conn
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"{path}: cannot open index ({exc}); is it a dtools index.db?") from None


def db_path(path: str) -> str | bytes:
    """A file's path as the index stores it: TEXT, or the raw bytes (a BLOB) of a name
    that is not UTF-8, which SQLite cannot hold as TEXT. The two never compare equal,
    so every file keeps exactly one row."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path)


def from_db_path(value: str | bytes) -> str:
    """A path read from the index, as the str (surrogate escapes included) ``open`` takes."""
    return os.fsdecode(value) if isinstance(value, bytes) else value


def statements(script: str) -> list[str]:
    """The SQL statements of ``script``, whole: a trigger's body has semicolons of its own."""
    out, pending = [], ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                out.append(pending.strip())
            pending = ""
    if pending.strip(" \n;"):
        out.append(pending.strip())
    return out


def migrate(conn: sqlite3.Connection, current: int) -> None:
    """Apply migrations after ``current``, each in its own transaction."""
    for number in range(current, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            # another writer may have migrated while we waited for the lock
            if conn.execute("PRAGMA user_version").fetchone()[0] > number:
                conn.execute("COMMIT")
                continue
            for statement in statements(MIGRATIONS[number]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number + 1}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # a signal may land after the COMMIT itself
                conn.execute("ROLLBACK")
            raise
