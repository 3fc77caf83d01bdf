"""SQLite helpers shared by the index and the relay ledger."""

from __future__ import annotations

import sqlite3
import time

WAL_RETRY_SECONDS = 30.0


def enable_wal(conn: sqlite3.Connection, deadline: float = WAL_RETRY_SECONDS) -> None:
    """Put a database in WAL mode, waiting for other openers.

    Switching a new database to WAL needs an exclusive lock, and SQLite answers
    "database is locked" at once, without its busy handler, while another process is
    creating or switching the same file (two commands of one pipe starting together).
    """
    end = time.monotonic() + deadline
    delay = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() >= end:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
