"""The README's quickstart: demo.sh relays a study between two sites over Maildir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_relays_a_study_and_gets_a_receipt(tmp_path):
    env = {**os.environ, "DTOOLS_DEMO_DIR": str(tmp_path / "demo"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    env.pop("DTOOLS_HOME", None)
    for attempt in range(2):  # a second run must be just as happy
        p = subprocess.run(["sh", str(ROOT / "demo.sh")], capture_output=True, text=True, env=env, timeout=300,
                           stdin=subprocess.DEVNULL)
        assert p.returncode == 0, p.stderr
        assert "Traceback" not in p.stderr
        assert '"kind":"receipt"' in p.stdout and '"status":"delivered"' in p.stdout
        assert "dsearch: 1 study" in p.stderr
    archive = tmp_path / "demo" / "site-b" / "archive"
    assert len(list(archive.rglob("*.dcm"))) == 6
