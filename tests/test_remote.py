"""Search and retrieve another site's archive through a real Dovecot, with three sites.

Site B holds the studies and grants A queries and retrieves, and C nothing. A's live
answers equal B's own; C is refused and sees nothing; a retrieved study is byte-identical
and arrives once when asked twice; a replayed request is refused; the mail store never
holds patient data in clear; a server killed mid-answer answers after its restart.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest

from conftest import BIN, require_tool
from dovecot import Dovecot
from exchange import Exchange

pytestmark = pytest.mark.integration
LOCAL = ("path", "path_b64", "size", "mtime")


@pytest.fixture(scope="module")
def dovecot():
    with Dovecot(require_tool("dovecot")) as dc:
        yield dc


@pytest.fixture
def ex(tmp_path, dovecot, request) -> Exchange:
    base = "r" + str(abs(hash(request.node.name)) % 10**8)
    ex = Exchange(tmp_path, dovecot.url.replace("/dtools", f"/{base}"), env=dovecot.env(),
                  names=("site-a", "site-b", "site-c"))
    ex.base = base  # type: ignore[attr-defined]
    ex.set("site-b", "peers.site-a", "query", "true")
    ex.set("site-b", "peers.site-a", "retrieve", "true")
    ex.add_studies("site-b", tmp_path / "b-data", studies=3)
    return ex


def serve_once(ex: Exchange) -> str:
    return ex.ok("site-b", "dserve --relay --once").stderr


def strip(records: list[dict], *extra: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in LOCAL + extra} for r in records]


def relay_bytes(dovecot: Dovecot) -> list[bytes]:
    root = dovecot.maildir()
    return [p.read_bytes() for p in root.rglob("*") if p.is_file() and ("/new/" in str(p) or "/cur/" in str(p))]


def test_live_answers_equal_the_peers_own_and_a_stranger_is_refused(ex, dovecot):
    asked = ex.sh("site-a", "dsearch --peer site-b --live --wait 1s --level study")
    assert asked.code == 75 and "site-b did not answer within 1 s" in asked.stderr  # no server yet
    assert asked.records == []
    # With a server running, an answer comes while the command waits.
    server = _start_server(ex)
    try:
        for level, keys in (("study", "PatientName=*"), ("series", "Modality=CT"), ("instance", "Modality=MR")):
            got = ex.ok("site-a", f"dsearch --peer site-b --live --wait 60s --level {level} {keys}")
            own = ex.ok("site-b", f"dsearch --level {level} {keys}")
            assert strip(got.records, "peer", "answered_at") == strip(own.records)
            assert got.records and all(r["peer"] == "site-b" for r in got.records)
        refused = ex.sh("site-c", "dsearch --peer site-b --live --wait 60s --level study")
        assert refused.code == 69 and "refused" in refused.stderr and refused.records == []
        refused = ex.sh("site-c", "dretrieve --peer site-b --wait 60s StudyInstanceUID=1.2.3")
        assert refused.code == 69 and "refused" in refused.stderr
    finally:
        _stop(server)
    assert ex.archive("site-c") == []
    st = ex.status("site-b")
    assert st["site-c"]["requests_refused"] == 2 and st["site-a"]["requests_served"] >= 3


def _start_server(ex: Exchange) -> subprocess.Popen:
    from dcmtk import free_port

    env = {**os.environ, **ex.env, "DTOOLS_HOME": str(ex.home("site-b")), "PATH": f"{BIN}:{os.environ['PATH']}"}
    return subprocess.Popen([str(BIN / "dserve"), "--relay", "--bind", "127.0.0.1", "--port", str(free_port()), "-v"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.stderr.read().decode("utf-8", "replace")


def test_a_retrieved_study_is_byte_identical_and_arrives_once(ex, tmp_path):
    study = ex.ok("site-b", "dsearch --level study").kinds("study")[0]["StudyInstanceUID"]
    asked = ex.ok("site-a", f"dretrieve --peer site-b StudyInstanceUID={study}")
    [req] = asked.kinds("message")
    assert req["status"] == "sent" and req["peer"] == "site-b"
    again = ex.ok("site-a", f"dretrieve --peer site-b StudyInstanceUID={study}")  # asked twice: not sent again
    assert [m["request_id"] for m in again.kinds("message")] == [req["request_id"]]
    assert again.kinds("message")[0]["status"] == "pending"
    serve_once(ex)
    got = ex.ok("site-a", f"dretrieve --peer site-b StudyInstanceUID={study} --wait 60s")
    own = {r["SOPInstanceUID"]: r["path"] for r in ex.ok("site-b", f"dsearch StudyInstanceUID={study}").records}
    assert sorted(r["SOPInstanceUID"] for r in got.kinds("instance")) == sorted(own)
    for rec in got.kinds("instance"):
        assert open(rec["path"], "rb").read() == open(own[rec["SOPInstanceUID"]], "rb").read()
    # A later request for the same study: answered with the envelope already delivered, nothing new.
    ex.ok("site-a", f"dretrieve --peer site-b StudyInstanceUID={study}")
    serve_once(ex)
    again = ex.ok("site-a", f"dretrieve --peer site-b StudyInstanceUID={study} --wait 60s")
    assert len(again.kinds("instance")) == len(own)
    assert len([e for e in ex.opened_envelopes("site-a") if e[2]]) == 1  # one delivery (answers hold no files)
    ex.receive("site-b")  # B takes A's receipt
    st = ex.status("site-b")["site-a"]
    assert (st["sealed"], st["delivered"]) == (1, 1)


def test_a_replayed_request_is_refused(ex, dovecot, tmp_path):
    ex.sh("site-a", "dsearch --peer site-b --live --wait 0s --level study")  # deposit, do not wait
    [request] = dovecot.message_files(f"{ex.base}/site-b-requests")  # type: ignore[attr-defined]
    copy = tmp_path / "request.eml"
    copy.write_bytes(request.read_bytes())
    serve_once(ex)
    assert dovecot.message_files(f"{ex.base}/site-b-requests") == []  # type: ignore[attr-defined]
    # Someone with write access to the relay puts the old request back.
    from imapclient import IMAPClient

    from dovecot import PASSWORD, USER

    c = IMAPClient("127.0.0.1", dovecot.port, ssl=False)
    c.login(USER, PASSWORD)
    c.append(f"{ex.base}/site-b-requests", copy.read_bytes())
    c.logout()
    log = ex.sh("site-b", "dserve --relay --once -v").stderr
    assert "refused request" in log and "replayed" in log
    got = ex.sh("site-a", "dsearch --peer site-b --live --wait 0s --level study")
    assert got.code == 75  # its own new request: not answered yet, nothing from the replay counts for it


def test_the_mail_store_holds_no_patient_data_in_clear(ex, dovecot, tmp_path):
    names = ex.ok("site-b", "dsearch --level study --fields PatientName,PatientID,AccessionNumber").records
    secrets = {str(v).split("^")[0].encode("utf-8") for r in names for v in r.values() if isinstance(v, str) and
               len(v) > 3 and v not in ("study",)}
    assert secrets
    ex.sh("site-a", "dsearch --peer site-b --live --wait 0s --level study PatientName='SMITH*' AccessionNumber=ACC*")
    study = names[0].get("StudyInstanceUID") or ex.ok("site-b", "dsearch --level study").records[0]["StudyInstanceUID"]
    ex.ok("site-a", f"dretrieve --peer site-b StudyInstanceUID={study}")
    serve_once(ex)  # answers and the study now sit in the relay
    stored = relay_bytes(dovecot)
    assert len(stored) >= 3
    for blob in stored:
        for secret in secrets | {b"SMITH", b"ACC*"}:
            assert secret not in blob, secret


def test_a_server_killed_mid_answer_loses_no_request(ex, tmp_path):
    rng = random.Random(3)
    studies = [r["StudyInstanceUID"] for r in ex.ok("site-b", "dsearch --level study").records]
    rids = []
    for s in studies:
        [m] = ex.ok("site-a", f"dretrieve --peer site-b StudyInstanceUID={s}").kinds("message")
        rids.append(m["request_id"])
    env = {**os.environ, **ex.env, "DTOOLS_HOME": str(ex.home("site-b")), "PATH": f"{BIN}:{os.environ['PATH']}"}
    kills = 0
    for _ in range(6):
        p = subprocess.Popen([str(BIN / "dserve"), "--relay", "--once"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
        time.sleep(rng.uniform(0.2, 1.5))
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            kills += 1
        p.wait(30)
        assert b"Traceback" not in p.stderr.read()
    assert kills >= 2
    serve_once(ex)
    got = ex.ok("site-a", " ; ".join(f"dretrieve -v --peer site-b StudyInstanceUID={s} --wait 60s" for s in studies))
    own = ex.ok("site-b", "dsearch").records
    assert sorted(r["SOPInstanceUID"] for r in got.kinds("instance")) == sorted(r["SOPInstanceUID"] for r in own), got.stderr + ex.sh("site-a", "dstatus -v").stdout
    import sqlite3

    db = sqlite3.connect(ex.home("site-b") / "outbox" / "ledger.db")
    served = dict(db.execute("SELECT request_id, status FROM served").fetchall())
    assert all(served.get(rid) == "answered" for rid in rids), served
    # each instance sealed for A once, however often the server was killed
    assert db.execute("SELECT count(*) FROM sealed_instances WHERE peer='site-a'").fetchone()[0] == len(own)
