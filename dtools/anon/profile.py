"""The PS3.15 Annex E Basic Application Level Confidentiality Profile as data, and the options.

The per-attribute action codes of table E.1-1 come from the ``dicom-anonymizer`` package
(Kitware), which regenerates them from the standard's own published table for each edition
(its ``dicom_anonymization_databases/dicomfields_<edition>.py``). This module is the one
place that reads them. That package carries the Basic Profile column only, so the three
options danon offers are derived here from those codes and pydicom's data dictionary:

* Retain UIDs: every attribute the profile marks U is kept.
* Retain Longitudinal Temporal Information with Modified Dates: every DA and DT attribute of
  the table is shifted (outside the Patient group 0010), TM attributes are kept.
* Clean Descriptors: every text attribute of the table whose keyword names a description,
  comment, note, label, reason, history or the protocol name is cleaned instead.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from dataclasses import dataclass, field
from importlib import metadata

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from ..errors import ConfigError, UsageError

# dicom-anonymizer's list names and the action codes of table E.1-1 they hold
CATEGORY_CODES = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}

# The code danon applies for each code of the table. Where the table leaves a choice
# ("X unless Z or D is needed for the IOD") we keep the attribute present when that can
# be done without its value (Z) or with a dummy (D), so that Type 1 and 2 attributes stay.
RESOLVE = {
    "D": "D",
    "Z": "Z",
    "X": "X",
    "U": "U",
    "Z/D": "D",
    "X/Z": "Z",
    "X/D": "X",
    "X/Z/D": "Z",
    "X/Z/U*": "R",  # a reference sequence: walk its items so that the UIDs in them are replaced
    "K": "K",
    "C": "C",
}

PATIENT_ID = 0x00100020
PATIENT_NAME = 0x00100010
TEXT_VRS = frozenset(("LO", "SH", "ST", "LT", "UT", "UC"))
DATE_VRS = frozenset(("DA", "DT"))
DESCRIPTOR = re.compile(r"(Description|Comments|Notes$|^ProtocolName$|Impressions|History|ReasonFor|Label$)")


def dictionary_vr(tag: int) -> str | None:
    """pydicom's VR for a public tag ("US or SS": the first), or None when it does not know it."""
    try:
        return dictionary_VR(tag).split(" or ")[0]
    except KeyError:
        return None


@dataclass(frozen=True)
class Options:
    retain_uids: bool = False
    retain_longitudinal: bool = False
    clean_descriptions: bool = False
    keep: frozenset[int] = frozenset()  # tags kept as they are, at any depth


@dataclass
class Table:
    """Table E.1-1's Basic Profile column: exact tags and masked repeating groups."""

    edition: str  # e.g. "2026c"
    source: str  # e.g. "dicom-anonymizer 2.1.0"
    codes: dict[int, str]
    masked: list[tuple[int, int, int, int, str]]  # group mask, group value, element mask, element value, code

    def code(self, tag: int) -> str | None:
        c = self.codes.get(tag)
        if c is not None:
            return c
        g, e = tag >> 16, tag & 0xFFFF
        for gm, gv, em, ev, code in self.masked:
            if g & gm == gv and e & em == ev:
                return code
        return None


