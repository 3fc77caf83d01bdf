"""dserve and dstore against real peers: Orthanc, DCMTK and pynetdicom's apps.

Each fault that testing against these peers found has a test here against the peer that
showed it; so has transcoding (a JPEG-LS, a JPEG 2000 and a big-endian file reach a
storescp that accepts only Implicit VR Little Endian, with the original pixels).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from conftest import require_tool, run
from dcmtk import free_port, make_instance, output, run_tool, start_dserve, start_storescp, stop
from orthanc import Orthanc

pytestmark = pytest.mark.integration
os.environ["TCP_NODELAY"] = "1"  # DCMTK reads it


def dsearch(home: Path, level: str, *terms: str) -> list[dict]:
    res = run("dsearch", "--home", str(home), "-L", level, *terms)
    assert res.returncode == 0, res.stderr
    return res.records


def wait_indexed(home: Path, n: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(dsearch(home, "instance")) < n:
        time.sleep(0.1)
    assert len(dsearch(home, "instance")) == n


def store(port: int, *paths, aec: str = "DTOOLS") -> None:
    res = run("dstore", f"{aec}@127.0.0.1:{port}", *map(str, paths))
    assert res.returncode == 0, res.stderr


# -- Orthanc ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def with_orthanc(tmp_path_factory):
    """Orthanc and a dserve that know each other: 2 patients, 3 studies, 10 instances."""
    base = tmp_path_factory.mktemp("orthanc")
    port = free_port()
    orthanc = Orthanc(base / "orthanc", modalities={"dtools": ("DTOOLS", "127.0.0.1", port)})
    src = base / "src"
    n = 0
    for patient, pid, date, count in (("DOE^JANE", "P1", "20240102", 4), ("DOE^JANE", "P1", "20240601", 2),
                                      ("ROE^RICHARD", "P2", "20231231", 4)):
        study, series = generate_uid(), generate_uid()
        for i in range(count):
            make_instance(src / f"{n:03d}.dcm", patient=patient, patient_id=pid, study_uid=study, series_uid=series,
                          study_date=date, instance_number=i + 1, accession=f"A{pid}{date}")
            n += 1
    home = base / "site"
    proc = start_dserve(home, port, "--destination", f"ORTHANC=127.0.0.1:{orthanc.dicom_port}", "-v")
    orthanc.start()
    try:
        store(port, *sorted(src.iterdir()))
        wait_indexed(home, n)
        yield {"orthanc": orthanc, "home": home, "port": port, "proc": proc, "src": src}
    finally:
        orthanc.stop()
        stop(proc)


def test_orthanc_finds_what_dsearch_finds(with_orthanc):
    from loopback import listening_addresses

    o, home = with_orthanc["orthanc"], with_orthanc["home"]
    assert listening_addresses(o.http_port) == listening_addresses(o.dicom_port) == {"127.0.0.1"}
    _qid, studies = o.query("dtools", "Study", {"PatientName": "DOE*", "StudyDate": "", "AccessionNumber": ""})
    want = dsearch(home, "study", "PatientName=DOE*")
    assert len(want) == 2
    assert ({(a["StudyInstanceUID"], a["StudyDate"], a["AccessionNumber"]) for a in studies}
            == {(r["StudyInstanceUID"], r["StudyDate"], r["AccessionNumber"]) for r in want})
    _qid, patients = o.query("dtools", "Patient", {"PatientID": "*", "PatientName": ""})
    assert {(a["PatientID"], a["PatientName"]) for a in patients} == {("P1", "DOE^JANE"), ("P2", "ROE^RICHARD")}
    _qid, series = o.query("dtools", "Series", {"StudyInstanceUID": want[0]["StudyInstanceUID"], "Modality": ""})
    assert [a["SeriesInstanceUID"] for a in series] == [r["SeriesInstanceUID"] for r in dsearch(
        home, "series", f"StudyInstanceUID={want[0]['StudyInstanceUID']}")]


def test_orthanc_retrieves_a_patient(with_orthanc):
    """Orthanc's PATIENT-level C-MOVE comes under the Study Root model: dserve serves it
    (it answered 0xC513 without a comment), with the stored bytes."""
    o, home = with_orthanc["orthanc"], with_orthanc["home"]
    job = o.post("/modalities/dtools/move", {"Level": "Patient", "Resources": [{"PatientID": "P1"}],
                                             "TargetAet": "ORTHANC", "Synchronous": True})
    assert job == {} or job is None or "Failed" not in str(job), job
    time.sleep(0.2)
    assert "C-MOVE from ORTHANC, PATIENT level: 6 instance(s) to ORTHANC@" in bytes(with_orthanc["proc"].err).decode()
    want = {r["SOPInstanceUID"]: r for r in dsearch(home, "instance", "PatientID=P1")}
    got = {t["SOPInstanceUID"]: t for t in o.instances() if t.get("PatientID") == "P1"}
    assert set(got) == set(want) and len(want) == 6
    uid = next(iter(want))
    archived = Path(want[uid]["path"]).read_bytes()
    received = o.file(got[uid]["_id"])
    assert dataset_bytes(received) == dataset_bytes(archived)


def dataset_bytes(raw: bytes) -> bytes:
    """A DICOM file's data set, without preamble and file meta."""
    assert raw[128:132] == b"DICM"
    return raw[144 + int.from_bytes(raw[140:144], "little"):]


