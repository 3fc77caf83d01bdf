"""The bridge: site B as one more DICOM node at site A, through a real Dovecot relay.

Site B holds the studies, grants A its catalog, queries and retrieves, and runs
'dserve --relay'. Site A's dserve answers associations called SITE_B ([peers.site-b] aet).
DCMTK's findscu, movescu and getscu talk to SITE_B as to any PACS: C-FIND answers what B's
own dsearch answers (NEARLINE, RetrieveAETitle SITE_B), C-MOVE lands every instance in a
storescp, C-GET returns them; a study that arrives late ends the C-MOVE with 0xA702 and is
still stored to the destination when it comes; a peer that does not grant retrieve refuses.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from conftest import require_tool
from dcmtk import free_port, run_tool, start_dserve, start_storescp, stop
from dovecot import Dovecot
from exchange import Exchange

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dovecot():
    with Dovecot(require_tool("dovecot")) as dc:
        yield dc


@pytest.fixture
def sites(tmp_path, dovecot, request):
    base = "b" + str(abs(hash(request.node.name)) % 10**8)
    ex = Exchange(tmp_path, dovecot.url.replace("/dtools", f"/{base}"), env=dovecot.env(), names=("site-a", "site-b"))
    for grant in ("share", "query", "retrieve"):
        ex.set("site-b", "peers.site-a", grant, "true")
    ex.add_studies("site-b", tmp_path / "b-data", studies=3)
    ex.ok("site-b", "dserve --relay --once")  # publishes B's catalog
    ex.receive("site-a")  # A's receive job applies it
    ex.dest_port = free_port()  # type: ignore[attr-defined]
    ex.set("site-a", "peers.site-b", "aet", '"SITE_B"')
    ex.set("site-a", "dserve", "bridge_wait", '"60s"')  # a refusal or a study comes sooner; a loaded CI may need it
    ex.set("site-a", "dserve", "publish_interval", "1")
    ex.set("site-a", "dserve.destinations", "STORESCP", f'"127.0.0.1:{ex.dest_port}"')
    procs: list[subprocess.Popen] = []
    ex.procs = procs  # type: ignore[attr-defined]
    yield ex
    for p in procs:
        if p.poll() is None:
            stop(p)


def serve(ex: Exchange, site: str, *args: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**ex.env, "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}"}
    p = start_dserve(ex.home(site), port, "--relay", *args, env=env)
    ex.procs.append(p)  # type: ignore[attr-defined]
    return p, port


def find_rsp(port: int, out: Path, *keys: str) -> list[pydicom.Dataset]:
    out.mkdir(parents=True, exist_ok=True)
    res = run_tool(require_tool("findscu"), "-S", "-aec", "SITE_B", "-X", "-od", str(out),
                   *[a for k in keys for a in ("-k", k)], "127.0.0.1", str(port))
    assert res.returncode == 0, res.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def test_findscu_movescu_getscu_through_the_bridge(sites, tmp_path):
    ex = sites
    serve(ex, "site-b")
    _a, port = serve(ex, "site-a")
    own = ex.ok("site-b", "dsearch --level study").records
    got = find_rsp(port, tmp_path / "find", "QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientID",
                   "RetrieveAETitle", "InstanceAvailability", "NumberOfStudyRelatedInstances")
    assert sorted(str(d.StudyInstanceUID) for d in got) == sorted(r["StudyInstanceUID"] for r in own)
    assert {str(d.RetrieveAETitle) for d in got} == {"SITE_B"}
    assert {str(d.InstanceAvailability) for d in got} == {"NEARLINE"}
    counts = {str(d.StudyInstanceUID): int(d.NumberOfStudyRelatedInstances) for d in got}
    assert counts == {r["StudyInstanceUID"]: int(r["NumberOfStudyRelatedInstances"]) for r in own}

    # C-MOVE a study from SITE_B to a storescp at site A
    study = own[0]["StudyInstanceUID"]
    want = {r["SOPInstanceUID"] for r in ex.ok("site-b", f"dsearch StudyInstanceUID={study}").records}
    scp = start_storescp(require_tool("storescp"), tmp_path / "moved", ex.dest_port)
    try:
        res = run_tool(require_tool("movescu"), "-S", "-aec", "SITE_B", "-aem", "STORESCP",
                       "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(port))
    finally:
        stop(scp)
    assert res.returncode == 0, res.stderr
    moved = {str(pydicom.dcmread(p).SOPInstanceUID) for p in (tmp_path / "moved").iterdir()}
    assert moved == want and want
    # the study is now in A's archive, once; B's ledger served one request for it
    assert {r["SOPInstanceUID"] for r in ex.ok("site-a", f"dsearch StudyInstanceUID={study}").records} == want

    # C-GET another study over the association
    other = own[1]["StudyInstanceUID"]
    want2 = {r["SOPInstanceUID"] for r in ex.ok("site-b", f"dsearch StudyInstanceUID={other}").records}
    (tmp_path / "got").mkdir()
    res = run_tool(require_tool("getscu"), "-S", "-aec", "SITE_B", "-od", str(tmp_path / "got"),
                   "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={other}", "127.0.0.1", str(port))
    assert res.returncode == 0, res.stderr
    assert {str(pydicom.dcmread(p).SOPInstanceUID) for p in (tmp_path / "got").iterdir()} == want2

    # IMAGE level asks B live
    series = ex.ok("site-b", f"dsearch --level series StudyInstanceUID={other}").records[0]["SeriesInstanceUID"]
    images = find_rsp(port, tmp_path / "find-image", "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={other}",
                      f"SeriesInstanceUID={series}", "SOPInstanceUID")
    assert {str(d.SOPInstanceUID) for d in images} == {
        r["SOPInstanceUID"] for r in ex.ok("site-b", f"dsearch SeriesInstanceUID={series}").records}
    status = ex.ok("site-a", "dstatus").records[0]
    assert status["requests_sent"] >= 3 and status["requests_pending"] == 0


def test_a_late_study_is_still_stored_to_the_destination(sites, tmp_path):
    ex = sites
    ex.set("site-a", "dserve", "bridge_wait", '"3s"')
    _a, port = serve(ex, "site-a")
    study = ex.ok("site-b", "dsearch --level study").records[2]["StudyInstanceUID"]
    want = {r["SOPInstanceUID"] for r in ex.ok("site-b", f"dsearch StudyInstanceUID={study}").records}
    log = tmp_path / "storescp.log"
    scp = start_storescp(require_tool("storescp"), tmp_path / "moved", ex.dest_port, "STORESCP", "-d", log=log)
    try:
        res = run_tool(require_tool("movescu"), "-S", "-aec", "SITE_B", "-aem", "STORESCP",
                       "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(port))
        assert res.returncode != 0 and b"OutOfResourcesSubOperations" in res.stderr + res.stdout, res.stderr  # 0xA702
        assert ex.ok("site-a", "dstatus").records[0]["forwards_waiting"] == 1
        serve(ex, "site-b")  # B comes back: its study travels, and A forwards it when it arrives
        deadline = time.monotonic() + 90
        moved: set[str] = set()
        while time.monotonic() < deadline and moved != want:
            time.sleep(1)
            moved = {str(pydicom.dcmread(p).SOPInstanceUID) for p in (tmp_path / "moved").glob("*")
                     if p.is_file() and not p.name.startswith(".")}
    finally:
        stop(scp)
    assert moved == want
    assert ex.ok("site-a", "dstatus").records[0]["forwards_waiting"] == 0
    # the forward came from SITE_B, as the C-MOVE's sub-operations would have
    callers = {line.split(":", 2)[2].strip() for line in log.read_text(errors="replace").splitlines()
               if "Calling Application Name" in line} - {""}
    assert callers == {"SITE_B"}


def test_a_peer_that_does_not_grant_retrieve_refuses(sites, tmp_path):
    ex = sites
    ex.set("site-b", "peers.site-a", "retrieve", "false")
    serve(ex, "site-b")
    a, port = serve(ex, "site-a")
    study = ex.ok("site-b", "dsearch --level study").records[0]["StudyInstanceUID"]
    res = run_tool(require_tool("movescu"), "-S", "-aec", "SITE_B", "-aem", "STORESCP",
                   "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(port))
    out = (res.stderr + res.stdout).decode()
    assert res.returncode != 0 and "UnableToProcess" in out, out  # 0xC001
    assert b"site-b refused: site-a is not granted retrieve here" in bytes(a.err)  # dserve's log, and the comment
    # an AE title nobody configured is still rejected
    res = run_tool(require_tool("echoscu"), "-aec", "SITE_X", "127.0.0.1", str(port))
    assert res.returncode != 0


def test_orthanc_finds_and_moves_from_site_b(sites, tmp_path):
    """A real PACS (Orthanc) with SITE_B as a modality: its C-FIND equals B's own dsearch, and
    its C-MOVE of a study from SITE_B to itself lands every instance, byte for byte. Orthanc
    accepts stores only from its known modalities: the sub-operations come from SITE_B."""
    from orthanc import Orthanc

    ex = sites
    serve(ex, "site-b")
    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", modalities={"siteb": ("SITE_B", "127.0.0.1", port)},
                      DicomAlwaysAllowStore=False)
    ex.set("site-a", "dserve.destinations", "ORTHANC", f'"127.0.0.1:{orthanc.dicom_port}"')
    env = {**ex.env, "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}"}
    a = start_dserve(ex.home("site-a"), port, "--relay", "-v", env=env)
    ex.procs.append(a)  # type: ignore[attr-defined]
    with orthanc:  # started here, stopped (by its process id) at the end
        _qid, answers = orthanc.query("siteb", "Study", {"StudyInstanceUID": "", "PatientID": "", "StudyDate": ""})
        own = ex.ok("site-b", "dsearch --level study").records
        assert sorted((a["StudyInstanceUID"], a["PatientID"], a["StudyDate"]) for a in answers) == sorted(
            (r["StudyInstanceUID"], r["PatientID"], r["StudyDate"]) for r in own)
        study = own[0]["StudyInstanceUID"]
        job = orthanc.post("/modalities/siteb/move", {"Level": "Study", "Resources": [{"StudyInstanceUID": study}],
                                                      "TargetAet": "ORTHANC", "Synchronous": True})
        assert job == {} or job is None or "Failed" not in str(job), job
        want = {r["SOPInstanceUID"]: r for r in ex.ok("site-b", f"dsearch StudyInstanceUID={study}").records}
        got = {t["SOPInstanceUID"]: t for t in orthanc.instances()}
        assert set(got) == set(want) and want
        uid = next(iter(want))
        assert dataset_bytes(orthanc.file(got[uid]["_id"])) == dataset_bytes(Path(want[uid]["path"]).read_bytes())
    log = bytes(a.err).decode()
    assert "to SITE_B (site-b, bridged)" in log and "asking site-b for 1 stud(ies)" in log


def test_a_relay_that_refuses_the_login_is_a_status_not_an_abort(sites, tmp_path):
    """A careless admin's wrong relay password at site A: C-MOVE, C-GET and a live C-FIND to
    SITE_B end with 0xA701 (0xA700 for C-FIND) and the reason, on an association that goes on;
    nothing is deferred."""
    ex = sites
    port = free_port()
    env = {**ex.env, "DTOOLS_RELAY_PASSWORD": "wrong", "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}"}
    a = start_dserve(ex.home("site-a"), port, env=env)
    ex.procs.append(a)  # type: ignore[attr-defined]
    study = ex.ok("site-b", "dsearch --level study").records[0]["StudyInstanceUID"]
    move = run_tool(require_tool("movescu"), "-v", "-S", "-aec", "SITE_B", "-aem", "STORESCP",
                    "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(port))
    get = run_tool(require_tool("getscu"), "-v", "-S", "-aec", "SITE_B", "-od", str(tmp_path),
                   "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(port))
    find = run_tool(require_tool("findscu"), "-v", "-S", "-aec", "SITE_B", "-k", "QueryRetrieveLevel=IMAGE",
                    "-k", f"StudyInstanceUID={study}", "-k", "SeriesInstanceUID=1.2.3", "-k", "SOPInstanceUID",
                    "127.0.0.1", str(port))
    for res in (move, get):
        out = (res.stdout + res.stderr).decode()
        assert "OutOfResourcesNumberOfMatches" in out and "Releasing Association" in out, out
    out = (find.stdout + find.stderr).decode()
    assert "OutOfResources" in out and "Releasing Association" in out, out
    stop(a)
    log = bytes(a.err).decode()
    assert log.count("cannot ask site-b:") == 3, log
    assert ex.ok("site-a", "dstatus").records[0]["forwards_waiting"] == 0


def dataset_bytes(raw: bytes) -> bytes:
    """A DICOM file's data set, without preamble and file meta."""
    assert raw[128:132] == b"DICM"
    return raw[144 + int.from_bytes(raw[140:144], "little"):]


