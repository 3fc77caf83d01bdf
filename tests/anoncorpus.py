"""Test data for danon: pydicom's bundled files and a generated cohort, and the raw-bytes check.

``leaks(original, copy, profile)`` lists every value the profile removes or replaces in
``original`` that can still be found in the bytes of ``copy``, in any of the encodings the
value can take (the file's own character sets, UTF-8, and each name component alone).
"""

from __future__ import annotations

import copy
import os
import shutil
import warnings
from pathlib import Path

import pydicom
from pydicom.charset import encode_string
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from dtools.anon.deid import DUMMY_TEXT
from dtools.anon.profile import Profile
from dtools.sample import make_instance

DATA = Path(pydicom.__file__).parent / "data"
# the sample cohort's names and their character sets, and a few more
NAMES = [
    ("Müller^Jürgen", "ISO_IR 100"),
    ("Ivanov^Ivan=Иванов^Иван", "ISO_IR 144"),
    ("Wang^XiaoDong=王^小东", "GB18030"),
    ("Yamada^Tarou=山田^太郎=やまだ^たろう", ["", "ISO 2022 IR 87"]),
    ("Hong^Gildong=洪^吉洞=홍^길동", ["", "ISO 2022 IR 149"]),
    ("Ζαχαρόπουλος^Δημήτρης", "ISO_IR 126"),
    ("Papadakis^Elena=Παπαδάκη^Έλενα", "ISO_IR 192"),
]


def bundled_files() -> list[Path]:
    return sorted((DATA / "test_files").glob("*.dcm")) + sorted((DATA / "charset_files").glob("*.dcm"))


def copy_bundled(dest: Path) -> list[Path]:
    """pydicom's bundled files that it can read, with UIDs added where a file has none."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for src in bundled_files():
        target = dest / src.name
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(src, force=True)
                ds.decode()
                _ = [e for e in ds.iterall()]
        except Exception:
            continue  # files pydicom itself cannot read are not this test's subject
        missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if k not in ds]
        if not missing and getattr(ds, "preamble", None) is not None:
            shutil.copyfile(src, target)
        else:
            for k in missing:
                setattr(ds, k, generate_uid(entropy_srcs=[src.name, k]))
            if "SOPClassUID" not in ds:
                ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ds.save_as(target, enforce_file_format=True)
            except Exception:
                continue
        out.append(target)
    return out


def deep_sequence(depth: int, leaf: Dataset) -> Sequence:
    """A sequence nested ``depth`` levels deep around ``leaf``: each level is a public sequence
    (ReferencedSeriesSequence, which the profile walks), with copies of ``leaf`` beside it in a
    private sequence and in a ContentSequence (D in the table: written empty)."""
    inner = leaf
    for level in range(depth):
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        item.ContentSequence = Sequence([copy.deepcopy(leaf)])
        item.add_new(0x00091010, "LO", "PRIVATE LEVEL")  # no creator: still private
        block = item.private_block(0x0011, "DTOOLS TEST", create=True)
        block.add_new(0x01, "SQ", Sequence([copy.deepcopy(leaf)]))
        item.ReferencedSeriesSequence = Sequence([inner])
        inner = item
    return Sequence([inner])


def cohort(dest: Path) -> list[Path]:
    """A generated cohort: names in several character sets, private tags, deep sequences,
    identifying values inside descriptions, and a patient with two studies a year apart."""
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for p, (name, charset) in enumerate(NAMES):
        for study, date in enumerate(("20240105", "20250120")):
            for n in range(2):
                ds = make_instance("CT" if p % 2 == 0 else "MR", p, p * 10 + study, 0, n, name=name,
                                   charset=charset, date=date)
                ds.PatientID = f"PID-{p:03d}-X"
                ds.OtherPatientNames = name
                ds.PatientBirthDate = f"19{60 + p}0{1 + p}1{p}"
                ds.InstitutionName = f"St Elsewhere Hospital {p}"
                ds.AccessionNumber = f"ACCN{p:03d}{study}{n}"
                ds.StudyDescription = f"CT THORAX {name.split('^')[0]} {ds.PatientID} 2024-01-05"
                ds.SeriesDescription = "AXIAL 5MM"
                ds.AcquisitionDate = date
                ds.ReferringPhysicianName = "Welby^Marcus"
                ds.PerformingPhysicianName = "Kildare^James"
                ds.OperatorsName = "Nightingale^Florence"
                block = ds.private_block(0x0029, "DTOOLS PRIVATE", create=True)
                block.add_new(0x10, "LO", f"private copy of PID-{p:03d}-X")
                leaf = Dataset()
                leaf.PatientName = name
                leaf.PatientID = f"PID-{p:03d}-X"
                leaf.ReferencedSOPInstanceUID = ds.SOPInstanceUID
                ds.ReferencedImageSequence = Sequence([copy.deepcopy(leaf)])
                ds.add_new(0x00081250, "SQ", deep_sequence(12, leaf))  # RelatedSeriesSequence: walked
                path = dest / f"p{p}" / f"s{study}" / f"{n}.dcm"
                path.parent.mkdir(parents=True, exist_ok=True)
                ds.save_as(path, enforce_file_format=True)
                paths.append(path)
    return paths


# -- the raw-bytes check -----------------------------------------------------------------
def _strings(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        out = []
        for v in value:
            out.extend(_strings(v))
        return out
    s = str(value).strip("\0 ")
    if not s:
        return []
    parts = [s]
    for group in s.split("="):
        parts.append(group)
        parts.extend(c for c in group.split("^"))
    return [p.strip() for p in parts if p.strip()]


def _encodings(text: str, charsets) -> set[bytes]:
    forms = {text.encode("utf-8", "replace")}
    try:
        forms.add(encode_string(text, charsets))
    except Exception:
        pass
    for cs in charsets:
        try:
            forms.add(text.encode(cs))
        except Exception:
            pass
    return forms


def removed_values(path: Path, profile: Profile) -> tuple[set[bytes], bytes]:
    """(encoded forms of every value the profile removes or replaces, the bytes of what it keeps)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, force=True)
        ds.decode()
    charsets = list(getattr(ds, "_character_set", None) or ["iso8859"])
    gone: set[bytes] = set()
    kept: list[bytes] = []

    def walk(d: Dataset, removing: bool) -> None:
        for elem in d:
            tag = int(elem.tag)
            action = profile.action(tag)
            private = elem.tag.is_private
            drop = removing or private or action not in (None, "K", "C", "S", "R")
            if elem.VR == "SQ":
                for item in elem.value or []:
                    walk(item, drop if action != "R" else removing)
                continue
            target = gone if drop else None
            if isinstance(elem.value, (bytes, bytearray)):
                if drop and len(elem.value) >= 8 and len(set(elem.value)) > 2:
                    gone.add(bytes(elem.value))
                elif not drop:
                    kept.append(bytes(elem.value))
                continue
            for s in _strings(elem.value):
                forms = _encodings(s, charsets)
                if target is not None:
                    gone.update(forms)
                else:
                    kept.extend(forms)

    walk(ds, False)
    return gone, b"\n".join(kept)


