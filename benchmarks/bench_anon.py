#!/usr/bin/env python3
"""Benchmark danon against the targets of the de-identification work.

    python benchmarks/bench_anon.py [--files 10000] [--rss-files 50000] [--repeat 3]

1. De-identified copies of N small CT/MR files (the corpus of bench_index.py) with
   `danon`, against a plain single-process loop of `pydicom.dcmread(f)` +
   `ds.save_as(out)` over the same files, in the same run (page cache warm for both;
   the order alternates). The loop is timed inside (its start-up is not counted); danon
   as the whole command (start-up, walk, worker processes, a syncfs per batch, the
   mapping table, renames, records). Ratio = baseline time / danon time.
2. Peak memory of danon (parent plus workers, sampled from /proc every 50 ms) during those
   runs and on --rss-files files: the process tree's PSS (shared pages split among the
   processes that share them), the largest single process's RSS, and the plain RSS sum.
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
from bench_index import child_cpu, files_of, make_corpus  # noqa: E402
from common import SCRATCH, machine  # noqa: E402

BIN = Path(sys.executable).parent

BASELINE = """
import sys, time, pydicom
files = [l.rstrip("\\n") for l in open(sys.argv[1])]
out = sys.argv[2]
t = time.perf_counter()
for i, f in enumerate(files):
    ds = pydicom.dcmread(f)
    ds.save_as(f"{out}/{i}.dcm")
print(time.perf_counter() - t)
"""


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def time_baseline(list_file: Path, out: Path) -> tuple[float, float]:
    """(seconds in the loop, CPU seconds of the whole process)."""
    fresh(out)
    cpu = child_cpu()
    res = subprocess.run([sys.executable, "-c", BASELINE, str(list_file), str(out)],
                         capture_output=True, text=True, check=True)
    return float(res.stdout.strip()), child_cpu() - cpu


def tree_memory_kb(pid: int) -> tuple[int, int, int]:
    """(RSS summed over the process tree, PSS summed over it, the largest single RSS), KiB.

    Forked workers share the parent's pages (pydicom, the profile): the RSS sum counts those
    once per process, PSS splits each shared page among its sharers, so the PSS sum is what
    the tree takes from the machine."""
    rss = pss = top = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        kb = int(line.split()[1])
                        rss += kb
                        top = max(top, kb)
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            pass
    return rss, pss, top


def run_danon(corpus: Path, out: Path, jobs: int | None = None) -> tuple[float, float, tuple[int, int, int]]:
    """(wall seconds, CPU seconds of danon and its workers, peak memory of the process tree as
    tree_memory_kb gives it, each figure's own peak)."""
    fresh(out)
    home = Path(tempfile.mkdtemp(prefix="dtools-bench-"))
    args = [str(BIN / "danon"), "-q", "--home", str(home), "--out", str(out), str(corpus)]
    if jobs:
        args += ["-j", str(jobs)]
    cpu = child_cpu()
    t = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    peak = (0, 0, 0)
    while proc.poll() is None:
        peak = tuple(max(a, b) for a, b in zip(peak, tree_memory_kb(proc.pid)))
        time.sleep(0.05)
    wall = time.perf_counter() - t
    shutil.rmtree(home, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"danon failed with {proc.returncode}")
    return wall, child_cpu() - cpu, peak


def _mem(peaks: list) -> str:
    rss, pss, top = (max(p[i] for p in peaks) / 1024 for i in range(3))
    return f"PSS of the process tree {pss:.0f} MB, largest process RSS {top:.0f} MB, RSS summed {rss:.0f} MB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--rss-files", type=int, default=50000, help="0 to skip the large RSS run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--single", action="store_true", help="also time danon -j 1 once")
    args = ap.parse_args(argv)
    SCRATCH.mkdir(exist_ok=True)
    print(f"machine: {machine()}")
    print(f"load average at start: {os.getloadavg()[0]:.1f}")

    corpus = make_corpus(args.files)
    files = files_of(corpus)
    list_file = SCRATCH / f"files-{args.files}.txt"
    list_file.write_text("\n".join(files) + "\n")
    base_out, anon_out = SCRATCH / "anon-baseline-out", SCRATCH / "anon-out"
    time_baseline(list_file, base_out)  # warm the page cache
    base, ours, base_cpu, our_cpu, peaks = [], [], [], [], []
    for i in range(args.repeat):
        order = ["base", "anon"] if i % 2 == 0 else ["anon", "base"]
        for which in order:
            if which == "base":
                secs, cpu = time_baseline(list_file, base_out)
                base.append(secs)
                base_cpu.append(cpu)
            else:
                secs, cpu, peak = run_danon(corpus, anon_out)
                ours.append(secs)
                our_cpu.append(cpu)
                peaks.append(peak)
    b, o = statistics.median(base), statistics.median(ours)
    bc, oc = statistics.median(base_cpu), statistics.median(our_cpu)
    print(f"\nde-identified copies of {len(files)} files (median of {args.repeat}; "
          f"load average now {os.getloadavg()[0]:.1f}):")
    print(f"  pydicom dcmread+save_as loop  {b:6.2f} s  {len(files) / b:7.0f} files/s   CPU {bc:6.2f} s (whole process)")
    print(f"  danon                         {o:6.2f} s  {len(files) / o:7.0f} files/s   CPU {oc:6.2f} s "
          f"(all processes, start-up included)")
    print(f"  ratio                         {b / o:6.2f} x wall (target >= 1.0, moonshot >= 2), {bc / oc:.2f} x CPU")
    print(f"  danon peak memory             {_mem(peaks)} (target <= 200 MB)")
    if args.single:
        secs, cpu, peak = run_danon(corpus, anon_out, jobs=1)
        print(f"  danon -j 1                    {secs:6.2f} s  {len(files) / secs:7.0f} files/s   CPU {cpu:6.2f} s, "
              f"peak {_mem([peak])}")
    shutil.rmtree(base_out, ignore_errors=True)

    if args.rss_files:
        big = make_corpus(args.rss_files)
        secs, _cpu, peak = run_danon(big, anon_out)
        print(f"danon on {args.rss_files} files: {secs:.0f} s, peak {_mem([peak])} (target <= 200 MB)")
    shutil.rmtree(anon_out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
