"""End to end across two site homes, over Dovecot and over the Maildir relay:

site A: dindex | dsearch | dseal --to site-b | dmail-send
site B: dmail-recv | dseal --open | dindex | dmail-send --receipts
site A: dmail-recv  -> receipt records, ledger marked delivered
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import orjson
import pytest

from conftest import BIN, require_tool
from dovecot import Dovecot
from mailsites import make_sites
from test_seal_support import make_study


def pipe(home: Path, script: str, env: dict, stdin: bytes = b"") -> tuple[list[dict], str]:
    full = {**os.environ, **env, "DTOOLS_HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}"}
    p = subprocess.run(["bash", "-c", "set -o pipefail; " + script], input=stdin, capture_output=True,
                       env=full, timeout=300)
    assert p.returncode == 0, p.stderr.decode()
    return [orjson.loads(x) for x in p.stdout.splitlines() if x.strip()], p.stderr.decode()


def relay_exchange(tmp_path: Path, relay: str, env: dict) -> None:
    homes = make_sites(tmp_path / "sites", relay)
    a, b = homes["site-a"], homes["site-b"]
    study, files = make_study(tmp_path / "incoming", n=5, series=2, pixels=300_000)
    out, _ = pipe(a, f"dindex {tmp_path / 'incoming'} >/dev/null && "
                     f"dsearch -k StudyInstanceUID={study} | dseal --to site-b | dmail-send --max-message-size 256K",
                  env)
    assert [m["kind"] for m in out] == ["message"]
    assert out[0]["peer"] == "site-b" and out[0]["parts"] > 1
    recs, _ = pipe(b, "dmail-recv | dseal --open | dindex | dmail-send --receipts", env)
    assert [(m["kind"], m["receipt"], m["instances"]) for m in recs] == [("message", True, 5)]
    # B's archive holds every instance byte-identical, and its index finds them.
    for f in files:
        import pydicom

        ds = pydicom.dcmread(f, stop_before_pixels=True)
        stored = b / "archive" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert stored.read_bytes() == f.read_bytes()
    found, _ = pipe(b, f"dsearch -L study -k StudyInstanceUID={study}", env)
    assert [r["StudyInstanceUID"] for r in found] == [study]
    # Receipts back at A.
    got, _ = pipe(a, "dmail-recv", env)
    assert [(r["kind"], r["status"], r["peer"], r["instances"]) for r in got] == [("receipt", "delivered", "site-b", 5)]
    assert got[0]["envelope_id"] == out[0]["envelope_id"] and got[0]["sha256"] == out[0]["sha256"]
    db = sqlite3.connect(a / "outbox" / "ledger.db")
    assert db.execute("SELECT receipt_at IS NOT NULL, receipt_instances FROM sent").fetchall() == [(1, 5)]
    # Nothing left to resend, nothing left to fetch, nothing delivered twice.
    assert pipe(a, "dmail-send --retry 0s </dev/null", env)[0] == []
    assert pipe(b, "dmail-recv", env)[0] == []


@pytest.mark.slow
def test_two_sites_over_maildir(tmp_path):
    relay_exchange(tmp_path, f"maildir:{tmp_path}/relay", {})


@pytest.mark.slow
@pytest.mark.integration
def test_two_sites_over_dovecot(tmp_path):
    with Dovecot(require_tool("dovecot")) as dc:
        relay_exchange(tmp_path, dc.url, dc.env())
