"""dserve's SCP in-process (statuses, TCP_NODELAY, counts) and the dserve/dstore command lines."""

from __future__ import annotations

import os
import socket
from pathlib import Path
import time

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from conftest import run
from dcmtk import free_port, make_corpus, make_instance
from dtools.net.common import Peer, parse_peer
from dtools.net.scp import Server, ServerSettings
from dtools.net.scp.storage import file_header
from dtools.net.scu import inspect
from dtools.net.syntaxes import contexts, split


def make_server(tmp_path, count_handler: bool = False, **overrides) -> Server:
    """A started in-process SCP on a free port; its records go to `.emitted`. With
    `count_handler`, `.handler_calls` lists the C-STOREs that reached pynetdicom's handler;
    `overrides` are ServerSettings fields."""
    home = tmp_path / "home"
    dest_port = free_port()
    settings = ServerSettings(**{
        "aet": "DTOOLS", "bind": "127.0.0.1", "port": 0, "archive": home / "archive", "index_path": home / "index.db",
        "destinations": {"DEST": Peer("DEST", "127.0.0.1", dest_port)}, "timeout": 10, **overrides,
    })
    emitted: list[dict] = []
    srv = Server(settings, emitted.append)
    if count_handler:
        srv.handler_calls = counting_store_handler(srv)
    srv.start()
    srv.emitted = emitted
    srv.dest_port = dest_port
    return srv


@pytest.fixture
def server(tmp_path):
    srv = make_server(tmp_path)
    yield srv
    srv.shutdown(2)


def scu(*contexts, roles=()):
    ae = AE(ae_title="TESTSCU")
    for cx in contexts:
        ae.add_requested_context(cx)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae


def store_over_pynetdicom(port: int, paths: list[Path]) -> list[int]:
    ae = scu(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="DTOOLS")
    assert assoc.is_established
    codes = [assoc.send_c_store(pydicom.dcmread(p)).Status for p in paths]
    assoc.release()
    return codes


def wait_established(server) -> None:
    """Bounded wait until the in-process server's association thread has marked an association
    established. The lane is decided then: a request that arrives earlier (a peer that sends
    at once, under load) is served by pynetdicom, which is as correct but not what a lane
    test looks at."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(
            a.is_acceptor and a.is_established for a in server.ae.active_associations):
        time.sleep(0.005)


def wait_indexed(server, n: int) -> None:
    """Bounded wait until the in-process server has indexed n instances."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and server.indexer.indexed < n:
        time.sleep(0.02)


def store_files(server, paths):
    codes = store_over_pynetdicom(server.s.port, paths)
    wait_indexed(server, server.stored)
    return codes


def test_store_writes_file_meta_and_data_set_as_received(server, tmp_path):
    src = make_instance(tmp_path / "a.dcm")
    assert store_files(server, [src]) == [0]
    stored = list(server.s.archive.rglob("*.dcm"))
    assert len(stored) == 1
    ds = pydicom.dcmread(stored[0])
    orig = pydicom.dcmread(src)
    assert ds.file_meta.MediaStorageSOPInstanceUID == orig.SOPInstanceUID
    assert ds.file_meta.SourceApplicationEntityTitle == "TESTSCU"
    assert ds.PixelData == orig.PixelData and ds.PatientName == orig.PatientName
    assert server.emitted[0]["SOPInstanceUID"] == orig.SOPInstanceUID
    assert server.emitted[0]["path"] == str(stored[0])


def test_file_header_matches_pydicom(tmp_path):
    from pydicom.filereader import read_file_meta_info

    head = file_header(CTImageStorage, "1.2.3.4", ExplicitVRLittleEndian, "ODD")
    (tmp_path / "h.dcm").write_bytes(head)
    meta = read_file_meta_info(tmp_path / "h.dcm")
    assert meta.MediaStorageSOPClassUID == CTImageStorage
    assert meta.MediaStorageSOPInstanceUID == "1.2.3.4"
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.SourceApplicationEntityTitle == "ODD"
    assert meta.FileMetaInformationGroupLength == len(head) - 144


