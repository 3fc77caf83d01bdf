#!/usr/bin/env python3
"""Searching and retrieving through the relay, through Dovecot on loopback, in one run:

1. Live query round trip: site B's `dserve --relay` idles on IMAP IDLE; site A runs
   `dsearch --peer site-b --live` (the whole command, start-up included) and, in-process,
   the same ask-and-wait with a connection already open. Beside it, Dovecot's own
   notification delay alone: one client idles on a folder while another appends to it.
2. Retrieve of a 100-instance study on request (`dretrieve --wait`, from the request to the
   last instance indexed at A) against pushing the same study (seal, send, receive, open,
   index) in the same run. Target: retrieve <= push + 3 s.

    python benchmarks/bench_remote.py [--runs 9] [--instances 100]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import machine  # noqa: E402
from dovecot import PASSWORD, USER, Dovecot, free_port  # noqa: E402

BIN = Path(sys.executable).parent


def sh(home: Path, script: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    full = {**os.environ, **env, "DTOOLS_HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}"}
    p = subprocess.run(["bash", "-c", "set -o pipefail; " + script], capture_output=True, env=full)
    if check and p.returncode != 0:
        raise SystemExit(f"{script}: exit {p.returncode}: {p.stderr.decode()[-1500:]}")
    return p


def sites(root: Path, relay: str) -> dict[str, Path]:
    from mailsites import make_sites

    homes = make_sites(root, relay, ("site-a", "site-b"))
    cfg = homes["site-b"] / "config.toml"
    cfg.write_text(cfg.read_text().replace("[peers.site-a]\n", "[peers.site-a]\nquery = true\nretrieve = true\n"))
    return homes


def make_study(directory: Path, study: int, n: int) -> None:
    from dtools.sample import make_instance

    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        make_instance("CT", study, study, i // 50, i).save_as(directory / f"{i}.dcm", enforce_file_format=True)


def idle_delay(dc: Dovecot, runs: int) -> list[float]:
    """Dovecot alone: how long after an APPEND does an IDLE-ing client hear of it."""
    from imapclient import IMAPClient

    folder = "bench/idle"
    a = IMAPClient("127.0.0.1", dc.port, ssl=False)
    a.login(USER, PASSWORD)
    a.create_folder(folder)
    b = IMAPClient("127.0.0.1", dc.port, ssl=False)
    b.login(USER, PASSWORD)
    out = []
    for _ in range(runs):
        a.select_folder(folder)
        a.idle()
        time.sleep(0.2)
        t = time.perf_counter()
        b.append(folder, b"Subject: x\r\n\r\nx\r\n")
        while True:
            if any(r[1] == b"EXISTS" for r in a.idle_check(timeout=10) if len(r) > 1):
                break
        out.append(time.perf_counter() - t)
        a.idle_done()
    a.logout()
    b.logout()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--instances", type=int, default=100)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dtools-bench-remote-"))
    try:
        with Dovecot(shutil.which("dovecot") or "/usr/sbin/dovecot") as dc:
            env = dc.env()
            homes = sites(root / "sites", dc.url)
            a, b = homes["site-a"], homes["site-b"]
            make_study(root / "b-data", 1, 20)
            sh(b, f"dindex -q {root / 'b-data'} >/dev/null", env)
            # -- 1. live queries -------------------------------------------------------
            full = {**os.environ, **env, "DTOOLS_HOME": str(b)}
            server = subprocess.Popen([str(BIN / "dserve"), "--relay", "--bind", "127.0.0.1", "--port",
                                       str(free_port())], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      env=full, start_new_session=True)
            try:
                time.sleep(3)
                sh(a, "dsearch --peer site-b --live --wait 30s --level study >/dev/null", env)  # warm up
                command = []
                for _ in range(args.runs):
                    t = time.perf_counter()
                    sh(a, "dsearch --peer site-b --live --wait 30s --level study >/dev/null", env)
                    command.append(time.perf_counter() - t)
                os.environ.update(env)
                from dtools.config import Config
                from dtools.remote import transport as t_
                from dtools.remote.asking import Asker

                asker = Asker(Config(a))
                inproc = []
                for _ in range(args.runs):
                    t = time.perf_counter()
                    rid = asker.ask("site-b", t_.QUERY, {"level": "study", "keys": {}}, expires_in=60)
                    asker.wait(time.monotonic() + 30)
                    assert rid in asker.answers
                    inproc.append(time.perf_counter() - t)
                asker.close()
                python = []
                for _ in range(args.runs):
                    t = time.perf_counter()
                    subprocess.run([sys.executable, "-c", "pass"])
                    python.append(time.perf_counter() - t)
            finally:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(30)
            delay = idle_delay(dc, args.runs)
            # -- 2. retrieve against push ----------------------------------------------
            push, retrieve = [], []
            for run in range(3):
                study = 100 + run
                data = root / f"study{study}"
                make_study(data, study, args.instances)
                sh(b, f"dindex -q {data} >/dev/null", env)
                uid = sh(b, f"dsearch --level study -k StudyInstanceUID='*' --fields StudyInstanceUID "
                            f"PatientID=PID{study:05d}", env).stdout.splitlines()[0]
                import orjson

                uid = orjson.loads(uid)["StudyInstanceUID"]
                # push: B seals and sends, A receives, opens, indexes (each a command, as cron runs them)
                t = time.perf_counter()
                sh(b, f"dsearch StudyInstanceUID={uid} | dseal --to site-a --resend | dmail-send >/dev/null", env)
                sh(a, "dmail-recv | dseal --open | dindex >/dev/null", env)
                push.append(time.perf_counter() - t)
                # retrieve on request: A asks, B's server (running, idle) answers, A takes delivery
                for p in a.glob("archive/*"):
                    shutil.rmtree(p)
                sh(a, "dindex --prune >/dev/null", env)
                server = subprocess.Popen([str(BIN / "dserve"), "--relay", "--bind", "127.0.0.1", "--port",
                                           str(free_port())], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          env=full, start_new_session=True)
                time.sleep(3)
                try:
                    # B sealed this study for A already (the push): a fresh one is needed for a fair run
                    make_study(root / f"r{study}", study + 50, args.instances)
                    sh(b, f"dindex -q {root / f'r{study}'} >/dev/null", env)
                    ruid = orjson.loads(sh(b, f"dsearch --level study --fields StudyInstanceUID "
                                              f"PatientID=PID{study + 50:05d}", env).stdout.splitlines()[0])
                    t = time.perf_counter()
                    out = sh(a, f"dretrieve --peer site-b StudyInstanceUID={ruid['StudyInstanceUID']} --wait 5m", env)
                    retrieve.append(time.perf_counter() - t)
                    got = [x for x in out.stdout.splitlines() if x.strip()]
                    if len(got) != args.instances:
                        raise SystemExit(f"retrieve gave {len(got)} records, not {args.instances}")
                finally:
                    os.killpg(server.pid, signal.SIGTERM)
                    server.wait(30)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def row(name, xs):
        print(f"{name:<44} {min(xs):7.2f}s {statistics.median(xs):7.2f}s {max(xs):7.2f}s")

    print(f"machine: {machine()}; load {os.getloadavg()[0]:.2f}")
    print(f"{'what':<44} {'min':>8} {'median':>8} {'max':>8}")
    row("dsearch --live (whole command)", command)
    row("ask + answer, in-process (open connection)", inproc)
    row("python3 -c pass", python)
    row("Dovecot IDLE notification alone", delay)
    row(f"push of {args.instances} instances (seal..index)", push)
    row(f"dretrieve --wait of {args.instances} instances", retrieve)
    print(f"live round trip p50 {statistics.median(command):.2f} s (target <= 2 s, moonshot <= 1 s); "
          f"of which Dovecot's notification to the serving side (IDLE) ~{statistics.median(delay):.2f} s; "
          "the asking side polls every 0.1 s while a person waits")
    print(f"retrieve p50 {statistics.median(retrieve):.2f} s vs push p50 {statistics.median(push):.2f} s: "
          f"{statistics.median(retrieve) - statistics.median(push):+.2f} s (target <= +3 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
