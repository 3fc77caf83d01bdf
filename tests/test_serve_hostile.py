"""dserve under hostile or broken clients: stalled, oversized, unknown and malformed PDUs.

Each attack writes raw bytes to a real dserve (a process, or the in-process server where
the test looks inside) on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom import AE
from pynetdicom.sop_class import Verification

import hostile as h
from conftest import require_tool
from dcmtk import free_port, make_instance, output, run_tool, start_dserve, stop
from test_serve import make_server, needs_lane, wait_established, wait_indexed

pytestmark = pytest.mark.integration
BOUND = 20.0  # seconds any single wait may take before the test fails
PENDING_LIMIT = 32  # connections waiting for their association, with --max-associations up to 16


@pytest.fixture
def dserve(tmp_path):
    """Start a dserve process with extra options; all are stopped by pid afterwards."""
    procs = []

    def start(*args: str) -> tuple[int, object]:
        port = free_port()
        proc = start_dserve(tmp_path / f"home{len(procs)}", port, "-v", *args)
        procs.append(proc)
        return port, proc

    yield start
    for proc in procs:
        stop(proc)


def echo(port: int, calling: str = "TESTSCU") -> int | None:
    """A C-ECHO over a new pynetdicom association: its status, None if not associated."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="DTOOLS")
    if not assoc.is_established:
        return None
    status = assoc.send_c_echo().Status
    assoc.release()
    return status


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# -- stalled connections ----------------------------------------------------------------
def test_stalled_association_requests_do_not_lock_out_others(dserve):
    port, _proc = dserve("--max-associations", "2", "--timeout", "60")
    stalled = h.stall(port, 10)  # 40 bytes of an A-ASSOCIATE-RQ each, then nothing
    try:
        for _ in range(3):
            assert echo(port) == 0x0000
        raw = h.associate(port)  # while the ten are still open
        raw.close()
    finally:
        h.close_all(stalled)


def test_echoscu_succeeds_with_20_stalled_connections_open(dserve):
    echoscu = require_tool("echoscu")
    port, _proc = dserve("--timeout", "60")
    stalled = h.stall(port, 20)
    try:
        res = run_tool(echoscu, "-to", "10", "-ta", "10", "-td", "10", "-aec", "DTOOLS", "127.0.0.1", str(port),
                       timeout=60)
    finally:
        h.close_all(stalled)
    assert res.returncode == 0, res.stderr + res.stdout


def test_closed_stalled_connections_end_their_associations_at_once(tmp_path):
    srv = make_server(tmp_path, timeout=60)  # ACSE timeout 30 s: the wait pynetdicom would keep
    try:
        stalled = h.stall(srv.s.port, 10)
        deadline = time.monotonic() + BOUND
        while len(srv._server.active_associations) < 10 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(srv._server.active_associations) == 10
        h.close_all(stalled)
        deadline = time.monotonic() + 5
        while srv._server.active_associations and time.monotonic() < deadline:
            time.sleep(0.02)
        assert srv._server.active_associations == []
        assert srv.pending.waiting() == 0
    finally:
        srv.shutdown(2)


def test_waiting_connections_are_bounded_and_the_oldest_turned_away(tmp_path):
    srv = make_server(tmp_path, timeout=60)
    limit = PENDING_LIMIT
    try:
        stalled = h.stall(srv.s.port, limit + 8)
        try:
            # The eight that waited longest (accept threads race, so not exactly the first
            # eight opened) get A-ASSOCIATE-RJ, transient, temporary congestion, and are closed.
            answered: list[socket.socket] = []
            deadline = time.monotonic() + BOUND
            while len(answered) < 8 and time.monotonic() < deadline:
                ready, _, _ = select.select([s for s in stalled if s not in answered], [], [], 0.1)
                for s in ready:
                    assert h.read_pdu(s, BOUND) == (h.A_ASSOCIATE_RJ, b"\x00\x02\x03\x01")
                    assert h.closed_after(s, BOUND) is not None
                    answered.append(s)
            assert len(answered) == 8
            assert stalled[-1] not in answered  # the newest stays
            rest = [s for s in stalled if s not in answered]
            assert select.select(rest, [], [], 0.2)[0] == []
            assert srv.pending.limit == limit and srv.pending.waiting() == limit
            assert echo(srv.s.port) == 0x0000  # turns away one more of the stalled, not this one
        finally:
            h.close_all(stalled)
    finally:
        srv.shutdown(2)


