"""The one query engine: DICOM C-FIND matching (PS3.4 C.2.2.2) plus FTS5 free text.

``dsearch`` and ``dserve``'s C-FIND both call ``find``. Keys may name attributes of the
query level, of the levels above it (joined) and of the levels below it (an instance
matches if any of its rows below do). Matching, per key value:

- ``""`` or ``*``: universal; the key is returned but does not filter.
- UIDs: single value, or a list ``a\\b\\c``.
- DA, TM, DT: single value or a range ``a-b``, ``a-``, ``-b`` (inclusive).
- Text with ``*`` or ``?``: wildcard. Person names match ignoring case.
- Anything else: single value, exact.

``parse_keys`` (in ``dtools.index.matching``, re-exported here) validates keys up front and
raises UsageError with what is allowed; this module turns the result into SQL and runs it.

A ``Scope`` says which tables a query reads: this site's archive (``LOCAL``), or the
copies of peers' catalogs (``peer_scope``), which hold patients, studies and series
but no instances and no free text.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Iterator, Sequence

from ..errors import UsageError
from .db import from_db_path
from .matching import (  # noqa: F401 - the engine's public names, importable from here as before
    IGNORED_KEYS, KEY_LEVEL, LEVEL_KEYS, LIVE_HINT, LOCAL, Condition, Query, Scope, allowed_keys_text, condition,
    is_multivalued, normalize_key, parse_keys, peer_scope, vr_of,
)
from .schema import ALIAS, LEVEL_ATTRS, LEVELS, PARENT


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
