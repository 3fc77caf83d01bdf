"""Benchmarks run with the project installed and without the test extras: each script
starts (--help) with pytest unimportable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("bench_*.py"))
RUN = """
import runpy, sys
sys.modules["pytest"] = None  # as in an environment without the test extras
sys.argv = [{path!r}, "--help"]
runpy.run_path({path!r}, run_name="__main__")
"""


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_starts_without_pytest(name):
    path = str(ROOT / "benchmarks" / name)
    p = subprocess.run([sys.executable, "-c", RUN.format(path=path)], capture_output=True, text=True, timeout=60,
                       cwd=ROOT / "benchmarks", stdin=subprocess.DEVNULL)
    assert p.returncode == 0 and "usage:" in p.stdout, p.stderr[-2000:]
