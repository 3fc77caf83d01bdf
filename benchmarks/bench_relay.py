#!/usr/bin/env python3
"""Relay throughput: dmail-send + dmail-recv of one large envelope through Dovecot on loopback,
against raw IMAP APPEND + FETCH of the same bytes on the same server, in the same run.

    nice python benchmarks/bench_relay.py [--size-mb 200] [--runs 3]

The baseline is the least any IMAP relay must do: the envelope's bytes, base64-encoded
ahead of time (not timed), appended in messages of the same size as ours with imaplib and
fetched back with IMAPClient, with no digest, no disk and no bookkeeping. Ours includes
everything: reading the envelope, encoding, APPEND, the ledger, FETCH, digest checks,
fsynced spool and inbox files, and expunging. Peak RSS of each command is measured from
a small launcher process (ru_maxrss of its child).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import machine  # noqa: E402
from dovecot import PASSWORD, USER, Dovecot  # noqa: E402

BIN = Path(sys.executable).parent
LAUNCHER = (
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "p = subprocess.run(sys.argv[1:], stdin=sys.stdin, stdout=subprocess.PIPE)\n"
    "dt = time.perf_counter() - t\n"
    "sys.stderr.write(f'BENCH {p.returncode} {dt} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}\\n')\n"
    "sys.stdout.buffer.write(p.stdout)\n"
)


def measured(argv: list[str], env: dict, stdin: bytes = b"") -> tuple[float, int, bytes]:
    """(seconds, peak RSS in KiB, stdout) of one command."""
    p = subprocess.run([sys.executable, "-c", LAUNCHER, *argv], input=stdin, capture_output=True, env=env)
    line = [x for x in p.stderr.decode().splitlines() if x.startswith("BENCH ")]
    if not line:
        raise SystemExit(f"{argv[0]} failed: {p.stderr.decode()[-2000:]}")
    _, rc, dt, rss = line[-1].split()
    if int(rc) != 0:
        raise SystemExit(f"{argv[0]} exited {rc}: {p.stderr.decode()[-2000:]}")
    return float(dt), int(rss), p.stdout


def make_sites(root: Path, relay: str) -> tuple[Path, Path]:
    from mailsites import make_sites as mk

    homes = mk(root, relay)
    return homes["site-a"], homes["site-b"]


def ours(dc: Dovecot, work: Path, data_path: Path, sha: str, run: int) -> dict:
    a, b = make_sites(work / f"run{run}", dc.url)
    env = {**os.environ, **dc.env()}
    env.pop("DTOOLS_HOME", None)
    envelope_id = hashlib.sha256(f"{sha}{run}{time.time()}".encode()).hexdigest()[:32]
    target = a / "outbox" / f"{envelope_id}.dtenv"
    target.parent.mkdir(parents=True, exist_ok=True)
    os.link(data_path, target)
    rec = json.dumps({"kind": "envelope", "path": str(target), "envelope_id": envelope_id, "to": ["site-b"],
                      "sha256": sha}).encode() + b"\n"
    t_send, rss_send, out = measured([str(BIN / "dmail-send"), "--home", str(a), "-q"], env, rec)
    parts = json.loads(out)["parts"]
    t_recv, rss_recv, out = measured([str(BIN / "dmail-recv"), "--home", str(b), "-q"], env)
    got = json.loads(out)
    assert got["sha256"] == sha and got["envelope_id"] == envelope_id, got
    os.unlink(got["path"])
    return {"send": t_send, "recv": t_recv, "total": t_send + t_recv, "rss_send": rss_send, "rss_recv": rss_recv,
            "parts": parts}


def baseline(dc: Dovecot, data_path: Path, chunk: int, run: int) -> dict:
    from imapclient import IMAPClient

    data = data_path.read_bytes()
    messages = []
    for i in range(0, len(data), chunk):
        body = base64.encodebytes(data[i:i + chunk]).replace(b"\n", b"\r\n")
        messages.append(b"Subject: raw\r\nContent-Transfer-Encoding: base64\r\n\r\n" + body)
    del data
    folder = f"raw{run}"
    c = IMAPClient("127.0.0.1", dc.port, ssl=False)
    c.login(USER, PASSWORD)
    c.create_folder(folder)
    t0 = time.perf_counter()
    for m in messages:
        c._imap.append(folder, None, None, m)  # plain imaplib APPEND
    t1 = time.perf_counter()
    c.select_folder(folder)
    total = 0
    for uid in c.search("ALL"):
        total += len(c.fetch([uid], ["BODY.PEEK[]"])[uid][b"BODY[]"])
    t2 = time.perf_counter()
    assert total == sum(len(m) for m in messages)
    c.unselect_folder()
    c.delete_folder(folder)
    c.logout()
    return {"append": t1 - t0, "fetch": t2 - t1, "total": t2 - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    try:
        os.nice(5)
    except OSError:
        pass
    from dtools.mail.message import part_payload_size

    chunk = part_payload_size(20 * 1024 * 1024)
    with tempfile.TemporaryDirectory(prefix="dtbench-") as tmp, Dovecot("/usr/sbin/dovecot") as dc:
        work = Path(tmp)
        data_path = work / "envelope.bin"
        with open(data_path, "wb") as f:
            for _ in range(args.size_mb):
                f.write(os.urandom(1 << 20))
        size = data_path.stat().st_size
        sha = hashlib.sha256(data_path.read_bytes()).hexdigest()
        rows_ours, rows_raw = [], []
        for run in range(args.runs):
            rows_raw.append(baseline(dc, data_path, chunk, run))
            rows_ours.append(ours(dc, work, data_path, sha, run))
            print(f"run {run + 1}: ours {rows_ours[-1]['total']:.2f} s "
                  f"(send {rows_ours[-1]['send']:.2f}, recv {rows_ours[-1]['recv']:.2f}), "
                  f"raw {rows_raw[-1]['total']:.2f} s", file=sys.stderr)
    mb = size / 1e6
    med = {k: statistics.median(r[k] for r in rows_ours) for k in ("send", "recv", "total")}
    raw = {k: statistics.median(r[k] for r in rows_raw) for k in ("append", "fetch", "total")}
    rss_send = max(r["rss_send"] for r in rows_ours) / 1024
    rss_recv = max(r["rss_recv"] for r in rows_ours) / 1024
    print(f"machine: {machine()}")
    print(f"envelope: {mb:.0f} MB in {rows_ours[0]['parts']} parts of <= 20 MiB messages; {args.runs} runs, medians")
    print(f"dmail-send + dmail-recv: {med['total']:.2f} s ({mb / med['total']:.1f} MB/s); "
          f"send {med['send']:.2f} s, recv {med['recv']:.2f} s")
    print(f"raw APPEND + FETCH:      {raw['total']:.2f} s ({mb / raw['total']:.1f} MB/s); "
          f"append {raw['append']:.2f} s, fetch {raw['fetch']:.2f} s")
    print(f"ratio (raw time / our time): {raw['total'] / med['total']:.2f}  (target >= 0.50)")
    print(f"peak RSS: dmail-send {rss_send:.0f} MB, dmail-recv {rss_recv:.0f} MB  (target <= 150 MB)")


if __name__ == "__main__":
    main()