# -- DCMTK ---------------------------------------------------------------------------------
PROFILES = r"""
[[TransferSyntaxes]]
[J2K]
TransferSyntax1 = JPEG2000LosslessOnly
[Implicit]
TransferSyntax1 = LittleEndianImplicit

[[PresentationContexts]]
[CTJ2K]
PresentationContext1 = CTImageStorage\J2K
[CTJ2KEcho]
PresentationContext1 = CTImageStorage\J2K
PresentationContext2 = VerificationSOPClass\Implicit

[[Profiles]]
[J2KOnly]
PresentationContexts = CTJ2K
[J2KOnlyEcho]
PresentationContexts = CTJ2KEcho
"""


def with_new_uids(name: str, dest: Path, study: str, series: str | None = None) -> Path:
    """A pydicom test file under new UIDs (the MR_small variants share theirs), in its own syntax."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series or generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID = "PX"
    ds.save_as(dest)
    return dest


def pixels_of(path: Path) -> np.ndarray:
    return pydicom.dcmread(path).pixel_array


@pytest.fixture(scope="module")
def qr(tmp_path_factory):
    """A dserve holding one instance of each case, and the ports of its move destinations:
    STORESCP (every syntax), IMPLICIT (Implicit VR Little Endian only), J2KONLY (CT in
    JPEG 2000 only) and J2KECHO (the same, and Verification)."""
    base = tmp_path_factory.mktemp("qr")
    src = base / "src"
    src.mkdir()
    study = generate_uid()
    files = {
        "jls": with_new_uids("MR_small_jpeg_ls_lossless.dcm", src / "jls.dcm", study),
        "j2k": with_new_uids("MR_small_jp2klossless.dcm", src / "j2k.dcm", study),
        "be": with_new_uids("MR_small_bigendian.dcm", src / "be.dcm", study),
    }
    plain = make_instance(base / "plain.dcm", patient_id="PG", study_uid=generate_uid(), series_uid=generate_uid())
    res = run_tool(require_tool("dcmconv"), "+g", str(plain), str(src / "gl.dcm"))  # with group lengths
    assert res.returncode == 0, res.stderr
    files["gl"] = src / "gl.dcm"
    pair_study, pair_series = generate_uid(), generate_uid()
    make_instance(base / "j.dcm", patient_id="PJ", study_uid=pair_study, series_uid=pair_series, instance_number=1)
    res = run_tool(require_tool("dcmcjpeg"), "+e1", str(base / "j.dcm"), str(src / "jll.dcm"))  # JPEG Lossless SV1
    assert res.returncode == 0, res.stderr
    files["jll"] = src / "jll.dcm"
    files["jll_plain"] = make_instance(src / "jll_plain.dcm", patient_id="PJ", study_uid=pair_study,
                                       series_uid=pair_series, instance_number=2)
    ports = {name: free_port() for name in ("STORESCP", "IMPLICIT", "J2KONLY", "J2KECHO")}
    port = free_port()
    home = base / "site"
    proc = start_dserve(home, port, "-v", *[a for name, p in ports.items()
                                            for a in ("--destination", f"{name}=127.0.0.1:{p}")])
    try:
        store(port, *files.values())
        wait_indexed(home, len(files))
        (base / "profiles.cfg").write_text(PROFILES)
        yield {"home": home, "port": port, "proc": proc, "files": files, "ports": ports, "base": base,
               "uids": {k: pydicom.dcmread(f).SOPInstanceUID for k, f in files.items()}}
    finally:
        stop(proc)


def archived(qr, key: str) -> Path:
    return Path(dsearch(qr["home"], "instance", f"SOPInstanceUID={qr['uids'][key]}")[0]["path"])


def movescu(port: int, dest: str, level: str, **keys: str) -> tuple[int, str]:
    args = [require_tool("movescu"), "-v", "-S", "-aec", "DTOOLS", "-aem", dest, "-k", f"QueryRetrieveLevel={level}"]
    for k, v in keys.items():
        args += ["-k", f"{k}={v}"]
    res = run_tool(*args, "127.0.0.1", str(port))
    return res.returncode, (res.stdout + res.stderr).decode(errors="replace")


def received(outdir: Path) -> dict[str, Path]:
    return {pydicom.dcmread(p).SOPInstanceUID: p for p in outdir.iterdir() if p.is_file()}


def test_move_sends_the_stored_bytes(qr, tmp_path):
    """C-MOVE sends the data set as archived, group lengths included (it re-encoded it)."""
    out = tmp_path / "out"
    scp = start_storescp(require_tool("storescp"), out, qr["ports"]["STORESCP"], "STORESCP", "+B")
    try:
        code, log = movescu(qr["port"], "STORESCP", "IMAGE", StudyInstanceUID="*", SeriesInstanceUID="*",
                            SOPInstanceUID=qr["uids"]["gl"])
    finally:
        stop(scp)
    assert code == 0, log
    got = received(out)[qr["uids"]["gl"]]
    assert b"\x08\x00\x00\x00UL" in dataset_bytes(got.read_bytes())[:16]  # (0008,0000) came along
    assert dataset_bytes(got.read_bytes()) == dataset_bytes(archived(qr, "gl").read_bytes())


def test_get_sends_the_stored_bytes(qr, tmp_path):
    out = tmp_path / "got"
    out.mkdir()
    res = run_tool(require_tool("getscu"), "-S", "+B", "-aec", "DTOOLS", "-od", str(out),
                   "-k", "QueryRetrieveLevel=IMAGE", "-k", "StudyInstanceUID=*", "-k", "SeriesInstanceUID=*",
                   "-k", f"SOPInstanceUID={qr['uids']['gl']}", "127.0.0.1", str(qr["port"]))
    assert res.returncode == 0, res.stderr
    got = received(out)[qr["uids"]["gl"]]
    assert dataset_bytes(got.read_bytes()) == dataset_bytes(archived(qr, "gl").read_bytes())


@pytest.mark.parametrize("key", ["jls", "j2k", "be"])
def test_move_converts_for_an_implicit_only_storescp(qr, tmp_path, key):
    """JPEG-LS, JPEG 2000 and big endian reach `storescp +xi` with the original pixels (it
    failed with 0xA702 for big endian, and never decompressed)."""
    out = tmp_path / "out"
    scp = start_storescp(require_tool("storescp"), out, qr["ports"]["IMPLICIT"], "IMPLICIT", "+xi")
    try:
        code, log = movescu(qr["port"], "IMPLICIT", "IMAGE", StudyInstanceUID="*", SeriesInstanceUID="*",
                            SOPInstanceUID=qr["uids"][key])
    finally:
        stop(scp)
    assert code == 0, log
    got = received(out)[qr["uids"][key]]
    assert pydicom.dcmread(got).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    assert np.array_equal(pixels_of(got), pixels_of(get_testdata_file("MR_small.dcm")))


def test_dstore_converts_for_an_implicit_only_storescp(qr, tmp_path):
    out = tmp_path / "out"
    port = free_port()
    scp = start_storescp(require_tool("storescp"), out, port, "PACS", "+xi")
    try:
        res = run("dstore", f"PACS@127.0.0.1:{port}", *[str(qr["files"][k]) for k in ("jls", "j2k", "be")])
    finally:
        stop(scp)
    assert res.returncode == 0, res.stderr
    assert [r["status"] for r in res.records] == ["stored"] * 3
    got = received(out)
    for key in ("jls", "j2k", "be"):
        assert pydicom.dcmread(got[qr["uids"][key]]).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
        assert np.array_equal(pixels_of(got[qr["uids"][key]]), pixels_of(get_testdata_file("MR_small.dcm")))


def test_dstore_transfer_syntax_option(qr, tmp_path):
    out = tmp_path / "out"
    port = free_port()
    scp = start_storescp(require_tool("storescp"), out, port, "PACS")
    try:
        ok = run("dstore", "--transfer-syntax", "ExplicitVRBigEndian", f"PACS@127.0.0.1:{port}", str(qr["files"]["j2k"]))
        never = run("dstore", "--transfer-syntax", "JPEGLSLossless", f"PACS@127.0.0.1:{port}", str(qr["files"]["be"]))
        bad = run("dstore", "--transfer-syntax", "JPEG-XL-please", f"PACS@127.0.0.1:{port}", str(qr["files"]["be"]))
    finally:
        stop(scp)
    assert ok.returncode == 0, ok.stderr
    got = received(out)[qr["uids"]["j2k"]]
    assert pydicom.dcmread(got).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.2"
    assert np.array_equal(pixels_of(got), pixels_of(get_testdata_file("MR_small.dcm")))
    # never lossless (or anything) into a compressed syntax: one named failure
    assert never.returncode == 1 and "dtools does not compress" in never.stderr
    assert never.stderr.startswith(f"dstore: {qr['files']['be']}:")
    assert bad.returncode == 2 and "unknown transfer syntax 'JPEG-XL-please'" in bad.stderr


def test_move_to_a_destination_that_accepts_nothing_usable(qr, tmp_path):
    """0xA702 with the Failed SOP Instance UID List, whether the destination accepts nothing
    at all or only Verification (it answered 0xA801 "Move Destination unknown")."""
    cfg = qr["base"] / "profiles.cfg"
    gl = qr["uids"]["gl"]
    for dest, profile in (("J2KONLY", "J2KOnly"), ("J2KECHO", "J2KOnlyEcho")):
        scp = start_storescp(require_tool("storescp"), tmp_path / dest, qr["ports"][dest], dest, "-xf", str(cfg), profile)
        try:
            from pynetdicom import AE
            from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

            ae = AE(ae_title="MOVER")
            ae.add_requested_context(MOVE)
            assoc = ae.associate("127.0.0.1", qr["port"], ae_title="DTOOLS")
            ident = pydicom.Dataset()
            ident.QueryRetrieveLevel = "IMAGE"
            ident.StudyInstanceUID = "*"
            ident.SeriesInstanceUID = "*"
            ident.SOPInstanceUID = gl
            rsps = list(assoc.send_c_move(ident, dest, MOVE))
            assoc.release()
        finally:
            stop(scp)
        final, failed = rsps[-1]
        assert final.Status == 0xA702, (dest, final)
        assert final.NumberOfFailedSuboperations == 1 and final.NumberOfCompletedSuboperations == 0
        assert failed["FailedSOPInstanceUIDList"].value == gl  # one failed instance: a single UID
        assert "accepts" in final.ErrorComment


def test_storescu_gets_its_first_transfer_syntax(tmp_path, qr):
    """storescu -xs offers [JPEG Lossless, uncompressed...] in one context: dserve takes the
    first, so the JPEG file is stored as it is (it took Implicit VR LE: "unable to convert")."""
    port = free_port()
    home = tmp_path / "site"
    proc = start_dserve(home, port)
    try:
        res = run_tool(require_tool("storescu"), "-xs", "-aec", "DTOOLS", "127.0.0.1", str(port), str(qr["files"]["jll"]))
        wait_indexed(home, 1)
    finally:
        stop(proc)
    assert res.returncode == 0, res.stderr
    stored = Path(dsearch(home, "instance")[0]["path"])
    assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    assert dataset_bytes(stored.read_bytes()) == dataset_bytes(qr["files"]["jll"].read_bytes())


def test_getscu_lossless_gets_every_instance(qr, tmp_path):
    """getscu +xs offers [JPEG Lossless, uncompressed...] per storage class: a series holding a
    JPEG Lossless and an uncompressed instance arrives whole (it got 1 of 2)."""
    out = tmp_path / "got"
    out.mkdir()
    series = pydicom.dcmread(qr["files"]["jll"]).SeriesInstanceUID
    res = run_tool(require_tool("getscu"), "-S", "+xs", "-aec", "DTOOLS", "-od", str(out),
                   "-k", "QueryRetrieveLevel=SERIES", "-k", "StudyInstanceUID=*", "-k", f"SeriesInstanceUID={series}",
                   "127.0.0.1", str(qr["port"]))
    assert res.returncode == 0, res.stderr
    got = received(out)
    assert set(got) == {qr["uids"]["jll"], qr["uids"]["jll_plain"]}
    for key in ("jll", "jll_plain"):  # JPEG Lossless is lossless: the same pixels either way
        assert np.array_equal(pixels_of(got[qr["uids"][key]]), pixels_of(qr["files"][key]))


def test_dstore_sends_the_data_set_uid(tmp_path):
    """A file whose meta names another SOP Instance UID goes under the data set's, as storescu
    sends it (dstore used the file meta's)."""
    src = make_instance(tmp_path / "a.dcm")
    ds = pydicom.dcmread(src)
    own = ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(src)
    assert pydicom.dcmread(src).file_meta.MediaStorageSOPInstanceUID != own
    out = tmp_path / "out"
    port = free_port()
    scp = start_storescp(require_tool("storescp"), out, port, "PACS")
    try:
        res = run("dstore", f"PACS@127.0.0.1:{port}", str(src))
    finally:
        stop(scp)
    assert res.returncode == 0, res.stderr
    assert res.records[0]["SOPInstanceUID"] == own
    got = pydicom.dcmread(next(out.iterdir()))
    assert got.file_meta.MediaStorageSOPInstanceUID == own == got.SOPInstanceUID
    assert got.PixelData == ds.PixelData


def test_dstore_counts_and_releases_an_association_that_accepts_nothing(qr, tmp_path):
    """A peer that accepts none of the storage contexts: one association, released, and the
    instance named as failed (dstore said "0 association(s)" and aborted)."""
    port = free_port()
    scp = start_storescp(require_tool("storescp"), tmp_path / "out", port, "PACS", "-v", "-xf",
                         str(qr["base"] / "profiles.cfg"), "J2KOnlyEcho")
    try:
        res = run("dstore", f"PACS@127.0.0.1:{port}", str(qr["files"]["gl"]))
    finally:
        stop(scp)
    scp_log = (scp.stdout.read() + scp.stderr.read()).decode(errors="replace")
    assert res.returncode == 1
    assert "0 sent, 1 failed, 1 association(s)" in res.stderr
    assert f"dstore: {qr['files']['gl']}: PACS@127.0.0.1:{port} accepts" in res.stderr
    assert "Association Release" in scp_log and "Abort" not in scp_log


@pytest.mark.parametrize("tool", ["getscu", "movescu"])
def test_series_level_without_series_uid_is_a900_for_get_and_move(qr, tool, tmp_path):
    """Both answer 0xA900 with a comment (C-GET said 0xA900, C-MOVE 0xC513), and dserve -v
    logs the refusal (it logged nothing)."""
    before = len(qr["proc"].err)
    args = [require_tool(tool), "-d", "-S", "-aec", "DTOOLS", "-k", "QueryRetrieveLevel=SERIES",
            "-k", "StudyInstanceUID=*"]
    args += ["-od", str(tmp_path)] if tool == "getscu" else ["-aem", "STORESCP"]
    res = run_tool(*args, "127.0.0.1", str(qr["port"]))
    log = (res.stdout + res.stderr).decode(errors="replace")
    assert "Error: DataSetDoesNotMatchSOPClass" in log, log  # DCMTK's name for 0xA900
    assert "SeriesInstanceUID is required to retrieve at the SERIES level" in log, log  # the Error Comment
    time.sleep(0.2)
    served = bytes(qr["proc"].err[before:]).decode(errors="replace")
    what = "C-GET" if tool == "getscu" else "C-MOVE"
    assert f"{what} from {tool.upper()} refused: SeriesInstanceUID is required" in served, served


def test_dserve_logs_failed_sub_operations(qr, tmp_path):
    before = len(qr["proc"].err)
    scp = start_storescp(require_tool("storescp"), tmp_path / "out", qr["ports"]["J2KECHO"], "J2KECHO", "-xf",
                         str(qr["base"] / "profiles.cfg"), "J2KOnlyEcho")
    try:
        code, log = movescu(qr["port"], "J2KECHO", "IMAGE", StudyInstanceUID="*", SeriesInstanceUID="*",
                            SOPInstanceUID=qr["uids"]["gl"])
    finally:
        stop(scp)
    assert code != 0 or "0xa702" in log.lower()
    time.sleep(0.2)
    served = bytes(qr["proc"].err[before:]).decode(errors="replace")
    assert f"C-MOVE: sub-operation for {qr['uids']['gl']} failed:" in served, served
    assert "C-MOVE from MOVESCU: 0 completed, 1 failed" in served


# -- called AE title ---------------------------------------------------------------------------
def test_called_ae_title_must_be_ours(tmp_path):
    echoscu = require_tool("echoscu")
    port = free_port()
    proc = start_dserve(tmp_path / "h", port, "--aet", "SITE_A")
    try:
        wrong = run_tool(echoscu, "-aec", "SITE_B", "127.0.0.1", str(port))
        right = run_tool(echoscu, "-aec", "SITE_A", "127.0.0.1", str(port))
        dstore = run("dstore", f"SITE_B@127.0.0.1:{port}", str(make_instance(tmp_path / "a.dcm")))
    finally:
        stop(proc)
    _out, err = output(proc)
    assert wrong.returncode != 0 and b"Called AE Title Not Recognized" in wrong.stdout + wrong.stderr
    assert right.returncode == 0, right.stderr
    assert dstore.returncode == 69
    assert "called AE title 'SITE_B' not recognised; check --aec" in dstore.stderr
    assert "it called AE title 'SITE_B', not 'SITE_A'" in err


def test_any_called_aet(tmp_path):
    echoscu = require_tool("echoscu")
    port = free_port()
    home = tmp_path / "h"
    home.mkdir()
    (home / "config.toml").write_text("[dserve]\naet = \"SITE_A\"\naccept_any_called_aet = true\n")
    proc = start_dserve(home, port)
    try:
        by_config = run_tool(echoscu, "-aec", "WHATEVER", "127.0.0.1", str(port))
    finally:
        stop(proc)
    proc = start_dserve(tmp_path / "h2", port, "--any-called-aet")
    try:
        by_flag = run_tool(echoscu, "-aec", "ANY-SCP", "127.0.0.1", str(port))
    finally:
        stop(proc)
    assert by_config.returncode == 0, by_config.stderr
    assert by_flag.returncode == 0, by_flag.stderr


def test_parallel_rejections_are_reported_as_rejections(tmp_path):
    """24 dstores at once against dserve --allow: every one says it was rejected and exits 69
    (1 in 48 said "cannot reach" in parallel loops). 24, not 48: each is a Python process
    that imports pydicom, and CI has two cores."""
    import subprocess

    from conftest import cmd_path

    port = free_port()
    proc = start_dserve(tmp_path / "h", port, "--allow", "SOMEONE")
    src = str(make_instance(tmp_path / "a.dcm"))
    runs: list = []
    try:
        import os

        env = {**os.environ, "DTOOLS_HOME": str(tmp_path / "client")}  # not the user's default home
        runs = [subprocess.Popen([cmd_path("dstore"), f"DTOOLS@127.0.0.1:{port}", src], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, env=env) for _ in range(24)]
        results = [(p.wait(300), p.stderr.read().decode(errors="replace")) for p in runs]
    finally:
        for p in runs:  # bounded: none outlives the test
            if p.poll() is None:
                p.kill()
                p.wait()
        stop(proc)
    assert [code for code, _ in results] == [69] * 24
    odd = [err for _, err in results if "rejected the association: calling AE title 'DTOOLS' not recognised" not in err]
    assert odd == []


# -- pynetdicom's apps -----------------------------------------------------------------------------
def pynetdicom_app(app: str, *args: str, cwd: Path | None = None):
    import subprocess
    import sys

    from loopback import loopback_env

    return subprocess.run([sys.executable, "-m", "pynetdicom", app, *args], capture_output=True, timeout=120,
                          env=loopback_env(), cwd=cwd)


def test_pynetdicom_getscu_gets_compressed_instances_decompressed(qr, tmp_path):
    """pynetdicom's getscu offers uncompressed syntaxes only: JPEG-LS and JPEG 2000 arrive
    decompressed, with the original pixels."""
    out = tmp_path / "got"
    out.mkdir()
    uids = "\\".join(qr["uids"][k] for k in ("jls", "j2k", "be"))
    res = pynetdicom_app("getscu", "127.0.0.1", str(qr["port"]), "-S", "-aec", "DTOOLS", "-od", str(out),
                         "-k", "QueryRetrieveLevel=IMAGE", "-k", "StudyInstanceUID=*", "-k", "SeriesInstanceUID=*",
                         "-k", f"SOPInstanceUID={uids}")
    assert res.returncode == 0, res.stderr
    got = received(out)
    assert set(got) == {qr["uids"][k] for k in ("jls", "j2k", "be")}, res.stderr
    for path in got.values():
        assert not pydicom.dcmread(path).file_meta.TransferSyntaxUID.is_compressed
        assert np.array_equal(pixels_of(path), pixels_of(get_testdata_file("MR_small.dcm")))


def test_pynetdicom_movescu_patient_level_under_study_root(qr, tmp_path):
    out = tmp_path / "moved"
    out.mkdir()
    res = pynetdicom_app("movescu", "127.0.0.1", str(qr["port"]), "-S", "-aec", "DTOOLS", "-aem", "STORESCP",
                         "--store", "--store-aet", "STORESCP", "--store-port", str(qr["ports"]["STORESCP"]),
                         "-od", str(out), "-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID=PJ")
    assert res.returncode == 0, res.stderr
    assert set(received(out)) == {qr["uids"]["jll"], qr["uids"]["jll_plain"]}, res.stderr.decode()[-2000:]
