"""danon's parts: the table as loaded, the options, keyed pseudonyms, date shifts, the key file."""

from __future__ import annotations

import stat
import threading

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dtools.anon import pseudo
from dtools.anon.deid import BURNED_IN_CLASSES, Deidentifier, _shift_value, burned_in_reason
from dtools.anon.profile import Options, Profile, keep_tags, load_table
from dtools.config import Config
from dtools.errors import UsageError


@pytest.fixture(scope="module")
def table():
    return load_table()


def test_the_table_is_the_standards(table):
    assert len(table.codes) > 600 and table.edition >= "2023"
    code = table.code
    assert code(0x00100010) == "Z"  # Patient's Name
    assert code(0x00100020) == "Z/D"  # Patient ID
    assert code(0x0020000D) == "U"  # Study Instance UID
    assert code(0x00081030) == "X"  # Study Description
    assert code(0x00080080) == "X/Z/D"  # Institution Name
    assert code(0x00081140) == "X/Z/U*"  # Referenced Image Sequence
    assert code(0x50001234) == "X" and code(0x60023000) == "X"  # curves, overlay data (repeating groups)
    assert code(0x00080060) is None  # Modality is not in the table: kept


def test_options_change_the_actions(table):
    basic = Profile.build(table, Options())
    assert basic.action(0x0020000D) == "U" and basic.action(0x00080020) == "Z"
    assert basic.action(0x00100010) == "N" and basic.action(0x00100020) == "P"
    uids = Profile.build(table, Options(retain_uids=True))
    assert uids.action(0x0020000D) == "K" and uids.action(0x00080018) == "K"
    dates = Profile.build(table, Options(retain_longitudinal=True))
    assert dates.action(0x00080020) == "S" and dates.action(0x0008002A) == "S"  # StudyDate, AcquisitionDateTime
    assert dates.action(0x00080030) == "K"  # StudyTime
    assert dates.action(0x00100030) == "Z"  # PatientBirthDate stays as the Basic Profile has it
    clean = Profile.build(table, Options(clean_descriptions=True))
    assert clean.action(0x00081030) == "C" and clean.action(0x0008103E) == "C" and clean.action(0x00181030) == "C"
    assert clean.action(0x00080080) == "Z"  # InstitutionName is no descriptor
    kept = Profile.build(table, Options(keep=keep_tags(["PatientAge", "StudyDescription"])))
    assert kept.action(0x00101010) == "K" and kept.action(0x00081030) == "K"
    with pytest.raises(UsageError):
        keep_tags(["PatientAgeX"])


def test_uids_are_valid_stable_and_keyed():
    a = pseudo.Keyring(b"k" * 32)
    b = pseudo.Keyring(b"j" * 32)
    u = a.uid("1.2.3.4")
    assert u == a.uid("1.2.3.4") == a.uid("1.2.3.4\0") and u != a.uid("1.2.3.5") and u != b.uid("1.2.3.4")
    assert u.startswith("2.25.") and len(u) <= 64 and pydicom.uid.UID(u).is_valid
    n = int(u[5:])
    assert (n >> 76) & 0xF == 8 and (n >> 62) & 0x3 == 2  # a version 8, RFC 4122 variant UUID
    assert a.patient("id\0\0X") == a.patient("id\0\0X") != b.patient("id\0\0X")
    assert 1 <= a.shift_days("id\0\0X") <= pseudo.MAX_SHIFT_DAYS
    with pytest.raises(ValueError):
        pseudo.Keyring(b"short")


def test_date_shift():
    assert _shift_value("20240301", "DA", 1) == "20240229"
    assert _shift_value("20240301120000.5+0100", "DT", 366) == "20230301120000.5+0100"
    assert _shift_value("2024", "DT", 10) is None and _shift_value("2024-03-01", "DA", 1) is None
    assert _shift_value("20241332", "DA", 1) is None


def test_the_key_is_made_once_with_mode_0600_even_by_two_runs_at_once(tmp_path):
    config = Config(tmp_path / "home")
    rings: list = []
    threads = [threading.Thread(target=lambda: rings.append(pseudo.load_keyring(config, None))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.key for r in rings}) == 1
    key_file = tmp_path / "home" / "keys" / "anon.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert [p.name for p in key_file.parent.iterdir()] == ["anon.key"]
    assert pseudo.load_keyring(config, None).key == rings[0].key


def test_burned_in(table):
    ds = Dataset()
    ds.SOPClassUID = pydicom.uid.UltrasoundImageStorage
    assert "Ultrasound Image Storage usually has text burned into the pixels" == burned_in_reason(ds)
    ds.SOPClassUID = pydicom.uid.CTImageStorage
    assert burned_in_reason(ds) is None
    ds.BurnedInAnnotation = "YES"
    assert burned_in_reason(ds).startswith("BurnedInAnnotation is YES")
    assert pydicom.uid.SecondaryCaptureImageStorage in BURNED_IN_CLASSES
    assert pydicom.uid.MultiFrameTrueColorSecondaryCaptureImageStorage in BURNED_IN_CLASSES


def test_a_data_set_in_memory(table):
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Jürgen"
    ds.PatientID = "12345"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = "1.2.3", "1.2.3.4", "1.2.3.4.5"
    ds.SOPClassUID = pydicom.uid.CTImageStorage
    ds.StudyDate = "20240105"
    ds.StudyDescription = "Knee of Müller 12345 on 2024-01-05"
    ds.add_new(0x00090010, "LO", "ACME")
    ds.add_new(0x00091001, "LO", "Müller")
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3.4.5"
    item.PatientName = "Müller^Jürgen"
    ds.ReferencedImageSequence = Sequence([item])
    profile = Profile.build(table, Options(clean_descriptions=True, retain_longitudinal=True))
    keyring = pseudo.Keyring(b"x" * 32)
    out = Deidentifier(profile, keyring).apply(ds)
    assert ds.PatientID == ds.PatientName == out.patient == keyring.patient("id\0\x0012345")
    assert ds.SOPInstanceUID == keyring.uid("1.2.3.4.5") == ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID
    assert ds.ReferencedImageSequence[0].PatientName == ""
    assert ds.StudyDescription == "Knee of * * on *"
    assert ds.StudyDate != "20240105" and len(ds.StudyDate) == 8
    assert 0x00090010 not in ds and 0x00091001 not in ds
    kinds = {row[0] for row in out.rows}
    assert {"patient", "study", "series", "instance"} <= kinds
    assert [i.CodeValue for i in ds.DeidentificationMethodCodeSequence] == ["113100", "113107", "113105"]
