"""The one query engine: DICOM C-FIND matching (PS3.4 C.2.2.2) plus FTS5 free text.

``dsearch`` and ``dserve``'s C-FIND both call ``find``. Keys may name attributes of the
query level, of the levels above it (joined) and of the levels below it (an instance
matches if any of its rows below do). Matching, per key value:

- ``""`` or ``*``: universal; the key is returned but does not filter.
- UIDs: single value, or a list ``a\\b\\c``.
- DA, TM, DT: single value or a range ``a-b``, ``a-``, ``-b`` (inclusive).
- Text with ``*`` or ``?``: wildcard. Person names match ignoring case.
- Anything else: single value, exact.

``parse_keys`` validates keys up front and raises UsageError with what is allowed.

A ``Scope`` says which tables a query reads: this site's archive (``LOCAL``), or the
copies of peers' catalogs (``peer_scope``), which hold patients, studies and series
but no instances and no free text.
"""

from __future__ import annotations

import re
import sqlite3
from typing import Any, Iterator, Sequence

from ..errors import UsageError
from .db import from_db_path
from .dictionary import ENTRIES, TAGS
from .schema import ALIAS, CATALOG_LEVELS, COMPUTED, FILE_FIELDS, LEVEL_ATTRS, LEVELS, PARENT, PEER_TABLE, PN_ATTRS, TABLE

# keyword -> level, for every key the index stores
KEY_LEVEL: dict[str, str] = {kw: level for level, attrs in LEVEL_ATTRS.items() for kw in attrs}
for _f in FILE_FIELDS:
    KEY_LEVEL[_f] = "instance"
LEVEL_KEYS: dict[str, list[str]] = {
    level: list(attrs) + (list(FILE_FIELDS) if level == "instance" else []) for level, attrs in LEVEL_ATTRS.items()
}
# keys a C-FIND identifier may carry that are not matching keys
IGNORED_KEYS = {"QueryRetrieveLevel", "SpecificCharacterSet", "TimezoneOffsetFromUTC"}

# compiled on first use (re caches them), not at import: start-up time counts
_DATE = r"^\d{8}$"
_TIME = r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$"
_DATETIME = r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$"


def vr_of(keyword: str) -> str:
    if keyword in ("path",):
        return "path"
    if keyword in ("size", "mtime"):
        return "num"
    entry = ENTRIES.get(keyword)
    if entry is not None:
        return entry[1].split(" or ")[0]
    from pydicom.datadict import dictionary_VR  # loads all of pydicom: only for keys the index lacks

    try:
        return str(dictionary_VR(keyword)).split(" or ")[0]
    except KeyError:
        return "LO"


def is_multivalued(keyword: str) -> bool:
    entry = ENTRIES.get(keyword)
    if entry is not None:
        return entry[2] != "1"
    if not keyword[:1].isupper():
        return False  # dtools' own fields (peer, path, size...): no need to load pydicom to know
    from pydicom.datadict import dictionary_VM

    try:
        return dictionary_VM(keyword) != "1"
    except (KeyError, ValueError):
        return False


def normalize_key(name: str) -> str:
    """A pydicom keyword, or DCMTK's ``gggg,eeee`` / ``(gggg,eeee)`` form, as a keyword."""
    raw = name.strip()
    m = re.match(r"^\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?$", raw)
    if m:
        tag = int(m.group(1) + m.group(2), 16)
        kw = TAGS.get(tag)
        if kw is None:
            from pydicom.datadict import keyword_for_tag

            kw = keyword_for_tag(tag)
        if not kw:
            raise UsageError(f"tag {raw} has no DICOM keyword; use a keyword such as PatientName")
        return kw
    return raw


class Scope:
    """The tables a query reads, and for peers' catalogs, whose rows (a plain class, like
    Condition below, for start-up time)."""

    __slots__ = ("tables", "levels", "peers")

    def __init__(self, tables: dict[str, str], levels: tuple[str, ...], peers: tuple[str, ...] | None = None):
        self.tables = tables
        self.levels = levels
        self.peers = peers  # None: this site's own archive

    def __repr__(self) -> str:
        return f"Scope({self.levels!r}, peers={self.peers!r})"

    @property
    def is_peer(self) -> bool:
        return self.peers is not None


