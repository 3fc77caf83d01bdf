"""The ledger in HOME/outbox/ledger.db: a site's exchange state with each peer.

Sender:   sealed -> deposited -> delivered (a signed receipt came back).
Receiver: fetched -> handed on -> opened (in archive and index) -> receipt deposited.

It is the memory that makes every command safe to kill and rerun: each state is committed
(synchronous=FULL) before the step that depends on it. ``dstatus`` only reads it.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path
from typing import Iterable, Iterator

from .. import security
from ..dbutil import enable_wal
from ..errors import ConfigError
from .schema import SCHEMA


class Ledger:
    def __init__(self, path: Path, readonly: bool = False):
        self.path = Path(path)
        try:
            if readonly:
                if not self.path.exists():
                    raise ConfigError(f"{self.path}: no exchange ledger here yet (nothing was sealed, sent or "
                                      "received with this home); check --home")
                self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30, isolation_level=None)
                self.db.row_factory = sqlite3.Row
                if self.db.execute("PRAGMA user_version").fetchone()[0] < len(SCHEMA):
                    # an older ledger: upgrade it once (a reader elsewhere never changes the file)
                    self.db.close()
                    Ledger(self.path).close()
                    self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30, isolation_level=None)
                    self.db.row_factory = sqlite3.Row
                return
            security.makedirs(self.path.parent)
            security.create_file(self.path)  # owner only (or the site's group); -wal and -shm copy its mode
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            enable_wal(self.db)
            self.db.execute("PRAGMA synchronous=FULL")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"{self.path}: cannot open the exchange ledger ({exc}); check the home directory") from None

    def _migrate(self) -> None:
        if self.db.execute("PRAGMA user_version").fetchone()[0] == len(SCHEMA):
            return
        # Two commands of one pipe may open a new ledger at once: read the version again
        # under the write lock.
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
            if self.db.in_transaction:  # a signal may land after the COMMIT itself
                self.db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            if self.db.in_transaction:  # a signal may land after the COMMIT itself
                self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- sealing ------------------------------------------------------------------
    def sealed_instance(self, peer: str, sop: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM sealed_instances WHERE peer=? AND sop=?", (peer, sop)).fetchone()

    def note_sealed(self, envelope_id: str, peers: Iterable[str], path: str, size: int, sha256: str,
                    instances: int | None, entries: Iterable[tuple] = (), request_id: str | None = None) -> None:
        """Remember an envelope and, per peer, the instances it carries (study, series, sop,
        path, size, mtime_ns, sha256), in one transaction. ``request_id``: sealed to answer
        that peer's retrieve request."""
        now = time.time()
        peers = list(peers)
        with self.transaction() as db:
            for peer in peers:
                db.execute("INSERT OR IGNORE INTO sealed (envelope_id, peer, path, bytes, sha256, instances, sealed_at,"
                           " request_id) VALUES (?,?,?,?,?,?,?,?)",
                           (envelope_id, peer, path, size, sha256, instances, now, request_id))
                db.executemany(
                    "INSERT INTO sealed_instances VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT (peer, sop) DO UPDATE SET"
                    " study=excluded.study, series=excluded.series, path=excluded.path, size=excluded.size,"
                    " mtime_ns=excluded.mtime_ns, sha256=excluded.sha256, envelope_id=excluded.envelope_id,"
                    " sealed_at=excluded.sealed_at",
                    [(peer, sop, study, series, p, sz, mt, digest, envelope_id, now)
                     for study, series, sop, p, sz, mt, digest in ((*e[:3], db_path(e[3]), *e[4:]) for e in entries)])

    def touch_sealed_instance(self, peer: str, sop: str, path: str, size: int, mtime_ns: int) -> None:
        """The same content found at another path or mtime: remember where, to skip hashing next time."""
        self.db.execute("UPDATE sealed_instances SET path=?, size=?, mtime_ns=? WHERE peer=? AND sop=?",
                        (db_path(path), size, mtime_ns, peer, sop))

    def sealed(self, envelope_id: str, peer: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM sealed WHERE envelope_id=? AND peer=?", (envelope_id, peer)).fetchone()

    def envelope_known(self, envelope_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM sealed WHERE envelope_id=? LIMIT 1", (envelope_id,)).fetchone() is not None

    def undeposited(self) -> list[sqlite3.Row]:
        """Envelopes sealed for a peer and not (completely) deposited in the relay yet."""
        return list(self.db.execute(
            "SELECT * FROM sealed WHERE lost_at IS NULL AND deposited_at IS NULL ORDER BY sealed_at"))

    def sealed_for_request(self, request_id: str, peer: str) -> list[sqlite3.Row]:
        """The envelopes sealed for ``peer`` to answer its retrieve request ``request_id``."""
        return list(self.db.execute("SELECT * FROM sealed WHERE request_id=? AND peer=? AND lost_at IS NULL"
                                    " ORDER BY sealed_at", (request_id, peer)))

    def envelopes_carrying(self, peer: str, studies: list[str], series: list[str]) -> list[sqlite3.Row]:
        """Every envelope sealed for ``peer`` that carries instances of these studies or series."""
        rows: dict[str, sqlite3.Row] = {}
        for column, uids in (("study", studies), ("series", series)):
            for i in range(0, len(uids), 500):
                part = uids[i:i + 500]
                marks = ",".join("?" for _ in part)
                for row in self.db.execute(
                        f"SELECT s.* FROM sealed s WHERE s.peer = ? AND s.lost_at IS NULL AND s.envelope_id IN"
                        f" (SELECT envelope_id FROM sealed_instances WHERE peer = ? AND {column} IN ({marks}))"
                        " ORDER BY s.sealed_at", (peer, peer, *part)):
                    rows[row["envelope_id"]] = row
        return list(rows.values())

    def mark_lost(self, envelope_id: str, peer: str) -> None:
        """The envelope file is gone before it reached the relay: forget its instances for that peer,
        so that the next seal for the peer includes them again."""
        with self.transaction() as db:
            db.execute("UPDATE sealed SET lost_at=? WHERE envelope_id=? AND peer=?", (time.time(), envelope_id, peer))
            db.execute("DELETE FROM sealed_instances WHERE envelope_id=? AND peer=?", (envelope_id, peer))

    def delivered_files(self, age: float) -> list[sqlite3.Row]:
        """Sealed envelope files whose every addressee sent a receipt at least ``age`` seconds ago."""
        return list(self.db.execute(
            "SELECT envelope_id, min(path) AS path FROM sealed WHERE removed_at IS NULL AND lost_at IS NULL"
            " GROUP BY envelope_id HAVING min(receipt_at IS NOT NULL) = 1 AND max(receipt_at) <= ?",
            (time.time() - age,)))

    def mark_removed(self, envelope_id: str) -> None:
        self.db.execute("UPDATE sealed SET removed_at=? WHERE envelope_id=?", (time.time(), envelope_id))

    # -- depositing ---------------------------------------------------------------
    def sent(self, envelope_id: str, peer: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM sent WHERE envelope_id=? AND peer=?", (envelope_id, peer)).fetchone()

    def begin_send(self, envelope_id: str, peer: str, path: str, size: int, sha256: str,
                   part_size: int, parts: int, relay: str, kind: str = "envelope") -> None:
        now = time.time()
        self.db.execute(
            "INSERT INTO sent (envelope_id, peer, path, bytes, sha256, part_size, parts, relay, first_sent, last_sent,"
            " kind) VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (envelope_id, peer) DO UPDATE SET"
            " path=excluded.path, relay=excluded.relay, last_sent=excluded.last_sent, attempts=attempts+1",
            (envelope_id, peer, path, size, sha256, part_size, parts, relay, now, now, kind))

    def parts_done(self, envelope_id: str, peer: str) -> set[int]:
        rows = self.db.execute("SELECT part FROM sent_parts WHERE envelope_id=? AND peer=?", (envelope_id, peer))
        return {r[0] for r in rows}

    def part_done(self, envelope_id: str, peer: str, part: int) -> None:
        self.db.execute("INSERT OR IGNORE INTO sent_parts VALUES (?,?,?,?)", (envelope_id, peer, part, time.time()))

    def complete(self, envelope_id: str, peer: str) -> None:
        now = time.time()
        with self.transaction() as db:
            db.execute("UPDATE sent SET complete=1, last_sent=? WHERE envelope_id=? AND peer=?", (now, envelope_id, peer))
            db.execute("UPDATE sealed SET deposited_at=COALESCE(deposited_at, ?) WHERE envelope_id=? AND peer=?",
                       (now, envelope_id, peer))

    def due_for_retry(self, age: float) -> list[sqlite3.Row]:
        return list(self.db.execute(
            "SELECT * FROM sent WHERE receipt_at IS NULL AND complete = 1 AND kind = 'envelope' AND last_sent <= ?"
            " ORDER BY first_sent",
            (time.time() - age,)))

    def mark_receipt(self, envelope_id: str, peer: str, instances: int | None) -> bool:
        now = time.time()
        with self.transaction() as db:
            cur = db.execute(
                "UPDATE sent SET receipt_at=COALESCE(receipt_at, ?), receipt_instances=? WHERE envelope_id=? AND peer=?",
                (now, instances, envelope_id, peer))
            db.execute("UPDATE sealed SET receipt_at=COALESCE(receipt_at, ?), deposited_at=COALESCE(deposited_at, ?)"
                       " WHERE envelope_id=? AND peer=?", (now, now, envelope_id, peer))
        return cur.rowcount > 0

    # -- receiving ----------------------------------------------------------------
    def received(self, envelope_id: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM received WHERE envelope_id=?", (envelope_id,)).fetchone()

    def mark_received(self, envelope_id: str, sender: str, path: str, size: int, sha256: str,
                      channel: str = "envelope", request_id: str | None = None) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO received (envelope_id, sender, path, bytes, sha256, received_at, channel,"
                       " request_id) VALUES (?,?,?,?,?,?,?,?)",
                       (envelope_id, sender, path, size, sha256, time.time(), channel, request_id))
            db.execute("DELETE FROM spool_sets WHERE envelope_id=?", (envelope_id,))

    def mark_handed(self, envelope_id: str) -> None:
        self.db.execute("UPDATE received SET handed_at=?, emitted=1 WHERE envelope_id=?", (time.time(), envelope_id))

    def to_hand_on(self, handed_before: float | None = None, channel: str = "envelope") -> list[sqlite3.Row]:
        """Received envelopes (of a channel) not opened (nor set aside) yet; with ``handed_before``,
        only those not handed on since then."""
        sql = ("SELECT * FROM received WHERE opened_at IS NULL AND quarantined_at IS NULL AND removed_at IS NULL"
               " AND channel = ?")
        args: tuple = (channel,)
        if handed_before is not None:
            sql += " AND (handed_at IS NULL OR handed_at <= ?)"
            args += (handed_before,)
        return list(self.db.execute(sql + " ORDER BY received_at", args))

    def quarantine_received(self, envelope_id: str, path: str, reason: str) -> None:
        self.db.execute("UPDATE received SET quarantined_at=?, reason=?, path=? WHERE envelope_id=?",
                        (time.time(), reason[:500], path, envelope_id))

    def note_set(self, envelope_id: str, sender: str, parts: int, sha256: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO spool_sets (envelope_id, sender, parts, sha256, first_seen)"
                        " VALUES (?,?,?,?,?)", (envelope_id, sender, parts, sha256, time.time()))

    def drop_set(self, envelope_id: str) -> None:
        self.db.execute("DELETE FROM spool_sets WHERE envelope_id=?", (envelope_id,))

    def stale_sets(self, age: float, unreported: bool = False) -> list[sqlite3.Row]:
        sql = "SELECT * FROM spool_sets WHERE first_seen <= ?"
        if unreported:
            sql += " AND reported = 0"
        return list(self.db.execute(sql + " ORDER BY first_seen", (time.time() - age,)))

    def mark_reported(self, envelope_id: str) -> None:
        self.db.execute("UPDATE spool_sets SET reported=1 WHERE envelope_id=?", (envelope_id,))

    def note_quarantine(self, sender: str | None, what: str, reason: str, place: str) -> None:
        self.db.execute("INSERT INTO quarantine (at, sender, what, reason, place) VALUES (?,?,?,?,?)",
                        (time.time(), sender, what[:200], reason[:500], place))

    def uidvalidity(self, relay: str, folder: str) -> int | None:
        row = self.db.execute("SELECT uidvalidity FROM folders WHERE relay=? AND folder=?", (relay, folder)).fetchone()
        return row[0] if row else None

    def set_uidvalidity(self, relay: str, folder: str, value: int) -> None:
        self.db.execute("INSERT INTO folders VALUES (?,?,?) ON CONFLICT (relay, folder) DO UPDATE SET"
                        " uidvalidity=excluded.uidvalidity", (relay, folder, value))

    def opened_files(self, age: float) -> list[sqlite3.Row]:
        """Inbox envelopes opened at least ``age`` seconds ago whose file is still kept."""
        return list(self.db.execute(
            "SELECT envelope_id, path FROM received WHERE removed_at IS NULL AND opened_at <= ?", (time.time() - age,)))

    def mark_received_removed(self, envelope_id: str) -> None:
        self.db.execute("UPDATE received SET removed_at=? WHERE envelope_id=?", (time.time(), envelope_id))

    # -- opening ------------------------------------------------------------------
    def opened(self, envelope_id: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM opened WHERE envelope_id=?", (envelope_id,)).fetchone()

    def mark_opened(self, envelope_id: str, sender: str, sha256: str, instances: int, receipt_owed: bool,
                    archived: Iterable[tuple[str, str]] = (), opened_at: float | None = None) -> None:
        """Record an opened envelope and the instances (sop, sha256) it placed in the archive."""
        now = time.time() if opened_at is None else opened_at
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO opened VALUES (?,?,?,?,?,?)",
                       (envelope_id, sender, sha256, instances, now, 1 if receipt_owed else 0))
            db.execute("UPDATE received SET opened_at=COALESCE(opened_at, ?) WHERE envelope_id=?", (now, envelope_id))
            db.executemany("INSERT INTO archived VALUES (?,?,?,?,?) ON CONFLICT (sop) DO UPDATE SET"
                           " peer=excluded.peer, sha256=excluded.sha256, envelope_id=excluded.envelope_id,"
                           " at=excluded.at", [(sop, sender, digest, envelope_id, now) for sop, digest in archived])

    def source_of(self, sop: str) -> sqlite3.Row | None:
        """Which peer's envelope placed this instance in the archive (None: not a peer)."""
        return self.db.execute("SELECT * FROM archived WHERE sop=?", (sop,)).fetchone()

    def owe_receipt_again(self, envelope_id: str) -> bool:
        """A copy of an opened envelope came again: its sender did not get our receipt."""
        cur = self.db.execute("UPDATE opened SET receipt_owed=1 WHERE envelope_id=? AND receipt_owed=0 AND"
                              " EXISTS (SELECT 1 FROM receipts_sent r WHERE r.envelope_id = opened.envelope_id)",
                              (envelope_id,))
        return cur.rowcount > 0

    def receipts_owed(self) -> list[sqlite3.Row]:
        return list(self.db.execute("SELECT * FROM opened WHERE receipt_owed=1 ORDER BY opened_at"))

    def receipt_sent(self, envelope_id: str, peer: str) -> bool:
        row = self.db.execute("SELECT receipt_owed FROM opened WHERE envelope_id=?", (envelope_id,)).fetchone()
        if row is not None and row[0]:
            return False
        return self.db.execute("SELECT 1 FROM receipts_sent WHERE envelope_id=? AND peer=?",
                               (envelope_id, peer)).fetchone() is not None

    def mark_receipt_sent(self, envelope_id: str, peer: str, instances: int) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO receipts_sent VALUES (?,?,?,?) ON CONFLICT (envelope_id, peer) DO UPDATE SET"
                       " instances=excluded.instances, sent_at=excluded.sent_at",
                       (envelope_id, peer, instances, time.time()))
            db.execute("UPDATE opened SET receipt_owed=0 WHERE envelope_id=?", (envelope_id,))


    # -- requests this site sent (dsearch --live, dretrieve) --------------------------
    def note_request(self, request_id: str, peer: str, kind: str, envelope_id: str, expires_at: float,
                     subject: str | None = None) -> None:
        self.db.execute("INSERT INTO requests (request_id, peer, kind, envelope_id, created_at, expires_at, subject)"
                        " VALUES (?,?,?,?,?,?,?)", (request_id, peer, kind, envelope_id, time.time(), expires_at,
                                                     subject))

    def request(self, request_id: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM requests WHERE request_id=?", (request_id,)).fetchone()

    def answer_request(self, request_id: str, status: str, answer: str | None) -> None:
        self.db.execute("UPDATE requests SET status=?, answer=?, answered_at=? WHERE request_id=? AND"
                        " status='pending'", (status, answer, time.time(), request_id))

    def pending_requests(self, peer: str, kind: str) -> list[sqlite3.Row]:
        """Requests of a kind to a peer that are neither answered nor expired."""
        return list(self.db.execute("SELECT * FROM requests WHERE peer=? AND kind=? AND status='pending' AND"
                                    " expires_at > ? ORDER BY created_at", (peer, kind, time.time())))

    def expire_requests(self) -> int:
        return self.db.execute("UPDATE requests SET status='expired' WHERE status='pending' AND expires_at <= ?",
                               (time.time(),)).rowcount

    # -- requests this site served (dserve --relay) -----------------------------------
    def served(self, request_id: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM served WHERE request_id=?", (request_id,)).fetchone()

    def note_served(self, request_id: str, peer: str, kind: str) -> bool:
        """Record a request as received; False if its id was seen before (a replay)."""
        cur = self.db.execute("INSERT OR IGNORE INTO served (request_id, peer, kind, received_at) VALUES (?,?,?,?)",
                              (request_id, peer, kind, time.time()))
        return cur.rowcount > 0

    def finish_served(self, request_id: str, status: str, reason: str | None = None) -> None:
        self.db.execute("UPDATE served SET status=?, reason=?, answered_at=? WHERE request_id=?",
                        (status, reason, time.time(), request_id))


def db_path(path: str) -> str | bytes:
    """A file path as the ledger keeps it: text, or its raw bytes when the name is not UTF-8
    (SQLite text must be valid UTF-8; compare against db_path() of a path, never the path)."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        import os

        return os.fsencode(path)


def ledger_path(home: Path) -> Path:
    return Path(home) / "outbox" / "ledger.db"