def test_store_without_study_uid_is_cannot_understand(server, tmp_path):
    ds = pydicom.dcmread(make_instance(tmp_path / "a.dcm"))
    del ds.StudyInstanceUID
    ae = scu(CTImageStorage)
    assoc = ae.associate("127.0.0.1", server.s.port, ae_title="DTOOLS")
    status = assoc.send_c_store(ds)
    ds.StudyInstanceUID = "1.2.3..4"  # not a valid UID: never becomes a path
    status2 = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0xC210 and status2.Status == 0xC210
    assert not list(server.s.archive.rglob("*.dcm"))


def test_store_that_cannot_be_written_is_out_of_resources(server, tmp_path):
    ds = pydicom.dcmread(make_instance(tmp_path / "a.dcm"))
    server.s.archive.mkdir(parents=True, exist_ok=True)
    (server.s.archive / ds.StudyInstanceUID).write_text("a file where a directory must go")
    assert store_files(server, [tmp_path / "a.dcm"]) == [0xA700]
    assert server.emitted == []


def test_tcp_nodelay_on_both_ends(server):
    seen = []
    ae = scu(CTImageStorage)
    assoc = ae.associate("127.0.0.1", server.s.port, ae_title="DTOOLS",
                         evt_handlers=[(evt.EVT_CONN_OPEN, lambda e: seen.append(e))])
    from dtools.net.common import on_conn_open

    on_conn_open(seen[0])  # what dstore and C-MOVE sub-associations use
    client = assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    accepted = [a for a in server.ae.active_associations]
    srv = accepted[0].dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assoc.release()
    assert client and srv


def find(server, model, ident):
    ae = scu(model)
    assoc = ae.associate("127.0.0.1", server.s.port, ae_title="DTOOLS")
    out = list(assoc.send_c_find(ident, model))
    assoc.release()
    return out


def test_find_statuses(server, tmp_path):
    store_files(server, make_corpus(tmp_path / "c", 6, studies=2))
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = ""
    ident.PatientComments = ""  # not in the index: returned empty, not an error
    ok = find(server, StudyRootQueryRetrieveInformationModelFind, ident)
    assert [s.Status for s, _ in ok] == [0xFF00, 0xFF00, 0x0000]
    assert all("PatientComments" in r and r.PatientComments in ("", None) for _, r in ok[:2])
    ident.StudyDate = "2024-01-01"
    bad_range = find(server, StudyRootQueryRetrieveInformationModelFind, ident)
    assert bad_range[-1][0].Status == 0xC210
    ident2 = Dataset()
    ident2.QueryRetrieveLevel = "NOPE"
    assert find(server, PatientRootQueryRetrieveInformationModelFind, ident2)[-1][0].Status == 0xA900


def test_get_counts_and_missing_file(server, tmp_path):
    paths = make_corpus(tmp_path / "c", 4, studies=1)
    store_files(server, paths)
    study = pydicom.dcmread(paths[0]).StudyInstanceUID
    victim = next(server.s.archive.rglob("*.dcm"))
    victim.unlink()  # indexed but gone: one failed sub-operation
    received = []
    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    role = build_role(CTImageStorage, scp_role=True)
    assoc = ae.associate("127.0.0.1", server.s.port, ae_title="DTOOLS", ext_neg=[role],
                         evt_handlers=[(evt.EVT_C_STORE, lambda e: received.append(e.dataset.SOPInstanceUID) or 0)])
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = study
    rsps = [s for s, _ in assoc.send_c_get(ident, StudyRootQueryRetrieveInformationModelGet)]
    assoc.release()
    final = rsps[-1]
    assert final.Status == 0xB000  # warning: some sub-operations failed
    assert final.NumberOfCompletedSuboperations == 3 and final.NumberOfFailedSuboperations == 1
    assert len(received) == 3
    assert rsps[0].Status == 0xFF00 and rsps[0].NumberOfRemainingSuboperations == 3


