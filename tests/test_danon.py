"""danon: de-identified copies, checked byte by byte, run as the installed command through real pipes."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import time
import warnings
from collections import defaultdict
from pathlib import Path

import orjson
import pydicom
import pytest

from anoncorpus import DATA, cohort, copy_bundled, corpus_files, leaks
from conftest import cmd_path, require_tool, run
from dtools.anon.profile import Options, Profile, load_table

RECORD_KEYS = {"kind", "path", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
               "SOPClassUID", "Modality"}


def danon(home: Path, *args: str, input: bytes | str | None = None):
    return run("danon", "--home", str(home), *args, input=input)


def read(path) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """pydicom's bundled files and the generated cohort, de-identified once by the default profile."""
    root = tmp_path_factory.mktemp("anon")
    bundled = copy_bundled(root / "bundled")
    generated = cohort(root / "cohort")
    home = root / "home"
    out = root / "out"
    res = danon(home, "--allow-burned-in", "--out", str(out), str(root / "bundled"), str(root / "cohort"))
    return {"root": root, "home": home, "out": out, "bundled": bundled, "cohort": generated, "result": res}


def originals_by_sop(paths) -> dict[str, Path]:
    """SOP UID -> the file danon copies for it: the first in walking order when several files
    hold the same instance (pydicom's bundled files have it in several encodings)."""
    out: dict[str, Path] = {}
    for p in sorted(paths, key=str):
        out.setdefault(str(read(p).SOPInstanceUID), p)
    return out


def pairs(corpus) -> list[tuple[Path, Path]]:
    """(original, copy) pairs, matched through the mapping table (pseudonym -> original SOP UID)."""
    db = sqlite3.connect(corpus["home"] / "anon.db")
    back = dict(db.execute("SELECT pseudonym, original FROM pseudonym WHERE kind = 'instance'"))
    db.close()
    failed = {line.split(": ")[1] for line in corpus["result"].stderr.splitlines()
              if line.startswith("danon: /") and "same SOP" not in line}
    by_sop = originals_by_sop(p for p in corpus["bundled"] + corpus["cohort"] if str(p) not in failed)
    out = []
    for rec in corpus["result"].records:
        original = by_sop[back[rec["SOPInstanceUID"]]]
        out.append((original, Path(rec["path"])))
    return out


# -- the profile, byte by byte ---------------------------------------------------------------
def test_every_readable_file_is_copied(corpus):
    res = corpus["result"]
    # the only failures are files that are cut short
    failed = [line for line in res.stderr.splitlines() if line.startswith("danon: /") and "same SOP" not in line]
    # the only failure is a file pydicom itself cannot write back (dcmread + save_as fails too)
    assert all("SC_rgb_jpeg.dcm: cannot de-identify (TypeError" in line for line in failed), failed
    # several bundled files are the same SOP instance in another encoding: each is written once
    distinct = len(originals_by_sop(corpus["bundled"] + corpus["cohort"]))
    assert distinct - len(failed) <= len(res.records) <= distinct
    assert len(res.records) > 80
    assert "Traceback" not in res.stderr


def test_no_removed_or_replaced_value_survives_in_the_bytes(corpus):
    profile = Profile.build(load_table(), Options())
    checked = 0
    for original, copy_path in pairs(corpus):
        found = leaks(original, copy_path, profile)
        assert not found, f"{original.name}: {found[:5]} still in {copy_path}"
        checked += 1
    assert checked > 80


def test_names_in_other_character_sets_are_gone_in_every_encoding(corpus):
    # the check itself must see these encodings, or the test above proves nothing for them
    profile = Profile.build(load_table(), Options())
    from anoncorpus import removed_values

    for original, copy_path in pairs(corpus):
        ds = read(original)
        if "ISO 2022 IR 87" in str(ds.get("SpecificCharacterSet", "")) and "PID-" in str(ds.get("PatientID", "")):
            gone, _ = removed_values(original, profile)
            assert "山田".encode("iso2022_jp") in gone or any(b"\x1b$B" in g for g in gone)
            data = copy_path.read_bytes()
            assert "山田".encode("iso2022_jp")[3:-3] not in data
            assert "Yamada".encode() not in data
            return
    pytest.fail("no ISO 2022 IR 87 file in the cohort")


