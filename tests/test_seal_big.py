"""A 1 GiB synthetic study through seal and open: memory stays constant, bytes identical."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import orjson
import pytest
from conftest import cmd_path
from pydicom.uid import generate_uid
from test_seal_support import make_dicom, make_sites, run_measured

FILE_MB = 16
LIMIT_KIB = 100 * 1024  # the target: peak RSS <= 100 MB while sealing or opening 1 GB


@pytest.mark.slow
def test_one_gib_study_constant_memory(tmp_path):
    homes = make_sites(tmp_path / "sites")
    study, series = generate_uid(), generate_uid()
    block = os.urandom(1 << 20)
    files = []
    for i in range(1024 // FILE_MB):
        # Distinct leading bytes per file; the rest repeats to keep generation fast.
        pixels = hashlib.sha256(str(i).encode()).digest() * 32768 + block * (FILE_MB - 1)
        files.append(make_dicom(tmp_path / "study" / f"{i:03d}.dcm", study, series, pixels=pixels))
    total = sum(f.stat().st_size for f in files)
    assert total >= 1 << 30

    paths = "".join(f"{f}\n" for f in files).encode()
    rc, out, err, _wall, rss_seal = run_measured([cmd_path("dseal"), "--home", str(homes["site-a"]), "--to", "site-b"], paths)
    assert rc == 0, err.decode()
    [env] = [orjson.loads(line) for line in out.splitlines()]
    assert env["instances"] == len(files) and env["bytes"] > total
    assert 0 < rss_seal <= LIMIT_KIB, f"sealing 1 GiB peaked at {rss_seal // 1024} MiB"

    rc, out, err, _wall, rss_open = run_measured([cmd_path("dseal"), "--home", str(homes["site-b"]), "--open"], out)
    assert rc == 0, err.decode()
    assert 0 < rss_open <= LIMIT_KIB, f"opening 1 GiB peaked at {rss_open // 1024} MiB"
    records = [orjson.loads(line) for line in out.splitlines()]
    assert len(records) == len(files)
    os.unlink(env["path"])  # free disk before reading everything back

    def digest(p: Path) -> str:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.hexdigest()

    want = sorted(digest(f) for f in files)
    assert sorted(digest(Path(r["path"])) for r in records) == want
    assert sorted(r["sha256"] for r in records) == want