def test_partial_association_request_is_closed_after_the_acse_timeout(dserve):
    port, proc = dserve("--timeout", "2")  # ACSE timeout min(--timeout, 30)
    s = h.stall(port, 1)[0]
    try:
        assert h.closed_after(s, BOUND) is not None
    finally:
        s.close()
    assert echo(port) == 0x0000


def test_association_request_in_slow_pieces_within_the_timeout_is_accepted(dserve):
    port, _proc = dserve("--timeout", "10")
    s = h.connect(port)
    rq = h.associate_rq()
    try:
        for k in range(0, len(rq), 30):
            s.sendall(rq[k:k + 30])
            time.sleep(0.1)
        answer = h.read_pdu(s, BOUND)
        assert answer is not None and answer[0] == h.A_ASSOCIATE_AC
    finally:
        s.close()


def test_shutdown_with_stalled_connections_is_prompt(dserve):
    port, proc = dserve("--timeout", "60")
    stalled = h.stall(port, 10)
    try:
        assert stop(proc, timeout=BOUND) == 143  # SIGTERM after a graceful stop, not SIGKILL
    finally:
        h.close_all(stalled)


# -- PDUs that never end, or are too long, or unknown --------------------------------------
def test_partial_pdata_pdu_times_out(dserve):
    port, _proc = dserve("--timeout", "2")
    s = h.associate(port)
    try:
        s.sendall(h.pdu_header(h.P_DATA_TF, 10_000) + b"\0" * 1_000)  # within the maximum length
        # the PDU deadline or the idle timeout, whichever the reactor sees first: A-ABORT
        answer = h.read_pdu(s, BOUND)
        assert answer is not None and answer[0] == h.A_ABORT
        assert h.closed_after(s, BOUND) is not None
    finally:
        s.close()
    assert echo(port) == 0x0000


def test_pdata_longer_than_the_negotiated_maximum_is_aborted(dserve):
    port, _proc = dserve()
    s = h.associate(port)
    try:
        s.sendall(h.pdu_header(h.P_DATA_TF, 100_000) + b"\0" * 1_000)
        # A-ABORT, service-provider, invalid-PDU-parameter-value; not after a timeout
        assert h.read_pdu(s, BOUND) == (h.A_ABORT, b"\x00\x00\x02\x06")
        assert h.closed_after(s, BOUND) is not None
    finally:
        s.close()


def test_pdu_announced_as_4_gib_is_not_buffered(dserve):
    port, proc = dserve()
    s = h.associate(port)
    before = rss_kib(proc.pid)
    fed = [0]

    def feed() -> None:
        chunk = b"\0" * (1 << 20)
        try:
            s.sendall(h.pdu_header(h.P_DATA_TF, 0xFFFFFFFF))
            while fed[0] < 100 << 20:
                s.sendall(chunk)
                fed[0] += len(chunk)
        except OSError:
            pass

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    feeder.join(BOUND * 3)
    grown = rss_kib(proc.pid) - before
    s.close()
    assert not feeder.is_alive()
    assert grown < 32 * 1024, f"dserve grew by {grown} KiB while fed {fed[0] >> 20} MiB"
    assert fed[0] < 100 << 20  # refused: the connection was closed under the feeder


def test_association_request_announced_as_4_gib_is_refused(dserve):
    port, _proc = dserve()
    s = h.connect(port)
    try:
        s.sendall(h.pdu_header(0x01, 0xFFFFFFFF) + b"\0" * 4096)
        assert h.read_pdu(s, BOUND) == (h.A_ABORT, b"\x00\x00\x02\x06")
        assert h.closed_after(s, BOUND) is not None
    finally:
        s.close()


@pytest.mark.parametrize("associated", [False, True], ids=["before-association", "associated"])
def test_unknown_pdu_type_is_aborted_and_closed(dserve, associated):
    port, _proc = dserve()
    s = h.associate(port) if associated else h.connect(port)
    try:
        s.sendall(h.pdu_header(0xFF, 100) + b"\xff" * 100)
        # PS3.8: A-ABORT; service-provider, unrecognized-PDU
        assert h.read_pdu(s, BOUND) == (h.A_ABORT, b"\x00\x00\x02\x01")
        assert h.closed_after(s, BOUND) is not None
    finally:
        s.close()


