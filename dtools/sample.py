"""Small synthetic DICOM studies for the quickstart, the tests and the benchmarks.

``python -m dtools.sample DIR`` writes a few CT and MR studies built from the small
images that ship with pydicom, with patient names in several character sets.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from ._version import __version__

UID_ROOT = "1.2.826.0.1.3680043.10.1234."  # dtools sample data

# (PatientName, SpecificCharacterSet): names that need their character set to come out right
PATIENTS = [
    ("SMITH^JOHN", "ISO_IR 6"),
    ("Müller^Jürgen", "ISO_IR 100"),
    ("Ivanov^Ivan=Иванов^Иван", ["ISO_IR 144"]),
    ("Wang^XiaoDong=王^小东", "GB18030"),
    ("Yamada^Tarou=山田^太郎=やまだ^たろう", ["", "ISO 2022 IR 87"]),
    ("Hong^Gildong=洪^吉洞=홍^길동", ["", "ISO 2022 IR 149"]),
    ("SMITHERS^WAYLON", "ISO_IR 192"),
    ("O'BRIEN^MARY", "ISO_IR 6"),
]
DESCRIPTIONS = {
    "CT": ["CT CHEST WITH CONTRAST", "CT ABDOMEN PELVIS", "CT HEAD TRAUMA"],
    "MR": ["MR BRAIN", "MR KNEE LEFT", "MR SPINE LUMBAR"],
}

_TEMPLATES: dict[str, Dataset] = {}


def template(modality: str) -> Dataset:
    if modality not in _TEMPLATES:
        name = "CT_small.dcm" if modality == "CT" else "MR_small.dcm"
        _TEMPLATES[modality] = pydicom.dcmread(get_testdata_file(name))
    return _TEMPLATES[modality]


def uid(*parts: int) -> str:
    return UID_ROOT + ".".join(str(p) for p in parts)


def make_instance(modality: str, patient: int, study: int, series: int, number: int, *, name=None,
                  charset=None, date: str = "20260115", description: str | None = None) -> Dataset:
    """One instance of a synthetic study; every UID is derived from the numbers given."""
    ds = copy.deepcopy(template(modality))
    pname, pcharset = PATIENTS[patient % len(PATIENTS)]
    ds.SpecificCharacterSet = charset if charset is not None else pcharset
    ds.PatientName = name if name is not None else pname
    ds.PatientID = f"PID{patient:05d}"
    ds.PatientBirthDate = f"19{50 + patient % 50:02d}0{1 + patient % 9}1{patient % 10}"
    ds.PatientSex = "MF"[patient % 2]
    ds.StudyInstanceUID = uid(1, patient, study)
    ds.SeriesInstanceUID = uid(2, patient, study, series)
    ds.SOPInstanceUID = uid(3, patient, study, series, number)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyDate = date
    ds.SeriesDate = date
    ds.StudyTime = f"{8 + study % 10:02d}{(study * 7) % 60:02d}00"
    ds.AccessionNumber = f"ACC{patient:04d}{study:03d}"
    ds.StudyID = f"S{study}"
    choices = DESCRIPTIONS[modality]
    ds.StudyDescription = description or choices[(patient + study) % len(choices)]
    ds.SeriesDescription = f"{modality} SERIES {series + 1}"
    ds.SeriesNumber = series + 1
    ds.InstanceNumber = number + 1
    ds.Modality = modality
    ds.ReferringPhysicianName = "WELBY^MARCUS"
    ds.BodyPartExamined = "CHEST" if modality == "CT" else "BRAIN"
    return ds


def generate(out: str | os.PathLike, studies: int = 6, series: int = 2, instances: int = 3) -> list[Path]:
    """Write ``studies`` studies of ``series`` x ``instances`` files under ``out``; returns the paths."""
    out = Path(out)
    paths = []
    for s in range(studies):
        patient = s % len(PATIENTS)
        modality = "CT" if s % 2 == 0 else "MR"
        date = f"2026{1 + s % 12:02d}{10 + s % 18:02d}"
        for se in range(series):
            for n in range(instances):
                ds = make_instance(modality, patient, s, se, n, date=date)
                path = out / f"study{s + 1:03d}" / f"series{se + 1}" / f"{n + 1:04d}.dcm"
                path.parent.mkdir(parents=True, exist_ok=True)
                ds.save_as(path, enforce_file_format=True)
                paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dtools.sample", description=__doc__.splitlines()[0])
    ap.add_argument("dir", help="directory to write the studies into")
    ap.add_argument("--studies", type=int, default=8)
    ap.add_argument("--series", type=int, default=2)
    ap.add_argument("--instances", type=int, default=3)
    ap.add_argument("--version", action="version", version=f"dtools {__version__}")
    args = ap.parse_args(argv)
    paths = generate(args.dir, args.studies, args.series, args.instances)
    print(f"wrote {len(paths)} DICOM files in {args.studies} studies under {args.dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