LOCAL = Scope(TABLE, LEVELS)
# what a usage error about a peer's catalog suggests instead
LIVE_HINT = "ask the peer itself with --live"


def peer_scope(peers: Sequence[str]) -> Scope:
    """The copies of these peers' catalogs (patients, studies, series)."""
    return Scope(PEER_TABLE, CATALOG_LEVELS, tuple(peers))


def allowed_keys_text(scope: Scope = LOCAL) -> str:
    return ", ".join(k for level in scope.levels for k in LEVEL_KEYS[level])


# Plain classes, not dataclasses: building a dataclass costs start-up time that
# `dsearch --count` from cron pays every minute.
class Condition:
    __slots__ = ("level", "sql", "params")

    def __init__(self, level: str, sql: str, params: list | None = None):
        self.level = level
        self.sql = sql  # with {a} for the table alias and {series} for the series table
        self.params = [] if params is None else params

    def __repr__(self) -> str:
        return f"Condition({self.level!r}, {self.sql!r}, {self.params!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Condition) and (self.level, self.sql, self.params) == (other.level, other.sql, other.params)

    def render(self, alias: str, scope: Scope) -> str:
        return self.sql.format(a=alias, series=scope.tables["series"])


class Query:
    """A validated query: conditions per level, free text, the level answered and the scope."""

    __slots__ = ("level", "conditions", "text", "scope")

    def __init__(self, level: str, conditions: list[Condition] | None = None, text: str | None = None,
                 scope: Scope = LOCAL):
        self.level = level
        self.conditions = [] if conditions is None else conditions
        self.text = text
        self.scope = scope

    def __repr__(self) -> str:
        return f"Query({self.level!r}, {self.conditions!r}, {self.text!r}, {self.scope!r})"


def _check_range_part(vr: str, part: str, key: str) -> None:
    pattern = {"DA": _DATE, "TM": _TIME, "DT": _DATETIME}[vr]
    if part and (not re.match(pattern, part) or not _plausible(vr, part)):
        if vr == "DA":
            raise UsageError(f"{key}={part!r}: dates are YYYYMMDD, e.g. {key}=20260101 or a range "
                             f"{key}=20260101-20260131")
        example = {"TM": "080000-120000", "DT": "20260101080000-20260101120000"}[vr]
        raise UsageError(
            f"{key}={part!r}: not a valid {vr} value; use a single value or a range like {key}={example}"
        )


def _check_date_value(key: str, value: str) -> None:
    """A date written the ISO way (2026-01-01, with its own '-') is refused before it is
    read as a range; the message says how DICOM writes dates."""
    m = re.search(r"(\d{4})-(\d{2})-(\d{2})", value)
    if m:
        raise UsageError(f"{key}={value!r}: dates are YYYYMMDD without '-' (e.g. {key}={''.join(m.groups())}); "
                         f"a range is {key}=20260101-20260131")


def _plausible(vr: str, value: str) -> bool:
    if vr == "DA":
        return "01" <= value[4:6] <= "12" and "01" <= value[6:8] <= "31"
    if vr == "TM":
        return value[:2] <= "23" and value[2:4] <= "59" and value[4:6] <= "60"
    return True


def _pad_upper(vr: str, value: str) -> str:
    # an upper bound like 1000 (10:00) includes 10:00:59.999999
    if vr == "TM":
        return value + "999999.999999"[len(value):] if len(value) < 13 else value
    if vr == "DT":
        return value + "99991231235959.999999"[len(value):] if len(value) < 21 else value
    return value


def _glob(value: str) -> str:
    # GLOB's own specials other than * and ? must match themselves
    return value.replace("[", "[[]")