# what danon itself writes: a removed value that is part of these ("ANON", "0000") proves nothing
DANON_WORDS = b"\n".join(v.encode() for v in (
    *DUMMY_TEXT.values(), "ANON", "PS3.15 E.1-1 Basic Profile", "Retain UIDs, Retain Modified Dates, Clean Descriptors",
    "Basic Application Confidentiality Profile", "Retain Longitudinal Temporal Information Modified Dates Option",
    "dicom-anonymizer", "dtools danon", "MODIFIED", "REMOVED", pydicom.uid.PYDICOM_IMPLEMENTATION_UID))


def leaks(original: Path, copy_path: Path, profile: Profile, min_len: int = 4) -> list[bytes]:
    """The removed or replaced values of ``original`` that occur in the bytes of ``copy_path``
    (its pixel data, checked separately to be unchanged, is left out of the search)."""
    gone, kept = removed_values(original, profile)
    data = copy_path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(copy_path)
    pixels = ds.get("PixelData")
    if pixels:
        data = data.replace(bytes(pixels), b"")
    # the new UIDs are long runs of digits in which a short number can turn up by chance
    for elem in list(ds.iterall()) + list(ds.file_meta):
        if elem.VR == "UI":
            for v in _strings(elem.value):
                if v.startswith("2.25.") and v.encode() not in gone:
                    data = data.replace(v.encode(), b"")
    found = []
    for value in gone:
        if len(value) < min_len or value in kept or value in DANON_WORDS:
            continue  # too short to mean anything, or also the value of an attribute the profile keeps
        if value in data:
            found.append(value)
    return found


def corpus_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.dcm") if not any(part.startswith(".") for part in p.parts))


def reset(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    os.makedirs(path)