def test_key_attributes_are_gone_or_pseudonymous(corpus):
    for original, copy_path in pairs(corpus):
        before, after = read(original), read(copy_path)
        assert after.PatientIdentityRemoved == "YES"
        codes = [item.CodeValue for item in after.DeidentificationMethodCodeSequence]
        assert codes == ["113100"]
        assert str(after.PatientID).startswith("ANON") and after.PatientID != before.get("PatientID")
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            assert str(after[kw].value).startswith("2.25.") and after[kw].value != before[kw].value
        assert after.file_meta.MediaStorageSOPInstanceUID == after.SOPInstanceUID
        for kw in ("PatientBirthDate", "AccessionNumber", "InstitutionName", "ReferringPhysicianName", "StudyDate"):
            assert not after.get(kw), (copy_path, kw)
        for kw in ("OtherPatientNames", "PerformingPhysicianName", "StudyDescription", "SeriesDescription"):
            assert kw not in after
        assert not any(e.tag.is_private for e in after.iterall())
        assert after.preamble == b"\0" * 128


def test_pixel_data_is_unchanged(corpus):
    n = 0
    for original, copy_path in pairs(corpus):
        before, after = read(original), read(copy_path)
        if "PixelData" in before:
            assert after.PixelData == before.PixelData, copy_path
            assert after.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
            n += 1
    assert n > 40


def test_study_and_series_structure_is_kept(corpus):
    orig_series = defaultdict(set)
    copy_series = defaultdict(set)
    study_of = {}
    for original, copy_path in pairs(corpus):
        before, after = read(original), read(copy_path)
        orig_series[(before.StudyInstanceUID, before.SeriesInstanceUID)].add(before.SOPInstanceUID)
        copy_series[(after.StudyInstanceUID, after.SeriesInstanceUID)].add(after.SOPInstanceUID)
        study_of.setdefault(before.StudyInstanceUID, set()).add(after.StudyInstanceUID)
        # the archive layout of the new UIDs
        assert copy_path == corpus["out"] / after.StudyInstanceUID / after.SeriesInstanceUID / f"{after.SOPInstanceUID}.dcm"
    assert sorted(len(v) for v in orig_series.values()) == sorted(len(v) for v in copy_series.values())
    assert all(len(v) == 1 for v in study_of.values())  # one study stays one study
    assert len(copy_series) == len(orig_series)


def test_records_carry_nothing_identifying(corpus):
    for rec in corpus["result"].records:
        assert set(rec) <= RECORD_KEYS and rec["kind"] == "instance"
        assert Path(rec["path"]).is_file()


def test_references_between_files_stay_consistent(corpus):
    # each cohort file refers to itself in ReferencedImageSequence: the reference follows the new UID
    for original, copy_path in pairs(corpus):
        if original.parent.parent.parent.name != "cohort":
            continue
        after = read(copy_path)
        assert after.ReferencedImageSequence[0].ReferencedSOPInstanceUID == after.SOPInstanceUID
        inner = after.ReferencedImageSequence[0]
        assert not inner.get("PatientName") and str(inner.PatientID).startswith("ANON")


def test_deep_sequences_are_walked(corpus):
    n = 0
    for original, copy_path in pairs(corpus):
        if original.parent.parent.parent.name != "cohort":
            continue
        after = read(copy_path)
        depth, item = 0, after[0x00081250].value[0]
        while "ReferencedSeriesSequence" in item:
            assert len(item.ContentSequence) == 0  # D: written empty
            assert not any(e.tag.is_private for e in item)
            item = item.ReferencedSeriesSequence[0]
            depth += 1
        assert depth == 12
        assert not item.get("PatientName") and str(item.PatientID).startswith("ANON")
        assert item.ReferencedSOPInstanceUID == after.SOPInstanceUID
        n += 1
    assert n == 28


