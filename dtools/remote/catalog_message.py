"""The catalog message (kind "catalog", see dtools-envelope(5)): a site's catalog update as
JSON, cut into parts that travel as message entries of one envelope, and read back with
every field checked, since a peer's message is input like any other.
"""

from __future__ import annotations

import math
import re
from typing import Iterable

import orjson

from ..dicom.archive import check_uid
from ..errors import InputError
from ..index.catalog import ATTRS, Row
from ..index.peers import Update
from ..index.schema import CATALOG_LEVELS, LEVEL_ATTRS

KIND = "catalog"
FORMAT = 1
ROWS_PER_PART = 20000  # a part stays a few megabytes of JSON
MAX_VERSION = 1 << 53  # exact in every JSON reader
MAX_TEXT = 1024  # longer than any attribute a catalog carries (LO 64, PN 5 x 64, LT 10240 is not one)
MAX_KEY = 128
# the fields before the attributes: the row's version, and its parent (a patient's own key)
LEAD = {"patient": ("version", "key"), "study": ("version", "patient"), "series": ("version", "study")}
_HEX32 = re.compile(r"^[0-9a-f]{32}$")


def encode(*, catalog_id: str, created_at: float, generated_at: float, since: int, through: int, full: bool,
           rows: Iterable[tuple[int, Row]], removed: Iterable[tuple[str, str, int]],
           per_part: int = ROWS_PER_PART) -> list[bytes]:
    """The JSON parts of one update: ``rows`` (version, row) and ``removed`` (level, uid, version)."""
    items: list[tuple[str, str, list]] = []  # (what, level, JSON value)
    for version, row in rows:
        lead = row.uid if row.level == "patient" else row.parent
        items.append(("rows", row.level, [version, lead, *row.values]))
    for level, uid, version in removed:
        items.append(("removed", level, [uid, version]))
    n_parts = max(1, math.ceil(len(items) / per_part))
    head = {"format": FORMAT, "catalog": catalog_id, "created_at": created_at, "generated_at": generated_at,
            "since": since, "through": through, "full": full, "parts": n_parts}
    parts = []
    for i in range(n_parts):
        body: dict = {"rows": {}, "removed": {}}
        for what, level, value in items[i * per_part:(i + 1) * per_part]:
            if what == "rows":
                section = body["rows"].setdefault(level, {"fields": [*LEAD[level], *ATTRS[level]], "values": []})
                section["values"].append(value)
            else:
                body["removed"].setdefault(level, []).append(value)
        parts.append(orjson.dumps({**head, "part": i + 1, **body}))
    return parts


def _int(value: object, what: str, lo: int = 0, hi: int = MAX_VERSION) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise InputError(f"catalog message: {what} is not a number from {lo} to {hi}")
    return value


