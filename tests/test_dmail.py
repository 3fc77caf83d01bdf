"""dmail-send and dmail-recv through the embedded Maildir relay: the whole contract without a server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import run
from dtools.mail.message import part_payload_size
from mailsites import fake_envelope, lines, make_sites, mark_opened


@pytest.fixture
def sites(tmp_path):
    return make_sites(tmp_path, f"maildir:{tmp_path}/relay")


def send(home, records, *args):
    return run("dmail-send", "--home", str(home), *args, input=lines(records))


def recv(home, *args):
    return run("dmail-recv", "--home", str(home), *args)


def relay_files(tmp_path, site="site-b"):
    d = tmp_path / "relay" / "dtools" / site
    return [p for sub in ("new", "cur") if (d / sub).exists() for p in (d / sub).iterdir()]


def test_send_and_receive_byte_identical(sites, tmp_path):
    a, b = sites["site-a"], sites["site-b"]
    envs = [fake_envelope(a / "outbox", n) for n in (0, 1000, 250_000)]
    r = send(a, envs, "--max-message-size", "64K")
    assert r.returncode == 0, r.stderr
    msgs = r.records
    assert [m["kind"] for m in msgs] == ["message"] * 3
    per_part = part_payload_size(64 * 1024)
    assert 40_000 < per_part < 64 * 1024
    assert [m["parts"] for m in msgs] == [1, 1, -(-250_000 // per_part)]
    assert all(m["status"] == "sent" and m["peer"] == "site-b" for m in msgs)
    assert len(relay_files(tmp_path)) == 2 + -(-250_000 // per_part)
    assert all(p.stat().st_size <= 64 * 1024 for p in relay_files(tmp_path))
    r = recv(b)
    assert r.returncode == 0, r.stderr
    got = {e["envelope_id"]: e for e in r.records}
    assert set(got) == {e["envelope_id"] for e in envs}
    for e in envs:
        g = got[e["envelope_id"]]
        assert g["kind"] == "envelope" and g["from"] == "site-a"
        assert Path(g["path"]) == b / "inbox" / f"{e['envelope_id']}.dtenv"
        assert Path(g["path"]).read_bytes() == Path(e["path"]).read_bytes()
        assert (g["bytes"], g["sha256"]) == (e["bytes"], e["sha256"])
    assert relay_files(tmp_path) == []  # taken out of the relay once stored
    assert list((b / "spool").glob("*/*")) == []
    # Not opened yet: every run hands them on again, fetching nothing.
    again = recv(b)
    assert again.returncode == 0 and sorted(r["envelope_id"] for r in again.records) == sorted(got)
    assert "0 part(s) fetched" in again.stderr
    for envelope_id in got:
        mark_opened(b, envelope_id)
    again = recv(b)
    assert again.returncode == 0 and again.records == []


def test_rerun_does_not_duplicate(sites, tmp_path):
    a = sites["site-a"]
    env = fake_envelope(a / "outbox", 200_000)
    assert send(a, [env], "--max-message-size", "64K").returncode == 0
    n = len(relay_files(tmp_path))
    r = send(a, [env], "--max-message-size", "64K")
    assert r.returncode == 0 and r.records[0]["status"] == "already-sent"
    assert len(relay_files(tmp_path)) == n
    # Even with the ledger lost, the mailbox itself tells which parts are there already.
    os.unlink(a / "outbox" / "ledger.db")
    r = send(a, [env], "--max-message-size", "64K")
    assert r.returncode == 0 and r.records[0]["appended"] == 0
    assert len(relay_files(tmp_path)) == n


def test_duplicates_after_delivery_are_dropped(sites, tmp_path):
    a, b = sites["site-a"], sites["site-b"]
    env = fake_envelope(a / "outbox", 5000)
    send(a, [env])
    assert len(recv(b).records) == 1
    mark_opened(b, env["envelope_id"])
    r = send(a, [env], "--retry", "0s")  # no receipt yet: resent
    assert r.returncode == 0, r.stderr
    assert [m["status"] for m in r.records] == ["already-sent", "resent"]
    assert len(relay_files(tmp_path)) == 1
    r = recv(b)
    assert r.returncode == 0 and r.records == []  # delivered exactly once
    assert relay_files(tmp_path) == []


def test_receipts_go_back_and_mark_the_ledger(sites, tmp_path):
    import sqlite3

    a, b = sites["site-a"], sites["site-b"]
    env = fake_envelope(a / "outbox", 3000)
    send(a, [env])
    [got] = recv(b).records
    # What 'dseal --open' prints for each stored instance carries envelope_id and peer.
    instances = [{"kind": "instance", "path": f"/x/{i}.dcm", "envelope_id": got["envelope_id"], "peer": "site-a"}
                 for i in range(3)]
    r = send(b, instances, "--receipts")
    assert r.returncode == 0, r.stderr
    [m] = r.records
    assert m["receipt"] is True and m["peer"] == "site-a" and m["instances"] == 3
    assert len(relay_files(tmp_path, "site-a")) == 1
    r = send(b, instances, "--receipts")
    assert r.records[0]["status"] == "already-sent" and len(relay_files(tmp_path, "site-a")) == 1
    r = recv(a)
    assert r.returncode == 0, r.stderr
    [rc] = r.records
    assert rc["kind"] == "receipt" and rc["status"] == "delivered"
    assert (rc["envelope_id"], rc["peer"], rc["instances"], rc["sha256"]) == (env["envelope_id"], "site-b", 3, env["sha256"])
    db = sqlite3.connect(a / "outbox" / "ledger.db")
    assert db.execute("SELECT receipt_instances FROM sent").fetchone()[0] == 3
    # Delivered: --retry has nothing to resend.
    assert send(a, [], "--retry", "0s").records == []


def test_forged_receipt_is_refused(sites, tmp_path):
    a, b = sites["site-a"], sites["site-b"]
    env = fake_envelope(a / "outbox", 3000)
    send(a, [env])
    [got] = recv(b).records
    send(b, [{"kind": "instance", "envelope_id": got["envelope_id"], "peer": "site-a"}], "--receipts")
    [f] = relay_files(tmp_path, "site-a")
    raw = f.read_bytes()
    f.write_bytes(raw.replace(b'"instances":1', b'"instances":9').replace(
        b"X-Dtools-Signature: ", b"X-Dtools-Signature: AAAA"))
    r = recv(a)
    assert r.returncode == 1
    assert "receipt for" in r.stderr and "signature does not verify" in r.stderr
    assert r.records == []
    # Set aside for the administrator, so it does not fail every run.
    assert relay_files(tmp_path, "site-a") == []
    assert len(relay_files(tmp_path, "site-a-quarantine")) == 1
    assert recv(a).returncode == 0


def test_tampered_part_is_reported_and_kept(sites, tmp_path):
    a, b = sites["site-a"], sites["site-b"]
    env = fake_envelope(a / "outbox", 150_000)
    send(a, [env], "--max-message-size", "64K")
    victim = sorted(relay_files(tmp_path))[0]
    raw = bytearray(victim.read_bytes())
    i = raw.rindex(b"base64\r\n\r\n") + 100
    raw[i] = ord("B") if raw[i] == ord("A") else ord("A")
    victim.write_bytes(bytes(raw))
    r = recv(b)
    assert r.returncode == 1
    assert "digest mismatch" in r.stderr and "Traceback" not in r.stderr
    assert "moved to relay folder dtools/site-b-quarantine" in r.stderr
    assert r.records == [] and not (b / "inbox" / f"{env['envelope_id']}.dtenv").exists()
    assert not victim.exists() and len(relay_files(tmp_path, "site-b-quarantine")) == 1
    # No receipt came back: the sender's retry replaces the damaged part, and the set completes.
    r = send(a, [], "--retry", "0s")
    assert r.returncode == 0 and r.records[0]["appended"] == 1
    r = recv(b)
    assert r.returncode == 0, r.stderr
    assert Path(r.records[0]["path"]).read_bytes() == Path(env["path"]).read_bytes()


def test_incomplete_set_waits_and_is_reported_after_part_timeout(sites, tmp_path):
    a, b = sites["site-a"], sites["site-b"]
    env = fake_envelope(a / "outbox", 150_000)
    send(a, [env], "--max-message-size", "64K")
    held = sorted(relay_files(tmp_path))[1]
    total = -(-150_000 // part_payload_size(64 * 1024))
    aside = tmp_path / "aside"
    held.rename(aside)
    r = recv(b)
    assert r.returncode == 0 and r.records == []
    r = recv(b, "--part-timeout", "0s")
    assert r.returncode == 1
    assert f"envelope {env['envelope_id']} from site-a: incomplete: {total - 1} of {total} parts" in r.stderr
    aside.rename(held)  # the last part arrives late
    r = recv(b)
    assert r.returncode == 0, r.stderr
    assert [e["envelope_id"] for e in r.records] == [env["envelope_id"]]
    assert Path(r.records[0]["path"]).read_bytes() == Path(env["path"]).read_bytes()


def test_bad_records_and_missing_files(sites):
    a = sites["site-a"]
    r = run("dmail-send", "--home", str(a), input=b'{"kind":"envelope","path":"/nonexistent/ab12cd34ef.dtenv","to":["site-b"]}\n'
            b'{"kind":"envelope","path":"/x/evil.dtenv","envelope_id":"../../etc","to":["site-b"]}\n{broken\n')
    assert r.returncode == 1
    assert "cannot read envelope file" in r.stderr and "not lowercase hex" in r.stderr
    assert "not a valid JSON record" in r.stderr and "Traceback" not in r.stderr


def test_no_site_name_is_a_config_error(tmp_path):
    home = tmp_path / "h"
    home.mkdir()
    r = run("dmail-recv", "--home", str(home))
    assert r.returncode == 2 and "[site] name" in r.stderr


def test_options_are_checked(sites):
    a = sites["site-a"]
    assert run("dmail-send", "--home", str(a), "--retry", "soon").returncode == 2
    assert run("dmail-send", "--home", str(a), "--max-message-size", "1K").returncode == 2
    r = run("dmail-send", "--home", str(a), "--relay", "ftp://x")
    assert r.returncode == 2 and "imaps://" in r.stderr
    assert run("dmail-recv", "--home", str(a), "--max-time", "1s").returncode == 2
    assert run("dmail-recv", "--home", str(a), "--done-folder", "../x").returncode == 2


def test_done_folder_keeps_processed_messages(sites, tmp_path):
    a, b = sites["site-a"], sites["site-b"]
    env = fake_envelope(a / "outbox", 1000)
    send(a, [env])
    r = recv(b, "--done-folder", "done")
    assert r.returncode == 0 and len(r.records) == 1
    assert relay_files(tmp_path) == []
    assert len(list((tmp_path / "relay" / "dtools" / "done" / "cur").iterdir())) == 1


def test_default_relay_is_a_maildir_in_the_home(tmp_path):
    homes = make_sites(tmp_path, "maildir:relay", names=("site-a",))
    env = fake_envelope(tmp_path, 100, to="site-a")
    home = homes["site-a"]
    (home / "config.toml").write_text('[site]\nname = "site-a"\n')
    assert send(home, [env]).returncode == 0
    assert (home / "relay" / "dtools" / "site-a" / "new").is_dir()
    r = recv(home)
    assert [e["envelope_id"] for e in r.records] == [env["envelope_id"]]


def test_help_and_version():
    for name in ("dmail-send", "dmail-recv"):
        r = run(name, "--help")
        assert r.returncode == 0 and "--relay" in r.stdout.decode() and "--insecure-skip-verify" in r.stdout.decode()
        r = run(name, "--version")
        assert r.returncode == 0 and b"(dtools)" in r.stdout


RSS_LAUNCHER = (
    "import resource, subprocess, sys\n"
    "p = subprocess.run(sys.argv[1:], stdin=sys.stdin, stdout=subprocess.DEVNULL)\n"
    "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


def _peak_rss_mb(argv, stdin=b""):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "DTOOLS_HOME"}
    p = subprocess.run([sys.executable, "-c", RSS_LAUNCHER, *argv], input=stdin, capture_output=True, env=env,
                       timeout=300)
    rc, kib = p.stdout.split()
    assert int(rc) == 0, p.stderr
    return int(kib) / 1024


@pytest.mark.slow
def test_memory_is_bounded_by_message_not_envelope(sites, tmp_path):
    from conftest import cmd_path

    a, b = sites["site-a"], sites["site-b"]
    size = 160 * 1024 * 1024
    env = fake_envelope(a / "outbox", 1)
    with open(env["path"], "wb") as f:
        for _ in range(size // (1 << 20)):
            f.write(os.urandom(1 << 20))
    import hashlib as _h

    with open(env["path"], "rb") as f:
        env["sha256"] = _h.file_digest(f, "sha256").hexdigest()
    env["bytes"] = size
    send_mb = _peak_rss_mb([cmd_path("dmail-send"), "--home", str(a), "--max-message-size", "4M"], lines([env]))
    recv_mb = _peak_rss_mb([cmd_path("dmail-recv"), "--home", str(b)])
    assert (b / "inbox" / f"{env['envelope_id']}.dtenv").stat().st_size == size
    # The envelope is 160 MiB; the commands hold a few 4 MiB messages at a time.
    print(f"peak RSS send {send_mb:.0f} MB, recv {recv_mb:.0f} MB")
    assert send_mb < 100 and recv_mb < 100, (send_mb, recv_mb)


def test_each_site_with_its_own_account(tmp_path):
    # A writes into B's mailbox and B into A's: [peers.NAME] relay names the peer's account.
    homes = make_sites(tmp_path, "unused")
    a, b = homes["site-a"], homes["site-b"]
    box_a, box_b = tmp_path / "box-a", tmp_path / "box-b"
    for home, own, peer, peer_box in ((a, box_a, "site-b", box_b), (b, box_b, "site-a", box_a)):
        cfg = (home / "config.toml").read_text().replace('url = "unused"', f'url = "maildir:{own}"')
        cfg = cfg.replace(f"[peers.{peer}]\n", f'[peers.{peer}]\nrelay = "maildir:{peer_box}"\n')
        (home / "config.toml").write_text(cfg)
    env = fake_envelope(a / "outbox", 70_000)
    r = send(a, [env])
    assert r.returncode == 0 and r.records[0]["relay"] == f"maildir:{box_b}"
    [got] = recv(b).records
    assert Path(got["path"]).read_bytes() == Path(env["path"]).read_bytes()
    assert send(b, [{"kind": "instance", "envelope_id": env["envelope_id"], "peer": "site-a"}],
                "--receipts").returncode == 0
    [rc] = recv(a).records
    assert rc["status"] == "delivered"
    assert not box_a.joinpath("dtools", "site-b").exists() and not box_b.joinpath("dtools", "site-a").exists()


def test_foreign_mail_in_the_folder_is_set_aside(sites, tmp_path):
    b = sites["site-b"]
    new = tmp_path / "relay" / "dtools" / "site-b" / "new"
    new.mkdir(parents=True)
    (new / "1.spam").write_bytes(b"From: x@example.org\r\nSubject: hello\r\n\r\nbuy now\r\n")
    r = recv(b)
    assert r.returncode == 1 and "not a dtools message" in r.stderr and "quarantine" in r.stderr
    assert relay_files(tmp_path) == [] and len(relay_files(tmp_path, "site-b-quarantine")) == 1
    assert recv(b).returncode == 0