def test_allow_refuses_a_calling_ae_title_before_the_request_is_complete(dserve):
    port, proc = dserve("--allow", "GOOD", "--timeout", "60")
    s = h.connect(port)
    try:
        s.sendall(h.associate_rq(calling="STRANGER")[:74])  # past the calling AE title, then nothing
        # rejected-permanent, service-user, calling AE title not recognized
        assert h.read_pdu(s, BOUND) == (h.A_ASSOCIATE_RJ, b"\x00\x01\x01\x03")
        assert h.closed_after(s, BOUND) is not None
    finally:
        s.close()
    assert echo(port, calling="GOOD") == 0x0000
    assert echo(port, calling="STRANGER") is None
    stop(proc)
    assert output(proc)[1].count("rejected association from STRANGER") == 2


def test_peer_that_stops_reading_cannot_hold_an_association(tmp_path):
    """A response the peer never reads ends the association after --timeout; it does not
    block the association's DUL thread in send() for ever."""
    from pynetdicom.pdu_primitives import P_DATA

    srv = make_server(tmp_path, timeout=2)
    try:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", srv.s.port))
        s.sendall(h.associate_rq())
        assert h.read_pdu(s, BOUND)[0] == h.A_ASSOCIATE_AC
        (assoc,) = srv._server.active_associations
        big = P_DATA()  # stands for a large C-GET or C-FIND answer
        big.presentation_data_value_list.append((1, b"\x02" + b"\0" * (64 << 20)))
        assoc.dul.send_pdu(big)
        deadline = time.monotonic() + BOUND
        while srv._server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv._server.active_associations == []
        s.close()
    finally:
        srv.shutdown(2)


# -- malformed C-STOREs --------------------------------------------------------------------
SOP = "1.2.3.4.5.6.7.8"
NON_ASCII = "1.2.3.4.5.6.7.\u00e9".encode("latin-1")  # as long as SOP


def data_set(tmp_path: Path, sop: str = SOP) -> bytes:
    ds = pydicom.dcmread(make_instance(tmp_path / f"{sop}.dcm", sop_uid=sop))
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def malformed(case: str, tmp_path: Path) -> tuple[bytes, bytes]:
    """(command set, data set) of a broken C-STORE request."""
    data = data_set(tmp_path)
    if case == "command-uid-not-ascii":
        return h.c_store_rq(1, h.CT_IMAGE.encode(), NON_ASCII), data
    if case == "data-set-uid-not-ascii":
        return h.c_store_rq(1, h.CT_IMAGE.encode(), SOP.encode()), data.replace(SOP.encode(), NON_ASCII)
    assert case == "empty-sop-instance-uid"
    return h.c_store_rq(1, h.CT_IMAGE.encode(), b""), data


@pytest.fixture
def counted(tmp_path):
    srv = make_server(tmp_path, count_handler=True)
    yield srv
    srv.shutdown(2)


@needs_lane
@pytest.mark.parametrize("path", ["lane", "pynetdicom"])
@pytest.mark.parametrize("case", ["command-uid-not-ascii", "data-set-uid-not-ascii", "empty-sop-instance-uid"])
def test_malformed_c_store_is_answered_cannot_understand(counted, tmp_path, path, case):
    # a peer whose maximum PDU length is below the lane's minimum is served by pynetdicom alone
    max_pdu = 16384 if path == "lane" else 256
    s = h.connect(counted.s.port)
    try:
        s.sendall(h.associate_rq(contexts=((h.CT_IMAGE, (h.EXPLICIT_LE,)),), max_pdu=max_pdu))
        assert h.read_pdu(s, BOUND)[0] == h.A_ASSOCIATE_AC
        wait_established(counted)
        command, data = malformed(case, tmp_path)
        assert h.status_of(h.c_store(s, command, data, timeout=BOUND)) == 0xC210
        # the association goes on: a good instance is stored over it
        good = data_set(tmp_path, "1.2.3.4.5.6.7.9")
        assert h.status_of(h.c_store(s, h.c_store_rq(2, h.CT_IMAGE.encode(), b"1.2.3.4.5.6.7.9"), good,
                                     timeout=BOUND)) == 0x0000
        s.sendall(h.release_rq())
        assert h.read_pdu(s, BOUND)[0] == h.A_RELEASE_RP
    finally:
        s.close()
    wait_indexed(counted, 1)
    assert [p.name for p in counted.s.archive.rglob("*.dcm")] == ["1.2.3.4.5.6.7.9.dcm"]
    if path == "pynetdicom":
        assert len(counted.handler_calls) == (1 if case == "empty-sop-instance-uid" else 2)
    elif case == "data-set-uid-not-ascii":
        assert counted.handler_calls == []  # the lane answered both
