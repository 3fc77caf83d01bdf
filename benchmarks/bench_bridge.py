#!/usr/bin/env python3
"""The bridge: C-MOVE of a study from SITE_B (a peer's AE title at site A's dserve) to a
local storescp, end to end, through Dovecot on loopback.

    python benchmarks/bench_bridge.py [--runs 7] [--instances 20]

Site B runs `dserve --relay` (idle on IMAP IDLE) and grants A retrieve; site A runs
`dserve --relay` with `[peers.site-b] aet = "SITE_B"`. Each run, B indexes a new study of
--instances instances (so that it really travels), and DCMTK's movescu asks SITE_B to move
it to a storescp: the time from movescu's start to its exit, when every instance is in the
storescp. Beside it, in the same run, the same study moved by A's own AE title once it is
in A's archive (a local C-MOVE): what the relay adds. Target: p50 <= 5 s.
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_remote import make_study, sh  # noqa: E402
from common import machine  # noqa: E402
from dovecot import Dovecot, free_port  # noqa: E402
from loopback import loopback_env  # noqa: E402

BIN = Path(sys.executable).parent
MOVESCU = shutil.which("movescu", path="/usr/bin") or "/usr/bin/movescu"
STORESCP = shutil.which("storescp", path="/usr/bin") or "/usr/bin/storescp"


def start(home: Path, env: dict, port: int) -> subprocess.Popen:
    full = {**os.environ, **env, "DTOOLS_HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}"}
    return subprocess.Popen([str(BIN / "dserve"), "--relay", "--bind", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=full, start_new_session=True)


def wait_port(port: int, timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on port {port}")


def move(port: int, called: str, uid: str) -> float:
    t = time.perf_counter()
    p = subprocess.run([MOVESCU, "-S", "-aec", called, "-aem", "STORESCP", "-k", "QueryRetrieveLevel=STUDY",
                        "-k", f"StudyInstanceUID={uid}", "127.0.0.1", str(port)], capture_output=True)
    took = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"movescu -aec {called}: exit {p.returncode}: {p.stderr.decode()[-800:]}")
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--instances", type=int, default=20)
    args = ap.parse_args()
    import orjson
    from mailsites import make_sites

    root = Path(tempfile.mkdtemp(prefix="dtools-bench-bridge-"))
    procs: list[subprocess.Popen] = []
    try:
        with Dovecot(shutil.which("dovecot") or "/usr/sbin/dovecot") as dc:
            env = dc.env()
            homes = make_sites(root / "sites", dc.url, ("site-a", "site-b"))
            a, b = homes["site-a"], homes["site-b"]
            cfg = b / "config.toml"
            cfg.write_text(cfg.read_text().replace("[peers.site-a]\n", "[peers.site-a]\nretrieve = true\n"))
            dest_port, a_port = free_port(), free_port()
            cfg = a / "config.toml"
            cfg.write_text(cfg.read_text().replace("[peers.site-b]\n", '[peers.site-b]\naet = "SITE_B"\n')
                           + f'\n[dserve.destinations]\nSTORESCP = "127.0.0.1:{dest_port}"\n')
            out = root / "moved"
            out.mkdir()
            procs.append(subprocess.Popen([STORESCP, "--output-directory", str(out), str(dest_port)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          env=loopback_env()))  # storescp has no bind option
            procs.append(start(b, env, free_port()))
            procs.append(start(a, env, a_port))
            wait_port(a_port)
            wait_port(dest_port)
            time.sleep(2)  # both relay sides idle
            bridged, local = [], []
            for run in range(args.runs + 1):  # the first run warms up
                data = root / f"study{run}"
                make_study(data, 200 + run, args.instances)
                sh(b, f"dindex -q {data} >/dev/null", env)
                uid = orjson.loads(sh(b, f"dsearch --level study --fields StudyInstanceUID PatientID=PID{200 + run:05d}",
                                      env).stdout.splitlines()[0])["StudyInstanceUID"]
                took = move(a_port, "SITE_B", uid)
                if len(list(out.iterdir())) < args.instances * (run + 1):
                    raise SystemExit(f"storescp holds {len(list(out.iterdir()))} files after run {run}")
                took_local = move(a_port, "DTOOLS", uid)
                if run:
                    bridged.append(took)
                    local.append(took_local)
                time.sleep(1)  # idle again
    finally:
        for p in procs:
            if p.poll() is None:
                if p.pid == os.getpgid(p.pid):
                    os.killpg(p.pid, signal.SIGTERM)
                else:
                    p.terminate()
                p.wait(30)
        shutil.rmtree(root, ignore_errors=True)

    print(f"machine: {machine()}; load {os.getloadavg()[0]:.2f}")
    print(f"C-MOVE of a {args.instances}-instance study to storescp, {args.runs} runs")
    for name, xs in (("from SITE_B (through the relay)", bridged), ("from A's own AE title (local)", local)):
        print(f"  {name:<34} min {min(xs):5.2f} s  p50 {statistics.median(xs):5.2f} s  max {max(xs):5.2f} s")
    print(f"bridged p50 {statistics.median(bridged):.2f} s (target <= 5 s); the relay adds "
          f"{statistics.median(bridged) - statistics.median(local):.2f} s to a local C-MOVE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
