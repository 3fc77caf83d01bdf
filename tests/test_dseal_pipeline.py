"""The relay pipe of DESIGN.md without the mail step: dindex | dsearch | dseal --to ...
then dseal --open | dindex at the other site, all real commands on real pipes."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import orjson
from conftest import cmd_path, run
from test_seal_support import make_sites, make_study


def test_search_seal_open_index(tmp_path):
    homes = make_sites(tmp_path / "sites")
    a, b = str(homes["site-a"]), str(homes["site-b"])
    uid, files = make_study(tmp_path / "pacs", n=4, series=2, pixels=2000)
    assert run("dindex", "--home", a, "-q", str(tmp_path / "pacs")).returncode == 0

    # site A: search the index, seal for B.
    search = subprocess.Popen([cmd_path("dsearch"), "--home", a, "--level", "instance", f"StudyInstanceUID={uid}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sealed = subprocess.run([cmd_path("dseal"), "--home", a, "--to", "site-b"], stdin=search.stdout,
                            capture_output=True, timeout=120)
    search.stdout.close()
    assert search.wait(timeout=60) == 0
    assert sealed.returncode == 0, sealed.stderr.decode()
    [env] = [orjson.loads(x) for x in sealed.stdout.splitlines()]
    assert env["instances"] == 4 and env["StudyInstanceUID"] == uid

    # site B: open and index; the records carry envelope_id and peer through dindex.
    opened = subprocess.Popen([cmd_path("dseal"), "--home", b, "--open"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    opened.stdin.write(sealed.stdout)  # one short line: fits in the pipe
    opened.stdin.close()
    indexed = subprocess.run([cmd_path("dindex"), "--home", b], stdin=opened.stdout, capture_output=True, timeout=120)
    opened.stdout.close()
    assert opened.wait(timeout=120) == 0, opened.stderr.read().decode()
    assert indexed.returncode == 0, indexed.stderr.decode()
    recs = [orjson.loads(x) for x in indexed.stdout.splitlines()]
    assert len(recs) == 4
    assert {r["envelope_id"] for r in recs} == {env["envelope_id"]} and {r["peer"] for r in recs} == {"site-a"}
    assert all(Path(r["path"]).is_relative_to(homes["site-b"] / "archive") for r in recs)

    found = run("dsearch", "--home", b, "--level", "instance", f"StudyInstanceUID={uid}")
    assert found.returncode == 0
    digest = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()  # noqa: E731
    assert sorted(digest(r["path"]) for r in found.records) == sorted(digest(f) for f in files)