def load_table() -> Table:
    """The newest edition of table E.1-1 that the installed dicom-anonymizer carries."""
    try:
        package = importlib.import_module("dicomanonymizer.dicom_anonymization_databases")
        editions = sorted(m.name for m in pkgutil.iter_modules(package.__path__) if m.name.startswith("dicomfields_"))
        if not editions:
            raise ImportError("no dicomfields_* module")
        module = importlib.import_module(f"{package.__name__}.{editions[-1]}")
        lists = {name: getattr(module, name) for name in CATEGORY_CODES}
        version = metadata.version("dicom-anonymizer")
    except (ImportError, AttributeError, metadata.PackageNotFoundError) as exc:
        raise ConfigError(f"the de-identification table is missing ({exc}); reinstall dtools "
                          "(it needs the dicom-anonymizer package, 2.x)") from None
    codes: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for name, entries in lists.items():
        code = CATEGORY_CODES[name]
        for entry in entries:
            if len(entry) == 2:
                codes[(entry[0] << 16) | entry[1]] = code
            elif len(entry) == 4:  # (group, element, group mask, element mask): a repeating group
                g, e, gm, em = entry
                masked.append((gm, g & gm, em, e & em, code))
    if len(codes) < 300 or PATIENT_NAME not in codes or PATIENT_ID not in codes:
        raise ConfigError(f"the de-identification table of dicom-anonymizer {version} looks incomplete "
                          f"({len(codes)} attributes); install dicom-anonymizer 2.x")
    return Table(editions[-1].removeprefix("dicomfields_"), f"dicom-anonymizer {version}", codes, masked)


@dataclass
class Profile:
    """The table resolved for one run's options: one danon action per tag.

    Actions: X remove, Z empty, D dummy, U replace UID, R walk a reference sequence,
    K keep, C clean the text, S shift the date, P pseudonymous PatientID, N PatientName.
    """

    table: Table
    options: Options
    actions: dict[int, str] = field(default_factory=dict)
    masked: list[tuple[int, int, int, int, str]] = field(default_factory=list)

    @classmethod
    def build(cls, table: Table, options: Options) -> "Profile":
        p = cls(table, options)
        for tag, code in table.codes.items():
            p.actions[tag] = p._resolve(tag, code)
        p.masked = [(gm, gv, em, ev, RESOLVE[code]) for gm, gv, em, ev, code in table.masked]
        p.actions[PATIENT_ID] = "P"
        p.actions[PATIENT_NAME] = "N"
        for tag in options.keep:
            p.actions[tag] = "K"
        return p

    def _resolve(self, tag: int, code: str) -> str:
        action = RESOLVE[code]
        opts = self.options
        vr = dictionary_vr(tag)
        if opts.retain_uids and action == "U":
            return "K"
        if opts.retain_longitudinal and vr is not None and tag >> 16 != 0x0010:
            if vr in DATE_VRS:
                return "S"
            if vr == "TM":
                return "K"
        if opts.clean_descriptions and vr in TEXT_VRS and DESCRIPTOR.search(keyword_for_tag(tag) or ""):
            return "C"
        return action

    def action(self, tag: int) -> str | None:
        a = self.actions.get(tag)
        if a is not None or not self.masked:
            return a
        g, e = tag >> 16, tag & 0xFFFF
        for gm, gv, em, ev, code in self.masked:
            if g & gm == gv and e & em == ev:
                return code
        return None

    def method_text(self, version: str) -> list[str]:
        """DeidentificationMethod (LO, 64 characters a value): what was applied, and from which table."""
        words = ["PS3.15 E.1-1 Basic Profile"]
        if self.options.retain_uids:
            words.append("Retain UIDs")
        if self.options.retain_longitudinal:
            words.append("Retain Modified Dates")
        if self.options.clean_descriptions:
            words.append("Clean Descriptors")
        if self.options.keep:
            words.append(f"{len(self.options.keep)} attribute(s) kept by protocol")
        return [v[:64] for v in (", ".join(words), f"table {self.table.edition} ({self.table.source})",
                                 f"dtools danon {version}")]


def keep_tags(keywords: list[str] | tuple[str, ...]) -> frozenset[int]:
    """--keep KEYWORD... as tags; an unknown or private keyword is a usage error."""
    tags = set()
    for kw in keywords:
        kw = kw.strip()
        tag = tag_for_keyword(kw)
        if tag is None:
            raise UsageError(f"--keep {kw}: not a DICOM keyword (use pydicom's spelling, e.g. PatientAge, "
                             "StudyDescription)")
        tags.add(tag)
    return frozenset(tags)
