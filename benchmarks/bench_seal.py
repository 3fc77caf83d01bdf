#!/usr/bin/env python3
"""Benchmark dseal: seal + open of a synthetic study against raw AES-GCM + SHA-256.

    nice python benchmarks/bench_seal.py [--size-mb 1024] [--runs 3] [--workdir DIR]

In the same run it measures
  * the baseline: cryptography's AES-256-GCM encrypt + SHA-256 over the study's bytes
    (1 MiB chunks, in memory: the least any seal must do), then decrypt + SHA-256 (the
    least any open must do);
  * ``dseal --to`` and ``dseal --open`` as installed console scripts on the same files,
    wall time and peak RSS (from wait4) of each process.
It prints medians of the runs and the ratios (baseline time / dseal time, so 1.0 means as
fast as the raw primitives, 0.5 means half their throughput) as Markdown.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
BIN = Path(sys.executable).parent
FILE_MB = 16


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs (nproc), {cpu}, Python {platform.python_version()}, {platform.system()} {platform.release()}"


def make_study(root: Path, size_mb: int) -> list[Path]:
    from test_seal_support import make_dicom
    from pydicom.uid import generate_uid

    study = generate_uid()
    series = generate_uid()
    files = []
    block = os.urandom(1 << 20)
    for i in range(max(1, size_mb // FILE_MB)):
        # Distinct bytes per file without paying for 1 GB of urandom.
        pixels = hashlib.sha256(str(i).encode()).digest() * 32768 + block * (FILE_MB - 1)
        files.append(make_dicom(root / f"img{i:05d}.dcm", study, series, pixels=pixels))
    return files


def baseline(files: list[Path]) -> tuple[float, float]:
    """Seconds for AES-GCM encrypt + SHA-256, and for decrypt + SHA-256, over the files' bytes."""
    key = AESGCM.generate_key(256)
    aead = AESGCM(key)
    nonce = os.urandom(12)
    cts = []  # keep only what is needed to decrypt one file at a time
    enc = dec = 0.0
    for f in files:
        with open(f, "rb") as fh:
            blocks = list(iter(lambda: fh.read(1 << 20), b""))
        t0 = time.perf_counter()
        h = hashes.Hash(hashes.SHA256())
        cts = []
        for b in blocks:
            h.update(b)
            cts.append(aead.encrypt(nonce, b, None))
        h.finalize()
        t1 = time.perf_counter()
        h = hashes.Hash(hashes.SHA256())
        for c in cts:
            h.update(aead.decrypt(nonce, c, None))
        h.finalize()
        t2 = time.perf_counter()
        enc += t1 - t0
        dec += t2 - t1
    return enc, dec


def write_floor(files: list[Path], scratch: Path) -> float:
    """Seconds to write the same bytes to one new file and fsync it: the I/O any seal or open must do."""
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    t = 0.0
    with open(scratch, "wb", buffering=0) as out:
        for f in files:
            with open(f, "rb", buffering=0) as src:
                while n := src.readinto(buf):
                    t0 = time.perf_counter()
                    out.write(view[:n])
                    t += time.perf_counter() - t0
        t0 = time.perf_counter()
        os.fsync(out.fileno())
        t += time.perf_counter() - t0
    scratch.unlink()
    return t


# Runs the command as its only child, so the rusage is the command's alone (a child forked
# straight from this big process would count this process's pages in its peak RSS).
_LAUNCHER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[2:])\n"
    "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "open(sys.argv[1], 'w').write(f'{u.ru_maxrss} {u.ru_utime + u.ru_stime}')\n"
    "sys.exit(rc)\n"
)


