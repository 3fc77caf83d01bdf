"""Exactly once between sites, as the README's cron lines run them (over the Maildir relay).

Each test runs the real commands in real shell pipelines; the same paths over Dovecot are in
test_exchange_dovecot.py.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from exchange import Exchange
from test_seal_support import make_dicom


@pytest.fixture
def ex(tmp_path) -> Exchange:
    return Exchange(tmp_path, f"maildir:{tmp_path}/relay")


def relay_files(ex: Exchange, folder: str) -> list[Path]:
    d = ex.root / "relay" / "dtools" / folder
    return [p for sub in ("new", "cur") if (d / sub).exists() for p in (d / sub).iterdir()]


def test_the_send_line_run_again_and_again_delivers_each_study_once(ex, tmp_path):
    files = ex.add_studies("site-a", tmp_path / "data", studies=3)
    first = ex.send("site-a", "site-b")
    assert len(first.kinds("message")) == 3 and "sealed 3 envelope(s)" in first.stderr
    for _ in range(4):  # cron, every minute
        again = ex.send("site-a", "site-b")
        assert again.records == []
        assert "sealed 0 envelope(s)" in again.stderr and "9 instance(s) already sealed" in again.stderr
    ex.receive("site-b")
    ex.receive("site-b")
    opened = ex.opened_envelopes("site-b")
    assert len(opened) == 3 and sum(n for _, _, n in opened) == len(files)
    assert len(ex.archive("site-b")) == len(files)
    ex.ok("site-a", "dmail-recv")
    st = ex.status("site-a")["site-b"]
    assert (st["sealed"], st["delivered"], st["awaiting_receipt"], st["not_deposited"]) == (3, 3, 0, 0)
    assert st["oldest_awaiting_s"] is None


def test_instances_added_later_travel_alone_and_resend_forces(ex, tmp_path):
    ex.add_studies("site-a", tmp_path / "data", studies=1, instances=2)
    [env] = ex.send("site-a", "site-b").kinds("message")
    # Two more instances of the same study arrive at site A later.
    from dtools.sample import make_instance

    for n in (2, 3):
        ds = make_instance("CT", 0, 0, 0, n, date="20260110")
        ds.save_as(tmp_path / "data" / f"late{n}.dcm", enforce_file_format=True)
    ex.ok("site-a", f"dindex -q {tmp_path / 'data'} >/dev/null")
    late = ex.send("site-a", "site-b").kinds("message")
    assert len(late) == 1 and late[0]["envelope_id"] != env["envelope_id"]
    ex.receive("site-b")
    assert sorted(n for _, _, n in ex.opened_envelopes("site-b")) == [2, 2]
    # A changed file (same SOP Instance UID, new content) goes again; an untouched one does not.
    victim = tmp_path / "data" / "late2.dcm"
    victim.write_bytes(victim.read_bytes() + b"\0\0")
    ex.ok("site-a", f"dindex -q {tmp_path / 'data'} >/dev/null")
    changed = ex.ok("site-a", "dsearch | dseal --to site-b")
    assert [r["instances"] for r in changed.kinds("envelope")] == [1]
    forced = ex.ok("site-a", "dsearch | dseal --to site-b --resend")
    assert [r["instances"] for r in forced.kinds("envelope")] == [4]


def test_a_receipt_lost_in_the_relay_is_owed_again_and_sent_by_the_next_run(ex, tmp_path):
    ex.add_studies("site-a", tmp_path / "data", studies=1)
    ex.send("site-a", "site-b")
    out = ex.receive("site-b")
    assert len(out.kinds("message")) == 1
    for f in relay_files(ex, "site-a"):  # the receipt vanishes from the relay
        f.unlink()
    assert ex.ok("site-a", "dmail-recv").records == []
    assert ex.status("site-a")["site-b"]["awaiting_receipt"] == 1
    # The sender retries; the receiver sees a copy of what it opened and owes its receipt again.
    ex.ok("site-a", "dmail-send --retry 0s </dev/null")
    again = ex.receive("site-b")
    assert [(m["receipt"], m["status"]) for m in again.kinds("message")] == [(True, "sent")]
    assert ex.status("site-b")["site-a"]["receipts_owed"] == 0
    got = ex.ok("site-a", "dmail-recv")
    assert [r["status"] for r in got.kinds("receipt")] == ["delivered"]
    assert ex.status("site-a")["site-b"]["delivered"] == 1
    assert len(ex.opened_envelopes("site-b")) == 1  # opened once


def test_envelopes_taken_by_a_receive_only_run_are_opened_by_the_next_pipeline(ex, tmp_path):
    files = ex.add_studies("site-a", tmp_path / "data", studies=2)
    ex.send("site-a", "site-b")
    ex.ok("site-b", "dmail-recv -q >/dev/null")  # e.g. run for receipts, its records thrown away
    assert ex.status("site-b")["site-a"]["unopened"] == 2
    ex.receive("site-b")
    assert len(ex.archive("site-b")) == len(files)
    st = ex.status("site-b")["site-a"]
    assert (st["unopened"], st["receipts_owed"]) == (0, 0)
    # Once opened, an envelope is not handed on again.
    assert ex.ok("site-b", "dmail-recv").kinds("envelope") == []


def test_a_pipeline_that_dies_after_opening_still_sends_its_receipts(ex, tmp_path):
    ex.add_studies("site-a", tmp_path / "data", studies=2)
    ex.send("site-a", "site-b")
    # The pipe breaks after dseal --open: its records never reach dindex or dmail-send.
    out = ex.sh("site-b", "dmail-recv | dseal --open | (cat >/dev/null; exit 1)")
    assert out.code == 1
    st = ex.status("site-b")["site-a"]
    assert (st["unopened"], st["receipts_owed"]) == (0, 2)
    # The index has them already: opening means in the archive and in the index.
    assert len(ex.ok("site-b", "dsearch --level study").kinds("study")) == 2
    sent = ex.ok("site-b", "dmail-send --receipts </dev/null")
    assert len(sent.kinds("message")) == 2
    assert ex.status("site-b")["site-a"]["receipts_owed"] == 0


def test_two_sites_sending_to_each_other_with_the_one_receive_pipeline(ex, tmp_path):
    a_files = ex.add_studies("site-a", tmp_path / "a", studies=2)
    from dtools.sample import generate

    b_files = generate(tmp_path / "b", 1, 1, 2)
    # site B's own studies: other patients, so that they do not collide with A's UIDs
    for f in b_files:
        import pydicom

        ds = pydicom.dcmread(f)
        for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            setattr(ds, key, ds.get(key) + ".9")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(f)
    ex.ok("site-b", f"dindex -q {tmp_path / 'b'} >/dev/null")
    for _ in range(2):
        ex.send("site-a", "site-b")
        ex.send("site-b", "site-a")
        ex.receive("site-a")
        ex.receive("site-b")
    assert len(ex.archive("site-b")) == len(a_files)
    assert len(ex.archive("site-a")) == len(b_files)
    sa, sb = ex.status("site-a")["site-b"], ex.status("site-b")["site-a"]
    assert (sa["sealed"], sa["delivered"], sb["sealed"], sb["delivered"]) == (2, 2, 1, 1)
    assert (sa["unopened"], sb["unopened"], sa["receipts_owed"], sb["receipts_owed"]) == (0, 0, 0, 0)


def test_dstatus_figures_before_and_after_receipts(ex, tmp_path):
    st = ex.status("site-a")["site-b"]  # nothing exchanged yet: zeros, no ledger needed
    assert (st["sealed"], st["delivered"], st["oldest_awaiting_s"]) == (0, 0, None)
    ex.add_studies("site-a", tmp_path / "data", studies=2)
    ex.ok("site-a", "dsearch | dseal --to site-b >/dev/null")  # sealed, the send half of the pipe lost
    st = ex.status("site-a")["site-b"]
    assert (st["sealed"], st["not_deposited"], st["awaiting_receipt"]) == (2, 2, 0)
    assert st["oldest_awaiting_s"] >= 0
    ex.ok("site-a", "dmail-send </dev/null")  # the next ordinary run deposits them
    st = ex.status("site-a")["site-b"]
    assert (st["not_deposited"], st["awaiting_receipt"]) == (0, 2)
    overdue = ex.sh("site-a", "dstatus --overdue 0s")
    assert overdue.code == 1 and "site-b: 2 envelope(s) without a receipt" in overdue.stderr
    assert ex.sh("site-a", "dstatus --overdue 1h").code == 0
    ex.receive("site-b")
    ex.ok("site-a", "dmail-recv")
    st = ex.status("site-a")["site-b"]
    assert (st["awaiting_receipt"], st["delivered"], st["oldest_awaiting_s"]) == (0, 2, None)
    assert ex.sh("site-a", "dstatus --overdue 0s").code == 0
    table = ex.ok("site-a", "dstatus --table")
    assert "site-b" in table.stdout and "delivered" in table.stdout
    # dstatus reads only: the ledger is byte-identical afterwards.
    ledger = ex.home("site-a") / "outbox" / "ledger.db"
    before = ledger.read_bytes()
    ex.ok("site-a", "dstatus --table >/dev/null; dstatus >/dev/null")
    assert ledger.read_bytes() == before


def test_delivered_and_opened_envelope_files_are_removed_by_ordinary_runs(ex, tmp_path):
    ex.add_studies("site-a", tmp_path / "data", studies=1)
    ex.set("site-b", "retention", "inbox", '"0s"')
    ex.send("site-a", "site-b")
    assert list((ex.home("site-a") / "outbox").glob("*.dtenv"))
    ex.receive("site-b")
    assert list((ex.home("site-b") / "inbox").glob("*.dtenv"))  # opened in this run
    ex.ok("site-b", "dmail-recv")  # the next ordinary run: opened, kept 0 s
    assert list((ex.home("site-b") / "inbox").glob("*.dtenv")) == []
    ex.ok("site-a", "dmail-recv")  # the receipt: delivered outbox files go at once by default
    assert list((ex.home("site-a") / "outbox").glob("*.dtenv")) == []
    # A duplicate arriving after its file was removed is still recognised.
    assert ex.ok("site-b", "dmail-recv").kinds("envelope") == []


def test_an_envelope_whose_deposit_failed_is_deposited_by_the_next_ordinary_run(ex, tmp_path):
    ex.add_studies("site-a", tmp_path / "data", studies=1)
    bad = ex.sh("site-a", "dsearch | dseal --to site-b | dmail-send --relay imap://u@127.0.0.1:1/dtools")
    assert bad.code in (2, 69)
    assert ex.status("site-a")["site-b"]["not_deposited"] == 1
    out = ex.ok("site-a", "dmail-send </dev/null")
    assert [m["status"] for m in out.kinds("message")] == ["sent"]
    assert ex.status("site-a")["site-b"]["not_deposited"] == 0


def test_sealed_envelope_removed_by_hand_is_sealed_again(ex, tmp_path):
    ex.add_studies("site-a", tmp_path / "data", studies=1)
    [env] = ex.ok("site-a", "dsearch | dseal --to site-b").kinds("envelope")
    Path(env["path"]).unlink()
    gone = ex.sh("site-a", "dmail-send </dev/null")
    assert gone.code == 1 and "sealed again by the next" in gone.stderr
    assert ex.sh("site-a", "dmail-send </dev/null").code == 0  # reported once
    again = ex.send("site-a", "site-b")
    assert len(again.kinds("message")) == 1


def test_unknown_peer_for_dmail_send_is_a_usage_error(ex, tmp_path):
    out = ex.sh("site-a", "dmail-send --to site-x </dev/null")
    assert out.code == 2 and "site-x" in out.stderr and "dseal peers add" in out.stderr
    assert not (ex.root / "relay" / "dtools" / "site-x").exists()


def test_a_second_file_with_the_same_sop_is_a_warning_in_dseal(ex, tmp_path):
    a = tmp_path / "one.dcm"
    make_dicom(a, study="1.2.3", series="1.2.3.4", sop="1.2.3.4.5")
    b = tmp_path / "two.dcm"
    make_dicom(b, study="1.2.3", series="1.2.3.4", sop="1.2.3.4.5", pixels=300)
    out = ex.sh("site-a", f"dseal --to site-b {a} {b}")
    assert out.code == 0, out.stderr
    assert "same SOPInstanceUID 1.2.3.4.5" in out.stderr
    assert [r["instances"] for r in out.kinds("envelope")] == [1]


def test_an_envelope_that_cannot_be_opened_is_set_aside_once(ex, tmp_path):
    ex.add_studies("site-a", tmp_path / "data", studies=1)
    ex.send("site-a", "site-b")
    ex.ok("site-b", "dmail-recv >/dev/null")
    # Site B replaced its keys before site A learnt the new ones: the envelope can never be
    # opened here. It is set aside, reported once, and shown by dstatus.
    from dtools.config import Config
    from dtools.seal.keys import generate_identity

    generate_identity(Config(ex.home("site-b")), "site-b", force=True)
    out = ex.sh("site-b", "dmail-recv | dseal --open")
    assert out.code == 1 and "not sealed for this site" in out.stderr and "set aside in" in out.stderr
    assert len(list((ex.home("site-b") / "inbox" / "quarantine").glob("*.dtenv"))) == 1
    assert ex.sh("site-b", "dmail-recv | dseal --open").code == 0  # not offered again
    st = ex.status("site-b")["site-a"]
    assert (st["quarantined"], st["unopened"]) == (1, 0)


def test_ledger_of_an_older_dtools_is_upgraded(ex, tmp_path):
    from dtools.exchange.schema import SCHEMA

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA[0])
    db.execute("INSERT INTO sent VALUES ('ab12','site-b','/x',1,'0',1,1,'r',1,1,1,1,NULL,NULL)")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    from dtools.exchange.ledger import Ledger

    led = Ledger(path)
    assert led.sent("ab12", "site-b")["complete"] == 1
    assert led.db.execute("PRAGMA user_version").fetchone()[0] == len(SCHEMA)
    led.close()


def test_dstatus_counts_equal_a_count_of_every_row(tmp_path):
    """The indexes dstatus reads give the same figures as counting the ledger row by row."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_status

    from dtools.exchange.ledger import Ledger, ledger_path
    from dtools.exchange.status import peer_status

    home = tmp_path / "home"
    home.mkdir()
    bench_status.fill(home, 2000)
    led = Ledger(ledger_path(home), readonly=True)
    rows = {r["peer"]: r for r in peer_status(led, bench_status.PEERS)}
    db = led.db
    for peer in bench_status.PEERS:
        sealed = db.execute("SELECT deposited_at, receipt_at, sealed_at FROM sealed WHERE peer=? AND lost_at IS NULL",
                            (peer,)).fetchall()
        r = rows[peer]
        assert r["sealed"] == len(sealed)
        assert r["not_deposited"] == sum(1 for d, _, _ in sealed if d is None)
        assert r["awaiting_receipt"] == sum(1 for d, rc, _ in sealed if d is not None and rc is None)
        assert r["delivered"] == sum(1 for _, rc, _ in sealed if rc is not None)
        received = db.execute("SELECT r.envelope_id, r.quarantined_at, o.receipt_owed FROM received r LEFT JOIN "
                              "opened o USING (envelope_id) WHERE r.sender=?", (peer,)).fetchall()
        assert r["unopened"] == sum(1 for _, q, o in received if o is None and q is None)
        assert r["receipts_owed"] == sum(1 for _, _, o in received if o == 1)
        relay = db.execute("SELECT count(*) FROM quarantine WHERE sender=?", (peer,)).fetchone()[0]
        assert r["quarantined"] == relay + sum(1 for _, q, o in received if o is None and q is not None)
    led.close()


