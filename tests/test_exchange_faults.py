"""Kill the README's pipelines, whole process groups, at random moments, again and again;
then let cron run them undisturbed. Count what arrived: every instance once, in one
envelope, every receipt returned, nothing left owed or unopened.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import time

import pytest

from conftest import BIN, require_tool
from dovecot import Dovecot
from exchange import RECEIVE, SEND, Exchange

ROUNDS = 16


def _start(ex: Exchange, site: str, script: str) -> subprocess.Popen:
    env = {**os.environ, **ex.env, "DTOOLS_HOME": str(ex.home(site)), "PATH": f"{BIN}:{os.environ['PATH']}"}
    return subprocess.Popen(["bash", "-c", "set -o pipefail; " + script], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)


def _run_faults(ex: Exchange, tmp_path) -> None:
    from dtools.sample import make_instance

    rng = random.Random(int(os.environ.get("DTOOLS_FAULT_SEED", "9")))
    data = tmp_path / "data"
    data.mkdir()
    sops: set[str] = set()
    kills = 0
    scale = 1.0  # adapts the kill delay to this machine's speed, so kills land mid-run
    for r in range(ROUNDS):
        # New work every round: a new study, and now and then an instance added to an old one.
        for study, n in [(r, i) for i in range(3)] + ([(r // 2, 10 + r)] if r % 3 == 2 else []):
            ds = make_instance("CT" if study % 2 else "MR", study, study, 0, n, date="20260115")
            path = data / f"{study}-{n}.dcm"
            ds.save_as(path, enforce_file_format=True)
            sops.add(str(ds.SOPInstanceUID))
        ex.ok("site-a", f"dindex -q {data} >/dev/null")
        procs = [_start(ex, "site-a", SEND.format(peer="site-b")), _start(ex, "site-b", RECEIVE),
                 _start(ex, "site-a", "dmail-recv >/dev/null")]
        time.sleep(rng.uniform(0.05, 1.2) * scale)
        for p in procs:
            if rng.random() < 0.8:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    kills += 1
                    scale = min(scale * 1.05, 3.0)
                else:
                    scale *= 0.8
        for p in procs:
            p.wait(timeout=120)
            err = p.stderr.read().decode("utf-8", "replace")
            p.stderr.close()
            assert "Traceback" not in err and "internal error" not in err, err
    assert kills >= ROUNDS  # the test really killed pipelines, often
    # Cron goes on, undisturbed: a few runs of each line finish everything.
    for _ in range(2):
        ex.send("site-a", "site-b")
        ex.receive("site-b")
        ex.ok("site-a", "dmail-recv >/dev/null")
    ex.receive("site-b")
    ex.ok("site-a", "dmail-recv >/dev/null")

    # Every instance reached B once, as a file and in the index.
    archive = ex.archive("site-b")
    assert sorted(p.stem for p in archive) == sorted(sops)
    found = ex.ok("site-b", "dsearch --level instance --fields SOPInstanceUID").kinds("instance")
    assert sorted(r["SOPInstanceUID"] for r in found) == sorted(sops)
    # ...in exactly one envelope: no instance was sealed twice for B.
    db = sqlite3.connect(ex.home("site-b") / "outbox" / "ledger.db")
    opened = db.execute("SELECT sum(instances), count(*) FROM opened").fetchone()
    assert opened[0] == len(sops)
    a = sqlite3.connect(ex.home("site-a") / "outbox" / "ledger.db")
    sealed = a.execute("SELECT count(*) FROM sealed_instances WHERE peer='site-b'").fetchone()[0]
    assert sealed == len(sops)
    # Every envelope A sealed was delivered, and B owes nothing and has nothing unopened.
    sa, sb = ex.status("site-a")["site-b"], ex.status("site-b")["site-a"]
    assert sa["sealed"] == opened[1] == sa["delivered"], (sa, opened)
    assert (sa["not_deposited"], sa["awaiting_receipt"]) == (0, 0)
    assert (sb["unopened"], sb["receipts_owed"], sb["quarantined"], sb["incomplete_sets"]) == (0, 0, 0, 0)
    assert list((ex.home("site-a") / "outbox").glob("*.dtenv")) == []  # delivered: removed


@pytest.mark.slow
def test_killed_pipelines_over_maildir(tmp_path):
    _run_faults(Exchange(tmp_path, f"maildir:{tmp_path}/relay"), tmp_path)


@pytest.mark.slow
@pytest.mark.integration
def test_killed_pipelines_over_dovecot(tmp_path):
    with Dovecot(require_tool("dovecot")) as dc:
        _run_faults(Exchange(tmp_path, dc.url, env=dc.env()), tmp_path)
