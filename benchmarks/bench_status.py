#!/usr/bin/env python3
"""dstatus on a home whose ledger holds 100,000 envelopes each way, against `python3 -c pass`
in the same run (the floor for any command started from cron).

    python benchmarks/bench_status.py [--envelopes 100000] [--runs 15]

The ledger is filled directly with the rows a busy site accumulates: per envelope a sealed
row, its instances, a deposit and (for most) a receipt; as many received envelopes, most
opened and acknowledged, some owed, unopened, quarantined or incomplete. The figure that
counts is the whole dstatus process, start-up included; the time of the queries alone is
reported beside it.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

BIN = Path(sys.executable).parent
PEERS = ["site-b", "site-c", "site-d", "site-e"]


def fill(home: Path, n: int) -> None:
    from dtools.exchange.ledger import Ledger, ledger_path

    rng = random.Random(1)
    led = Ledger(ledger_path(home))
    now = time.time()
    with led.transaction() as db:
        for i in range(n):
            eid = f"{i:032x}"
            peer = PEERS[i % len(PEERS)]
            t = now - rng.uniform(0, 90 * 86400)
            deposited = rng.random() < 0.98
            receipt = t + 60 if deposited and rng.random() < 0.9 else None
            db.execute("INSERT INTO sealed (envelope_id, peer, path, bytes, sha256, instances, sealed_at, deposited_at,"
                       " receipt_at) VALUES (?,?,?,?,?,?,?,?,?)",
                       (eid, peer, f"/outbox/{eid}.dtenv", 1 << 20, "0" * 64, 40, t, t + 1 if deposited else None,
                        receipt))
            db.execute("INSERT INTO sealed_instances VALUES (?,?,?,?,?,?,?,?,?,?)",
                       (peer, f"1.2.{i}", f"1.2.{i // 10}", f"1.2.{i // 5}", f"/data/{i}.dcm", 1000, 1, "0" * 64, eid, t))
            if deposited:
                db.execute("INSERT INTO sent (envelope_id, peer, path, bytes, sha256, part_size, parts, relay, "
                           "first_sent, last_sent, complete, receipt_at, receipt_instances) "
                           "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                           (eid, peer, f"/outbox/{eid}.dtenv", 1 << 20, "0" * 64, 1 << 20, 1, "maildir:/r", t, t, 1,
                            receipt, 40 if receipt else None))
            rid = f"{n + i:032x}"
            db.execute("INSERT INTO received (envelope_id, sender, path, bytes, sha256, received_at, emitted, "
                       "handed_at) VALUES (?,?,?,?,?,?,1,?)", (rid, peer, f"/inbox/{rid}.dtenv", 1 << 20, "0" * 64, t, t))
            r = rng.random()
            if r < 0.97:
                db.execute("INSERT INTO opened VALUES (?,?,?,?,?,?)", (rid, peer, "0" * 64, 40, t + 5, int(r > 0.96)))
                db.execute("UPDATE received SET opened_at=? WHERE envelope_id=?", (t + 5, rid))
            elif r < 0.98:
                db.execute("UPDATE received SET quarantined_at=?, reason='x' WHERE envelope_id=?", (t, rid))
        for i in range(200):
            db.execute("INSERT INTO quarantine (at, sender, what, reason, place) VALUES (?,?,?,?,?)",
                       (now, PEERS[i % 4] if i % 3 else None, "message", "junk", "dtools/site-a-quarantine"))
        for i in range(50):
            db.execute("INSERT INTO spool_sets VALUES (?,?,?,?,?,0)", (f"{3 * n + i:032x}", PEERS[i % 4], 3, "0" * 64, now))
    led.close()


def timed(argv: list[str], env: dict, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        out.append(time.perf_counter() - t)
        if p.returncode != 0:
            raise SystemExit(f"{argv} exited {p.returncode}: {p.stderr.decode()[-500:]}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--envelopes", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dtools-bench-status-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        (home / "config.toml").write_text('[site]\nname = "site-a"\n' + "".join(
            f"[peers.{p}]\n" for p in PEERS))
        t = time.perf_counter()
        fill(home, args.envelopes)
        print(f"ledger: {args.envelopes} envelopes sent and {args.envelopes} received, filled in "
              f"{time.perf_counter() - t:.1f} s; {(home / 'outbox' / 'ledger.db').stat().st_size / 1e6:.0f} MB")
        env = {**os.environ, "DTOOLS_HOME": str(home)}
        from dtools.exchange.ledger import Ledger, ledger_path
        from dtools.exchange.status import peer_status

        led = Ledger(ledger_path(home), readonly=True)
        engine = []
        for _ in range(args.runs):
            t = time.perf_counter()
            peer_status(led, PEERS)
            engine.append(time.perf_counter() - t)
        led.close()
        # Interleave the commands so that a slow spell of the machine hits all of them.
        series: dict[str, list[float]] = {"python3 -c pass": [], "dstatus": [], "dstatus --table": [],
                                          "dstatus --overdue 6h": []}
        argv = {"python3 -c pass": [sys.executable, "-c", "pass"], "dstatus": [str(BIN / "dstatus")],
                "dstatus --table": [str(BIN / "dstatus"), "--table"],
                "dstatus --overdue 6h": [str(BIN / "dstatus"), "--overdue", "100d"]}
        for _ in range(args.runs):
            for name, cmd in argv.items():
                series[name] += timed(cmd, env, 1)
    print(f"machine: {machine()}; load {os.getloadavg()[0]:.2f}")
    print(f"{'what':<24} {'min':>8} {'median':>8} {'max':>8}")
    print(f"{'queries alone':<24} {min(engine) * 1e3:7.1f}ms {statistics.median(engine) * 1e3:7.1f}ms "
          f"{max(engine) * 1e3:7.1f}ms")
    for name, xs in series.items():
        print(f"{name:<24} {min(xs) * 1e3:7.1f}ms {statistics.median(xs) * 1e3:7.1f}ms {max(xs) * 1e3:7.1f}ms")
    base = statistics.median(series["python3 -c pass"])
    d = statistics.median(series["dstatus"])
    print(f"dstatus median {d * 1e3:.0f} ms (target <= 200 ms): {d / base:.1f}x python3 -c pass")
    return 0


if __name__ == "__main__":
    sys.exit(main())