def test_move_to_unreachable_destination_is_a801(server, tmp_path):
    paths = make_corpus(tmp_path / "c", 2, studies=1)
    store_files(server, paths)
    ae = scu(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", server.s.port, ae_title="DTOOLS")
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = pydicom.dcmread(paths[0]).StudyInstanceUID
    unknown = [s.Status for s, _ in assoc.send_c_move(ident, "NOBODY", StudyRootQueryRetrieveInformationModelMove)]
    down = [s.Status for s, _ in assoc.send_c_move(ident, "DEST", StudyRootQueryRetrieveInformationModelMove)]
    del ident.StudyInstanceUID
    no_key = [s for s, _ in assoc.send_c_move(ident, "DEST", StudyRootQueryRetrieveInformationModelMove)]
    assoc.release()
    assert unknown == [0xA801] and down == [0xA801]
    # the same status and comment as C-GET gives (fault: C-MOVE said 0xC513 without a comment)
    assert [s.Status for s in no_key] == [0xA900]
    assert no_key[0].ErrorComment == "StudyInstanceUID is required to retrieve at the STUDY level"


def test_contexts_split_at_128(tmp_path):
    from dtools.net.scu import Item

    items = [Item(f"/x/{i}", f"1.2.3.{i}", f"9.{i}", ExplicitVRLittleEndian, True) for i in range(100)]
    groups = list(split(items))
    # each needs its own and an uncompressed fallback context; one Verification context per association
    assert [len(g) for g in groups] == [63, 37]
    assert all(len(contexts({i.pair for i in g})) <= 128 for g in groups)


def test_inspect_rejects_non_dicom(tmp_path):
    from dtools.errors import InputError

    bad = tmp_path / "x.dcm"
    bad.write_bytes(b"\0" * 200)
    with pytest.raises(InputError):
        inspect(str(bad))
    good = inspect(str(make_instance(tmp_path / "y.dcm")))
    assert good.as_is and good.transfer_syntax == ExplicitVRLittleEndian


def test_parse_peer():
    assert parse_peer("PACS@10.0.0.5:104") == Peer("PACS", "10.0.0.5", 104)
    assert parse_peer("[::1]:11112", "X") == Peer("X", "::1", 11112)
    from dtools.errors import UsageError

    for bad in ("PACS@host", "@h:1", "A\\B@h:1", "h:0", "h:99999", "THIS-AE-TITLE-IS-TOO-LONG@h:1"):
        with pytest.raises(UsageError):
            parse_peer(bad)


# -- command lines ------------------------------------------------------------------------
def test_dstore_unreachable_peer_exits_69(tmp_path):
    src = make_instance(tmp_path / "a.dcm")
    res = run("dstore", f"PACS@127.0.0.1:{free_port()}", str(src), "--timeout", "5")
    assert res.returncode == 69
    assert res.stderr.strip().splitlines()[-1].startswith("dstore: cannot reach PACS@127.0.0.1:")
    assert "Traceback" not in res.stderr


def test_dstore_usage_errors(tmp_path):
    res = run("dstore", "NOSUCHPEER", "--home", str(tmp_path))
    assert res.returncode == 2 and "unknown peer 'NOSUCHPEER'" in res.stderr
    res = run("dstore", "PACS@host:notaport")
    assert res.returncode == 2


def test_dstore_peer_from_config(tmp_path):
    (tmp_path / "config.toml").write_text(f'[dserve.destinations]\nPACS = "127.0.0.1:{free_port()}"\n')
    res = run("dstore", "PACS", "--home", str(tmp_path), str(make_instance(tmp_path / "a.dcm")), "--timeout", "3")
    assert res.returncode == 69 and "PACS@127.0.0.1" in res.stderr


def test_dserve_port_in_use_exits_2(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = run("dserve", "--home", str(tmp_path / "h"), "--bind", "127.0.0.1", "--port", str(port), timeout=30)
    assert res.returncode == 2
    assert "cannot listen on 127.0.0.1" in res.stderr and "another --port" in res.stderr


def test_dserve_bad_options(tmp_path):
    res = run("dserve", "--home", str(tmp_path), "--aet", "WAY-TOO-LONG-AE-TITLE")
    assert res.returncode == 2 and "--aet 'WAY-TOO-LONG-AE-TITLE' is not valid" in res.stderr
    res = run("dserve", "--home", str(tmp_path), "--port", "0x")
    assert res.returncode == 2


@pytest.mark.parametrize("prog", ["dserve", "dstore"])
def test_help_and_version(prog):
    assert run(prog, "--version").stdout.decode().startswith(f"{prog} (dtools)")
    res = run(prog, "--help")
    assert res.returncode == 0 and "--aet" in res.stdout.decode()


def test_dserve_sync_batch_prints_records_after_sync(tmp_path):
    from dcmtk import output, start_dserve, stop

    port = free_port()
    proc = start_dserve(tmp_path / "h", port, "--sync", "batch")
    try:
        paths = make_corpus(tmp_path / "c", 5, studies=1)
        res = run("dstore", f"DTOOLS@127.0.0.1:{port}", *map(str, paths))
    finally:
        code = stop(proc)
    out, err = output(proc)
    assert res.returncode == 0 and code == 143, err
    recs = [__import__("orjson").loads(line) for line in out.splitlines()]
    assert sorted(r["SOPInstanceUID"] for r in recs) == sorted(pydicom.dcmread(p).SOPInstanceUID for p in paths)
    assert all(Path(r["path"]).is_file() for r in recs)


@pytest.mark.parametrize("sync", [True, False])
def test_write_new_file_is_atomic_and_creates_directories(tmp_path, sync):
    from dtools.net.scp.storage import write_new_file

    target = tmp_path / "1.2" / "3.4" / "5.6.dcm"
    write_new_file(str(target), (b"head", memoryview(b"data")), sync=sync)
    assert target.read_bytes() == b"headdata"
    write_new_file(str(target), (b"new",), sync=sync)  # a re-sent instance replaces the old file
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["5.6.dcm"]


def test_write_new_file_failure_leaves_no_temporary(tmp_path):
    from dtools.net.scp.storage import write_new_file

    target = tmp_path / "s" / "x.dcm"
    target.parent.mkdir()
    target.write_bytes(b"old")
    with pytest.raises(TypeError):  # fails after the temporary was created and partly written
        write_new_file(str(target), (b"head", object()), sync=False)
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["x.dcm"]


# -- the C-STORE lane and the tuned reactors (dtools.net.fastpath, tune_pynetdicom) -------------
@pytest.mark.parametrize("status,sop,comment", [
    (0x0000, "1.2.3.4", None),  # even-length UID
    (0xB000, "1.2.3", None),  # odd: padded with NUL
    (0xA700, "1.2.840.10008.5.1.4.1.1.2.99", "cannot write to the archive (No space left on device)"),
    (0xC210, "1.2.3", "odd"),  # odd comment: padded with a space
])
def test_store_response_bytes_equal_pynetdicom(status, sop, comment):
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    from dtools.net.fastpath import encode_store_rsp

    p = C_STORE()
    p.MessageIDBeingRespondedTo = 7
    p.AffectedSOPClassUID = CTImageStorage
    p.AffectedSOPInstanceUID = sop
    p.Status = status
    if comment:
        p.ErrorComment = comment
    msg = C_STORE_RSP()
    msg.primitive_to_message(p)
    assert encode_store_rsp(7, status, CTImageStorage, sop, comment) == encode(msg.command_set, True, True)


def test_parse_command_reads_a_pynetdicom_request():
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    from dtools.net.fastpath import parse_command

    p = C_STORE()
    p.MessageID = 513
    p.AffectedSOPClassUID = CTImageStorage
    p.AffectedSOPInstanceUID = "1.2.3"
    p.Priority = 2
    p.MoveOriginatorApplicationEntityTitle = "MOVER"
    p.MoveOriginatorMessageID = 9
    p.DataSet = __import__("io").BytesIO(b"\x08\x00\x18\x00\x00\x00\x00\x00")
    msg = C_STORE_RQ()
    msg.primitive_to_message(p)
    cmd = parse_command(encode(msg.command_set, True, True))
    assert cmd[0x0100] == 0x0001 and cmd[0x0110] == 513 and cmd[0x0700] == 2
    assert cmd[0x0002] == CTImageStorage and cmd[0x1000] == "1.2.3"
    assert cmd[0x1030] == "MOVER" and cmd[0x1031] == 9 and cmd[0x0800] != 0x0101
    assert parse_command(b"\x00\x00\x00\x01\x04\x00\x00\x00") is None  # not group 0000
    assert parse_command(b"\x00\x00\x10\x01\x09\x00\x00\x00ab") is None  # value runs past the end


def lane_available() -> bool:
    import pynetdicom

    from dtools.net.internals import TUNED_PYNETDICOM

    return str(pynetdicom.__version__).startswith(TUNED_PYNETDICOM)


needs_lane = pytest.mark.skipif(not lane_available(), reason="the C-STORE lane is off on this pynetdicom version")


def counting_store_handler(server):
    """Count the C-STOREs that reach pynetdicom's EVT_C_STORE handler instead of the lane."""
    calls = []
    plain = server.storage.on_store

    def on_store(event):
        calls.append(event.context.transfer_syntax)
        return plain(event)

    server.storage.on_store = on_store
    return calls


@pytest.fixture
def counted(tmp_path):
    srv = make_server(tmp_path, count_handler=True)
    yield srv
    srv.shutdown(2)


@needs_lane
def test_lane_stores_plain_requests_and_leaves_deflate_to_pynetdicom(counted, tmp_path):
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

    paths = [make_instance(tmp_path / f"{k}.dcm", study_uid="1.2.3.9", series_uid="1.2.3.9.1",
                           sop_uid=f"1.2.3.9.1.{k}") for k in range(4)]
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, [ImplicitVRLittleEndian])
    ae.add_requested_context(CTImageStorage, [DeflatedExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", counted.s.port, ae_title="DTOOLS")
    assert assoc.is_established
    wait_established(counted)
    statuses = []
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        if k == 3:
            ds = ds.copy()
            ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        statuses.append(assoc.send_c_store(ds).Status)
    assoc.release()
    assert statuses == [0, 0, 0, 0]
    # three went through the lane, the deflated one through pynetdicom and the handler
    assert [str(ts) for ts in counted.handler_calls] == [DeflatedExplicitVRLittleEndian]
    wait_indexed(counted, 4)
    assert sorted(r["SOPInstanceUID"] for r in counted.emitted) == [f"1.2.3.9.1.{k}" for k in range(4)]
    for k in range(4):
        stored = pydicom.dcmread(counted.s.archive / "1.2.3.9" / "1.2.3.9.1" / f"1.2.3.9.1.{k}.dcm")
        assert stored.PixelData == pydicom.dcmread(paths[k]).PixelData


@needs_lane
def test_lane_refuses_a_damaged_data_set(counted, tmp_path):
    ds = pydicom.dcmread(make_instance(tmp_path / "a.dcm"))
    del ds.StudyInstanceUID
    ae = scu(CTImageStorage)
    assoc = ae.associate("127.0.0.1", counted.s.port, ae_title="DTOOLS")
    wait_established(counted)
    rsp = assoc.send_c_store(ds)
    assoc.release()
    assert rsp.Status == 0xC210 and "StudyInstanceUID" in str(rsp.ErrorComment)
    assert counted.handler_calls == []  # answered by the lane
    assert not list(counted.s.archive.rglob("*.dcm"))


@needs_lane
def test_peer_with_small_pdus_is_served_by_pynetdicom(counted, tmp_path):
    ae = scu(CTImageStorage)
    # the lane answers only peers that take a whole response in one PDU
    assoc = ae.associate("127.0.0.1", counted.s.port, ae_title="DTOOLS", max_pdu=256)
    rsp = assoc.send_c_store(pydicom.dcmread(make_instance(tmp_path / "a.dcm")))
    assoc.release()
    assert rsp.Status == 0 and len(counted.handler_calls) == 1
    assert len(list(counted.s.archive.rglob("*.dcm"))) == 1


@needs_lane
def test_wake_pipes_of_finished_associations_are_closed(server, tmp_path):
    import gc
    from pynetdicom.sop_class import Verification

    def open_fds():
        gc.collect()
        return len(os.listdir("/proc/self/fd"))

    ae = scu(Verification)
    assoc = ae.associate("127.0.0.1", server.s.port, ae_title="DTOOLS")  # warm up: threads, imports
    assoc.send_c_echo()
    assoc.release()
    time.sleep(0.2)
    before = open_fds()
    for _ in range(15):
        assoc = ae.associate("127.0.0.1", server.s.port, ae_title="DTOOLS")
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and open_fds() > before + 4:
        time.sleep(0.1)
    assert open_fds() <= before + 4  # 15 associations, each with its wake pipe on both ends


# -- the indexer process --------------------------------------------------------------------
def children_of(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def test_dserve_stops_when_its_indexer_dies(tmp_path):
    from dcmtk import output, start_dserve, stop

    port = free_port()
    proc = start_dserve(tmp_path / "home", port)
    try:
        kids = children_of(proc.pid)
        assert len(kids) == 1
        os.kill(kids[0], 9)
        proc.wait(20)
    finally:
        stop(proc)
    _out, err = output(proc)
    assert proc.returncode == 75
    assert "indexer stopped unexpectedly" in err and "Traceback" not in err


def test_killed_dserve_leaves_its_stores_indexed(tmp_path):
    """SIGKILL after the last answer: the indexer process still commits what was stored."""
    import orjson
    from dcmtk import output, start_dserve, stop

    src = tmp_path / "src"
    paths = make_corpus(src, 30, studies=1)
    home = tmp_path / "home"
    port = free_port()
    proc = start_dserve(home, port)
    try:
        kid = children_of(proc.pid)[0]
        assert store_over_pynetdicom(port, paths) == [0] * 30
        os.kill(proc.pid, 9)
        proc.wait(10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and Path(f"/proc/{kid}").exists():
            time.sleep(0.05)
    finally:
        stop(proc)
    res = run("dsearch", "--home", str(home), "-L", "instance")
    assert res.returncode == 0, res.stderr
    assert len(res.records) == 30
    # and their records still reached dserve's stdout: the indexer writes them there itself
    out, _err = output(proc)
    assert sorted(r["path"] for r in map(orjson.loads, out.splitlines())) == sorted(r["path"] for r in res.records)


def test_sync_batch_renames_files_only_after_syncing_them(tmp_path, caplog):
    """--sync batch: a stored file waits at its temporary name until its batch is synced."""
    from dtools.net.indexproc import IndexWriter
    from dtools.net.scp.storage import write_new_file

    src = make_instance(tmp_path / "a.dcm")
    target = tmp_path / "archive" / "s" / "a.dcm"
    tmp = write_new_file(str(target), (src.read_bytes(),), sync=False, rename=False)
    assert Path(tmp).is_file() and not target.exists() and Path(tmp).name.startswith(".a.dcm.")
    lost = tmp_path / "archive" / "s" / "b.dcm"
    emitted = []
    writer = IndexWriter(tmp_path / "index.db", emitted.append, lambda m: None, sync_files=True)
    writer.start()
    writer.put(target, None, tmp)
    writer.put(lost, None, str(lost) + ".gone.tmp")  # its temporary vanished: reported, not indexed
    writer.stop(30)
    assert target.is_file() and not Path(tmp).exists()
    assert [r["path"] for r in emitted] == [str(target)]
    assert "b.dcm: stored but not moved into place" in caplog.text


def test_reactor_wait_does_not_swallow_a_consumers_wakeup():
    """An association reactor waiting on the DIMSE queue must not keep the notification a
    thread blocked in get() needs (it would then sleep until its DIMSE timeout)."""
    import queue
    import threading
    from types import SimpleNamespace

    from dtools.net.internals import _reactor_sleep

    q: queue.Queue = queue.Queue()

    class Reactor(threading.Thread):
        dimse = SimpleNamespace(msg_queue=q)

        def run(self):
            _reactor_sleep(3.0)

    got = []

    def consumer():
        t = time.monotonic()
        got.append((q.get(timeout=5), time.monotonic() - t))

    reactor = Reactor()
    reactor.start()
    time.sleep(0.2)  # the reactor waits first, so a plain notify() would wake it, not the consumer
    c = threading.Thread(target=consumer)
    c.start()
    time.sleep(0.2)
    q.put("message")
    c.join(6)
    reactor.join(4)
    assert got and got[0][0] == "message" and got[0][1] < 1.5


def test_lane_takes_only_whole_c_store_requests():
    """The lane's PDU handling on crafted P-DATA-TF PDUs, with a fake association."""
    import struct as st
    from types import SimpleNamespace

    from dtools.net.fastpath import Lane, encode_store_rsp, pdata_pdu, take

    def pdu(*pdvs):
        items = b"".join(st.pack(">IBB", len(frag) + 2, cx, control) + frag for cx, control, frag in pdvs)
        return st.pack(">BBI", 4, 0, len(items)) + items

    def command(field=0x0001, sop="1.2.3", msg_id=5):
        def el(e, v):
            v = v + b"\0" if len(v) % 2 else v
            return st.pack("<HHI", 0, e, len(v)) + v
        body = (el(0x0002, CTImageStorage.encode()) + st.pack("<HHIH", 0, 0x0100, 2, field)
                + st.pack("<HHIH", 0, 0x0110, 2, msg_id) + st.pack("<HHIH", 0, 0x0800, 2, 0x0000)
                + el(0x1000, sop.encode()))
        return st.pack("<HHII", 0, 0, 4, len(body)) + body

    stored, sent = [], []
    fake = SimpleNamespace(assoc=None, socket=SimpleNamespace(send=sent.append))

    def store(assoc, cx, sop_class, sop, ts, data):
        stored.append((cx, sop_class, sop, ts, bytes(data)))
        return 0, None

    lane = Lane(store, frozenset(), {1: (CTImageStorage, str(ExplicitVRLittleEndian))})
    # command and data set in one PDU
    assert take(fake, lane, pdu((1, 0x03, command()), (1, 0x02, b"DATA")))
    assert stored[-1] == (1, CTImageStorage, "1.2.3", str(ExplicitVRLittleEndian), b"DATA")
    assert sent[-1] == pdata_pdu(1, encode_store_rsp(5, 0, CTImageStorage, "1.2.3"))
    # a data set over two PDUs: stored once it is complete
    assert take(fake, lane, pdu((1, 0x03, command(msg_id=6))))
    assert take(fake, lane, pdu((1, 0x00, b"PART1-")))
    assert len(stored) == 1
    assert take(fake, lane, pdu((1, 0x02, b"PART2")))
    assert stored[-1][4] == b"PART1-PART2" and len(sent) == 2
    # not for the lane: another command, an unknown context, the next message in the same
    # PDU, an empty PDU
    assert not take(fake, lane, pdu((1, 0x03, command(field=0x0020)), (1, 0x02, b"ID")))
    assert not take(fake, lane, pdu((3, 0x03, command()), (3, 0x02, b"X")))
    assert not take(fake, lane, pdu((1, 0x03, command()), (1, 0x02, b"X"), (1, 0x03, command())))
    assert not take(fake, lane, pdu())
    assert len(stored) == 2 and len(sent) == 2 and lane.command is None


def test_dserve_with_its_stdout_closed_exits_141(tmp_path):
    """`dserve | head -1` style: the reader goes away; dserve says so and exits 141."""
    import subprocess

    from dcmtk import BIN, wait_port

    home = tmp_path / "home"
    port = free_port()
    proc = subprocess.Popen([str(BIN / "dserve"), "--home", str(home), "--bind", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_port(port, proc)
        proc.stdout.close()  # nobody reads the records
        paths = make_corpus(tmp_path / "src", 3, studies=1)
        store_over_pynetdicom(port, paths)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode()
    assert code == 141, err
    assert "standard output was closed" in err and "Traceback" not in err
    res = run("dsearch", "--home", str(home), "-L", "instance")
    assert len(res.records) >= 1  # what was committed before the first record failed stays indexed


def test_an_idle_accepted_association_looks_less_often():
    """After IDLE_AFTER quiet looks, an acceptor's reactor waits IDLE_POLL between looks; a
    message resets it. A requestor's reactor never does (its send_*() calls wait for it)."""
    import queue
    import threading
    from types import SimpleNamespace

    from dtools.net.internals import IDLE_AFTER, _reactor_sleep

    seen = {}

    class Reactor(threading.Thread):
        def __init__(self, acceptor):
            super().__init__()
            self.is_acceptor = acceptor
            self.dimse = SimpleNamespace(msg_queue=queue.Queue())

        def run(self):
            for _ in range(IDLE_AFTER + 5):
                _reactor_sleep(0.001)  # what the association reactor asks for
            seen[self.is_acceptor] = [self._dtools_quiet]
            self.dimse.msg_queue.put("request")
            _reactor_sleep(0.001)
            seen[self.is_acceptor].append(self._dtools_quiet)

    for acceptor in (True, False):
        r = Reactor(acceptor)
        r.start()
        r.join(20)
    assert seen[True][0] >= IDLE_AFTER and seen[True][1] == 0
    assert seen[False][0] <= 1 and seen[False][1] == 0


def test_syntax_choice_never_compresses():
    from dtools.errors import UsageError
    from dtools.net.syntaxes import choose, parse_syntax

    ct, ile, ele, be = CTImageStorage, "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"
    jls, j2k = "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90"
    assert choose(ct, jls, {ct: [ile, jls]}) == (jls, "")  # as stored first
    assert choose(ct, jls, {ct: [ile, ele]}) == (ele, "")  # decompressed, explicit VR first
    assert choose(ct, be, {ct: [ile]}) == (ile, "")
    target, why = choose(ct, ele, {ct: [j2k]})
    assert target is None and "does not compress" in why
    target, why = choose(ct, ele, {ct: [ele]}, want=jls)
    assert target is None and "does not accept" in why
    assert choose(ct, jls, {})[0] is None
    assert parse_syntax("implicitvrlittleendian") == ile and parse_syntax(" 1.2.840.10008.1.2.4.80") == jls
    with pytest.raises(UsageError):
        parse_syntax("1.2.840.10008.5.1.4.1.1.2")  # a SOP class, not a transfer syntax


def test_acceptor_takes_the_callers_first_syntax():
    """pynetdicom picks the acceptor's order; dserve's hook re-picks the caller's."""
    from pynetdicom.presentation import build_context, negotiate_as_acceptor

    from dtools.net.internals.acceptor import prefer_caller_order

    jll, ele, ile = "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
    rq = build_context(CTImageStorage, [jll, ele, ile])
    rq.context_id = 1
    ac = build_context(CTImageStorage, [ile, ele, jll])
    result, _ = negotiate_as_acceptor([rq], [ac])
    assert result[0].transfer_syntax == [ile]  # pynetdicom's own choice
    prefer_caller_order(result, [rq], [ac])
    assert result[0].transfer_syntax == [jll]
    result[0]._as_scu = True  # a C-GET storage context: we send on it
    prefer_caller_order(result, [rq], [ac])
    assert result[0].transfer_syntax == [ele]


def test_the_indexer_does_not_run_code_from_the_working_directory(tmp_path, monkeypatch):
    """dserve started in a directory others can write to: a 'dtools' package there is not the
    one its indexer runs."""
    rogue = tmp_path / "shared"
    (rogue / "dtools" / "net").mkdir(parents=True)
    marker = tmp_path / "ran-rogue-code"
    for init in (rogue / "dtools" / "__init__.py", rogue / "dtools" / "net" / "__init__.py"):
        init.write_text(f"open({str(marker)!r}, 'w').close()\n")
    (rogue / "dtools" / "net" / "indexproc.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(rogue)
    srv = make_server(tmp_path)
    try:
        assert store_files(srv, [make_instance(tmp_path / "a.dcm")]) == [0]
        assert srv.indexer.indexed == 1
    finally:
        srv.shutdown(2)
    assert not marker.exists()


def test_a_fast_rejection_is_reported_as_a_rejection(tmp_path, monkeypatch):
    """dserve --allow rejects as soon as the calling AE title is in. When the requesting
    thread looks at the connection only after the DUL has sent the request, read the
    A-ASSOCIATE-RJ and closed the socket (as under load), pynetdicom 3.0 reports an abort;
    dstore must still say it was rejected, and why (fault 10: 'cannot reach' under load)."""
    import threading

    from pynetdicom import transport

    from dtools.errors import RemoteError
    from dtools.net.scu import StoreSession

    class LateEvent(threading.Event):
        def wait(self, timeout=None):
            got = super().wait(timeout)
            time.sleep(0.3)  # descheduled, as a loaded machine does
            return got

    init = transport.AssociationSocket.__init__

    def late_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._ready = LateEvent()
        if getattr(self, "_is_connected", False):
            self._ready.set()

    srv = make_server(tmp_path, allow=["SOMEONE"])
    try:
        monkeypatch.setattr(transport.AssociationSocket, "__init__", late_init)
        session = StoreSession(Peer("DTOOLS", "127.0.0.1", srv.s.port), "STRANGER", timeout=10)
        with pytest.raises(RemoteError, match="rejected the association: calling AE title 'STRANGER' not recognised"):
            session.open([inspect(make_instance(tmp_path / "a.dcm"))])
    finally:
        srv.shutdown(2)


def test_a_rejected_connection_leaves_no_thread_behind(tmp_path):
    """Each association rejected for its calling AE title (--allow) ends its threads at once,
    not after the ACSE timeout: a modality retrying every second must not pile them up."""
    from pynetdicom import AE as StockAE

    srv = make_server(tmp_path, allow=["SOMEONE"], timeout=30)
    try:
        for _ in range(5):
            assoc = scu(CTImageStorage).associate("127.0.0.1", srv.s.port, ae_title="DTOOLS")
            assert assoc.is_rejected
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and StockAE.active_associations.fget(srv.ae):
            time.sleep(0.05)
        assert StockAE.active_associations.fget(srv.ae) == []
    finally:
        srv.shutdown(2)
