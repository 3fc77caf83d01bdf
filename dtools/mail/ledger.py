"""The relay ledger in HOME/outbox/ledger.db: what was sent, when, and whether a receipt came back;
what was received, and what each relay folder's UIDVALIDITY was.

It is the memory that makes both commands safe to kill and rerun: every step is committed
(synchronous=FULL) before the step that depends on it.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from .. import security
from ..dbutil import enable_wal
from ..errors import ConfigError

SCHEMA = [
    # version 1
    """
    CREATE TABLE sent (
        envelope_id TEXT NOT NULL, peer TEXT NOT NULL, path TEXT NOT NULL, bytes INTEGER NOT NULL,
        sha256 TEXT NOT NULL, part_size INTEGER NOT NULL, parts INTEGER NOT NULL, relay TEXT NOT NULL,
        first_sent REAL NOT NULL, last_sent REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 1,
        complete INTEGER NOT NULL DEFAULT 0, receipt_at REAL, receipt_instances INTEGER,
        PRIMARY KEY (envelope_id, peer));
    CREATE TABLE sent_parts (
        envelope_id TEXT NOT NULL, peer TEXT NOT NULL, part INTEGER NOT NULL, appended_at REAL NOT NULL,
        PRIMARY KEY (envelope_id, peer, part));
    CREATE TABLE received (
        envelope_id TEXT PRIMARY KEY, sender TEXT NOT NULL, path TEXT NOT NULL, bytes INTEGER NOT NULL,
        sha256 TEXT NOT NULL, received_at REAL NOT NULL, emitted INTEGER NOT NULL DEFAULT 0);
    CREATE TABLE spool_sets (
        envelope_id TEXT PRIMARY KEY, sender TEXT NOT NULL, parts INTEGER NOT NULL, sha256 TEXT NOT NULL,
        first_seen REAL NOT NULL, reported INTEGER NOT NULL DEFAULT 0);
    CREATE TABLE folders (
        relay TEXT NOT NULL, folder TEXT NOT NULL, uidvalidity INTEGER NOT NULL,
        PRIMARY KEY (relay, folder));
    CREATE TABLE receipts_sent (
        envelope_id TEXT NOT NULL, peer TEXT NOT NULL, instances INTEGER NOT NULL, sent_at REAL NOT NULL,
        PRIMARY KEY (envelope_id, peer));
    """,
]


class Ledger:
    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            security.makedirs(self.path.parent)
            security.create_file(self.path)  # owner only (or the site's group); -wal and -shm copy its mode
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            enable_wal(self.db)
            self.db.execute("PRAGMA synchronous=FULL")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"{self.path}: cannot open the relay ledger ({exc}); check the home directory") from None

    def _migrate(self) -> None:
        if self.db.execute("PRAGMA user_version").fetchone()[0] == len(SCHEMA):
            return
        # dmail-recv and dmail-send --receipts in one pipe may both open a new ledger at once:
        # read the version again under the write lock.
        self.db.execute("BEGIN IMMEDIATE")
        try:
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(SCHEMA):
                raise ConfigError(f"{self.path} was written by a newer dtools; upgrade dtools")
            for i in range(version, len(SCHEMA)):
                for stmt in SCHEMA[i].split(";"):
                    if stmt.strip():
                        self.db.execute(stmt)
                self.db.execute(f"PRAGMA user_version = {i + 1}")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.db.close()

    # -- sending ------------------------------------------------------------------
    def sent(self, envelope_id: str, peer: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM sent WHERE envelope_id=? AND peer=?", (envelope_id, peer)).fetchone()

    def begin_send(self, envelope_id: str, peer: str, path: str, size: int, sha256: str,
                   part_size: int, parts: int, relay: str) -> None:
        now = time.time()
        self.db.execute(
            "INSERT INTO sent (envelope_id, peer, path, bytes, sha256, part_size, parts, relay, first_sent, last_sent)"
            " VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT (envelope_id, peer) DO UPDATE SET"
            " path=excluded.path, relay=excluded.relay, last_sent=excluded.last_sent, attempts=attempts+1",
            (envelope_id, peer, path, size, sha256, part_size, parts, relay, now, now))

    def parts_done(self, envelope_id: str, peer: str) -> set[int]:
        rows = self.db.execute("SELECT part FROM sent_parts WHERE envelope_id=? AND peer=?", (envelope_id, peer))
        return {r[0] for r in rows}

    def part_done(self, envelope_id: str, peer: str, part: int) -> None:
        self.db.execute("INSERT OR IGNORE INTO sent_parts VALUES (?,?,?,?)", (envelope_id, peer, part, time.time()))

    def complete(self, envelope_id: str, peer: str) -> None:
        self.db.execute("UPDATE sent SET complete=1, last_sent=? WHERE envelope_id=? AND peer=?",
                        (time.time(), envelope_id, peer))

    def due_for_retry(self, age: float) -> list[sqlite3.Row]:
        return list(self.db.execute(
            "SELECT * FROM sent WHERE receipt_at IS NULL AND last_sent <= ? ORDER BY first_sent",
            (time.time() - age,)))

    def mark_receipt(self, envelope_id: str, peer: str, instances: int | None) -> bool:
        cur = self.db.execute(
            "UPDATE sent SET receipt_at=COALESCE(receipt_at, ?), receipt_instances=? WHERE envelope_id=? AND peer=?",
            (time.time(), instances, envelope_id, peer))
        return cur.rowcount > 0

    # -- receiving ----------------------------------------------------------------
    def received(self, envelope_id: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM received WHERE envelope_id=?", (envelope_id,)).fetchone()

    def mark_received(self, envelope_id: str, sender: str, path: str, size: int, sha256: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO received VALUES (?,?,?,?,?,?,0)",
                        (envelope_id, sender, path, size, sha256, time.time()))
        self.db.execute("DELETE FROM spool_sets WHERE envelope_id=?", (envelope_id,))

    def mark_emitted(self, envelope_id: str) -> None:
        self.db.execute("UPDATE received SET emitted=1 WHERE envelope_id=?", (envelope_id,))

    def not_emitted(self) -> list[sqlite3.Row]:
        return list(self.db.execute("SELECT * FROM received WHERE emitted=0 ORDER BY received_at"))

    def note_set(self, envelope_id: str, sender: str, parts: int, sha256: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO spool_sets (envelope_id, sender, parts, sha256, first_seen)"
                        " VALUES (?,?,?,?,?)", (envelope_id, sender, parts, sha256, time.time()))

    def stale_sets(self, age: float) -> list[sqlite3.Row]:
        return list(self.db.execute("SELECT * FROM spool_sets WHERE first_seen <= ? ORDER BY first_seen",
                                    (time.time() - age,)))

    def uidvalidity(self, relay: str, folder: str) -> int | None:
        row = self.db.execute("SELECT uidvalidity FROM folders WHERE relay=? AND folder=?", (relay, folder)).fetchone()
        return row[0] if row else None

    def set_uidvalidity(self, relay: str, folder: str, value: int) -> None:
        self.db.execute("INSERT INTO folders VALUES (?,?,?) ON CONFLICT (relay, folder) DO UPDATE SET"
                        " uidvalidity=excluded.uidvalidity", (relay, folder, value))

    # -- receipts we sent ---------------------------------------------------------
    def receipt_sent(self, envelope_id: str, peer: str) -> bool:
        return self.db.execute("SELECT 1 FROM receipts_sent WHERE envelope_id=? AND peer=?",
                               (envelope_id, peer)).fetchone() is not None

    def mark_receipt_sent(self, envelope_id: str, peer: str, instances: int) -> None:
        self.db.execute("INSERT OR IGNORE INTO receipts_sent VALUES (?,?,?,?)",
                        (envelope_id, peer, instances, time.time()))


def ledger_path(home: Path) -> Path:
    return Path(home) / "outbox" / "ledger.db"
