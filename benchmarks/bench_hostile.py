#!/usr/bin/env python3
"""Benchmark dserve under hostile clients, this tree against another (default: main) in the same run.

    python benchmarks/bench_hostile.py [--compare main] [--instances 2000] [--repeat 3]

1. Stalled connections: 20 connections each send the first 40 bytes of an A-ASSOCIATE-RQ
   and wait; DCMTK echoscu is run again and again (each with 5 s timeouts) until one
   succeeds. Reports the seconds until it did (target <= 20 s, goal <= 5 s), giving up
   after 60 s.
2. A PDU announced at 4 GiB: after an accepted association, a P-DATA-TF header announcing
   0xFFFFFFFF bytes, then up to 300 MB of zeros in 1 MiB writes, as fast as dserve takes
   them. Reports how much dserve accepted and its peak RSS growth (VmRSS sampled every
   20 ms; target < 64 MB).
3. C-STORE: the same run as benchmarks/bench_serve.py (--instances small CT instances by
   storescu over one association, TCP_NODELAY), alternating both trees' dserve (--sync
   always and batch) and DCMTK storescp, --repeat times; reports the median ratio to
   storescp of each tree and its CPU per instance. The guards must not cost the C-STORE lane.

The other tree is `git archive REF dtools` in benchmarks/scratch, run by this Python with
PYTHONPATH pointing at it; everything else (pydicom, pynetdicom, DCMTK) is shared.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_serve import ENV, free_port, run_dserve, run_storescp, stop, wait_port  # noqa: E402
from common import SCRATCH, machine  # noqa: E402

sys.path.insert(0, str(HERE.parent / "tests"))
import hostile  # noqa: E402
from dcmtk import make_corpus  # noqa: E402

BIN = Path(sys.executable).parent
ECHOSCU = shutil.which("echoscu", path="/usr/bin:" + os.environ.get("PATH", "")) or "echoscu"


def export_tree(ref: str) -> Path:
    """`git archive REF dtools` unpacked under scratch; its path, for PYTHONPATH."""
    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=HERE.parent, check=True,
                         capture_output=True, text=True).stdout.strip()
    out = SCRATCH / f"tree-{sha}"
    if not (out / "dtools" / "__init__.py").exists():
        out.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", ref, "dtools"], cwd=HERE.parent, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def tree_env(tree: Path | None) -> dict:
    env = dict(ENV)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    return env


def start(env: dict, home: Path, *args: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([str(BIN / "dserve"), "-q", "--home", str(home), "--bind", "127.0.0.1",
                             "--port", str(port), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    wait_port(port)
    return proc, port


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def bench_stalled(env: dict, n: int = 20, give_up: float = 60.0) -> tuple[float | None, int]:
    """Seconds until echoscu succeeds with n stalled connections open, and its attempts."""
    home = Path(tempfile.mkdtemp(prefix="hostile-", dir=SCRATCH))
    proc, port = start(env, home, "--timeout", "60")
    stalled = []
    try:
        stalled = hostile.stall(port, n)
        t0 = time.perf_counter()
        attempts = 0
        while time.perf_counter() - t0 < give_up:
            attempts += 1
            res = subprocess.run([ECHOSCU, "-to", "5", "-ta", "5", "-td", "5", "-aec", "DTOOLS", "127.0.0.1",
                                  str(port)], capture_output=True, env=env, timeout=60)
            if res.returncode == 0:
                return time.perf_counter() - t0, attempts
            time.sleep(0.2)
        return None, attempts
    finally:
        hostile.close_all(stalled)
        stop(proc)
        shutil.rmtree(home, ignore_errors=True)


def bench_big_pdu(env: dict, feed_mb: int = 300) -> tuple[int, int]:
    """(MiB dserve accepted, its peak RSS growth in KiB) for a P-DATA-TF announced at 4 GiB."""
    home = Path(tempfile.mkdtemp(prefix="hostile-", dir=SCRATCH))
    proc, port = start(env, home)
    try:
        s = hostile.associate(port)
        time.sleep(0.5)  # let the association settle before the baseline
        base = rss_kib(proc.pid)
        peak = [base]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_kib(proc.pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        fed = 0
        chunk = b"\0" * (1 << 20)
        s.settimeout(30)
        try:
            s.sendall(hostile.pdu_header(hostile.P_DATA_TF, 0xFFFFFFFF))
            while fed < feed_mb << 20:
                s.sendall(chunk)
                fed += len(chunk)
        except OSError:
            pass
        time.sleep(0.5)
        done.set()
        sampler.join()
        s.close()
        return fed >> 20, peak[0] - base
    finally:
        stop(proc)
        shutil.rmtree(home, ignore_errors=True)


def bench_store(trees: dict[str, dict], n: int, repeat: int) -> None:
    corpus = SCRATCH / f"serve-corpus-{n}"
    if not (corpus.exists() and len(list(corpus.iterdir())) == n):
        shutil.rmtree(corpus, ignore_errors=True)
        make_corpus(corpus, n, studies=max(1, n // 100), series_per_study=2)
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
    theirs = []
    keep = Path(tempfile.mkdtemp(prefix="bench-hostile-", dir=SCRATCH))
    try:
        for _ in range(repeat):
            for label, env in trees.items():
                for mode in ("always", "batch"):
                    stored, _indexed, cpu = run_dserve(corpus, n, mode, keep, env=env)
                    runs.setdefault((label, mode), []).append((stored, cpu))
            theirs.append(run_storescp(corpus, n, keep))
    finally:
        shutil.rmtree(keep, ignore_errors=True)
    t = statistics.median(theirs)
    print(f"\n3. C-STORE: {n} instances by storescu over one association, median of {repeat}; "
          f"storescp {t:.2f} s (runs {[round(x, 2) for x in theirs]})")
    for (label, mode), rs in runs.items():
        o = statistics.median(r[0] for r in rs)
        cpu = statistics.median(r[1] for r in rs) / n * 1000
        print(f"   {label:14s} --sync {mode:6s} {o:6.2f} s  ratio {t / o:.2f}  CPU {cpu:.2f} ms/instance  "
              f"(runs {[round(r[0], 2) for r in rs]})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", default="main", metavar="REF", help="git ref of the other tree ('' for none)")
    ap.add_argument("--instances", type=int, default=2000, help="C-STORE run size; 0 to skip it")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    for tool in ("echoscu", "storescu", "storescp"):
        if not shutil.which(tool, path="/usr/bin:" + os.environ.get("PATH", "")):
            raise SystemExit(f"{tool} not found: apt-get install dcmtk")
    SCRATCH.mkdir(parents=True, exist_ok=True)
    trees = {"this tree": tree_env(None)}
    if args.compare:
        trees[args.compare] = tree_env(export_tree(args.compare))
    print(f"machine: {machine()}")
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    print("\n1. echoscu with 20 stalled connections open (target <= 20 s, goal <= 5 s)")
    for label, env in trees.items():
        took, attempts = bench_stalled(env)
        print(f"   {label:14s} " + (f"succeeded after {took:.2f} s ({attempts} attempt(s))" if took is not None
                                    else f"no success within 60 s ({attempts} attempts)"))
    print("\n2. one P-DATA-TF announced at 4 GiB, fed up to 300 MB (target: RSS growth < 64 MB)")
    for label, env in trees.items():
        fed, grown = bench_big_pdu(env)
        print(f"   {label:14s} accepted {fed} MiB, peak RSS growth {grown / 1024:.1f} MiB")
    if args.instances:
        bench_store(trees, args.instances, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
