"""Publishing this site's catalog to the peers it shares with (``[peers.NAME] share = true``).

Each pass reads what changed in the index (its change log; the whole index the first
time, or when the index was rebuilt), compares each row's hash with the one last
published (the ledger's ``catalog_rows``), and gives every addition, change and removal
the next version of one counter. Each granted peer then gets, sealed for it alone, the
rows with a version above what it was last sent: the whole catalog the first time. Its
mark advances only once the envelope is in the outbox, so a crash sends again rather
than never; the receiving side ignores what it already has. A peer whose grant is
withdrawn is sent an empty complete catalog, which clears its copy.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..config import Config
from ..dicom.archive import AtomicFile
from ..exchange.ledger import Ledger
from ..index import catalog as local
from ..index.db import open_index
from ..index.schema import CATALOG_LEVELS
from ..seal import envelope
from ..seal.format import Entry, new_envelope_id
from ..seal.keys import load_identity, load_peers
from ..seal.memory import SealLock
from . import catalog_message
from .grants import peers_granted

log = logging.getLogger("dtools")


@dataclass
class _Pass:
    """One look at the index: the rows that changed (with their new versions) and, when it
    was read whole or a peer needs it, every current row."""

    catalog_id: str
    created_at: float
    through: int
    changed: dict[tuple[str, str], local.Row] = field(default_factory=dict)
    current: dict[tuple[str, str], local.Row] | None = None


def publish_catalog(config: Config, ledger: Ledger, *, rescan: bool = False,
                    index: sqlite3.Connection | None = None) -> list[dict]:
    """Bring every peer granted ``share`` up to date with this site's catalog.

    Returns the ``envelope`` records of what it sealed (one per peer that had something
    new; none when nothing changed). They are recorded in the ledger like ``dseal --to``'s,
    so the next ``dmail-send`` deposits them, and their receipts come back as for studies.
    ``rescan`` compares the whole index instead of its change log. Raises ConfigError when
    a peer is granted ``share`` and this site has no identity to sign with.
    """
    granted = peers_granted(config, "share")
    outbox = config.dir("outbox")
    with _lock(outbox / ".catalog.lock"):
        known = {r[0]: r[1] for r in ledger.db.execute("SELECT peer, published_version FROM catalog_peers")}
        withdrawn = [p for p in known if p not in granted]
        if not granted and not withdrawn:
            return []
        conn = index if index is not None else open_index(config.index_path)
        try:
            run = _refresh(conn, ledger, rescan)
            _resend_lost(ledger, known)
            keys = load_peers(config)
            identity = None
            records = []
            for peer in granted:
                since = known.get(peer, 0)
                if peer in known and since >= run.through:
                    continue
                if peer not in keys:
                    log.warning("[peers.%s] share = true, but %s has no identity in %s; its catalog is not sent "
                                "(add it with 'dseal peers add')", peer, peer, config.path)
                    continue
                identity = identity or load_identity(config)
                rows, removed = _rows_for(conn, ledger, run, since)
                if since > 0 and not rows and not removed:
                    _advance(ledger, peer, run.through)
                    continue
                if since == 0:
                    _new_version(ledger, run)  # every complete catalog has a version of its own
                records.append(_seal(outbox, ledger, identity, keys[peer], run, since, since == 0, rows, removed))
                _advance(ledger, peer, run.through)
            for peer in withdrawn:
                if known[peer] > 0 and peer in keys:
                    identity = identity or load_identity(config)
                    _new_version(ledger, run)
                    records.append(_seal(outbox, ledger, identity, keys[peer], run, known[peer], True, [], []))
                with ledger.transaction() as db:
                    db.execute("DELETE FROM catalog_peers WHERE peer = ?", (peer,))
            return records
        finally:
            if index is None:
                conn.close()


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    """One publisher at a time per home (dserve --relay and a cron --once may overlap)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _refresh(conn: sqlite3.Connection, ledger: Ledger, rescan: bool) -> _Pass:
    """Diff the index against the published catalog and version what changed."""
    state = ledger.db.execute("SELECT catalog_id, created_at, index_id FROM catalog_state WHERE id = 1").fetchone()
    idx = local.index_id(conn)
    whole = rescan or state is None or state["index_id"] != idx
    conn.execute("BEGIN")  # one snapshot for the change log and the rows it names
    try:
        last = local.last_change(conn)
        if whole:
            current = {(r.level, r.uid): r for level in CATALOG_LEVELS for r in local.all_rows(conn, level)}
            candidates, gone = list(current.values()), None
        else:
            current = None
            ch = local.changes(conn, last)
            candidates, gone = ch.rows, ch.gone
    finally:
        conn.execute("COMMIT")
    now = time.time()
    with ledger.transaction() as db:
        if state is None:
            db.execute("INSERT INTO catalog_state (id, catalog_id, created_at, index_id) VALUES (1, ?, ?, ?)",
                       (new_envelope_id(), now, idx))
        else:
            db.execute("UPDATE catalog_state SET index_id = ? WHERE id = 1", (idx,))
        catalog_id, created_at, version = db.execute(
            "SELECT catalog_id, created_at, max(version, (SELECT coalesce(max(version), 0) FROM catalog_rows)) "
            "FROM catalog_state WHERE id = 1").fetchone()
        if whole:
            stored = {(r[0], r[1]): (r[2], r[3]) for r in db.execute("SELECT level, uid, hash, removed FROM catalog_rows")}
            gone = [k for k, (_h, removed) in stored.items() if not removed and k not in current]  # type: ignore[operator]
        else:
            stored = {}
            for r in candidates:
                got = db.execute("SELECT hash, removed FROM catalog_rows WHERE level = ? AND uid = ?",
                                 (r.level, r.uid)).fetchone()
                if got is not None:
                    stored[(r.level, r.uid)] = (got[0], got[1])
            for key in gone:
                got = db.execute("SELECT hash, removed FROM catalog_rows WHERE level = ? AND uid = ?", key).fetchone()
                if got is not None:
                    stored[key] = (got[0], got[1])
        changed: dict[tuple[str, str], local.Row] = {}
        writes = []
        for r in candidates:
            digest = r.digest
            old = stored.get((r.level, r.uid))
            if old is not None and not old[1] and old[0] == digest:
                continue
            version += 1
            changed[(r.level, r.uid)] = r
            writes.append((r.level, r.uid, digest, version, 0))
        for level, uid in gone or ():
            old = stored.get((level, uid))
            if old is None or old[1]:
                continue  # never published, or already removed
            version += 1
            writes.append((level, uid, "", version, 1))
        db.executemany("INSERT INTO catalog_rows (level, uid, hash, version, removed) VALUES (?, ?, ?, ?, ?) "
                       "ON CONFLICT (level, uid) DO UPDATE SET hash = excluded.hash, version = excluded.version, "
                       "removed = excluded.removed", writes)
        db.execute("UPDATE catalog_state SET version = ? WHERE id = 1", (version,))
    if last:
        # Published up to ``last``; a change made since has a later entry and stays.
        conn.execute("BEGIN IMMEDIATE")
        try:
            local.forget_changes(conn, last)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    if writes:
        log.info("catalog: %d row(s) added, changed or removed (version %d)", len(writes), version)
    return _Pass(catalog_id, created_at, version, changed, current)


