"""The keys of a query: what each key=value matches (PS3.4 C.2.2.2), checked up front.

``parse_keys`` turns keys (pydicom keywords or ``gggg,eeee`` tags) into a ``Query`` of
``Condition``s, one SQL fragment per key, or raises UsageError saying what is allowed.
``Scope`` says which tables the query will read. ``dtools.index.query`` runs it.
"""

from __future__ import annotations

import re
from typing import Sequence

from ..errors import UsageError
from .dictionary import ENTRIES, TAGS
from .schema import CATALOG_LEVELS, COMPUTED, FILE_FIELDS, LEVEL_ATTRS, LEVELS, PEER_TABLE, PN_ATTRS, TABLE

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
