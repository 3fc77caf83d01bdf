"""Peers' catalogs in the index: applying a peer's catalog update, and what is known of each.

Each row keeps the peer's version of it. An update never rolls the copy back: a row is
written only when its version is newer than the one stored and than a removal recorded
for it, and (unless the update is itself a complete catalog) newer than the peer's floor:
the version of the last complete catalog applied, which listed every row then alive, so
that an older row missing from it is gone. Each complete catalog has a version of its
own, so the later of two always wins. A study or series whose parent has not arrived yet
is kept and joined once the parent comes. Only the named peer's rows are touched.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field

from .schema import CATALOG_LEVELS, LEVEL_ATTRS, PEER_TABLE, PN_ATTRS

ATTRS = {level: tuple(LEVEL_ATTRS[level]) for level in CATALOG_LEVELS}
# the column naming a row within its peer, and the parent's (uid column, id column, level)
UID_COLUMN = {"patient": "uid", "study": "StudyInstanceUID", "series": "SeriesInstanceUID"}
PARENT_COLUMNS = {"study": ("patient_uid", "patient_id", "patient"), "series": ("study_uid", "study_id", "study")}
CHILD = {"patient": "study", "study": "series"}


@dataclass
class Update:
    """One catalog update of a peer (all message entries of one envelope)."""

    catalog_id: str  # the peer's catalog lineage; a newer one replaces the copy
    created_at: float  # when that lineage began
    generated_at: float
    since: int
    through: int
    full: bool  # a complete catalog as of ``through``
    rows: dict[str, list[tuple[int, str, str | None, tuple]]] = field(default_factory=dict)  # (version, uid, parent, values)
    removed: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # (uid, version)


@dataclass
class Applied:
    rows: int = 0  # rows added or changed
    removed: int = 0
    ignored: int = 0  # rows and removals older than the copy
    stale: bool = False  # a whole update the copy has moved past (an older catalog)


def _values(level: str, values: tuple) -> list:
    out = []
    for kw, v in zip(ATTRS[level], values):
        out.append(v)
        if kw in PN_ATTRS:
            out.append(v.upper() if isinstance(v, str) else None)
    return out


def _columns(level: str) -> list[str]:
    cols = []
    for kw in ATTRS[level]:
        cols.append(kw)
        if kw in PN_ATTRS:
            cols.append(kw + "_ci")
    return cols


def _upsert_sql(level: str) -> str:
    table = PEER_TABLE[level]
    cols = _columns(level)
    uid = UID_COLUMN[level]
    head = ["peer", "version"] + ([uid] if level == "patient" else [])
    marks = ["?", "?"] + (["?"] if level == "patient" else [])
    if level in PARENT_COLUMNS:
        puid, pid, plevel = PARENT_COLUMNS[level]
        head += [puid, pid]
        marks += ["?", f"(SELECT id FROM {PEER_TABLE[plevel]} WHERE peer = ? AND {UID_COLUMN[plevel]} = ?)"]
    names = head + cols
    updates = ", ".join(f"{c} = excluded.{c}" for c in names if c not in ("peer", uid))
    # the removal check reads its own three parameters after the row's
    return (f"INSERT INTO {table} ({', '.join(names)}) SELECT {', '.join(marks + ['?'] * len(cols))} "
            f"WHERE NOT EXISTS (SELECT 1 FROM peer_removed r WHERE r.peer = ? AND r.level = '{level}' "
            f"AND r.uid = ? AND r.version >= ?) "
            f"ON CONFLICT (peer, {uid}) DO UPDATE SET {updates} WHERE excluded.version > {table}.version")


_UPSERT = {level: _upsert_sql(level) for level in CATALOG_LEVELS}


def _adopt(conn: sqlite3.Connection, peer: str, level: str) -> None:
    """Join the children that arrived before this level's rows to them."""
    child = CHILD.get(level)
    if child is None:
        return
    puid, pid, _ = PARENT_COLUMNS[child]
    t, pt = PEER_TABLE[child], PEER_TABLE[level]
    conn.execute(f"UPDATE {t} SET {pid} = (SELECT p.id FROM {pt} p WHERE p.peer = {t}.peer AND "
                 f"p.{UID_COLUMN[level]} = {t}.{puid}) WHERE peer = ? AND {pid} IS NULL", (peer,))


def _orphan(conn: sqlite3.Connection, level: str, ids: list[int]) -> None:
    child = CHILD.get(level)
    if child is None or not ids:
        return
    pid = PARENT_COLUMNS[child][1]
    conn.executemany(f"UPDATE {PEER_TABLE[child]} SET {pid} = NULL WHERE {pid} = ?", [(i,) for i in ids])


def drop_peer(conn: sqlite3.Connection, peer: str) -> None:
    """Forget a peer's whole catalog (in the caller's transaction)."""
    for level in CATALOG_LEVELS:
        conn.execute(f"DELETE FROM {PEER_TABLE[level]} WHERE peer = ?", (peer,))
    conn.execute("DELETE FROM peer_removed WHERE peer = ?", (peer,))
    conn.execute("DELETE FROM peer_catalog WHERE peer = ?", (peer,))


