"""dserve and dstore against real DCMTK tools: echoscu, storescu, findscu, movescu, getscu, storescp."""

from __future__ import annotations

import re

import os
import signal
import subprocess
import time
from pathlib import Path

import orjson
import pydicom
import pytest
from pydicom.uid import generate_uid

from conftest import require_tool, run
from dcmtk import output, free_port, make_corpus, make_instance, run_tool, start_dserve, start_storescp, stop

pytestmark = pytest.mark.integration
CORPUS = Path(pydicom.__file__).parent / "data" / "test_files"
os.environ["TCP_NODELAY"] = "1"  # DCMTK reads it; without it every PDU waits for a delayed ACK


def records_of(proc: subprocess.Popen) -> list[dict]:
    out, _err = output(proc)
    return [orjson.loads(line) for line in out.splitlines() if line.strip()]


def dataset_bytes(path: Path) -> bytes:
    """The data set of a DICOM file without preamble and file meta."""
    raw = Path(path).read_bytes()
    assert raw[128:132] == b"DICM"
    group_len = int.from_bytes(raw[140:144], "little")
    return raw[144 + group_len:]


@pytest.fixture
def site(tmp_path):
    """A running dserve on a free 127.0.0.1 port, stopped by pid afterwards."""
    home = tmp_path / "site"
    port = free_port()
    dest_port = free_port()
    proc = start_dserve(home, port, "--destination", f"STORESCP=127.0.0.1:{dest_port}", "--aet", "DTOOLS")
    info = {"home": home, "port": port, "dest_port": dest_port, "proc": proc}
    yield info
    stop(proc)


def dsearch(home: Path, level: str, *terms: str) -> list[dict]:
    res = run("dsearch", "--home", str(home), "-L", level, *terms)
    assert res.returncode == 0, res.stderr
    return res.records


def test_echoscu(site):
    res = run_tool(require_tool("echoscu"), "-aec", "DTOOLS", "127.0.0.1", str(site["port"]))
    assert res.returncode == 0, res.stderr


def test_allow_list_rejects_unknown_calling_aet(tmp_path):
    echoscu = require_tool("echoscu")
    port = free_port()
    proc = start_dserve(tmp_path / "h", port, "--allow", "GOOD")
    try:
        bad = run_tool(echoscu, "-aet", "BAD", "-aec", "DTOOLS", "127.0.0.1", str(port))
        good = run_tool(echoscu, "-aet", "GOOD", "-aec", "DTOOLS", "127.0.0.1", str(port))
    finally:
        stop(proc)
    assert bad.returncode != 0 and b"Rejected" in bad.stderr + bad.stdout
    assert good.returncode == 0, good.stderr


# storescu proposes one compressed transfer syntax per run: the option for each (and dserve
# accepts what storescu prefers, so each uncompressed syntax gets its own run too)
PROPOSE = {
    "1.2.840.10008.1.2": "-xi", "1.2.840.10008.1.2.1": "-xe", "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.5": "-xr", "1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs", "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw", "1.2.840.10008.1.2.1.99": "-xd",
}


def corpus_by_option() -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for f in sorted(CORPUS.glob("*.dcm")):
        try:
            meta = pydicom.filereader.read_file_meta_info(f)
            ts = str(meta.TransferSyntaxUID)
        except Exception:
            ts = ""
        groups.setdefault(PROPOSE.get(ts, "-x="), []).append(str(f))
    return groups


