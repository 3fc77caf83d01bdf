"""Writing parsed headers into the index, in batched transactions.

A batch is one transaction: a killed process loses at most the uncommitted batch, and a
rerun indexes those files again (they are not in the index, so nothing is duplicated).
Counts (NumberOf...Related..., ModalitiesInStudy) are recomputed for the touched rows
when a batch commits.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any, Callable, Iterable

from ..dicom.archive import check_uid
from ..dicom.header import Header, read_header
from ..errors import InputError
from .db import db_path, from_db_path
from .schema import COMPUTED, LEVEL_ATTRS, PN_ATTRS

REQUIRED = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_UNKNOWN = ...


def _stored(level: str) -> list[str]:
    return [k for k in LEVEL_ATTRS[level] if k not in COMPUTED]


_STORED = {level: _stored(level) for level in LEVEL_ATTRS}
# what the parser must convert for the index (free text is collected separately)
INDEX_KEYS = frozenset(k for level in LEVEL_ATTRS for k in _STORED[level])


def _columns(level: str) -> list[str]:
    cols = []
    for kw in _STORED[level]:
        cols.append(kw)
        if kw in PN_ATTRS:
            cols.append(kw + "_ci")
    return cols


_COLS = {level: _columns(level) for level in LEVEL_ATTRS}


def _upsert_sql(table: str, key: str, extra_cols: list[str]) -> str:
    cols = extra_cols + _COLS[table]
    names = ", ".join(cols)
    marks = ", ".join("?" for _ in cols)
    updates = ", ".join(f"{c} = excluded.{c}" for c in cols if c != key)
    return f"INSERT INTO {table} ({names}) VALUES ({marks}) ON CONFLICT({key}) DO UPDATE SET {updates} RETURNING id"


_SQL = {
    "patient": _upsert_sql("patient", "patient_key", ["patient_key"]),
    "study": _upsert_sql("study", "StudyInstanceUID", ["patient_id"]),
    "series": _upsert_sql("series", "SeriesInstanceUID", ["study_id"]),
    "instance": _upsert_sql("instance", "path", ["series_id", "path", "size", "mtime_ns"]),
}


def _sql_value(value: Any) -> Any:
    if isinstance(value, list):
        return "\\".join("" if v is None else str(v) for v in value)
    return value


def _values(level: str, attrs: dict) -> list:
    out = []
    for kw in _STORED[level]:
        v = _sql_value(attrs.get(kw))
        if LEVEL_ATTRS[level][kw] == "INTEGER" and v is not None and not isinstance(v, int):
            try:
                v = int(float(v))
            except (TypeError, ValueError):
                v = None
        out.append(v)
        if kw in PN_ATTRS:
            out.append(v.upper() if isinstance(v, str) else None)
    return out


def patient_key(attrs: dict) -> str:
    """Patients are told apart by PatientID (with its issuer), or by name when there is no ID."""
    pid = _sql_value(attrs.get("PatientID")) or ""
    if pid:
        return f"{pid}\0{_sql_value(attrs.get('IssuerOfPatientID')) or ''}"
    return f"\1{_sql_value(attrs.get('PatientName')) or ''}"


def record_fields(attrs: dict) -> dict:
    """The index's attributes of a header, in record order."""
    rec: dict[str, Any] = {}
    for level in ("patient", "study", "series", "instance"):
        for kw in _STORED[level]:
            if kw in attrs:
                rec[kw] = attrs[kw]
    return rec


