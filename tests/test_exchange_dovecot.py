"""Exactly once between sites over a real Dovecot, as the README's cron lines run them,
including the recovery paths: a deposit that fails, a receipt that cannot be deposited,
envelopes taken by a receive-only run, and dstatus --check-relay."""

from __future__ import annotations

import pytest

from conftest import require_tool
from dovecot import PASSWORD, Dovecot
from exchange import Exchange

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dovecot():
    with Dovecot(require_tool("dovecot"), append_limit=8 * 1024 * 1024) as dc:
        yield dc


@pytest.fixture
def ex(tmp_path, dovecot, request) -> Exchange:
    # One base folder per test, so tests sharing the server never see each other's mail.
    base = "t" + str(abs(hash(request.node.name)) % 10**8)
    return Exchange(tmp_path, dovecot.url.replace("/dtools", f"/{base}"), env=dovecot.env())


def test_readme_lines_five_sends_then_receive_give_one_envelope_per_study(ex, tmp_path):
    files = ex.add_studies("site-a", tmp_path / "data", studies=3)
    for _ in range(5):
        ex.send("site-a", "site-b")
    ex.receive("site-b")
    ex.receive("site-b")
    opened = ex.opened_envelopes("site-b")
    assert len(opened) == 3 and sum(n for *_, n in opened) == len(files)
    assert len(ex.archive("site-b")) == len(files)
    got = ex.ok("site-a", "dmail-recv")
    assert sorted(r["status"] for r in got.kinds("receipt")) == ["delivered"] * 3
    st = ex.status("site-a")["site-b"]
    assert (st["sealed"], st["delivered"], st["awaiting_receipt"]) == (3, 3, 0)


def test_a_failed_deposit_is_made_by_the_next_ordinary_run(ex, tmp_path):
    ex.add_studies("site-a", tmp_path / "data", studies=2)
    ex.env["DTOOLS_RELAY_PASSWORD"] = "wrong"
    bad = ex.sh("site-a", "dsearch | dseal --to site-b | dmail-send")
    assert bad.code == 2 and "refused login" in bad.stderr
    assert ex.status("site-a")["site-b"]["not_deposited"] == 2
    ex.env["DTOOLS_RELAY_PASSWORD"] = PASSWORD
    out = ex.send("site-a", "site-b")  # the same cron line, next minute: nothing new to seal
    assert sorted(m["status"] for m in out.kinds("message")) == ["sent", "sent"]
    assert ex.status("site-a")["site-b"]["not_deposited"] == 0
    ex.receive("site-b")
    assert len(ex.opened_envelopes("site-b")) == 2


def test_a_receipt_that_could_not_be_deposited_goes_with_the_next_run(ex, tmp_path):
    ex.add_studies("site-a", tmp_path / "data", studies=1)
    ex.send("site-a", "site-b")
    ex.env["DTOOLS_RELAY_PASSWORD"] = "wrong"  # wrong only for the last command of the pipe
    out = ex.sh("site-b", f"DTOOLS_RELAY_PASSWORD={PASSWORD} dmail-recv | "
                          f"DTOOLS_RELAY_PASSWORD={PASSWORD} dseal --open | dindex | dmail-send --receipts")
    assert out.code == 2
    ex.env["DTOOLS_RELAY_PASSWORD"] = PASSWORD
    assert ex.status("site-b")["site-a"]["receipts_owed"] == 1
    nxt = ex.receive("site-b")  # nothing new arrives; the receipt still owed goes
    assert [(m["receipt"], m["status"]) for m in nxt.kinds("message")] == [(True, "sent")]
    assert ex.status("site-b")["site-a"]["receipts_owed"] == 0
    got = ex.ok("site-a", "dmail-recv")
    assert [r["status"] for r in got.kinds("receipt")] == ["delivered"]


def test_envelopes_taken_by_a_receipts_only_run_are_still_opened(ex, tmp_path):
    files = ex.add_studies("site-a", tmp_path / "data", studies=2)
    ex.send("site-a", "site-b")
    ex.ok("site-b", "dmail-recv -q >/dev/null")
    assert ex.status("site-b")["site-a"]["unopened"] == 2
    ex.receive("site-b")
    assert len(ex.archive("site-b")) == len(files)
    assert ex.status("site-b")["site-a"]["unopened"] == 0


def test_both_sites_sending_to_each_other(ex, tmp_path):
    ex.add_studies("site-a", tmp_path / "a", studies=1)
    from dtools.sample import make_instance

    (tmp_path / "b").mkdir()
    for n in range(2):
        ds = make_instance("MR", 7, 40, 0, n)
        ds.save_as(tmp_path / "b" / f"{n}.dcm", enforce_file_format=True)
    ex.ok("site-b", f"dindex -q {tmp_path / 'b'} >/dev/null")
    for _ in range(2):
        for site, peer in (("site-a", "site-b"), ("site-b", "site-a")):
            ex.send(site, peer)
        for site in ("site-a", "site-b"):
            ex.receive(site)
    sa, sb = ex.status("site-a")["site-b"], ex.status("site-b")["site-a"]
    assert (sa["sealed"], sa["delivered"], sb["sealed"], sb["delivered"]) == (1, 1, 1, 1)
    assert len(ex.archive("site-a")) == 2 and len(ex.archive("site-b")) == 3


def test_check_relay_reports_folders_and_limits(ex, tmp_path, dovecot):
    ex.add_studies("site-a", tmp_path / "data", studies=1)
    ex.send("site-a", "site-b")
    out = ex.ok("site-a", "dstatus --check-relay")
    [relay] = out.kinds("relay")
    assert relay["append_limit"] == 8 * 1024 * 1024
    [storage] = [q for q in relay["quota"] if q["resource"] == "STORAGE"]
    assert storage["limit"] == 1024 * 1024 and storage["usage"] > 0  # KiB (RFC 9208)
    waiting = [v for k, v in relay["folders"].items() if k.endswith("/site-b")]
    assert waiting and waiting[0]["messages"] == 1 and waiting[0]["bytes"] > 0
    table = ex.ok("site-a", "dstatus --check-relay --table")
    assert "append limit 8388608" in table.stdout
    down = ex.sh("site-a", "dstatus --check-relay --relay imap://relay@127.0.0.1:1/x")
    assert down.code == 69 and "cannot reach" in down.stderr
