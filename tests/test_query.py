"""The query engine: every PS3.4 C.2.2.2 matching rule, free text, levels and errors."""

from __future__ import annotations

import sqlite3

import pytest

from dtools.errors import UsageError
from dtools.index.db import open_index
from dtools.index.ingest import Indexer
from dtools.index.query import count, find, parse_keys
from dtools.index.schema import MIGRATIONS, SCHEMA_VERSION
from dtools.sample import make_instance

# (patient, study, modality, date, time, name)
STUDIES = [
    (0, 0, "CT", "20260105", "081500", "SMITH^JOHN"),
    (0, 1, "MR", "20260120", "093000", "SMITH^JOHN"),
    (1, 2, "CT", "20260203", "101500", "SMITHERS^WAYLON"),
    (2, 3, "MR", "20251231", "235959", "Müller^Jürgen"),
    (3, 4, "CT", "20260131", "120000", "smythe^anne"),
]


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    d = tmp_path_factory.mktemp("q")
    conn = open_index(d / "index.db")
    paths = {}
    with Indexer(conn) as ix:
        for patient, study, mod, date, time, name in STUDIES:
            for series in range(2):
                for n in range(2):
                    ds = make_instance(mod, patient, study, series, n, name=name, charset="ISO_IR 192", date=date)
                    ds.StudyTime = time
                    if study == 2 and series == 1:
                        ds.Modality = "SR" if mod != "SR" else mod
                    p = d / f"{study}-{series}-{n}.dcm"
                    ds.save_as(p, enforce_file_format=True)
                    paths[(study, series, n)] = p
                    ix.add(p)
    yield conn
    conn.close()


def uids(results, key="StudyInstanceUID"):
    return sorted({r[key] for r in results})


def study_uid(study):
    patient = STUDIES[study][0]
    return make_instance("CT", patient, study, 0, 0).StudyInstanceUID


def studies(db, **keys):
    return uids(find(db, "study", keys))


def test_levels_and_counts(db):
    assert count(db, parse_keys("patient", {})) == 4
    assert count(db, parse_keys("study", {})) == 5
    assert count(db, parse_keys("series", {})) == 10
    assert count(db, parse_keys("instance", {})) == 20
    st = next(find(db, "study", {"StudyInstanceUID": study_uid(2)}))
    assert st["NumberOfStudyRelatedSeries"] == 2
    assert st["NumberOfStudyRelatedInstances"] == 4
    assert st["ModalitiesInStudy"] == ["CT", "SR"]
    p = next(find(db, "patient", {"PatientID": "PID00000"}))
    assert p["NumberOfPatientRelatedStudies"] == 2 and p["NumberOfPatientRelatedInstances"] == 8


def test_single_value(db):
    assert studies(db, StudyDate="20260120") == [study_uid(1)]
    assert studies(db, PatientID="PID00001") == [study_uid(2)]
    assert studies(db, PatientID="PID0000") == []


def test_wildcards(db):
    assert studies(db, PatientName="SMI*") == sorted([study_uid(0), study_uid(1), study_uid(2)])
    assert studies(db, PatientName="SM?TH*") == sorted([study_uid(0), study_uid(1), study_uid(2), study_uid(4)])
    assert studies(db, PatientName="*^JOHN") == sorted([study_uid(0), study_uid(1)])
    assert studies(db, AccessionNumber="ACC0003*") == [study_uid(4)]


def test_person_names_ignore_case_and_unicode(db):
    assert studies(db, PatientName="smith^john") == sorted([study_uid(0), study_uid(1)])
    assert studies(db, PatientName="MÜLLER*") == [study_uid(3)]
    assert studies(db, PatientName="müller^jürgen") == [study_uid(3)]


def test_date_ranges(db):
    assert studies(db, StudyDate="20260101-20260131") == sorted([study_uid(0), study_uid(1), study_uid(4)])
    assert studies(db, StudyDate="20260201-") == [study_uid(2)]
    assert studies(db, StudyDate="-20251231") == [study_uid(3)]
    assert studies(db, StudyDate="20260131-20260131") == [study_uid(4)]


def test_time_ranges_include_the_upper_minute(db):
    assert studies(db, StudyTime="0900-1015") == sorted([study_uid(1), study_uid(2)])
    assert studies(db, StudyTime="2359-") == [study_uid(3)]
    assert studies(db, StudyTime="1200") == [study_uid(4)]


def test_uid_list(db):
    wanted = sorted([study_uid(0), study_uid(3)])
    assert studies(db, StudyInstanceUID="\\".join(wanted)) == wanted


def test_universal_returns_key_without_filtering(db):
    got = list(find(db, "study", {"StudyDescription": "", "PatientName": "SMITH^JOHN"}, fields=["StudyDescription", "StudyDate"]))
    assert len(got) == 2
    assert all(set(r) == {"kind", "StudyDescription", "StudyDate"} for r in got)
    assert studies(db, StudyDate="") == studies(db)


