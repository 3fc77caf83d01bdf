"""Start-up time of the commands cron runs every minute, against `python3 -c pass`.

    python benchmarks/bench_startup.py [--runs 30]

Times, as whole processes from start to exit, every installed command's ``--version``
and ``dsearch --count`` on an empty index of a home with a typical config.toml, and
in the same run, interleaved with them, the baseline: the same interpreter running
``-c pass`` (so both pay the same site-packages set-up). Prints min and median wall
milliseconds, the median ratio to the baseline, median CPU milliseconds (user + system,
steadier than wall time on a busy machine) and its ratio, and whether the 60 ms target
holds.

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
COMMANDS = ["dindex", "dsearch", "dseal", "dmail-send", "dmail-recv", "dserve", "dstore", "dstatus", "danon", "dretrieve"]
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


def timed(argv: list[str], env: dict) -> tuple[float, float]:
    """Wall and CPU (user + system) milliseconds of one run of ``argv``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = (time.perf_counter() - t0) * 1000
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.read().decode(errors='replace')}")
    proc.stderr.close()
    return elapsed, (usage.ru_utime + usage.ru_stime) * 1000


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
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(2):
        for argv in cases.values():
            timed(argv, env)
    for _ in range(args.runs):  # interleaved, so drifting load hits every case alike
        for name, argv in cases.items():
            w, c = timed(argv, env)
            times[name].append(w)
            cpu[name].append(c)

    load = os.getloadavg()[0]
    base = statistics.median(times["python3 -c pass"])
    print(f"# {machine()}; load average {load:.2f}; {args.runs} runs each")
    cbase = statistics.median(cpu["python3 -c pass"])
    print(f"{'command':<32} {'min ms':>8} {'median ms':>10} {'x pass':>7} {'cpu ms':>7} {'x pass':>7}"
          f"  target: median <= {TARGET_MS:.0f} ms")
    failed = 0
    for name, ts in times.items():
        med, cmed = statistics.median(ts), statistics.median(cpu[name])
        verdict = "" if name.startswith("python3") else ("ok" if med <= TARGET_MS else "SLOW")
        failed += verdict == "SLOW"
        print(f"{name:<32} {min(ts):8.1f} {med:10.1f} {med / base:7.2f} {cmed:7.1f} {cmed / cbase:7.2f}  {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