def apply_update(conn: sqlite3.Connection, peer: str, u: Update, now: float | None = None) -> Applied:
    """Apply one update of ``peer``'s catalog in one transaction; replays change nothing."""
    now = time.time() if now is None else now
    out = Applied()
    conn.execute("BEGIN IMMEDIATE")
    try:
        state = conn.execute("SELECT catalog_id, created_at, floor FROM peer_catalog WHERE peer = ?",
                             (peer,)).fetchone()
        if state is not None and state[0] != u.catalog_id:
            if u.created_at <= state[1]:
                out.stale = True  # from a catalog the peer has since replaced
                conn.execute("COMMIT")
                return out
            drop_peer(conn, peer)  # the peer started its catalog over: take the new one whole
            state = None
        floor = state[2] if state is not None else 0
        if u.full and u.through <= floor:
            out.stale = True
            conn.execute("COMMIT")
            return out
        for level in CATALOG_LEVELS:
            params = []
            for version, uid, parent, values in u.rows.get(level, ()):
                if version <= floor and not u.full:
                    out.ignored += 1
                    continue
                p = [peer, version] + ([uid] if level == "patient" else [])
                if level in PARENT_COLUMNS:
                    p += [parent, peer, parent]
                params.append(p + _values(level, values) + [peer, uid, version])
            if params:
                mark = conn.total_changes
                conn.executemany(_UPSERT[level], params)
                written = conn.total_changes - mark
                out.rows += written
                out.ignored += len(params) - written
                conn.executemany("DELETE FROM peer_removed WHERE peer = ? AND level = ? AND uid = ? AND version < ?",
                                 [(peer, level, p[-2], p[-1]) for p in params])
                _adopt(conn, peer, level)
        for level in reversed(CATALOG_LEVELS):
            table, uid_col = PEER_TABLE[level], UID_COLUMN[level]
            gone = []
            for uid, version in u.removed.get(level, ()):
                if version <= floor:
                    out.ignored += 1
                    continue
                row = conn.execute(f"DELETE FROM {table} WHERE peer = ? AND {uid_col} = ? AND version < ? RETURNING id",
                                   (peer, uid, version)).fetchone()
                if row is not None:
                    gone.append(row[0])
                    out.removed += 1
                conn.execute("INSERT INTO peer_removed (peer, level, uid, version) VALUES (?, ?, ?, ?) "
                             "ON CONFLICT (peer, level, uid) DO UPDATE SET version = max(version, excluded.version)",
                             (peer, level, uid, version))
            _orphan(conn, level, gone)
        if u.full:
            out.removed += _keep_only_listed(conn, peer, u)
            floor = u.through
            conn.execute("DELETE FROM peer_removed WHERE peer = ? AND version <= ?", (peer, floor))
        conn.execute(
            "INSERT INTO peer_catalog (peer, catalog_id, created_at, through, floor, generated_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (peer) DO UPDATE SET through = max(through, excluded.through), "
            "floor = excluded.floor, generated_at = max(coalesce(generated_at, 0), excluded.generated_at), "
            "updated_at = excluded.updated_at",
            (peer, u.catalog_id, u.created_at, u.through, floor, u.generated_at, now))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return out


def _keep_only_listed(conn: sqlite3.Connection, peer: str, u: Update) -> int:
    """A complete catalog: rows up to its version that it does not list are gone."""
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS catalog_listed (level TEXT NOT NULL, uid TEXT NOT NULL, "
                 "PRIMARY KEY (level, uid)) WITHOUT ROWID")
    conn.execute("DELETE FROM temp.catalog_listed")
    n = 0
    try:
        for level in CATALOG_LEVELS:
            conn.executemany("INSERT OR IGNORE INTO temp.catalog_listed VALUES (?, ?)",
                             [(level, uid) for _v, uid, _p, _vals in u.rows.get(level, ())])
        for level in reversed(CATALOG_LEVELS):
            table, uid_col = PEER_TABLE[level], UID_COLUMN[level]
            ids = [r[0] for r in conn.execute(
                f"DELETE FROM {table} WHERE peer = ? AND version <= ? AND {uid_col} NOT IN "
                f"(SELECT uid FROM temp.catalog_listed WHERE level = ?) RETURNING id", (peer, u.through, level))]
            n += len(ids)
            _orphan(conn, level, ids)
    finally:
        conn.execute("DELETE FROM temp.catalog_listed")
    return n


@dataclass
class CatalogState:
    peer: str
    through: int
    generated_at: float | None
    updated_at: float
    studies: int = 0


def catalog_states(conn: sqlite3.Connection) -> dict[str, CatalogState]:
    """What this index holds of each peer's catalog."""
    return {r[0]: CatalogState(r[0], r[1], r[2], r[3])
            for r in conn.execute("SELECT peer, through, generated_at, updated_at FROM peer_catalog")}