def test_dseal_seals_what_a_streaming_producer_sent_once_it_pauses(ex, tmp_path):
    """dserve | dseal --to | dmail-send relays live: dseal does not wait for the end of its input."""
    import os
    import subprocess
    import time

    from conftest import BIN

    files = ex.add_studies("site-a", tmp_path / "data", studies=2, instances=2)
    found = ex.ok("site-a", "dsearch").records
    env = {**os.environ, "DTOOLS_HOME": str(ex.home("site-a"))}
    p = subprocess.Popen([str(BIN / "dseal"), "--to", "site-b", "--settle", "1s"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    import orjson

    first = [r for r in found if r["StudyInstanceUID"] == found[0]["StudyInstanceUID"]]
    p.stdin.write(b"".join(orjson.dumps(r) + b"\n" for r in first))
    p.stdin.flush()
    line = p.stdout.readline()  # comes while stdin is still open
    rec = orjson.loads(line)
    assert rec["kind"] == "envelope" and rec["instances"] == len(first)
    rest = [r for r in found if r not in first]
    p.stdin.write(b"".join(orjson.dumps(r) + b"\n" for r in rest))
    p.stdin.close()
    out = p.stdout.read()
    assert p.wait(60) == 0, p.stderr.read()
    [rec2] = [orjson.loads(x) for x in out.splitlines()]
    assert rec2["instances"] == len(rest) and len(first) + len(rest) == len(files)