@pytest.mark.slow
def test_storescu_corpus_is_archived_and_indexed(site):
    storescu = require_tool("storescu")
    for option, files in corpus_by_option().items():
        run_tool(storescu, "-nh", "-R", option, "-aec", "DTOOLS", "127.0.0.1", str(site["port"]), *files, timeout=300)
    stop(site["proc"])
    recs = records_of(site["proc"])
    stored = list((site["home"] / "archive").rglob("*.dcm"))
    assert len(recs) >= 40, output(site["proc"])[1][-2000:]
    # one record per instance, each pointing at a complete file in the archive
    assert {r["path"] for r in recs} == {str(p) for p in stored}
    assert not list((site["home"] / "archive").rglob(".*.tmp"))
    syntaxes = {r.get("TransferSyntaxUID") for r in recs}
    for ts in ("1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.80",
               "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2"):
        assert ts in syntaxes, f"{ts} missing from {syntaxes}"
    last = {r["path"]: r for r in recs}  # the corpus reuses SOP Instance UIDs: the last store wins
    for r in last.values():
        ds = pydicom.dcmread(r["path"])
        assert ds.SOPInstanceUID == r["SOPInstanceUID"]
        assert ds.file_meta.TransferSyntaxUID == r["TransferSyntaxUID"]
    indexed = dsearch(site["home"], "instance")
    assert {r["SOPInstanceUID"] for r in indexed} == {r["SOPInstanceUID"] for r in recs}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """A site holding 3 patients / 4 studies / 6 series / 24 instances, sent with dstore.

    Shared by the query and retrieve tests, which do not change it.
    """
    base = tmp_path_factory.mktemp("loaded")
    src = base / "src"
    plan = [
        ("DOE^JANE", "P1", "20240102", "CT", 2), ("DOE^JOHN", "P2", "20240315", "MR", 1),
        ("MÜLLER^JÜRGEN", "P3", "20231231", "CT", 2), ("DOE^JANE", "P1", "20240601", "MR", 1),
    ]
    n = 0
    for patient, pid, date, modality, nseries in plan:
        study = generate_uid()
        for s in range(nseries):
            series = generate_uid()
            for i in range(4):
                make_instance(src / f"{n:04d}.dcm", patient=patient, patient_id=pid, study_uid=study,
                              series_uid=series, study_date=date, modality=modality, series_number=s + 1,
                              instance_number=i + 1, accession=f"ACC{pid}{date}")
                n += 1
    port, dest_port = free_port(), free_port()
    proc = start_dserve(base / "site", port, "--destination", f"STORESCP=127.0.0.1:{dest_port}")
    site = {"home": base / "site", "port": port, "dest_port": dest_port, "proc": proc}
    res = run("dstore", f"DTOOLS@127.0.0.1:{site['port']}", *sorted(str(p) for p in src.iterdir()))
    assert res.returncode == 0, res.stderr
    assert [r["status"] for r in res.records] == ["stored"] * n
    assert "1 association(s)" in res.stderr
    # the indexer commits in batches: wait (bounded) until everything is searchable
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(dsearch(site["home"], "instance")) < n:
        time.sleep(0.1)
    assert len(dsearch(site["home"], "instance")) == n
    yield site
    stop(proc)


def findscu(port: int, model: str, keys: list[str], outdir: Path) -> list[pydicom.Dataset]:
    outdir.mkdir(parents=True, exist_ok=True)
    args = [require_tool("findscu"), model, "-aec", "DTOOLS", "-X", "-od", str(outdir)]
    for k in keys:
        args += ["-k", k]
    res = run_tool(*args, "127.0.0.1", str(port))
    assert res.returncode == 0, res.stderr
    return [pydicom.dcmread(p) for p in sorted(outdir.glob("rsp*.dcm"))]


def answers(datasets, keywords):
    out = set()
    for ds in datasets:
        row = []
        for kw in keywords:
            v = ds.get(kw)
            if v is None or v == "":
                row.append(None)
            elif isinstance(v, pydicom.multival.MultiValue):
                row.append("\\".join(str(x) for x in v))
            else:
                row.append(str(v))
        out.add(tuple(row))
    return out


def dsearch_answers(recs, keywords):
    out = set()
    for r in recs:
        row = []
        for kw in keywords:
            v = r.get(kw)
            if v is None or v == "":
                row.append(None)
            elif isinstance(v, list):
                row.append("\\".join(str(x) for x in v))
            else:
                row.append(str(v))
        out.add(tuple(row))
    return out


