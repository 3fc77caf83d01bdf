"""One data set through the profile: every element at every depth gets its table action.

Private elements and group lengths go, sequences are walked item by item, UIDs become
keyed pseudonyms (so references between files stay consistent), and the result says
what was done (PatientIdentityRemoved, DeidentificationMethod and its code sequence).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field

from pydicom import config as pydicom_config
from pydicom.dataelem import DataElement as _DataElement
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes

from .. import __version__
from .profile import PATIENT_ID, PATIENT_NAME, Profile, dictionary_vr
from .pseudo import Keyring

ISSUER_OF_PATIENT_ID = 0x00100021
PATIENT_BIRTH_DATE = 0x00100030
BURNED_IN_ANNOTATION = 0x00280301
IDENTITY_REMOVED, METHOD, METHOD_CODES, TEMPORAL_MODIFIED = 0x00120062, 0x00120063, 0x00120064, 0x00280303
STUDY_UID, SERIES_UID, SOP_UID = 0x0020000D, 0x0020000E, 0x00080018
UID_KINDS = {STUDY_UID: "study", SERIES_UID: "series", SOP_UID: "instance"}

# Dummy values (action D) by VR: valid for the VR and plainly not data.
DUMMY_TEXT = {"AE": "ANONYMOUS", "AS": "000Y", "CS": "ANONYMIZED", "DA": "19000101", "DS": "0",
              "DT": "19000101000000", "IS": "0", "LO": "ANONYMIZED", "LT": "ANONYMIZED", "PN": "ANONYMIZED",
              "SH": "ANONYMIZED", "ST": "ANONYMIZED", "TM": "000000", "UC": "ANONYMIZED",
              "UR": "urn:dtools:anonymized", "UT": "ANONYMIZED"}
NUMBER_VRS = frozenset(("US", "SS", "UL", "SL", "FL", "FD", "SV", "UV", "AT"))
BYTES_VRS = frozenset(("OB", "OD", "OF", "OL", "OV", "OW", "UN"))
TEXT_VRS = frozenset(("LO", "SH", "ST", "LT", "UT", "UC", "PN", "CS", "AE"))
DATE_LIKE = re.compile(r"(?<!\d)(?:\d{4}[-./]?\d{2}[-./]?\d{2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4})(?!\d)")


def _burned_in_classes() -> dict[str, str]:
    """SOP classes whose images usually carry text in their pixels: secondary capture and ultrasound."""
    from pydicom._uid_dict import UID_dictionary

    out = {}
    for uid, (name, kind, *_rest) in UID_dictionary.items():
        if kind == "SOP Class" and ("Secondary Capture" in name or name.startswith("Ultrasound")):
            out[uid] = name
    return out


BURNED_IN_CLASSES = _burned_in_classes()


def DataElement(tag: int, vr: str, value) -> _DataElement:
    """An element danon made: its values are valid by construction, so pydicom need not check them."""
    return _DataElement(tag, vr, value, validation_mode=pydicom_config.IGNORE)


@dataclass
class Outcome:
    """What de-identifying one data set produced: the new identity and the rows for the mapping table."""

    patient: str  # pseudonymous PatientID
    study: str
    series: str
    sop: str
    sop_class: str
    modality: str
    patient_basis: str  # "id", "name" or "study": what the patient pseudonym was derived from
    rows: list[tuple] = field(default_factory=list)  # (kind, pseudonym, original, issuer, shift_days)


def patient_identity(ds: Dataset) -> tuple[str, str, str, str]:
    """(hash input, original for the mapping, issuer, basis): PatientID with its issuer; without one,
    the name and birth date; without those, the study (each study then is its own patient)."""
    pid = _text(ds.get(PATIENT_ID))
    issuer = _text(ds.get(ISSUER_OF_PATIENT_ID))
    if pid:
        return f"id\0{issuer}\0{pid}", pid, issuer, "id"
    name = _text(ds.get(PATIENT_NAME))
    birth = _text(ds.get(PATIENT_BIRTH_DATE))
    if name:
        return f"name\0{name}\0{birth}", f"{name} {birth}".strip(), "", "name"
    study = _text(ds.get(STUDY_UID))
    return f"study\0{study}", f"study {study}", "", "study"


def _text(elem) -> str:
    if elem is None or elem.value is None:
        return ""
    v = elem.value
    if isinstance(v, MultiValue):
        v = "\\".join(str(x) for x in v)
    return str(v).strip("\0 ")


def burned_in_reason(ds: Dataset) -> str | None:
    """Why this file may have patient data in its pixels, or None."""
    flag = _text(ds.get(BURNED_IN_ANNOTATION)).upper()
    if flag == "YES":
        return "BurnedInAnnotation is YES: patient data may be burned into the pixels"
    sop_class = _text(ds.get(0x00080016))
    if sop_class in BURNED_IN_CLASSES:
        return f"{BURNED_IN_CLASSES[sop_class]} usually has text burned into the pixels"
    return None


class Deidentifier:
    """Applies a Profile with a Keyring; one per worker process, reused for every file."""

    def __init__(self, profile: Profile, keyring: Keyring):
        self.profile = profile
        self.keyring = keyring
        self.options = profile.options
        self.action = profile.action
        # per data set
        self.rows: list[tuple] = []
        self.shift = 0
        self.scrub: re.Pattern | None = None
        self.method = profile.method_text(__version__)

    def apply(self, ds: Dataset) -> Outcome:
        """De-identify ``ds`` in place."""
        identity, original, issuer, basis = patient_identity(ds)
        pseudonym = self.keyring.patient(identity)
        self.shift = self.keyring.shift_days(identity) if self.options.retain_longitudinal else 0
        self.rows = [("patient", pseudonym, original, issuer or None, self.shift or None)]
        self.scrub = self._scrubber(ds) if self.options.clean_descriptions else None
        self._walk(ds, top=True)
        self._mark(ds, pseudonym)
        return Outcome(pseudonym, _text(ds.get(STUDY_UID)), _text(ds.get(SERIES_UID)), _text(ds.get(SOP_UID)),
                       _text(ds.get(0x00080016)), _text(ds.get(0x00080060)), basis, self.rows)

    # -- the walk ------------------------------------------------------------------
    def _walk(self, ds: Dataset, top: bool) -> None:
        action_of = self.action
        for tag in list(ds.keys()):
            group = tag >> 16
            if group & 1 or tag & 0xFFFF == 0:  # private elements and creators; group lengths (stale now)
                del ds[tag]
                continue
            action = action_of(tag)
            if action is None:
                if _is_sequence(ds, tag):
                    for item in ds[tag].value:
                        self._walk(item, top=False)
                continue
            if action == "K":
                continue
            if action == "X":
                del ds[tag]
                continue
            vr = _vr(ds, tag)
            if action == "R":
                if vr == "SQ":
                    for item in ds[tag].value:
                        self._walk(item, top=False)
                    continue
                action = "U" if vr == "UI" else "Z"
            if action == "D" and vr == "UI":
                action = "U"
            if action == "D" and self.shift and vr in ("DA", "DT"):
                action = "S"
            if action == "U":
                self._replace_uids(ds, tag)
            elif action == "Z":
                ds[tag] = DataElement(tag, vr, _empty(vr))
            elif action == "D":
                ds[tag] = DataElement(tag, vr, _dummy(vr))
            elif action == "S":
                self._shift(ds, tag, vr)
            elif action == "C":
                self._clean(ds, tag, vr)
            elif action == "P":
                sub_identity = patient_identity(ds)[0]
                ds[tag] = DataElement(tag, "LO", self.keyring.patient(sub_identity))
            elif action == "N":
                value = self.rows[0][1] if top else ""
                ds[tag] = DataElement(tag, "PN", value)

    def _replace_uids(self, ds: Dataset, tag: int) -> None:
        raw = ds.get_item(tag)
        if isinstance(raw, RawDataElement) and isinstance(raw.value, bytes):
            # UIDs are ASCII: split the raw value rather than have pydicom build UID objects first
            values = raw.value.decode("ascii", "replace").split("\\")
        else:
            value = ds[tag].value
            values = list(value) if isinstance(value, (MultiValue, list)) else [value]
        if not any(str(v).strip("\0 ") for v in values):
            return
        kind = UID_KINDS.get(tag, "uid")
        new = []
        for v in values:
            original = str(v).strip("\0 ")
            if not original:
                new.append("")
                continue
            pseudonym = self.keyring.uid(original)
            self.rows.append((kind, pseudonym, original, None, None))
            new.append(pseudonym)
        ds[tag] = DataElement(tag, "UI", new if len(new) > 1 else new[0])

    def _shift(self, ds: Dataset, tag: int, vr: str) -> None:
        value = ds[tag].value
        if value is None or value == "":
            return
        values = list(value) if isinstance(value, (MultiValue, list)) else [value]
        shifted = []
        for v in values:
            s = _shift_value(str(v).strip("\0 "), vr, self.shift)
            if s is None:  # not a date we can move: it goes, as the profile would have it
                del ds[tag]
                return
            shifted.append(s)
        ds[tag] = DataElement(tag, vr, shifted if len(shifted) > 1 else shifted[0])

    def _clean(self, ds: Dataset, tag: int, vr: str) -> None:
        value = ds[tag].value
        if value is None or value == "":
            return
        values = list(value) if isinstance(value, (MultiValue, list)) else [value]
        cleaned = [self._scrub_text(str(v)) for v in values]
        ds[tag] = DataElement(tag, vr, cleaned if len(cleaned) > 1 else cleaned[0])

    def _scrub_text(self, text: str) -> str:
        text = DATE_LIKE.sub("*", text)
        if self.scrub is not None:
            text = self.scrub.sub("*", text)
        return text

    def _scrubber(self, ds: Dataset) -> re.Pattern | None:
        """One pattern for every identifying value of this data set (names by component), so that
        Clean Descriptors can take them out of the text it keeps."""
        found: set[str] = set()
        self._identifiers(ds, found)
        words = sorted((w for w in found if len(w) >= 2), key=len, reverse=True)
        if not words:
            return None
        return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(w) for w in words) + r")(?!\w)", re.IGNORECASE)

    def _identifiers(self, ds: Dataset, found: set[str]) -> None:
        for tag in ds.keys():
            if tag >> 16 & 1:
                continue
            action = self.action(tag)
            vr = _vr(ds, tag)
            if vr == "SQ":
                for item in ds[tag].value:
                    self._identifiers(item, found)
                continue
            if action in (None, "K", "C", "S") or vr not in TEXT_VRS:
                continue
            text = _text(ds[tag])
            if not text:
                continue
            found.add(text)
            for part in re.split(r"[\\^=]", text):
                part = part.strip()
                if part:
                    found.add(part)
                    found.update(p for p in part.split() if len(p) >= 3)

    # -- what was done -------------------------------------------------------------
    def _mark(self, ds: Dataset, pseudonym: str) -> None:
        keep = self.options.keep
        if PATIENT_ID not in keep:
            ds[PATIENT_ID] = DataElement(PATIENT_ID, "LO", pseudonym)
        if PATIENT_NAME not in keep:
            ds[PATIENT_NAME] = DataElement(PATIENT_NAME, "PN", pseudonym)
        ds[IDENTITY_REMOVED] = DataElement(IDENTITY_REMOVED, "CS", "YES")
        ds[METHOD] = DataElement(METHOD, "LO", self.method)
        ds[METHOD_CODES] = DataElement(METHOD_CODES, "SQ", self._codes())
        ds[TEMPORAL_MODIFIED] = DataElement(TEMPORAL_MODIFIED, "CS",
                                            "MODIFIED" if self.options.retain_longitudinal else "REMOVED")

    def _codes(self) -> Sequence:
        """The De-identification Method Code Sequence: CID 7050 codes of the profile and options used."""
        used = [codes.DCM.BasicApplicationConfidentialityProfile]
        if self.options.retain_uids:
            used.append(codes.DCM.RetainUidsOption)
        if self.options.retain_longitudinal:
            used.append(codes.DCM.RetainLongitudinalTemporalInformationModifiedDatesOption)
        if self.options.clean_descriptions:
            used.append(codes.DCM.CleanDescriptorsOption)
        items = []
        for code in used:
            item = Dataset()
            item[0x00080100] = DataElement(0x00080100, "SH", code.value)
            item[0x00080102] = DataElement(0x00080102, "SH", code.scheme_designator)
            item[0x00080104] = DataElement(0x00080104, "LO", code.meaning)
            items.append(item)
        return Sequence(items)


def _vr(ds: Dataset, tag: int) -> str:
    raw = ds.get_item(tag)
    vr = getattr(raw, "VR", None)
    if vr and vr != "UN":
        return str(vr)
    known = dictionary_vr(tag)
    return known or (str(vr) if vr else "UN")


def _is_sequence(ds: Dataset, tag: int) -> bool:
    raw = ds.get_item(tag)
    vr = getattr(raw, "VR", None)
    if vr == "SQ":
        return True
    if vr in (None, "UN"):
        return dictionary_vr(tag) == "SQ"
    return False


def _empty(vr: str):
    if vr == "SQ":
        return Sequence([])
    if vr in BYTES_VRS:
        return b""
    if vr in NUMBER_VRS:
        return None
    return ""


def _dummy(vr: str):
    if vr == "SQ":
        return Sequence([])  # a dummied sequence (a report's content tree, a person's codes) is written empty
    if vr in NUMBER_VRS:
        return 0
    if vr in BYTES_VRS:
        return b"\0\0"
    return DUMMY_TEXT.get(vr, "ANONYMIZED")


def _shift_value(value: str, vr: str, days: int) -> str | None:
    """A DA or DT value moved back by ``days``; None when it is not a full date."""
    if len(value) < 8 or not value[:8].isdigit():
        return None
    try:
        day = dt.date(int(value[:4]), int(value[4:6]), int(value[6:8])) - dt.timedelta(days=days)
    except (ValueError, OverflowError):
        return None
    if vr == "DA" and len(value) != 8:
        return None
    return day.strftime("%Y%m%d") + value[8:]
