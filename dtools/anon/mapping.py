"""The site's mapping table, HOME/anon.db: every pseudonym danon issued and the original it stands for.

Only the site can link a pseudonym back: the file is readable by its owner only, and the
pseudonyms cannot be recomputed without the key. SQLite in WAL mode, so that several
danon runs (and a reader) can use it at once; rows are only ever added.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from ..dbutil import enable_wal
from ..errors import ConfigError

FILE = "anon.db"
BUSY_TIMEOUT_MS = 30000

SCHEMA = """
CREATE TABLE IF NOT EXISTS pseudonym (
    key_id     TEXT NOT NULL,     -- which key made it (HOME/keys/anon.key or a --salt file)
    pseudonym  TEXT NOT NULL,     -- what the copies carry
    kind       TEXT NOT NULL,     -- patient, study, series, instance or uid
    original   TEXT NOT NULL,     -- PatientID (or name and birth date), or the original UID
    issuer     TEXT,              -- IssuerOfPatientID, for patients
    shift_days INTEGER,           -- --retain-longitudinal: days the patient's dates were moved back
    first_seen TEXT NOT NULL,
    PRIMARY KEY (key_id, pseudonym)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pseudonym_original ON pseudonym (key_id, original);
"""


class Mapping:
    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            _create_private(self.path)
            # used by danon's committer thread, one thread at a time
            self.conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000,
                                        check_same_thread=False)
            self.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            enable_wal(self.conn)
            # a pseudonym printed on stdout must be linkable even after a power cut
            self.conn.execute("PRAGMA synchronous = FULL")
            self.conn.executescript(SCHEMA)
            self.conn.execute("CREATE TEMP TABLE IF NOT EXISTS seen (uid TEXT PRIMARY KEY) WITHOUT ROWID")
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"{self.path}: cannot open the mapping table ({exc}); is it a danon anon.db?") from None
        for suffix in ("", "-wal", "-shm"):
            try:
                os.chmod(f"{self.path}{suffix}", 0o600)
            except OSError:
                pass

    def add(self, key_id: str, rows: list[tuple], sops: list[str]) -> list[bool]:
        """Record (kind, pseudonym, original, issuer, shift_days) rows, and say for each of ``sops``
        whether this run meets it for the first time; one transaction for a whole batch."""
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.executemany(
                # a UID first met as a reference ("uid") is named study, series or instance when its own file comes
                "INSERT INTO pseudonym (key_id, pseudonym, kind, original, issuer, shift_days, first_seen) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key_id, pseudonym) DO UPDATE SET kind = excluded.kind "
                "WHERE pseudonym.kind = 'uid' AND excluded.kind != 'uid'",
                [(key_id, p, kind, orig, issuer, shift, now) for kind, p, orig, issuer, shift in rows],
            )
            # this run's SOP instances (a temporary table on disk: bounded memory), so that the same
            # instance given twice is written once
            first = [self.conn.execute("INSERT OR IGNORE INTO seen (uid) VALUES (?)", (sop,)).rowcount == 1
                     for sop in sops]
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        return first

    def close(self) -> None:
        self.conn.close()


def _create_private(path: Path) -> None:
    """Create the file owner-only before SQLite opens it (SQLite gives -wal and -shm the same mode)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        os.close(fd)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create the mapping table ({exc.strerror}); check --home") from None