def _new_version(ledger: Ledger, run: _Pass) -> None:
    """Take the next version for a complete catalog: two of them (a withdrawal and a grant
    again) are never the same version, so a receiver always knows which came last."""
    with ledger.transaction() as db:
        db.execute("UPDATE catalog_state SET version = version + 1 WHERE id = 1")
        run.through = db.execute("SELECT version FROM catalog_state WHERE id = 1").fetchone()[0]


def _resend_lost(ledger: Ledger, known: dict[str, int]) -> None:
    """A catalog envelope whose file was lost before it reached the relay: send its rows again."""
    lost = ledger.db.execute(
        "SELECT c.envelope_id, c.peer, c.since FROM catalog_envelopes c JOIN sealed s "
        "ON s.envelope_id = c.envelope_id AND s.peer = c.peer WHERE s.lost_at IS NOT NULL AND c.lost_seen = 0").fetchall()
    if not lost:
        return
    with ledger.transaction() as db:
        for envelope_id, peer, since in lost:
            db.execute("UPDATE catalog_peers SET published_version = min(published_version, ?) WHERE peer = ?",
                       (since, peer))
            db.execute("UPDATE catalog_envelopes SET lost_seen = 1 WHERE envelope_id = ? AND peer = ?",
                       (envelope_id, peer))
            if peer in known:
                known[peer] = min(known[peer], since)
            log.warning("catalog envelope %s for %s was lost before it was deposited; its rows are sent again",
                        envelope_id, peer)


