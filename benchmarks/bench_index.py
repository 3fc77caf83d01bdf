#!/usr/bin/env python3
"""Benchmark dindex and dsearch against the targets of the index work.

    python benchmarks/bench_index.py [--files 10000] [--rss-files 100000] [--instances 1000000]

1. Fresh indexing of N small CT/MR files with `dindex`, against a plain single-process
   loop of `pydicom.dcmread(f, stop_before_pixels=True)` over the same files, in the
   same run (page cache warm for both). Ratio = baseline time / dindex time.
2. A re-scan of the same N unchanged files.
3. Peak RSS of dindex (parent plus worker processes) on --rss-files files.
4. p50 of dsearch queries over a synthesized index of --instances instances: in-process
   (the query engine, as dserve calls it) and end to end (the dsearch command).
Medians of --repeat runs. Work files live in benchmarks/scratch/ (not committed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import SCRATCH, machine  # noqa: E402
sys.path.insert(0, str(HERE.parent))
WORK = SCRATCH
BIN = Path(sys.executable).parent


def make_corpus(n: int) -> Path:
    """N files: half CT (39 KB), half MR (10 KB), 50 instances per series."""
    from dtools.sample import make_instance

    d = WORK / f"corpus-{n}"
    marker = WORK / f"corpus-{n}.complete"
    if marker.exists():
        return d
    shutil.rmtree(d, ignore_errors=True)
    t = time.perf_counter()
    for i in range(n):
        study, k = divmod(i, 200)
        series, number = divmod(k, 50)
        ds = make_instance("CT" if study % 2 == 0 else "MR", study % 500, study, series, number)
        p = d / f"{study:05d}" / f"{series}" / f"{number:03d}.dcm"
        p.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(p, enforce_file_format=True)
    marker.touch()
    print(f"  generated {n} files in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return d


def files_of(d: Path) -> list[str]:
    return sorted(str(p) for p in d.rglob("*.dcm"))


BASELINE = """
import sys, time, pydicom
files = [l.rstrip("\\n") for l in open(sys.argv[1])]
t = time.perf_counter()
for f in files:
    pydicom.dcmread(f, stop_before_pixels=True)
print(time.perf_counter() - t)
"""


def child_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def time_baseline(list_file: Path) -> tuple[float, float]:
    """(seconds in the loop, CPU seconds of the whole process)."""
    cpu = child_cpu()
    out = subprocess.run([sys.executable, "-c", BASELINE, str(list_file)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip()), child_cpu() - cpu


def time_dindex(args: list[str], home: Path) -> tuple[float, float]:
    """(wall seconds of the whole command, CPU seconds of it and its workers)."""
    env = {**os.environ, "DTOOLS_HOME": str(home)}
    cpu = child_cpu()
    t = time.perf_counter()
    subprocess.run([str(BIN / "dindex"), "-q", *args], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t, child_cpu() - cpu


def tree_rss_kb(pid: int) -> int:
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            pass
    return total


def peak_rss_dindex(corpus: Path, home: Path) -> tuple[float, int]:
    env = {**os.environ, "DTOOLS_HOME": str(home)}
    t = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "dindex"), "-q", str(corpus)], env=env, stdout=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss_kb(proc.pid))
        time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"dindex failed with {proc.returncode}")
    return time.perf_counter() - t, peak


def query_p50(db: Path, repeat: int) -> list[tuple[str, float, float, int]]:
    from dtools.index.db import open_index
    from dtools.index.query import find

    cases = [
        ("study", ["Modality=CT", "StudyDate=20260101-20260131"], {"Modality": "CT", "StudyDate": "20260101-20260131"}, None),
        ("study", ["ROSSI"], {}, "ROSSI"),
        ("study", ["PatientName=SMI*"], {"PatientName": "SMI*"}, None),
        ("patient", ["PatientName=SMI*"], {"PatientName": "SMI*"}, None),
    ]
    conn = open_index(db, readonly=True)
    out = []
    home = Path(tempfile.mkdtemp(prefix="dtools-bench-"))
    env = {**os.environ, "DTOOLS_HOME": str(home), "DTOOLS_INDEX_PATH": str(db)}
    for level, argv, keys, text in cases:
        times, n = [], 0
        for _ in range(repeat * 5):
            t = time.perf_counter()
            n = len(list(find(conn, level, keys, text)))
            times.append((time.perf_counter() - t) * 1000)
        cli = []
        for _ in range(repeat):
            t = time.perf_counter()
            subprocess.run([str(BIN / "dsearch"), "--level", level, *argv], env=env, check=True, stdout=subprocess.DEVNULL)
            cli.append((time.perf_counter() - t) * 1000)
        out.append((f"--level {level} {' '.join(argv)}", statistics.median(times), statistics.median(cli), n))
    conn.close()
    shutil.rmtree(home, ignore_errors=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--rss-files", type=int, default=100000, help="0 to skip the RSS run")
    ap.add_argument("--instances", type=int, default=1_000_000, help="0 to skip the query run")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    WORK.mkdir(exist_ok=True)
    print(f"machine: {machine()}")

    corpus = make_corpus(args.files)
    files = files_of(corpus)
    list_file = WORK / f"files-{args.files}.txt"
    list_file.write_text("\n".join(files) + "\n")
    time_baseline(list_file)  # warm the page cache
    base, ours, rescan, base_cpu, our_cpu = [], [], [], [], []
    for _ in range(args.repeat):
        secs, cpu = time_baseline(list_file)
        base.append(secs)
        base_cpu.append(cpu)
        home = Path(tempfile.mkdtemp(prefix="dtools-bench-"))
        secs, cpu = time_dindex([str(corpus)], home)
        ours.append(secs)
        our_cpu.append(cpu)
        for _ in range(2):
            rescan.append(time_dindex([str(corpus)], home)[0])
        shutil.rmtree(home)
    b, o = statistics.median(base), statistics.median(ours)
    bc, oc = statistics.median(base_cpu), statistics.median(our_cpu)
    print(f"\nfresh index of {len(files)} files (median of {args.repeat}; load average {os.getloadavg()[0]:.1f}):")
    print(f"  pydicom loop  {b:6.2f} s  {len(files) / b:7.0f} files/s   CPU {bc:6.2f} s (whole process)")
    print(f"  dindex        {o:6.2f} s  {len(files) / o:7.0f} files/s   CPU {oc:6.2f} s (all processes, start-up included)")
    print(f"  ratio         {b / o:6.2f} x wall (target >= 2.5), {bc / oc:.2f} x CPU")
    print(f"re-scan of {len(files)} unchanged files: median {statistics.median(rescan):.2f} s (target < 1 s)")

    if args.rss_files:
        big = make_corpus(args.rss_files)
        home = Path(tempfile.mkdtemp(prefix="dtools-bench-"))
        secs, peak = peak_rss_dindex(big, home)
        shutil.rmtree(home)
        print(f"dindex on {args.rss_files} files: {secs:.0f} s, peak RSS {peak / 1024:.0f} MB "
              f"(parent + workers; target < 200 MB)")

    if args.instances:
        db = WORK / f"synth-{args.instances}.db"
        if not db.exists():
            subprocess.run([sys.executable, str(HERE / "synth_index.py"), str(db), "--instances", str(args.instances)], check=True)
        print(f"\nqueries over {args.instances} instances: p50 engine (in-process) / p50 dsearch command, matches")
        for name, engine, cli, n in query_p50(db, args.repeat * 3):
            print(f"  {name:55s} {engine:7.1f} ms  {cli:7.1f} ms  {n:6d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
