"""Start-up time of the commands cron runs every minute, against `python3 -c pass`.

    python benchmarks/bench_startup.py [--runs 30]

Times, as whole processes from start to exit, every installed command's ``--version``
and ``dsearch --count`` on an empty index of a home with a typical config.toml, and
in the same run, interleaved with them, the baseline: the same interpreter running
``-c pass`` (so both pay the same site-packages set-up). Prints min and median wall
milliseconds, the median ratio to the baseline, and whether the 60 ms target holds.

pip compiles a package's bytecode when it installs it; an editable install compiles it
on first run, unless PYTHONDONTWRITEBYTECODE is set. The script compiles dtools first
so that a fresh checkout is measured as it runs from cron.
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine

TARGET_MS = 60.0
BIN = Path(sys.executable).parent
COMMANDS = ["dindex", "dsearch", "dseal", "dmail-send", "dmail-recv", "dserve", "dstore", "dstatus", "danon"]
CONFIG = """\
[site]
name = "site-a"

[relay]
url = "imaps://dtools@mail.example.org/dtools"
password_file = "relay.pass"

[peers.site-b]
identity = "dtools1 site-b AAAA BBBB"

[dserve]
aet = "SITE_A"
port = 11112
"""


def wall_ms(argv: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    elapsed = (time.perf_counter() - t0) * 1000
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {p.returncode}: {p.stderr.decode(errors='replace').strip()}")
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30, help="timed runs of each command (after 2 warm-up runs)")
    args = ap.parse_args()

    import dtools

    compileall.compile_dir(str(Path(dtools.__file__).parent), quiet=1)
    home = Path(tempfile.mkdtemp(prefix="dtools-startup-"))
    (home / "config.toml").write_text(CONFIG)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DTOOLS_")}
    env["DTOOLS_HOME"] = str(home)
    subprocess.run([str(BIN / "dindex"), "-q"], stdin=subprocess.DEVNULL, env=env, check=True)  # an empty index

    cases = {"python3 -c pass": [sys.executable, "-c", "pass"]}
    for name in COMMANDS:
        if (BIN / name).exists():
            cases[f"{name} --version"] = [str(BIN / name), "--version"]
    cases["dsearch --count (empty index)"] = [str(BIN / "dsearch"), "--count"]

    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(2):
        for argv in cases.values():
            wall_ms(argv, env)
    for _ in range(args.runs):  # interleaved, so drifting load hits every case alike
        for name, argv in cases.items():
            times[name].append(wall_ms(argv, env))

    load = os.getloadavg()[0]
    base = statistics.median(times["python3 -c pass"])
    print(f"# {machine()}; load average {load:.2f}; {args.runs} runs each")
    print(f"{'command':<32} {'min ms':>8} {'median ms':>10} {'x pass':>7}  target <= {TARGET_MS:.0f} ms")
    failed = 0
    for name, ts in times.items():
        med = statistics.median(ts)
        verdict = "" if name.startswith("python3") else ("ok" if med <= TARGET_MS else "SLOW")
        failed += verdict == "SLOW"
        print(f"{name:<32} {min(ts):8.1f} {med:10.1f} {med / base:7.2f}  {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