def test_lower_level_keys_and_modalities(db):
    assert studies(db, Modality="CT", StudyDate="20260101-20260131") == sorted([study_uid(0), study_uid(4)])
    assert studies(db, ModalitiesInStudy="SR") == [study_uid(2)]
    assert studies(db, ModalitiesInStudy="MR\\SR") == sorted([study_uid(1), study_uid(2), study_uid(3)])
    series = list(find(db, "series", {"StudyInstanceUID": study_uid(2)}))
    assert sorted(s["Modality"] for s in series) == ["CT", "SR"]


def test_patient_keys_at_lower_levels(db):
    got = list(find(db, "instance", {"PatientName": "Müller*"}))
    assert len(got) == 4 and all(r["path"].endswith(".dcm") for r in got)
    assert all(r["PatientName"] == "Müller^Jürgen" and r["kind"] == "instance" for r in got)


def test_free_text(db):
    assert studies(db) and uids(find(db, "study", {}, text="welby")) == studies(db)
    assert uids(find(db, "study", {}, text="jürgen")) == [study_uid(3)]
    assert uids(find(db, "study", {}, text="juergen OR jurgen")) == [study_uid(3)]  # diacritics folded
    assert uids(find(db, "study", {"Modality": "MR"}, text="smith")) == [study_uid(1)]


def test_fts_syntax_error_is_usage_error(db):
    with pytest.raises(UsageError, match="not valid FTS5 syntax.*--quote"):
        list(find(db, "study", {}, text='"unbalanced'))


@pytest.mark.parametrize(
    "keys,needle",
    [
        ({"NoSuchKeyword": "x"}, "unknown keyword"),
        ({"PatientComments": "x"}, "not a search key"),
        ({"StudyDate": "2026-01-01-2026"}, "dates are YYYYMMDD without '-'"),
        ({"StudyDate": "2026-01-01"}, r"dates are YYYYMMDD without '-' \(e.g. StudyDate=20260101\)"),
        ({"StudyDate": "20260131-20260101"}, "the range ends before it starts; dates are YYYYMMDD"),
        ({"StudyDate": "20260101-2026"}, "dates are YYYYMMDD"),
        ({"StudyDate": "January"}, "dates are YYYYMMDD"),
        ({"StudyDate": "20261301"}, "dates are YYYYMMDD"),
        ({"StudyTime": "1200-1300-1400"}, "range has one '-'"),
        ({"StudyTime": "25-"}, "not a valid TM"),
        ({"SeriesNumber": "two"}, "expected a number"),
    ],
)
def test_bad_keys_are_usage_errors(db, keys, needle):
    with pytest.raises(UsageError, match=needle):
        list(find(db, "study", keys))


def test_cfind_mode_ignores_unknown_keys(db):
    got = list(find(db, "study", {"PatientComments": "", "QueryRetrieveLevel": "STUDY", "StudyDate": "20260120"}, strict=False))
    assert uids(got) == [study_uid(1)]


def test_dcmtk_tag_form(db):
    assert studies(db, **{"0008,0020": "20260120"}) == [study_uid(1)]
    assert studies(db, **{"(0010,0020)": "PID00001"}) == [study_uid(2)]


def test_limit_offset(db):
    all_ = [r["SOPInstanceUID"] for r in find(db, "instance", {})]
    page = [r["SOPInstanceUID"] for r in find(db, "instance", {}, limit=5, offset=5)]
    assert page == all_[5:10]


def test_glob_specials_match_literally(db, tmp_path):
    conn = open_index(tmp_path / "i.db")
    with Indexer(conn) as ix:
        ds = make_instance("CT", 9, 9, 0, 0, name="A[1]^B", charset="ISO_IR 6")
        ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
        ix.add(tmp_path / "x.dcm")
    assert len(list(find(conn, "patient", {"PatientName": "A[1]*"}))) == 1
    assert len(list(find(conn, "patient", {"PatientName": "A1*"}))) == 0


def test_older_index_is_migrated(tmp_path):
    path = tmp_path / "old.db"
    raw = sqlite3.connect(path)
    raw.executescript(MIGRATIONS[0] + "; PRAGMA user_version = 1;")
    raw.close()
    conn = open_index(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "patient_name_idx" in names


def test_newer_index_is_refused(tmp_path):
    path = tmp_path / "new.db"
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(Exception, match="newer than this dtools"):
        open_index(path)


def test_new_index_opened_by_several_processes_at_once(tmp_path):
    # dserve and dindex (or two cron jobs) may create the same index together
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for n in range(5):
        path = tmp_path / f"i{n}.db"
        procs = [ctx.Process(target=_open_and_close, args=(path,)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0]
        conn = open_index(path)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()


def _open_and_close(path):
    open_index(path).close()


def test_dictionary_table_matches_pydicom():
    """The small table that spares queries pydicom's import says what pydicom's dictionary says."""
    from pydicom.datadict import dictionary_VM, dictionary_VR, tag_for_keyword

    from dtools.index.dictionary import ENTRIES
    from dtools.index.query import KEY_LEVEL

    indexed = {k for k in KEY_LEVEL if k not in ("path", "size", "mtime")}
    assert set(ENTRIES) == indexed
    for kw, (tag, vr, vm) in ENTRIES.items():
        assert (tag, vr, vm) == (tag_for_keyword(kw), dictionary_VR(kw), dictionary_VM(kw)), kw
