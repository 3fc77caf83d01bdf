"""SIGKILL fault test: kill dmail-send and dmail-recv at random points, many times, then rerun.

Every envelope must arrive exactly once (one inbox file, one ledger row, nothing left in the
relay or the spool) and byte-identical. Bounded: a fixed number of rounds, each a second or less.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import orjson
import pytest

from conftest import cmd_path, require_tool
from dovecot import Dovecot
from mailsites import fake_envelope, lines, make_sites

ROUNDS = 30


def _start(name, home, env, stdin=b""):
    p = subprocess.Popen([cmd_path(name), "--home", str(home), "-q"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    if stdin:
        try:
            p.stdin.write(stdin)
        except BrokenPipeError:
            pass
    p.stdin.close()
    p.stdin = None
    return p


def _records(out: bytes) -> list[dict]:
    recs = []
    for line in out.splitlines():
        try:
            recs.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            pass  # a line cut by SIGKILL
    return recs


def _run_faults(tmp_path, relay, env, relay_left):
    rng = random.Random(int(os.environ.get("DTOOLS_FAULT_SEED", "4")))
    homes = make_sites(tmp_path, relay)
    a, b = homes["site-a"], homes["site-b"]
    cfg = (a / "config.toml").read_text().replace("[relay]\n", '[relay]\nmax_message_size = "64K"\n')
    (a / "config.toml").write_text(cfg)
    envs: list[dict] = []
    full_env = {**os.environ, **env}
    emitted: list[str] = []
    kills = 0
    scale = 1.0  # adapts the kill delay to this machine's speed, so kills land mid-run
    for _ in range(ROUNDS):
        # New work every round, so that kills land in the middle of something.
        envs.append(fake_envelope(a / "outbox", rng.randrange(1, 400_000)))
        feed = lines(envs)
        procs = [_start("dmail-send", a, full_env, feed), _start("dmail-recv", b, full_env)]
        time.sleep(rng.uniform(0.1, 0.5) * scale)
        for p in procs:
            if rng.random() < 0.8:
                if p.poll() is None:
                    p.send_signal(signal.SIGKILL)
                    kills += 1
                    scale = min(scale * 1.05, 2.0)
                else:  # finished before the kill: aim earlier next time
                    scale *= 0.7
        for p in procs:
            out, _err = p.communicate(timeout=60)
            if p is procs[1]:
                emitted += [r["envelope_id"] for r in _records(out) if r.get("kind") == "envelope"]
    assert kills >= ROUNDS // 3  # the test really killed them, often
    # Reruns without faults finish the job.
    r = subprocess.run([cmd_path("dmail-send"), "--home", str(a)], input=feed, capture_output=True, env=full_env, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    for _ in range(2):
        r = subprocess.run([cmd_path("dmail-recv"), "--home", str(b)], capture_output=True, env=full_env, timeout=120)
        assert r.returncode == 0, r.stderr.decode()
        emitted += [x["envelope_id"] for x in _records(r.stdout)]
    want = {e["envelope_id"] for e in envs}
    assert set(emitted) == want  # every envelope was handed on
    inbox = sorted(p.name for p in (b / "inbox").iterdir())
    assert inbox == sorted(f"{i}.dtenv" for i in want)  # exactly once: one file each, no temporaries
    for e in envs:
        assert (b / "inbox" / f"{e['envelope_id']}.dtenv").read_bytes() == Path(e["path"]).read_bytes()
    db = sqlite3.connect(b / "outbox" / "ledger.db")
    assert sorted(r[0] for r in db.execute("SELECT envelope_id FROM received")) == sorted(want)
    assert db.execute("SELECT count(*) FROM received WHERE emitted = 0").fetchone()[0] == 0
    assert [p for p in (b / "spool").rglob("*") if p.is_file() and not p.name.startswith(".dmail")] == []
    assert relay_left() == []


@pytest.mark.slow
def test_sigkill_over_maildir(tmp_path):
    relay = tmp_path / "relay"

    def left():
        return [p for p in relay.rglob("*") if p.is_file()]

    _run_faults(tmp_path, f"maildir:{relay}", {}, left)


@pytest.mark.slow
@pytest.mark.integration
def test_sigkill_over_dovecot(tmp_path):
    with Dovecot(require_tool("dovecot")) as dc:
        _run_faults(tmp_path, dc.url, dc.env(), lambda: dc.message_files("dtools/site-b"))
