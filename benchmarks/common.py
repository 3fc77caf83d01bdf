"""What the benchmark scripts share: where they keep scratch data, and the machine line."""

from __future__ import annotations

import os
import platform
import sqlite3
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRATCH = HERE / "scratch"  # generated corpora and indexes; not committed


def machine() -> str:
    """CPU count and model, Python and SQLite versions: the line each result is quoted with."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
            f"SQLite {sqlite3.sqlite_version}, {platform.system()} {platform.release()}")