def timed(cmd: list[str], stdin: bytes, env: dict | None = None) -> tuple[float, int, float, bytes]:
    """Wall seconds, peak RSS (KiB), CPU seconds (user + system, all threads) and stdout of one process."""
    import subprocess

    with tempfile.NamedTemporaryFile("r", suffix=".ru") as ru, tempfile.TemporaryFile() as out, \
            tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as inp:
        inp.write(stdin)
        inp.seek(0)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, "-c", _LAUNCHER, ru.name, *cmd], stdin=inp, stdout=out, stderr=err,
                             timeout=600, env=env)
        wall = time.perf_counter() - t0
        if rc != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd[:4])}... failed: {err.read().decode(errors='replace')}")
        rss, cpu = ru.read().split()
        out.seek(0)
        return wall, int(rss), float(cpu), out.read()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1024, help="study size in MiB (default 1024)")
    ap.add_argument("--runs", type=int, default=3, help="runs; medians are reported (default 3)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="uncounted runs first, so fresh memory pages of a new VM are not measured (default 1)")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--compare", metavar="DIR", default=None,
                    help="also run dseal from the dtools source tree in DIR (e.g. a 'git archive' of an earlier "
                         "commit) in the same runs, alternating which goes first: a before/after under the same load")
    args = ap.parse_args()
    load_start = os.getloadavg()[0]

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-seal-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        from test_seal_support import make_sites

        homes = make_sites(work / "sites")
        files = make_study(work / "study", args.size_mb)
        total = sum(f.stat().st_size for f in files)
        paths = "".join(f"{f}\n" for f in files).encode()
        dseal = str(BIN / "dseal")
        rows = {k: [] for k in ("b_enc", "b_dec", "io", "seal", "open", "rss_seal", "rss_open", "cpu_seal", "cpu_open",
                                "c_seal", "c_open", "c_cpu_seal", "c_cpu_open")}
        compare_env = None
        if args.compare:
            src = Path(args.compare).resolve()
            if not (src / "dtools" / "seal" / "envelope.py").is_file():
                raise SystemExit(f"--compare {src}: no dtools source tree there")
            compare_env = dict(os.environ, PYTHONPATH=str(src))

        def seal_and_open(env: dict | None) -> tuple[float, int, float, float, int, float]:
            s_wall, s_rss, s_cpu, out = timed([dseal, "--home", str(homes["site-a"]), "-q", "--to", "site-b"], paths, env)
            o_wall, o_rss, o_cpu, opened = timed([dseal, "--home", str(homes["site-b"]), "-q", "--open"], out, env)
            assert opened.count(b"\n") == len(files), "open did not emit one record per file"
            # Fresh state for the next run: no replay, no envelope, empty archive.
            shutil.rmtree(homes["site-b"] / "archive", ignore_errors=True)
            shutil.rmtree(homes["site-b"] / "spool" / "opened", ignore_errors=True)
            for p in (homes["site-a"] / "outbox").iterdir():
                p.unlink()
            return s_wall, s_rss, s_cpu, o_wall, o_rss, o_cpu

        for run in range(-args.warmup, args.runs):
            enc, dec = baseline(files)
            io = write_floor(files, work / "floor.bin")
            cmp_first = compare_env is not None and run % 2 == 0
            if cmp_first:
                c = seal_and_open(compare_env)
            s_wall, s_rss, s_cpu, o_wall, o_rss, o_cpu = seal_and_open(None)
            if compare_env is not None and not cmp_first:
                c = seal_and_open(compare_env)
            if run >= 0:
                for k, v in (("b_enc", enc), ("b_dec", dec), ("io", io), ("seal", s_wall), ("rss_seal", s_rss),
                             ("open", o_wall), ("rss_open", o_rss), ("cpu_seal", s_cpu), ("cpu_open", o_cpu)):
                    rows[k].append(v)
                if compare_env is not None:
                    for k, v in (("c_seal", c[0]), ("c_cpu_seal", c[2]), ("c_open", c[3]), ("c_cpu_open", c[5])):
                        rows[k].append(v)
            label = f"run {run + 1}" if run >= 0 else "warm-up"
            line = (f"{label}: baseline enc {enc:.2f}s dec {dec:.2f}s write {io:.2f}s, seal {s_wall:.2f}s ({s_rss // 1024} MiB), "
                    f"open {o_wall:.2f}s ({o_rss // 1024} MiB); CPU seal {s_cpu:.2f}s open {o_cpu:.2f}s")
            if compare_env is not None:
                line += f"; compared tree{' (ran first)' if cmp_first else ''}: seal {c[0]:.2f}s open {c[3]:.2f}s"
            print(line, file=sys.stderr)
        med = {k: statistics.median(v) for k, v in rows.items() if v}
        mib = total / (1 << 20)
        # Ratios are taken within each run (same load, same page cache), then the median.
        runs = range(len(rows["seal"]))

        def ratio(num, den) -> float:
            return statistics.median(num(i) / den(i) for i in runs)

        r_both = ratio(lambda i: rows["b_enc"][i] + rows["b_dec"][i], lambda i: rows["seal"][i] + rows["open"][i])
        r_one = ratio(lambda i: rows["b_enc"][i], lambda i: rows["seal"][i] + rows["open"][i])
        r_floor = ratio(lambda i: rows["b_enc"][i] + rows["b_dec"][i] + 2 * rows["io"][i],
                        lambda i: rows["seal"][i] + rows["open"][i])
        r_seal = ratio(lambda i: rows["b_enc"][i], lambda i: rows["seal"][i])
        r_open = ratio(lambda i: rows["b_dec"][i], lambda i: rows["open"][i])
        print(f"Machine: {machine()}")
        print(f"Study: {len(files)} files, {mib:.0f} MiB; {args.runs} runs after {args.warmup} warm-up, medians; "
              f"load average (1 min) at the start {load_start:.2f}, at the end {os.getloadavg()[0]:.2f}.\n")
        print("| step | seconds | MiB/s | peak RSS | CPU seconds |")
        print("|---|---:|---:|---:|---:|")
        print(f"| baseline AES-256-GCM encrypt + SHA-256 | {med['b_enc']:.2f} | {mib / med['b_enc']:.0f} | | |")
        print(f"| baseline AES-256-GCM decrypt + SHA-256 | {med['b_dec']:.2f} | {mib / med['b_dec']:.0f} | | |")
        print(f"| reference: write the same bytes to a new file + fsync | {med['io']:.2f} | {mib / med['io']:.0f} | | |")
        print(f"| `dseal --to` (seal) | {med['seal']:.2f} | {mib / med['seal']:.0f} | {med['rss_seal'] / 1024:.0f} MiB | {med['cpu_seal']:.2f} |")
        print(f"| `dseal --open` (open) | {med['open']:.2f} | {mib / med['open']:.0f} | {med['rss_open'] / 1024:.0f} MiB | {med['cpu_open']:.2f} |")
        print()
        print("Ratios (baseline time / dseal time within each run, median over runs):\n")
        print(f"- seal + open vs encrypt+SHA-256 + decrypt+SHA-256: **{r_both:.2f}** of raw throughput")
        print(f"- seal + open vs one pass of encrypt+SHA-256: {r_one:.2f}")
        print(f"- seal + open vs the same crypto plus writing the bytes twice (envelope, archive): {r_floor:.2f}")
        print(f"- seal alone vs encrypt+SHA-256: {r_seal:.2f}; open alone vs decrypt+SHA-256: {r_open:.2f}")
        if compare_env is not None:
            c_both = ratio(lambda i: rows["b_enc"][i] + rows["b_dec"][i], lambda i: rows["c_seal"][i] + rows["c_open"][i])
            print(f"\nCompared tree {args.compare}, same runs (medians): seal {med['c_seal']:.2f} s "
                  f"({med['c_cpu_seal']:.2f} CPU s), open {med['c_open']:.2f} s ({med['c_cpu_open']:.2f} CPU s); "
                  f"seal + open vs encrypt+SHA-256 + decrypt+SHA-256: {c_both:.2f}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