def test_mapping_table_links_pseudonyms_back_and_is_private(corpus):
    home = corpus["home"]
    db_path = home / "anon.db"
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "keys" / "anon.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "keys").stat().st_mode) == 0o700
    db = sqlite3.connect(db_path)
    rows = dict(db.execute("SELECT pseudonym, original FROM pseudonym WHERE kind = 'patient'"))
    for original, copy_path in pairs(corpus):
        before, after = read(original), read(copy_path)
        if before.get("PatientID"):
            assert rows[after.PatientID] == before.PatientID
    (dupes,) = db.execute("SELECT count(*) - count(DISTINCT pseudonym) FROM pseudonym").fetchone()
    assert dupes == 0


# -- options -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("small")
    return {"root": root, "files": cohort(root / "src")}


def test_pseudonyms_are_stable_across_runs_and_differ_with_another_key(small, tmp_path):
    home = tmp_path / "home"
    src = str(small["root"] / "src")
    a = danon(home, "--out", str(tmp_path / "a"), src)
    b = danon(home, "--out", str(tmp_path / "b"), src)
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    strip = lambda recs: sorted({k: v for k, v in r.items() if k != "path"}.items() for r in recs)  # noqa: E731
    assert strip(a.records) == strip(b.records) and len(a.records) == len(small["files"])
    # the same bytes, file by file, so that exports of the same cohort line up
    for ra, rb in zip(a.records, b.records):
        assert Path(ra["path"]).read_bytes() == Path(rb["path"]).read_bytes()
    salt = tmp_path / "project.key"
    salt.write_bytes(os.urandom(32))
    salt.chmod(0o600)
    c = danon(home, "--salt", str(salt), "--out", str(tmp_path / "c"), src)
    assert c.returncode == 0, c.stderr
    uids_a = {r["SOPInstanceUID"] for r in a.records} | {r["PatientID"] for r in a.records}
    uids_c = {r["SOPInstanceUID"] for r in c.records} | {r["PatientID"] for r in c.records}
    assert not uids_a & uids_c
    # and a new home (a new site key) gives other pseudonyms again
    d = danon(tmp_path / "other-home", "--out", str(tmp_path / "d"), src)
    assert not uids_a & {r["SOPInstanceUID"] for r in d.records}


def test_retain_longitudinal_keeps_intervals(small, tmp_path):
    res = danon(tmp_path / "home", "--retain-longitudinal", "--out", str(tmp_path / "o"), str(small["root"] / "src"))
    assert res.returncode == 0, res.stderr
    by_patient = defaultdict(set)
    for rec in res.records:
        ds = read(rec["path"])
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
        assert "113107" in [i.CodeValue for i in ds.DeidentificationMethodCodeSequence]
        assert ds.StudyDate == ds.AcquisitionDate and ds.StudyDate not in ("20240105", "20250120")
        assert not ds.get("PatientBirthDate")  # the Patient group stays as the Basic Profile has it
        by_patient[ds.PatientID].add(ds.StudyDate)
    original = (dt.date(2025, 1, 20) - dt.date(2024, 1, 5)).days
    assert len(by_patient) == 7
    shifts = set()
    for dates in by_patient.values():
        first, second = sorted(dt.datetime.strptime(d, "%Y%m%d").date() for d in dates)
        assert (second - first).days == original
        shifts.add((dt.date(2024, 1, 5) - first).days)
    assert len(shifts) > 1  # each patient has an offset of its own