def _rows_for(conn: sqlite3.Connection, ledger: Ledger, run: _Pass, since: int
              ) -> tuple[list[tuple[int, local.Row]], list[tuple[str, str, int]]]:
    """What a peer sent up to ``since`` lacks: rows and removals, or (since 0) every live row."""
    if since == 0:
        wanted = ledger.db.execute("SELECT level, uid, version, removed FROM catalog_rows WHERE removed = 0").fetchall()
    else:
        wanted = ledger.db.execute("SELECT level, uid, version, removed FROM catalog_rows WHERE version > ?",
                                   (since,)).fetchall()
    rows: list[tuple[int, local.Row]] = []
    removed: list[tuple[str, str, int]] = []
    for level, uid, version, is_removed in wanted:
        if version > run.through:
            continue  # versioned by a later pass (none runs concurrently, but be exact)
        if is_removed:
            removed.append((level, uid, version))
            continue
        row = run.changed.get((level, uid))
        if row is None:
            if run.current is None:  # a peer behind this pass: read the index whole, once
                conn.execute("BEGIN")
                try:
                    run.current = {(r.level, r.uid): r for lv in CATALOG_LEVELS for r in local.all_rows(conn, lv)}
                finally:
                    conn.execute("COMMIT")
            row = run.current.get((level, uid))
            if row is None:
                continue  # gone from the index since; the next pass sends its removal
        rows.append((version, row))
    order = {level: i for i, level in enumerate(CATALOG_LEVELS)}
    rows.sort(key=lambda vr: (order[vr[1].level], vr[0]))
    return rows, removed


def _seal(outbox: Path, ledger: Ledger, identity, peer_key, run: _Pass, since: int, full: bool,
          rows: list[tuple[int, local.Row]], removed: list[tuple[str, str, int]]) -> dict:
    """Seal one catalog update for one peer into the outbox, recorded in the ledger."""
    parts = catalog_message.encode(catalog_id=run.catalog_id, created_at=run.created_at, generated_at=time.time(),
                                   since=since, through=run.through, full=full, rows=rows, removed=removed)
    entries = [Entry.message(catalog_message.KIND, data) for data in parts]
    eid = new_envelope_id()
    target = outbox / f"{eid}{envelope.SUFFIX}"
    result: list = []

    def remember() -> None:
        sealed = result[0]
        with ledger.transaction() as db:
            db.execute("INSERT OR IGNORE INTO catalog_envelopes (envelope_id, peer, since, through, sealed_at) "
                       "VALUES (?, ?, ?, ?, ?)", (eid, peer_key.name, since, run.through, time.time()))
        ledger.note_sealed(eid, [peer_key.name], str(target), sealed.bytes, sealed.sha256, 0)

    # The seal lock: dmail-send's recovery of an envelope recorded without its file waits for it.
    with SealLock(outbox):
        with AtomicFile(target, 0o600, before_rename=remember) as out:
            result.append(envelope.seal(out, eid, entries, identity=identity, recipients=[peer_key]))
    sealed = result[0]
    log.info("catalog for %s: %d row(s), %d removal(s), versions %d..%d%s in envelope %s", peer_key.name, len(rows),
             len(removed), since + 1, run.through, " (complete)" if full else "", eid)
    return {"kind": "envelope", "path": str(target), "envelope_id": eid, "from": identity.name, "to": [peer_key.name],
            "instances": 0, "bytes": sealed.bytes, "sha256": sealed.sha256,
            "catalog": {"since": since, "through": run.through, "full": full, "rows": len(rows),
                        "removed": len(removed)}}


def _advance(ledger: Ledger, peer: str, through: int) -> None:
    with ledger.transaction() as db:
        db.execute("INSERT INTO catalog_peers (peer, published_version, published_at) VALUES (?, ?, ?) "
                   "ON CONFLICT (peer) DO UPDATE SET published_version = excluded.published_version, "
                   "published_at = excluded.published_at", (peer, through, time.time()))


# -- the receiving side ------------------------------------------------------------------
def apply_catalog(conn: sqlite3.Connection, sender: str, parts: list[bytes], *, signed: bool,
                  site: str | None = None):
    """Apply the catalog messages of one opened envelope to ``sender``'s copy in the index.

    ``sender`` is the envelope's verified sender, never a name from the message. Raises
    InputError for a catalog that is not signed with a peer's key, that claims to be this
    site's own, or that is malformed; the caller then refuses the whole envelope.
    """
    from ..errors import InputError
    from ..index.peers import apply_update

    if not signed:
        raise InputError(f"catalog from {sender} is sealed with a passphrase; a catalog is accepted only when "
                         "signed with a peer's key")
    if site is not None and sender == site:
        raise InputError("catalog from this site itself; not applied")
    return apply_update(conn, sender, catalog_message.decode(parts))