class Indexer:
    """Adds files to the index in batches. Use as a context manager (commits on exit).

    ``on_duplicate(path, other_path, sop_uid)`` is called when a SOP Instance UID is
    already indexed at another path: both stay indexed (see dindex(1)).
    """

    def __init__(self, conn: sqlite3.Connection, on_duplicate: Callable[[str, str, str], None] | None = None):
        self.conn = conn
        self.on_duplicate = on_duplicate
        self.in_batch = 0
        self._ids: dict[tuple[str, str], int] = {}
        self._touched: dict[str, set[int]] = {"patient": set(), "study": set(), "series": set()}
        self._added: list[int] = []  # instance ids of this batch, checked for duplicate SOPs at commit

    # -- batches --------------------------------------------------------------------
    def _begin(self) -> None:
        if not self.conn.in_transaction:
            self.conn.execute("BEGIN IMMEDIATE")

    def flush(self) -> int:
        """Recount the touched rows and commit the batch; returns how many files it held."""
        n = self.in_batch
        if not self.conn.in_transaction:
            return n
        self._report_duplicates()
        self._recount()
        self.conn.execute("COMMIT")
        self.in_batch = 0
        return n

    def rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
        self.in_batch = 0
        self._ids.clear()
        self._added.clear()
        for s in self._touched.values():
            s.clear()

    def __enter__(self) -> "Indexer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.flush()
        else:
            self.rollback()

    # -- lookups ----------------------------------------------------------------------
    def existing(self, path: str) -> tuple | None:
        """``(size, mtime_ns, id, series_id)`` of the indexed file at ``path``, or None."""
        return self.conn.execute("SELECT size, mtime_ns, id, series_id FROM instance WHERE path = ?",
                                 (db_path(path),)).fetchone()

    def unchanged(self, path: str, size: int, mtime_ns: int) -> bool:
        row = self.existing(path)
        return row is not None and row[0] == size and row[1] == mtime_ns

    def _report_duplicates(self) -> None:
        added, self._added = self._added, []
        if self.on_duplicate is None or not added:
            return
        for i in range(0, len(added), 500):
            ids = added[i : i + 500]
            marks = ", ".join("?" for _ in ids)
            rows = self.conn.execute(
                f"SELECT a.path, min(b.path), a.SOPInstanceUID FROM instance a "
                f"JOIN instance b ON b.SOPInstanceUID = a.SOPInstanceUID AND b.id < a.id "
                f"WHERE a.id IN ({marks}) GROUP BY a.id ORDER BY a.id", ids).fetchall()
            for path, other, sop in rows:
                self.on_duplicate(from_db_path(path), from_db_path(other), sop)

    # -- adding -----------------------------------------------------------------------
    def add(self, path: str | os.PathLike, extra: dict | None = None) -> dict:
        """Parse ``path`` and index it; returns its ``instance`` record."""
        path = os.path.abspath(os.fspath(path))
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise InputError("no such file") from None
        except OSError as exc:
            raise InputError(f"cannot stat ({exc.strerror})") from None
        header = read_header(path, st.st_size, INDEX_KEYS)
        return self.add_header(path, st.st_size, st.st_mtime_ns, header, extra)

    def add_header(self, path: str, size: int, mtime_ns: int, header: Header, extra: dict | None = None,
                   existing: Any = ...) -> dict:
        """Index an already parsed header; returns the ``instance`` record.

        ``existing`` is what ``existing(path)`` returned, when the caller asked already
        and nothing has written that path since."""
        attrs = header.attrs
        for kw in REQUIRED:
            if not attrs.get(kw):
                raise InputError(f"no {kw}; not indexed")
            check_uid(attrs[kw] if isinstance(attrs[kw], str) else "", kw)
        if header.transfer_syntax and "TransferSyntaxUID" not in attrs:
            attrs["TransferSyntaxUID"] = header.transfer_syntax
        self._begin()
        ex = self.conn.execute
        pkey = patient_key(attrs)
        pid = self._ids.get(("patient", pkey))
        if pid is None:
            pid = ex(_SQL["patient"], [pkey, *_values("patient", attrs)]).fetchone()[0]
            self._ids[("patient", pkey)] = pid
        study_uid = attrs["StudyInstanceUID"]
        stid = self._ids.get(("study", study_uid))
        if stid is None:
            stid = ex(_SQL["study"], [pid, *_values("study", attrs)]).fetchone()[0]
            self._ids[("study", study_uid)] = stid
        series_uid = attrs["SeriesInstanceUID"]
        seid = self._ids.get(("series", series_uid))
        if seid is None:
            seid = ex(_SQL["series"], [stid, *_values("series", attrs)]).fetchone()[0]
            self._ids[("series", series_uid)] = seid
        if existing is _UNKNOWN:
            existing = self.existing(path)
        old = None if existing is None else existing[2:4]
        if old is not None and old[1] != seid:
            self._touch_series(old[1])
        iid = ex(_SQL["instance"], [seid, db_path(path), size, mtime_ns, *_values("instance", attrs)]).fetchone()[0]
        if old is None:
            self._added.append(iid)
        else:
            ex("DELETE FROM instance_text WHERE rowid = ?", (iid,))
        ex("INSERT INTO instance_text (rowid, text) VALUES (?, ?)", (iid, " ".join(header.text)))
        self._touched["series"].add(seid)
        self._touched["study"].add(stid)
        self._touched["patient"].add(pid)
        self.in_batch += 1
        rec = dict(extra) if extra else {}
        rec["kind"] = "instance"
        rec.update(record_fields(attrs))
        rec["path"] = path
        rec["size"] = size
        rec["mtime"] = mtime_ns / 1e9
        return rec

    def _touch_series(self, series_id: int) -> None:
        self._touched["series"].add(series_id)
        row = self.conn.execute(
            "SELECT st.id, st.patient_id FROM series se JOIN study st ON st.id = se.study_id WHERE se.id = ?",
            (series_id,),
        ).fetchone()
        if row:
            self._touched["study"].add(row[0])
            self._touched["patient"].add(row[1])

    # -- removing -----------------------------------------------------------------------
    def remove_paths(self, paths: Iterable[str]) -> int:
        """Drop the instances at ``paths`` (and levels left empty)."""
        n = 0
        self._begin()
        for path in paths:
            row = self.conn.execute("SELECT id, series_id FROM instance WHERE path = ?", (db_path(path),)).fetchone()
            if row is None:
                continue
            self._touch_series(row[1])
            self.conn.execute("DELETE FROM instance_text WHERE rowid = ?", (row[0],))
            self.conn.execute("DELETE FROM instance WHERE id = ?", (row[0],))
            n += 1
            self.in_batch += 1
        return n

    # -- counts -------------------------------------------------------------------------
    def _recount(self) -> None:
        ex = self.conn.execute
        # ids may be recycled after deletes; forget them between batches
        self._ids.clear()
        for seid in self._touched["series"]:
            n = ex("SELECT count(DISTINCT SOPInstanceUID) FROM instance WHERE series_id = ?", (seid,)).fetchone()[0]
            if n:
                ex("UPDATE series SET NumberOfSeriesRelatedInstances = ? WHERE id = ?", (n, seid))
            else:
                ex("DELETE FROM series WHERE id = ?", (seid,))
        for stid in self._touched["study"]:
            n_series, n_inst = ex(
                "SELECT count(*), coalesce(sum(NumberOfSeriesRelatedInstances), 0) FROM series WHERE study_id = ?",
                (stid,),
            ).fetchone()
            if not n_series:
                ex("DELETE FROM study WHERE id = ?", (stid,))
                continue
            mods = [r[0] for r in ex(
                "SELECT DISTINCT Modality FROM series WHERE study_id = ? AND Modality IS NOT NULL ORDER BY Modality",
                (stid,),
            )]
            ex(
                "UPDATE study SET NumberOfStudyRelatedSeries = ?, NumberOfStudyRelatedInstances = ?, "
                "ModalitiesInStudy = ? WHERE id = ?",
                (n_series, n_inst, "\\".join(mods) or None, stid),
            )
        for pid in self._touched["patient"]:
            n_st, n_se, n_in = ex(
                "SELECT count(*), coalesce(sum(NumberOfStudyRelatedSeries), 0), "
                "coalesce(sum(NumberOfStudyRelatedInstances), 0) FROM study WHERE patient_id = ?",
                (pid,),
            ).fetchone()
            if not n_st:
                ex("DELETE FROM patient WHERE id = ?", (pid,))
                continue
            ex(
                "UPDATE patient SET NumberOfPatientRelatedStudies = ?, NumberOfPatientRelatedSeries = ?, "
                "NumberOfPatientRelatedInstances = ? WHERE id = ?",
                (n_st, n_se, n_in, pid),
            )
        for s in self._touched.values():
            s.clear()
