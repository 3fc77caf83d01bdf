#!/usr/bin/env python3
"""Benchmark dserve against the targets of the DICOM node work.

    python benchmarks/bench_serve.py [--instances 2000] [--repeat 3] [--index benchmarks/scratch/1m.db]

1. C-STORE: --instances small CT instances (16x16, about 1.4 KB) sent by DCMTK storescu
   over one association to dserve and to DCMTK storescp, alternately, --repeat times,
   TCP_NODELAY=1 for both. Reports the median instances/s and MB/s and the ratio.
   dserve's time ends with storescu's last response (the files are durable in the
   archive then); the time until the last record is indexed is reported too, and
   the CPU time dserve used per instance (steadier than wall time on a shared machine).
   Next to them, the floor for --sync always's durability: a plain Python loop over the
   same files that writes each to a temporary name, fsyncs it, renames it into a
   study/series directory tree and fsyncs the directory (no network, no parsing).
2. C-FIND at STUDY level over a synthesized 1,000,000-instance index (made with
   synth_index.py if --index does not exist): p50 per query, end to end, both with an
   SCU on an open association (request to final response) and with a findscu process
   per query (association and process start included).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import SCRATCH, machine  # noqa: E402
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from dcmtk import make_corpus  # noqa: E402
from loopback import loopback_env  # noqa: E402

BIN = Path(sys.executable).parent
ENV = {**os.environ, "TCP_NODELAY": "1"}

STUDY_QUERIES = [
    ("PatientID=P0012345", {"PatientID": "P0012345"}),
    ("AccessionNumber=A00042424", {"AccessionNumber": "A00042424"}),
    ("StudyInstanceUID=<one>", {"StudyInstanceUID": "1.2.826.0.1.3680043.10.1234.9.1.31337"}),
    ("PatientName=NOWAK^ANNA StudyDate=20260301-20260331", {"PatientName": "NOWAK^ANNA", "StudyDate": "20260301-20260331"}),
    ("PatientName=KOWAL* StudyDate=20260115", {"PatientName": "KOWAL*", "StudyDate": "20260115"}),
    ("StudyDate=20250704 Modality=MR", {"StudyDate": "20250704", "Modality": "MR"}),
]
RETURN_KEYS = ["StudyInstanceUID", "PatientName", "PatientID", "StudyDate", "AccessionNumber", "ModalitiesInStudy",
               "StudyDescription", "NumberOfStudyRelatedInstances"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def count_lines(stream, counter: list[int], done: threading.Event, want: int) -> None:
    for _line in stream:
        counter[0] += 1
        if counter[0] >= want:
            counter.append(time.perf_counter())
            done.set()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc), NaN elsewhere.

    On a shared machine a receiver's CPU per instance varies much less than its wall time."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def run_dserve(corpus: Path, n: int, sync: str, keep: Path, env: dict | None = None) -> tuple[float, float, float]:
    """(stored, indexed, CPU) seconds; `env` may point PYTHONPATH at another dtools tree."""
    home = Path(tempfile.mkdtemp(prefix="dserve-", dir=keep))
    port = free_port()
    proc = subprocess.Popen(["nice", str(BIN / "dserve"), "-q", "--home", str(home), "--bind", "127.0.0.1",
                             "--port", str(port), "--sync", sync], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env or ENV)
    try:
        wait_port(port)
        counter: list = [0]
        done = threading.Event()
        threading.Thread(target=count_lines, args=(proc.stdout, counter, done, n), daemon=True).start()
        cpu0 = cpu_seconds(proc.pid)  # `nice` execs dserve: same pid
        t = time.perf_counter()
        subprocess.run(["storescu", "-aec", "DTOOLS", "127.0.0.1", str(port), "+sd", str(corpus)],
                       env=ENV, check=True, stderr=subprocess.DEVNULL)
        stored = time.perf_counter() - t
        done.wait(120)
        indexed = (counter[1] - t) if len(counter) > 1 else float("nan")
        cpu = cpu_seconds(proc.pid) - cpu0
        got = len(list((home / "archive").rglob("*.dcm")))
        if got != n:
            raise SystemExit(f"dserve stored {got} of {n}")
        return stored, indexed, cpu
    finally:
        stop(proc)


def run_storescp(corpus: Path, n: int, keep: Path) -> float:
    out = Path(tempfile.mkdtemp(prefix="storescp-", dir=keep))
    port = free_port()
    proc = subprocess.Popen(["nice", "storescp", "-od", str(out), str(port)], env=loopback_env(dict(ENV)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        t = time.perf_counter()
        subprocess.run(["storescu", "127.0.0.1", str(port), "+sd", str(corpus)], env=ENV, check=True,
                       stderr=subprocess.DEVNULL)
        elapsed = time.perf_counter() - t
        got = len(list(out.iterdir()))
        if got != n:
            raise SystemExit(f"storescp stored {got} of {n}")
        return elapsed
    finally:
        stop(proc)


def run_floor(corpus: Path, keep: Path) -> float:
    """Write + fsync + rename + fsync(dir) of every file: what --sync always must at least do."""
    out = Path(tempfile.mkdtemp(prefix="floor-", dir=keep))
    files = sorted(corpus.iterdir())
    data = [f.read_bytes() for f in files]  # from the page cache, as storescu reads them
    t = time.perf_counter()
    made = set()
    for i, (f, raw) in enumerate(zip(files, data)):
        parent = out / f"{i // 100}" / f"{(i // 50) % 2}"  # the archive's study/series levels
        if parent not in made:
            parent.mkdir(parents=True, exist_ok=True)
            made.add(parent)
        tmp = parent / f".{f.name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, raw)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, parent / f.name)
        dfd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return time.perf_counter() - t


def bench_store(n: int, repeat: int) -> None:
    corpus = SCRATCH / f"serve-corpus-{n}"
    if not (corpus.exists() and len(list(corpus.iterdir())) == n):
        shutil.rmtree(corpus, ignore_errors=True)
        make_corpus(corpus, n, studies=max(1, n // 100), series_per_study=2)
    size_mb = sum(p.stat().st_size for p in corpus.iterdir()) / 1e6
    ours: dict[str, list[float]] = {"always": [], "batch": []}
    indexed: dict[str, list[float]] = {"always": [], "batch": []}
    cpu: dict[str, list[float]] = {"always": [], "batch": []}
    theirs, floor = [], []
    # Every receiver's files stay until the end: deleting thousands of files makes the
    # file system slow for a while (the root file system here discards freed blocks),
    # which would fall on whichever receiver runs next.
    keep = Path(tempfile.mkdtemp(prefix="bench-serve-", dir=SCRATCH))
    try:
        for _ in range(repeat):
            for mode in ours:
                s, i, c = run_dserve(corpus, n, mode, keep)
                ours[mode].append(s)
                indexed[mode].append(i)
                cpu[mode].append(c)
            theirs.append(run_storescp(corpus, n, keep))
            floor.append(run_floor(corpus, keep))
    finally:
        shutil.rmtree(keep, ignore_errors=True)
    t = statistics.median(theirs)
    print(f"\nC-STORE: {n} instances, {size_mb:.1f} MB, storescu over one association, TCP_NODELAY=1, "
          f"median of {repeat}")
    for mode, runs in ours.items():
        o = statistics.median(runs)
        print(f"  dserve --sync {mode:6s} {o:7.2f} s  {n / o:7.0f} instances/s  {size_mb / o:6.2f} MB/s  "
              f"ratio {t / o:.2f}  (all indexed and printed after {statistics.median(indexed[mode]):.2f} s; "
              f"runs {[round(x, 2) for x in runs]}; CPU {statistics.median(cpu[mode]) / n * 1000:.2f} ms/instance)")
    print(f"  storescp (no fsync)  {t:7.2f} s  {n / t:7.0f} instances/s  {size_mb / t:6.2f} MB/s  "
          f"(runs {[round(x, 2) for x in theirs]})")
    f = statistics.median(floor)
    always = statistics.median(ours["always"])
    print(f"  Python write+fsync+rename loop (the floor of --sync always) {f:7.2f} s  {n / f:7.0f} instances/s  "
          f"ratio to storescp {t / f:.2f}; dserve --sync always takes {always / f:.2f}x the floor's time "
          f"(runs {[round(x, 2) for x in floor]})")
    print("  target: --sync always ratio to storescp >= its earlier 0.25")


def bench_find(db: Path, repeat: int) -> None:
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    if not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(HERE / "synth_index.py"), str(db), "--instances", "1000000"], check=True)
    home = Path(tempfile.mkdtemp(prefix="bench-find-"))
    port = free_port()
    env = {**ENV, "DTOOLS_INDEX_PATH": str(db.resolve())}
    proc = subprocess.Popen(["nice", str(BIN / "dserve"), "-q", "--home", str(home), "--bind", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    try:
        wait_port(port)
        ae = AE(ae_title="BENCH")
        ae.add_requested_context(FIND)
        from dtools.net.common import nodelay_handlers

        assoc = ae.associate("127.0.0.1", port, ae_title="DTOOLS", evt_handlers=nodelay_handlers())
        print(f"\nC-FIND at STUDY level over {db.name}: p50 of {repeat * 5} runs (SCU on an open association) "
              f"and of {repeat} findscu processes")
        all_scu, all_proc = [], []
        for label, keys in STUDY_QUERIES:
            ident = Dataset()
            ident.QueryRetrieveLevel = "STUDY"
            for kw in RETURN_KEYS:
                setattr(ident, kw, "")
            for kw, v in keys.items():
                setattr(ident, kw, v)
            times, n = [], 0
            for _ in range(repeat * 5):
                t = time.perf_counter()
                rsps = list(assoc.send_c_find(ident, FIND))
                times.append((time.perf_counter() - t) * 1000)
                n = len(rsps) - 1
                assert rsps[-1][0].Status == 0, rsps[-1][0]
            argv = ["findscu", "-S", "-aec", "DTOOLS", "-k", "QueryRetrieveLevel=STUDY"] + [a for kw in RETURN_KEYS if kw not in keys for a in ("-k", kw)]
            argv += [a for kw, v in keys.items() for a in ("-k", f"{kw}={v}")]
            ptimes = []
            for _ in range(repeat):
                t = time.perf_counter()
                subprocess.run(argv + ["127.0.0.1", str(port)], env=ENV, check=True, capture_output=True)
                ptimes.append((time.perf_counter() - t) * 1000)
            all_scu += times
            all_proc += ptimes
            print(f"  {label:55s} {n:5d} matches  p50 {statistics.median(times):7.1f} ms   findscu "
                  f"{statistics.median(ptimes):7.1f} ms")
        assoc.release()
        print(f"  all queries: p50 {statistics.median(all_scu):.1f} ms (open association), "
              f"{statistics.median(all_proc):.1f} ms (findscu process)  (target <= 50 ms)")
    finally:
        stop(proc)
        shutil.rmtree(home, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=2000, help="0 to skip the C-STORE run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--index", default=str(SCRATCH / "1m.db"), help="index for C-FIND; '' to skip")
    args = ap.parse_args(argv)
    for tool in ("storescu", "storescp", "findscu"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found: apt-get install dcmtk")
    print(f"machine: {machine()}")
    if args.instances:
        bench_store(args.instances, args.repeat)
    if args.index:
        bench_find(Path(args.index), args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