def test_retain_uids_and_keep(small, tmp_path):
    src = small["files"][0]
    res = danon(tmp_path / "home", "--retain-uids", "--keep", "PatientSex", "--keep", "StudyDescription",
                "--out", str(tmp_path / "o"), str(src))
    assert res.returncode == 0, res.stderr
    assert "warning: --keep StudyDescription keeps an attribute the profile would remove" in res.stderr
    before, after = read(src), read(res.records[0]["path"])
    assert after.SOPInstanceUID == before.SOPInstanceUID and after.StudyInstanceUID == before.StudyInstanceUID
    assert after.PatientSex == before.PatientSex and after.StudyDescription == before.StudyDescription
    assert "113110" in [i.CodeValue for i in after.DeidentificationMethodCodeSequence]
    assert not after.get("PatientBirthDate")
    bad = danon(tmp_path / "home", "--keep", "NoSuchThing", "--out", str(tmp_path / "o"), str(src))
    assert bad.returncode == 2 and "--keep NoSuchThing: not a DICOM keyword" in bad.stderr


def test_clean_descriptions_keeps_text_without_identifiers(small, tmp_path):
    res = danon(tmp_path / "home", "--clean-descriptions", "--out", str(tmp_path / "o"), str(small["root"] / "src"))
    assert res.returncode == 0, res.stderr
    profile = Profile.build(load_table(), Options(clean_descriptions=True))
    by_sop = originals_by_sop(small["files"])
    db = sqlite3.connect(tmp_path / "home" / "anon.db")
    back = dict(db.execute("SELECT pseudonym, original FROM pseudonym WHERE kind = 'instance'"))
    for rec in res.records:
        original = by_sop[back[rec["SOPInstanceUID"]]]
        after = read(rec["path"])
        assert after.SeriesDescription == "AXIAL 5MM"
        assert after.StudyDescription.startswith("CT THORAX *") and "PID-" not in after.StudyDescription
        assert "2024" not in after.StudyDescription
        assert not leaks(original, Path(rec["path"]), profile)


# -- refusals and bad input ---------------------------------------------------------------------------
def test_burned_in_files_are_refused_by_name(small, tmp_path):
    sc = DATA / "test_files" / "SC_rgb.dcm"
    if not sc.exists():
        sc = DATA / "test_files" / "SC_rgb_rle.dcm"
    ct = read(small["files"][0])
    ct.BurnedInAnnotation = "YES"
    flagged = tmp_path / "flagged.dcm"
    ct.save_as(flagged, enforce_file_format=True)
    good = small["files"][1]
    res = danon(tmp_path / "home", "--out", str(tmp_path / "o"), str(sc), str(flagged), str(good))
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert f"danon: {sc}: Secondary Capture Image Storage usually has text burned into the pixels; not copied " \
           "(check the images, then rerun with --allow-burned-in)" in lines
    assert any(line.startswith(f"danon: {flagged}: BurnedInAnnotation is YES") for line in lines)
    assert len(res.records) == 1  # the rest was processed
    assert len(corpus_files(tmp_path / "o")) == 1
    ok = danon(tmp_path / "home", "--allow-burned-in", "--out", str(tmp_path / "o2"), str(sc), str(flagged))
    assert ok.returncode == 0 and len(ok.records) == 2