def condition(key: str, value: str) -> Condition | None:
    """The SQL for one ``key=value``, or None for universal matching."""
    level = KEY_LEVEL[key]
    vr = vr_of(key)
    value = value if value is not None else ""
    if value in ("", "*") and key not in ("size", "mtime"):
        return None
    if key == "ModalitiesInStudy":
        # matches if any series of the study has one of the given modalities
        mods = [m for m in value.split("\\") if m]
        if any("*" in m or "?" in m for m in mods):
            ors = " OR ".join("se_m.Modality GLOB ?" for _ in mods)
            return Condition("study", f"{{a}}.id IN (SELECT se_m.study_id FROM {{series}} se_m WHERE {ors})", [_glob(m) for m in mods])
        marks = ", ".join("?" for _ in mods)
        return Condition("study", f"{{a}}.id IN (SELECT se_m.study_id FROM {{series}} se_m WHERE se_m.Modality IN ({marks}))", mods)
    if key in COMPUTED or vr == "num" or LEVEL_ATTRS.get(level, {}).get(key) == "INTEGER":
        col = "mtime_ns" if key == "mtime" else key
        try:
            number = float(value) * (1e9 if key == "mtime" else 1)
        except ValueError:
            raise UsageError(f"{key}={value!r}: expected a number") from None
        return Condition(level, f"{{a}}.{col} = ?", [int(number) if number == int(number) else number])
    if vr == "UI":
        uids = [u.strip() for u in value.split("\\") if u.strip()]
        if len(uids) == 1:
            return Condition(level, f"{{a}}.{key} = ?", uids)
        marks = ", ".join("?" for _ in uids)
        return Condition(level, f"{{a}}.{key} IN ({marks})", uids)
    if vr in ("DA", "TM", "DT"):
        if vr == "DA":
            _check_date_value(key, value)
        if "-" in value and not (vr == "DT" and re.search(r"\d[+-]\d{4}$", value) and value.count("-") == 1 and not value.startswith("-")):
            lo, _, hi = value.partition("-")
            if "-" in hi:
                raise UsageError(f"{key}={value!r}: a range has one '-', like {key}=20260101-20260131")
            _check_range_part(vr, lo, key)
            _check_range_part(vr, hi, key)
            if not lo and not hi:
                return None
            if vr == "DA" and lo and hi and lo > hi:
                raise UsageError(f"{key}={value!r}: the range ends before it starts; dates are YYYYMMDD and a "
                                 f"range goes from the earlier to the later: {key}={hi}-{lo}")
            parts, params = [], []
            if lo:
                parts.append(f"{{a}}.{key} >= ?")
                params.append(lo)
            if hi:
                parts.append(f"{{a}}.{key} <= ?")
                params.append(_pad_upper(vr, hi))
            return Condition(level, " AND ".join(parts), params)
        if "*" in value or "?" in value:
            return Condition(level, f"{{a}}.{key} GLOB ?", [_glob(value)])
        _check_range_part(vr, value, key)
        if vr == "DA":
            return Condition(level, f"{{a}}.{key} = ?", [value])
        # a partial time matches every time that starts with it (0930 matches 093015)
        return Condition(level, f"{{a}}.{key} >= ? AND {{a}}.{key} <= ?", [value, _pad_upper(vr, value)])
    col, val = key, value
    if key in PN_ATTRS:
        col, val = key + "_ci", value.upper()
    if "*" in val or "?" in val:
        return Condition(level, f"{{a}}.{col} GLOB ?", [_glob(val)])
    return Condition(level, f"{{a}}.{col} = ?", [val])


def _check_scope(level: str, text: str | None, scope: Scope) -> None:
    if not scope.is_peer:
        return
    if level not in scope.levels:
        raise UsageError(f"a peer's catalog holds patients, studies and series, not {level}s; "
                         f"use --level {'|'.join(scope.levels)}, or {LIVE_HINT}")
    if text:
        raise UsageError(f"free text ({text!r}) is not in a peer's catalog; search it with Keyword=value "
                         f"keys ({allowed_keys_text(scope)}), or {LIVE_HINT}")


