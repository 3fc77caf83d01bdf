"""This site's catalog as the index holds it: its patients, studies and series as rows to
publish, read whole or only where the change log says something changed.

A row is identified by its StudyInstanceUID or SeriesInstanceUID; a patient, whose index
key holds its PatientID, by a digest of that key, so that no patient data becomes a key
outside the index. Each row names its parent (the study its series belongs to, the
patient its study belongs to) and carries the attributes C-FIND returns at its level,
counts included, in ``LEVEL_ATTRS`` order. No file paths.
"""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass
from typing import Iterator

import orjson

from .schema import CATALOG_LEVELS, LEVEL_ATTRS, LOCAL_KEY

ATTRS = {level: tuple(LEVEL_ATTRS[level]) for level in CATALOG_LEVELS}
_PARENT_KEY = {"patient": None, "study": "p.patient_key", "series": "st.StudyInstanceUID"}
_FROM = {
    "patient": "patient p",
    "study": "study st JOIN patient p ON p.id = st.patient_id",
    "series": "series se JOIN study st ON st.id = se.study_id",
}
_ALIAS = {"patient": "p", "study": "st", "series": "se"}


def patient_uid(patient_key: str) -> str:
    """The catalog's name for a patient: a digest of its index key (PatientID and issuer, or name)."""
    return hashlib.sha256(patient_key.encode("utf-8", "surrogatepass")).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Row:
    level: str
    uid: str
    parent: str | None
    values: tuple  # LEVEL_ATTRS[level] order, as the index stores them

    @property
    def digest(self) -> str:
        """What changes when anything a peer would see of the row changes."""
        return hashlib.blake2b(orjson.dumps([self.parent, *self.values]), digest_size=16).hexdigest()


def index_id(conn: sqlite3.Connection) -> str:
    """This index's random identity: a rebuilt or replaced index has another one."""
    return conn.execute("SELECT value FROM meta WHERE name = 'index_id'").fetchone()[0]


def _select(level: str, where: str = "") -> str:
    a = _ALIAS[level]
    cols = ", ".join(f"{a}.{kw}" for kw in ATTRS[level])
    parent = _PARENT_KEY[level] or "NULL"
    return f"SELECT {a}.{LOCAL_KEY[level]}, {parent}, {cols} FROM {_FROM[level]} {where}"


def _row(level: str, r: tuple) -> tuple[str, Row]:
    key, parent = r[0], r[1]
    uid = patient_uid(key) if level == "patient" else key
    if level == "study":
        parent = patient_uid(parent)
    return key, Row(level, uid, parent, tuple(r[2:]))


def all_rows(conn: sqlite3.Connection, level: str) -> Iterator[Row]:
    for r in conn.execute(_select(level)):
        yield _row(level, r)[1]


@dataclass
class Changes:
    """What the change log names up to ``last``: the rows as they are now, and the ones gone."""

    last: int
    rows: list[Row]
    gone: list[tuple[str, str]]  # (level, uid)


def last_change(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT coalesce(max(seq), 0) FROM catalog_changes").fetchone()[0]


def changes(conn: sqlite3.Connection, last: int) -> Changes:
    """The rows the change log names (up to ``last``), read in the caller's transaction."""
    rows: list[Row] = []
    gone: list[tuple[str, str]] = []
    for level in CATALOG_LEVELS:
        a = _ALIAS[level]
        named = {k for (k,) in conn.execute(
            "SELECT key FROM catalog_changes WHERE level = ? AND seq <= ?", (level, last))}
        if not named:
            continue
        found = set()
        where = (f"WHERE {a}.{LOCAL_KEY[level]} IN "
                 f"(SELECT key FROM catalog_changes WHERE level = ? AND seq <= ?)")
        for r in conn.execute(_select(level, where), (level, last)):
            key, row = _row(level, r)
            found.add(key)
            rows.append(row)
        for key in named - found:
            gone.append((level, patient_uid(key) if level == "patient" else key))
    return Changes(last, rows, gone)


def forget_changes(conn: sqlite3.Connection, last: int) -> None:
    """The change log up to ``last`` is published (a row changed since has a later entry)."""
    conn.execute("DELETE FROM catalog_changes WHERE seq <= ?", (last,))