def test_bad_inputs_get_one_line_each_and_the_rest_is_processed(small, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("this is not DICOM\n" * 20)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    no_pid = read(small["files"][0])
    del no_pid.PatientID
    no_pid.SOPInstanceUID = no_pid.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    nopid_path = tmp_path / "nopid.dcm"
    no_pid.save_as(nopid_path, enforce_file_format=True)
    no_uid = read(small["files"][1])
    del no_uid.SeriesInstanceUID
    nouid_path = tmp_path / "nouid.dcm"
    no_uid.save_as(nouid_path, enforce_file_format=True)
    bare = read(small["files"][2])  # a data set without preamble and meta (older files)
    bare.file_meta = pydicom.dataset.FileMetaDataset()
    bare.preamble = None
    bare_path = tmp_path / "bare.dcm"
    pydicom.dcmwrite(bare_path, bare, implicit_vr=True, little_endian=True)
    assert bare_path.read_bytes()[:2] == b"\x08\x00"
    missing = tmp_path / "missing.dcm"
    stdin = "\n".join([str(text), str(empty), str(nopid_path), str(nouid_path), str(bare_path), str(missing),
                       '{"kind": "study", "StudyInstanceUID": "1.2.3"}', "{not json"]) + "\n"
    res = danon(tmp_path / "home", "--out", str(tmp_path / "o"), input=stdin)
    assert res.returncode == 1, res.stderr
    assert f"danon: {text}: not a DICOM file" in res.stderr
    assert f"danon: {empty}:" in res.stderr
    assert f"danon: {nouid_path}: has no SeriesInstanceUID; danon files copies by UID" in res.stderr
    assert f"danon: {missing}: no such file or directory" in res.stderr
    assert 'danon: study record: has no "path"; give files, or search with \'dsearch --level instance\'' in res.stderr
    assert "danon: line '{not json'" in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.records) == 2  # the file without PatientID and the bare data set
    assert "1 file(s) had no PatientID" in res.stderr
    nopid_copy = [r for r in res.records if read(r["path"]).InstanceNumber == no_pid.InstanceNumber][0]
    assert nopid_copy["PatientID"].startswith("ANON")


def test_the_same_sop_given_twice_is_written_once(small, tmp_path):
    src = small["files"][0]
    twin = tmp_path / "twin.dcm"
    shutil.copyfile(src, twin)
    res = danon(tmp_path / "home", "--out", str(tmp_path / "o"), str(src), str(twin), str(src), "-j", "1")
    assert res.returncode == 0, res.stderr
    assert len(res.records) == 1 and len(corpus_files(tmp_path / "o")) == 1
    assert f"danon: {twin}: the same SOP instance as an earlier input; its copy is written once" in res.stderr


def test_out_inside_the_archive_is_refused(small, tmp_path):
    home = tmp_path / "home"
    for where in (home / "archive" / "research", home / "keys", home):
        res = danon(home, "--out", str(where), str(small["files"][0]))
        assert res.returncode == 2, res.stderr
        assert "must not mix with it" in res.stderr and "Traceback" not in res.stderr
    assert not (home / "archive" / "research").exists()
    missing = run("danon", "--home", str(home), str(small["files"][0]))
    assert missing.returncode == 2 and "--out" in missing.stderr