def parse_keys(level: str, keys: dict[str, str] | Sequence[tuple[str, str]], text: str | None = None,
               strict: bool = True, scope: Scope = LOCAL) -> Query:
    """Validate ``keys`` for a query at ``level`` in ``scope``.

    With ``strict=False`` (C-FIND), keys the index does not store are ignored instead of
    being a usage error.
    """
    if level not in LEVELS:
        raise UsageError(f"unknown level {level!r}; use one of {', '.join(LEVELS)}")
    _check_scope(level, text or None, scope)
    q = Query(level=level, text=text or None, scope=scope)
    items = keys.items() if isinstance(keys, dict) else keys
    for name, value in items:
        key = normalize_key(name)
        if key in IGNORED_KEYS:
            continue
        if key not in KEY_LEVEL:
            if not strict:
                continue
            from pydicom.datadict import tag_for_keyword

            if tag_for_keyword(key) is None and key not in FILE_FIELDS:
                raise UsageError(f"unknown keyword {name!r}; keys are DICOM keywords such as PatientName or "
                                 f"gggg,eeee tags. Searchable keys: {allowed_keys_text(scope)}")
            if scope.is_peer:
                raise UsageError(f"{key} is not in a peer's catalog; use one of: {allowed_keys_text(scope)}, "
                                 f"or {LIVE_HINT}")
            raise UsageError(f"{key} is not a search key; search it as free text (a bare word), "
                             f"or use one of: {allowed_keys_text(scope)}")
        if KEY_LEVEL[key] not in scope.levels:
            if not strict:
                continue
            raise UsageError(f"{key} is an instance attribute, which a peer's catalog does not hold; "
                             f"use one of {allowed_keys_text(scope)}, or {LIVE_HINT}")
        cond = condition(key, "" if value is None else str(value))
        if cond is not None:
            q.conditions.append(cond)
    return q


# -- SQL ---------------------------------------------------------------------------
def _from(level: str, scope: Scope = LOCAL) -> str:
    """FROM clause joining ``level`` up to patient, with aliases."""
    a, t = ALIAS, scope.tables
    sql = f"{t[level]} {a[level]}"
    child = level
    while child in PARENT:
        parent, fk = PARENT[child]
        sql += f" JOIN {t[parent]} {a[parent]} ON {a[parent]}.id = {a[child]}.{fk}"
        child = parent
    return sql


def _depth(level: str) -> int:
    return LEVELS.index(level)


def build_where(q: Query) -> tuple[str, list]:
    """WHERE clause and parameters for a query (without the keyword)."""
    parts: list[str] = []
    params: list = []
    qd = _depth(q.level)
    lower: list[Condition] = []
    scope = q.scope
    conditions = list(q.conditions)
    if q.text:
        conditions.append(Condition("instance", "{a}.id IN (SELECT rowid FROM instance_text WHERE instance_text MATCH ?)", [q.text]))
    if scope.peers is not None:
        # the joins go by row id, so the peer of the level answered is the peer of the whole row
        marks = ", ".join("?" for _ in scope.peers)
        conditions.append(Condition(q.level, f"{{a}}.peer IN ({marks})" if len(scope.peers) != 1 else "{a}.peer = ?",
                                    list(scope.peers)))
    for c in conditions:
        if _depth(c.level) <= qd:
            parts.append(c.render(ALIAS[c.level], scope))
            params.extend(c.params)
        else:
            lower.append(c)
    if lower:
        deepest = max(_depth(c.level) for c in lower)
        # rows below the query level: join down from the deepest level needed up to the
        # query level's child, and match on the query level's id
        sub_levels = LEVELS[qd + 1 : deepest + 1]
        a2 = {lv: ALIAS[lv] + "2" for lv in sub_levels}
        bottom = sub_levels[-1]
        t = scope.tables
        sql = f"{t[bottom]} {a2[bottom]}"
        for lv in reversed(sub_levels[:-1]):
            child = LEVELS[LEVELS.index(lv) + 1]
            sql += f" JOIN {t[lv]} {a2[lv]} ON {a2[lv]}.id = {a2[child]}.{PARENT[child][1]}"
        top = sub_levels[0]
        fk = PARENT[top][1]
        inner = [c.render(a2[c.level], scope) for c in lower]
        for c in lower:
            params.extend(c.params)
        if q.text:
            # free text is selective: let FTS drive, then map its rows up to the query level
            parts.append(f"{ALIAS[q.level]}.id IN (SELECT {a2[top]}.{fk} FROM {sql} WHERE {' AND '.join(inner)})")
        else:
            # attribute keys below the level: probe (parent_id, key) indexes per candidate row,
            # so an indexed key at the query level (a date range) drives the search
            parts.append(f"EXISTS (SELECT 1 FROM {sql} WHERE {a2[top]}.{fk} = {ALIAS[q.level]}.id AND {' AND '.join(inner)})")
    return (" AND ".join(parts) or "1"), params


