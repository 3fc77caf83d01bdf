"""The README's quickstart: demo.sh relays a study between two sites over Maildir, then site B
searches site A's catalog and retrieves its MR studies."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_relays_a_study_and_gets_a_receipt(tmp_path):
    env = {**os.environ, "DTOOLS_DEMO_DIR": str(tmp_path / "demo"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    env.pop("DTOOLS_HOME", None)
    for attempt in range(2):  # a second run must be just as happy, and send nothing again
        p = subprocess.run(["sh", str(ROOT / "demo.sh")], capture_output=True, text=True, env=env, timeout=300,
                           stdin=subprocess.DEVNULL)
        assert p.returncode == 0, p.stderr
        assert "Traceback" not in p.stderr
        assert ("dsearch: 1 study" in p.stderr) == (attempt == 0)  # B before retrieving, the first time
        sealed = [int(n) for n in re.findall(r"dseal: sealed (\d+) envelope", p.stderr)]
        assert sealed == ([1, 0] if attempt == 0 else [0, 0])
        # dstatus at both sites: A's one envelope delivered, B owes nothing.
        rows = [r for r in p.stdout.splitlines() if r.startswith("│ site-") and r.count("│") > 10]
        assert len(rows) == 2, p.stdout
        a_row, b_row = ([c.strip() for c in r.strip("│").split("│")] for r in rows)
        # the CT study, the catalog, and the four MR studies B retrieved: all delivered, once
        assert a_row[0] == "site-b" and a_row[2:4] == ["0", "0"] and a_row[1] == a_row[4] == "6", a_row
        assert b_row[0] == "site-a" and b_row[6:8] == ["0", "0"]
        assert "dsearch: 8 studies" in p.stderr  # B's search of A's catalog
        assert "dretrieve: 24 instance(s) of the 4 studies or series asked for are in the local archive" in p.stderr
        assert "dsearch: 5 studies" in p.stderr
    archive = tmp_path / "demo" / "site-b" / "archive"
    assert len(list(archive.rglob("*.dcm"))) == 6 + 24