CASES = [
    # (model, level, matching keys, return keys)
    ("-P", "PATIENT", {"PatientName": "DOE*"}, ["PatientID", "PatientBirthDate", "NumberOfPatientRelatedStudies"]),
    ("-P", "PATIENT", {"PatientID": "P?"}, ["PatientName"]),
    ("-S", "STUDY", {"StudyDate": "20240101-20241231"}, ["StudyInstanceUID", "PatientName", "ModalitiesInStudy",
                                                         "NumberOfStudyRelatedInstances", "AccessionNumber"]),
    ("-S", "STUDY", {"PatientName": "*JÜRGEN"}, ["StudyInstanceUID", "StudyDate"]),
    ("-P", "STUDY", {"PatientID": "P1", "StudyDate": "-20240301"}, ["StudyInstanceUID"]),
    ("-S", "SERIES", {"Modality": "CT"}, ["SeriesInstanceUID", "StudyInstanceUID", "SeriesNumber",
                                          "NumberOfSeriesRelatedInstances"]),
    ("-S", "IMAGE", {"InstanceNumber": "2"}, ["SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID"]),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_findscu_equals_dsearch(loaded, tmp_path, case):
    model, level, match, ret = CASES[case]
    keys = [f"QueryRetrieveLevel={level}"] + [f"{k}={v}" for k, v in match.items()] + ret
    if any(not v.isascii() for v in match.values()):
        keys.append("SpecificCharacterSet=ISO_IR 192")  # findscu sends argv bytes as they are
    got = findscu(loaded["port"], model, keys, tmp_path / "rsp")
    recs = dsearch(loaded["home"], {"IMAGE": "instance"}.get(level, level.lower()),
                   *[f"{k}={v}" for k, v in match.items()])
    assert recs, "the case must match something"
    kws = list(match) + ret
    assert answers(got, kws) == dsearch_answers(recs, kws)
    assert all(ds.QueryRetrieveLevel == level for ds in got)


def test_findscu_uid_list(loaded, tmp_path):
    studies = dsearch(loaded["home"], "study")
    pick = [s["StudyInstanceUID"] for s in studies[:2]]
    got = findscu(loaded["port"], "-S", ["QueryRetrieveLevel=SERIES", "StudyInstanceUID=" + "\\".join(pick),
                                          "SeriesInstanceUID"], tmp_path / "rsp")
    want = dsearch(loaded["home"], "series", "StudyInstanceUID=" + "\\".join(pick))
    assert {ds.SeriesInstanceUID for ds in got} == {r["SeriesInstanceUID"] for r in want}
    assert {ds.StudyInstanceUID for ds in got} == set(pick)


def test_findscu_patient_level_in_study_root_is_refused(loaded, tmp_path):
    res = run_tool(require_tool("findscu"), "-v", "-S", "-aec", "DTOOLS", "-k", "QueryRetrieveLevel=PATIENT",
                   "-k", "PatientID", "127.0.0.1", str(loaded["port"]))
    assert b"Final Find Response (Error: DataSetDoesNotMatchSOPClass)" in res.stderr + res.stdout


@pytest.mark.parametrize("date", ["20240601-20240101", "2024-01-02"])
def test_findscu_bad_date_gets_a_failure_status(loaded, tmp_path, date):
    """The query engine refuses a reversed range or an ISO date; over C-FIND that is a
    failure status (0xC210), and dserve goes on serving."""
    res = run_tool(require_tool("findscu"), "-d", "-S", "-aec", "DTOOLS", "-k", "QueryRetrieveLevel=STUDY",
                   "-k", f"StudyDate={date}", "-k", "StudyInstanceUID", "127.0.0.1", str(loaded["port"]))
    out = (res.stderr + res.stdout).decode(errors="replace")
    assert re.search(r"DIMSE Status\s*:\s*0xc210", out, re.I), out
    assert "Find Response: 1 (Pending)" not in out
    assert loaded["proc"].poll() is None
    ok = findscu(loaded["port"], "-S", ["QueryRetrieveLevel=STUDY", "StudyDate=20240101-20240601",
                                        "StudyInstanceUID"], tmp_path / "rsp")
    assert len(ok) == 3  # the studies of 20240102, 20240315 and 20240601


def test_movescu_to_storescp(loaded, tmp_path):
    out = tmp_path / "moved"
    log = tmp_path / "storescp.log"
    scp = start_storescp(require_tool("storescp"), out, loaded["dest_port"], "STORESCP", "-d", log=log)
    try:
        study = dsearch(loaded["home"], "study", "PatientID=P3")[0]
        res = run_tool(require_tool("movescu"), "-S", "-aet", "PACS_A", "-aec", "DTOOLS", "-aem", "STORESCP",
                       "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study['StudyInstanceUID']}",
                       "127.0.0.1", str(loaded["port"]))
        unknown = run_tool(require_tool("movescu"), "-S", "-aec", "DTOOLS", "-aem", "NOWHERE",
                           "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study['StudyInstanceUID']}",
                           "127.0.0.1", str(loaded["port"]))
    finally:
        stop(scp)
    assert res.returncode == 0, res.stderr
    want = {r["SOPInstanceUID"] for r in dsearch(loaded["home"], "instance", f"StudyInstanceUID={study['StudyInstanceUID']}")}
    got = {pydicom.dcmread(p).SOPInstanceUID for p in out.iterdir()}
    assert got == want and len(want) == 8
    assert b"MoveDestinationUnknown" in unknown.stderr + unknown.stdout
    # each sub-operation names the C-MOVE's caller as its Move Originator (PS3.7 9.3.1.1)
    originators = [line.split(":", 2)[2].strip() for line in log.read_text(errors="replace").splitlines()
                   if "Move Originator AE Title" in line]
    assert originators == ["PACS_A"] * 8


def test_movescu_destination_down_fails(loaded):
    study = dsearch(loaded["home"], "study")[0]
    res = run_tool(require_tool("movescu"), "-S", "-aec", "DTOOLS", "-aem", "STORESCP",
                   "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study['StudyInstanceUID']}",
                   "127.0.0.1", str(loaded["port"]))
    assert res.returncode != 0 and b"Move response with error status" in res.stderr + res.stdout


def test_getscu_series(loaded, tmp_path):
    out = tmp_path / "got"
    out.mkdir()
    series = dsearch(loaded["home"], "series", "Modality=MR")[0]
    res = run_tool(require_tool("getscu"), "-S", "-aec", "DTOOLS", "-od", str(out),
                   "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={series['StudyInstanceUID']}",
                   "-k", f"SeriesInstanceUID={series['SeriesInstanceUID']}", "127.0.0.1", str(loaded["port"]))
    assert res.returncode == 0, res.stderr
    want = dsearch(loaded["home"], "instance", f"SeriesInstanceUID={series['SeriesInstanceUID']}")
    got = {pydicom.dcmread(p).SOPInstanceUID: p for p in out.iterdir()}
    assert set(got) == {r["SOPInstanceUID"] for r in want} and len(got) == 4
    for r in want:  # same data set as archived
        assert pydicom.dcmread(got[r["SOPInstanceUID"]]).PixelData == pydicom.dcmread(r["path"]).PixelData


def test_concurrent_associations(site, tmp_path):
    storescu = require_tool("storescu")
    dirs = []
    for k in range(3):
        d = tmp_path / f"batch{k}"
        make_corpus(d, 20, studies=1)
        dirs.append(d)
    procs = [subprocess.Popen([storescu, "-aec", "DTOOLS", "127.0.0.1", str(site["port"]), "+sd", str(d)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for d in dirs]
    for p in procs:
        assert p.wait(120) == 0, p.stderr.read()
    stop(site["proc"])
    assert len(records_of(site["proc"])) == 60
    assert len(dsearch(site["home"], "instance")) == 60


@pytest.mark.slow
def test_sigterm_mid_transfer_leaves_no_partial_file(site, tmp_path):
    storescu = require_tool("storescu")
    src = tmp_path / "big"
    make_corpus(src, 150, studies=3, rows=256, columns=256)
    sender = subprocess.Popen([storescu, "-nh", "-aec", "DTOOLS", "127.0.0.1", str(site["port"]), "+sd", str(src)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    archive = site["home"] / "archive"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(archive.rglob("*.dcm"))) < 10:
        time.sleep(0.05)
    code = stop(site["proc"], signal.SIGTERM)
    sender.wait(60)
    assert code == 143
    assert "terminated" in output(site["proc"])[1]
    files = list(archive.rglob("*.dcm"))
    assert 10 <= len(files)
    assert not list(archive.rglob(".*.tmp"))
    for f in files:
        ds = pydicom.dcmread(f)
        assert len(ds.PixelData) == 256 * 256 * 2
    # everything on disk was indexed and reported before exit
    assert len(records_of(site["proc"])) == len(files)
    assert len(dsearch(site["home"], "instance")) == len(files)


def test_dstore_into_storescp_byte_identical(tmp_path):
    storescp = require_tool("storescp")
    out = tmp_path / "recv"
    port = free_port()
    scp = start_storescp(storescp, out, port, "PACS", "+B")
    files = [CORPUS / n for n in ("CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm",
                                  "ExplVR_BigEnd.dcm", "rtplan.dcm", "image_dfl.dcm", "JPEGLSNearLossless_08.dcm")]
    try:
        res = run("dstore", f"PACS@127.0.0.1:{port}", input="\n".join(map(str, files)) + "\n")
    finally:
        stop(scp)
    assert res.returncode == 0, res.stderr
    assert [r["status"] for r in res.records] == ["stored"] * len(files)
    assert "1 association(s)" in res.stderr
    received = {pydicom.dcmread(p).SOPInstanceUID: p for p in out.iterdir()}
    for f in files:
        ds = pydicom.dcmread(f)
        if f.name == "image_dfl.dcm":  # re-encoded: a deflated stream is sent padded to even length
            assert pydicom.dcmread(received[ds.SOPInstanceUID]).PixelData == ds.PixelData
            continue
        assert dataset_bytes(received[ds.SOPInstanceUID]) == dataset_bytes(f), f.name


def test_dstore_reports_bad_files(tmp_path):
    storescp = require_tool("storescp")
    port = free_port()
    scp = start_storescp(storescp, tmp_path / "recv", port, "PACS")
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom at all")
    try:
        mixed = run("dstore", f"PACS@127.0.0.1:{port}", str(CORPUS / "CT_small.dcm"), str(bad), str(tmp_path / "gone.dcm"))
    finally:
        stop(scp)
    assert mixed.returncode == 1
    by_path = {Path(r["path"]).name: r for r in mixed.records}
    assert by_path["CT_small.dcm"]["status"] == "stored"
    assert by_path["bad.dcm"]["status"] == "failed" and by_path["bad.dcm"]["error"]
    assert by_path["gone.dcm"]["status"] == "failed"
    assert f"dstore: {bad}:" in mixed.stderr and "Traceback" not in mixed.stderr


def test_dstore_rejected_by_allow_list_exits_69(tmp_path):
    require_tool("storescp")
    port = free_port()
    proc = start_dserve(tmp_path / "h", port, "--allow", "SOMEONE")
    try:
        res = run("dstore", f"DTOOLS@127.0.0.1:{port}", str(CORPUS / "CT_small.dcm"))
    finally:
        stop(proc)
    assert res.returncode == 69
    assert "rejected the association" in res.stderr and "Traceback" not in res.stderr


def test_storescp_in_tests_listens_on_loopback_only(tmp_path):
    from dcmtk import free_port, start_storescp, stop
    from loopback import listening_addresses

    tool = require_tool("storescp")
    port = free_port()
    proc = start_storescp(tool, tmp_path / "out", port)
    try:
        assert listening_addresses(port) == {"127.0.0.1"}
    finally:
        stop(proc)