def test_out_inside_the_input_tree_is_not_read_again(small, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(small["root"] / "src", tree)
    first = danon(tmp_path / "home", "--out", str(tree / "anon"), str(tree))
    assert first.returncode == 0 and len(first.records) == len(small["files"])
    second = danon(tmp_path / "home", "--out", str(tree / "anon"), str(tree))
    assert second.returncode == 0 and len(second.records) == len(small["files"])
    assert len(corpus_files(tree / "anon")) == len(small["files"])


def test_bad_salt_file(small, tmp_path):
    short = tmp_path / "short.key"
    short.write_text("abc\n")
    res = danon(tmp_path / "home", "--salt", str(short), "--out", str(tmp_path / "o"), str(small["files"][0]))
    assert res.returncode == 2 and "has 3 bytes; a key needs at least 16" in res.stderr
    shared = tmp_path / "shared.key"
    shared.write_bytes(os.urandom(32))
    shared.chmod(0o644)
    res = danon(tmp_path / "home", "--salt", str(shared), "--out", str(tmp_path / "o"), str(small["files"][0]))
    assert res.returncode == 0 and "can be read by others" in res.stderr


# -- pipes, concurrency, kills -------------------------------------------------------------------------
def test_dsearch_pipe_into_danon(small, tmp_path):
    home = tmp_path / "home"
    idx = run("dindex", "--home", str(home), "-q", str(small["root"] / "src"))
    assert idx.returncode == 0, idx.stderr
    found = run("dsearch", "--home", str(home), "--level", "instance", "Modality=MR")
    assert found.returncode == 0 and found.records
    res = danon(home, "--out", str(tmp_path / "o"), input=found.stdout)
    assert res.returncode == 0, res.stderr
    assert len(res.records) == len(found.records)
    assert all(read(r["path"]).Modality == "MR" for r in res.records)
    # the copies are valid input for the next step of a pipe
    again = run("dindex", "--home", str(tmp_path / "research"), input=res.stdout)
    assert again.returncode == 0 and len(again.records) == len(res.records)


def test_dcmtk_reads_the_copies(small, tmp_path):
    dcmdump = require_tool("dcmdump")
    res = danon(tmp_path / "home", "--out", str(tmp_path / "o"), *map(str, small["files"][:4]))
    assert res.returncode == 0
    for rec in res.records:
        p = subprocess.run([dcmdump, "-q", "+P", "0012,0062", "+P", "0010,0020", rec["path"]],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert "[YES]" in p.stdout and f"[{rec['PatientID']}]" in p.stdout


def test_two_runs_at_once_share_the_mapping_table(small, tmp_path):
    home = tmp_path / "home"
    src = str(small["root"] / "src")
    procs = [subprocess.Popen([cmd_path("danon"), "--home", str(home), "--out", str(tmp_path / f"o{i}"), src],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
             for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    recs = [[orjson.loads(line) for line in o[0].splitlines()] for o in outs]
    assert sorted(r["SOPInstanceUID"] for r in recs[0]) == sorted(r["SOPInstanceUID"] for r in recs[1])
    db = sqlite3.connect(home / "anon.db")
    (n,) = db.execute("SELECT count(*) FROM pseudonym WHERE kind = 'instance'").fetchone()
    assert n == len(small["files"])
    (keys,) = db.execute("SELECT count(DISTINCT key_id) FROM pseudonym").fetchone()
    assert keys == 1  # both runs ended up with the one key created first


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> list[Path]:
    from dtools.sample import make_instance

    root = tmp_path_factory.mktemp("many")
    out = []
    for i in range(400):
        ds = make_instance("CT", i % 7, i // 50, (i // 10) % 5, i)
        p = root / f"{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_run_leaves_no_partial_file(many, tmp_path, sig):
    home, out = tmp_path / "home", tmp_path / "o"
    proc = subprocess.Popen([cmd_path("danon"), "--home", str(home), "--out", str(out), "-j", "2",
                             *map(str, many)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()  # the first batch is in place
    assert first, proc.stderr.read() if proc.stderr else ""
    time.sleep(0.05)
    os.killpg(proc.pid, sig)
    proc.wait(timeout=60)
    if sig == signal.SIGTERM:
        assert proc.returncode == 143
        assert not list((out / ".danon-tmp").glob("*")) if (out / ".danon-tmp").exists() else True
    written = corpus_files(out)
    assert 0 < len(written) <= len(many)
    originals = {read(p).InstanceNumber: read(p).PixelData for p in many}
    for p in written:  # every file in place is whole
        ds = read(p)
        assert ds.PixelData == originals[ds.InstanceNumber]
    # only hidden temporaries may remain, and the next run removes them and finishes the job
    stray = [p for p in out.rglob("*") if p.is_file() and p.suffix != ".dcm"]
    assert all(p.name.startswith(".") and p.name.endswith(".tmp") for p in stray)
    again = danon(home, "--out", str(out), *map(str, many))
    assert again.returncode == 0, again.stderr
    assert len(corpus_files(out)) == len(many) == len(again.records)
    assert not (out / ".danon-tmp").exists()


def test_a_closed_stdout_ends_the_run_quietly(many, tmp_path):
    proc = subprocess.Popen([cmd_path("danon"), "--home", str(tmp_path / "home"), "--out", str(tmp_path / "o"),
                             *map(str, many)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline()  # like '| head -1'
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "internal error" not in err
    assert not list((tmp_path / "o" / ".danon-tmp").glob("*")) if (tmp_path / "o" / ".danon-tmp").exists() else True