def test_a_bridge_killed_mid_move_loses_nothing_and_the_study_travels_once(sites, tmp_path):
    """Site A's dserve killed (its whole process group) while a C-MOVE waits for B's study;
    restarted, the same C-MOVE completes: every instance at the destination, each once in A's
    archive, and B sealed the study for A once."""
    import signal

    ex = sites
    serve(ex, "site-b")
    a, port = serve(ex, "site-a")
    study = ex.ok("site-b", "dsearch --level study").records[0]["StudyInstanceUID"]
    want = {r["SOPInstanceUID"] for r in ex.ok("site-b", f"dsearch StudyInstanceUID={study}").records}
    scp = start_storescp(require_tool("storescp"), tmp_path / "moved", ex.dest_port)
    argv = [require_tool("movescu"), "-S", "-aec", "SITE_B", "-aem", "STORESCP", "-k", "QueryRetrieveLevel=STUDY",
            "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(port)]
    try:
        first = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.8)  # the request is out; B is answering
        for pid in [a.pid, *children(a.pid)]:  # dserve and its indexer, as a killed process group
            os.kill(pid, signal.SIGKILL)
        first.wait(60)
        a2, port2 = serve(ex, "site-a")
        argv[-1] = str(port2)
        res = run_tool(*argv)
    finally:
        stop(scp)
    assert res.returncode == 0, res.stderr
    moved = [str(pydicom.dcmread(p).SOPInstanceUID) for p in (tmp_path / "moved").iterdir()]
    assert set(moved) == want
    archived = ex.ok("site-a", f"dsearch StudyInstanceUID={study}").records
    assert sorted(r["SOPInstanceUID"] for r in archived) == sorted(want)  # each once
    import sqlite3

    db = sqlite3.connect(ex.home("site-b") / "outbox" / "ledger.db")
    sealed = db.execute("SELECT count(DISTINCT envelope_id), sum(instances) FROM sealed WHERE peer='site-a' "
                        "AND instances > 0").fetchone()
    assert sealed == (1, len(want)), sealed


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out