def _time(value: object, what: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1e11:
        raise InputError(f"catalog message: {what} is not a time")
    return float(value)


def _key(value: object, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_KEY or not value.isprintable():
        raise InputError(f"catalog message: {what} is not a valid key")
    return value


def _attr(level: str, kw: str, value: object) -> object:
    if value is None:
        return None
    if LEVEL_ATTRS[level][kw] == "INTEGER":
        if not isinstance(value, int) or isinstance(value, bool) or abs(value) > MAX_VERSION:
            raise InputError(f"catalog message: {kw} is not a number")
        return value
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise InputError(f"catalog message: {kw} is not text of at most {MAX_TEXT} characters")
    return value


def _row(level: str, fields: list[str], raw: object, through: int) -> tuple[int, str, str | None, tuple]:
    if not isinstance(raw, list) or len(raw) != len(fields):
        raise InputError(f"catalog message: a {level} row does not match its fields")
    got = dict(zip(fields, raw))
    version = _int(got.get("version"), f"a {level} version", 1, through)
    values = tuple(_attr(level, kw, got.get(kw)) for kw in ATTRS[level])
    if level == "patient":
        return version, _key(got.get("key"), "a patient key"), None, values
    uid_kw = "StudyInstanceUID" if level == "study" else "SeriesInstanceUID"
    uid = check_uid(got.get(uid_kw), f"catalog message: {uid_kw}")
    values = tuple(uid if kw == uid_kw else v for kw, v in zip(ATTRS[level], values))
    parent = (_key(got.get("patient"), "a study's patient") if level == "study"
              else check_uid(got.get("study"), "catalog message: a series' study"))
    return version, uid, parent, values


def decode(parts: list[bytes]) -> Update:
    """The update the parts of one envelope carry; InputError for anything malformed."""
    if not parts:
        raise InputError("catalog message: no parts")
    heads = []
    u: Update | None = None
    seen: set[int] = set()
    for raw in parts:
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise InputError("catalog message is not valid JSON") from None
        if not isinstance(obj, dict):
            raise InputError("catalog message is not a JSON object")
        if obj.get("format") != FORMAT:
            raise InputError(f"catalog message format {str(obj.get('format'))[:10]!r} is not one this dtools "
                             "reads; upgrade dtools")
        head = tuple(obj.get(k) for k in ("catalog", "created_at", "generated_at", "since", "through", "full", "parts"))
        heads.append(head)
        if u is None:
            catalog_id = obj.get("catalog")
            if not isinstance(catalog_id, str) or not _HEX32.match(catalog_id):
                raise InputError("catalog message: no valid catalog id")
            through = _int(obj.get("through"), "through")
            since = _int(obj.get("since"), "since", 0, through)
            if not isinstance(obj.get("full"), bool):
                raise InputError("catalog message: 'full' is not true or false")
            _int(obj.get("parts"), "parts", 1, 1 << 20)
            u = Update(catalog_id, _time(obj.get("created_at"), "created_at"),
                       _time(obj.get("generated_at"), "generated_at"), since, through, obj["full"])
        elif head != heads[0]:
            raise InputError("catalog message: its parts belong to different updates")
        part = _int(obj.get("part"), "part", 1, obj.get("parts") if isinstance(obj.get("parts"), int) else 1)
        if part in seen:
            raise InputError(f"catalog message: part {part} is there twice")
        seen.add(part)
        rows, removed = obj.get("rows", {}), obj.get("removed", {})
        if not isinstance(rows, dict) or not isinstance(removed, dict):
            raise InputError("catalog message: 'rows' and 'removed' must be objects")
        for level, section in rows.items():
            if level not in CATALOG_LEVELS or not isinstance(section, dict):
                raise InputError(f"catalog message: unknown level {str(level)[:20]!r}")
            fields, values = section.get("fields"), section.get("values")
            if (not isinstance(fields, list) or not all(isinstance(f, str) for f in fields)
                    or len(set(fields)) != len(fields) or not set(LEAD[level]) <= set(fields)
                    or not isinstance(values, list)):
                raise InputError(f"catalog message: the {level} rows have no valid fields")
            u.rows.setdefault(level, []).extend(_row(level, fields, v, u.through) for v in values)
        for level, entries in removed.items():
            if level not in CATALOG_LEVELS or not isinstance(entries, list):
                raise InputError(f"catalog message: unknown level {str(level)[:20]!r}")
            out = u.removed.setdefault(level, [])
            for entry in entries:
                if not isinstance(entry, list) or len(entry) != 2:
                    raise InputError(f"catalog message: a {level} removal is not [uid, version]")
                uid = _key(entry[0], "a patient key") if level == "patient" else check_uid(
                    entry[0], f"catalog message: a removed {level}")
                out.append((uid, _int(entry[1], f"a {level} removal's version", 1, u.through)))
    assert u is not None
    if seen != set(range(1, heads[0][6] + 1)):
        raise InputError(f"catalog message: {len(seen)} of its {heads[0][6]} parts are there")
    return u