def _select_columns(level: str, scope: Scope = LOCAL) -> list[tuple[str, str]]:
    """(keyword, SQL expression) of every field a record at ``level`` carries."""
    cols: list[tuple[str, str]] = [("peer", f"{ALIAS[level]}.peer")] if scope.is_peer else []
    for lv in LEVELS[: _depth(level) + 1]:
        for kw in LEVEL_ATTRS[lv]:
            cols.append((kw, f"{ALIAS[lv]}.{kw}"))
    if level == "instance":
        cols += [("path", "i.path"), ("size", "i.size"), ("mtime", "i.mtime_ns")]
    return cols


def _run(conn: sqlite3.Connection, sql: str, params: list, text: str | None):
    try:
        return conn.execute(sql, params)
    except sqlite3.OperationalError as exc:
        msg = str(exc)
        if text and ("fts5" in msg or "syntax error" in msg or "no such column" in msg or "unterminated" in msg):
            raise UsageError(
                f"free text {text!r} is not valid FTS5 syntax ({msg}); put words in double quotes, "
                "e.g. '\"O'\"'\"'Brien\"', or use --quote"
            ) from None
        raise


def count(conn: sqlite3.Connection, q: Query) -> int:
    where, params = build_where(q)
    sql = f"SELECT count(*) FROM {_from(q.level, q.scope)} WHERE {where}"
    return _run(conn, sql, params, q.text).fetchone()[0]


def run_query(conn: sqlite3.Connection, q: Query, fields: Sequence[str] | None = None,
              limit: int | None = None, offset: int = 0) -> Iterator[dict]:
    """Yield one record per match, in index order.

    Without ``fields`` a record carries every non-empty attribute of its level and the
    levels above. With ``fields`` it carries exactly those keys (None when empty), which
    is what C-FIND returns. Records from a peer's catalog carry ``peer`` right after ``kind``,
    with ``fields`` too.
    """
    cols = _select_columns(q.level, q.scope)
    where, params = build_where(q)
    sql = (f"SELECT {', '.join(expr for _, expr in cols)} FROM {_from(q.level, q.scope)} WHERE {where}"
           f" ORDER BY {ALIAS[q.level]}.id")
    if limit is not None:
        sql += " LIMIT ? OFFSET ?"
        params = params + [int(limit), int(offset)]
    elif offset:
        sql += " LIMIT -1 OFFSET ?"
        params = params + [int(offset)]
    names = [name for name, _ in cols]
    multi = {name for name in names if is_multivalued(name)}
    wanted = list(fields) if fields else None
    head = ["peer"] if q.scope.is_peer else []
    for row in _run(conn, sql, params, q.text):
        rec: dict[str, Any] = {"kind": q.level}
        for name, value in zip(names, row):
            if value is None:
                continue
            if name == "mtime":
                value = value / 1e9
            elif name == "path" and isinstance(value, bytes):
                value = from_db_path(value)  # a file name that is not UTF-8
            elif name in multi and isinstance(value, str) and "\\" in value:
                value = value.split("\\")
            rec[name] = value
        if wanted is not None:
            rec = {"kind": q.level, **{k: rec[k] for k in head}, **{k: rec.get(k) for k in wanted if k not in head}}
        yield rec


def find(conn: sqlite3.Connection, level: str, keys: dict[str, str], text: str | None = None,
         fields: Sequence[str] | None = None, limit: int | None = None, offset: int = 0,
         strict: bool = True, scope: Scope = LOCAL) -> Iterator[dict]:
    """Match ``keys`` (and free ``text``) at ``level`` in ``scope``; see the module docstring."""
    q = parse_keys(level, keys, text, strict=strict, scope=scope)
    if fields:
        for f in fields:
            key = normalize_key(f)
            if key not in KEY_LEVEL and key != "kind" and strict:
                raise UsageError(f"unknown field {f!r}; fields are: {allowed_keys_text(scope)}")
    return run_query(conn, q, fields=[normalize_key(f) for f in fields] if fields else None, limit=limit, offset=offset)
