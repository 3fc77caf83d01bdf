"""dindex against hostile file trees: names that are not UTF-8 or hold newlines, a tree
1,000 levels deep, link loops, FIFOs, unreadable directories. Each is at most one failed
input; the rest is indexed, and a name that is not UTF-8 travels on through dsearch,
dseal and dstore as exact bytes."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from conftest import cmd_path, require_tool, run
from dcmtk import free_port, start_storescp, stop
from dtools import records
from dtools.sample import generate
from test_seal_support import make_sites

BAD = b"caf\xe9 \xff.dcm"  # Latin-1 bytes: no UTF-8 decoder accepts them


@pytest.fixture
def corpus(tmp_path) -> list[Path]:
    d = tmp_path / "corpus"
    generate(d, studies=2, series=1, instances=3)
    return sorted(d.rglob("*.dcm"))


def fsname(parent: Path, raw: bytes) -> Path:
    return Path(os.fsdecode(os.path.join(os.fsencode(parent), raw)))


def one_line_failures(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("dindex: /")]


def test_name_not_utf8_or_with_newline_is_indexed_and_failure_stays_one_line(tmp_path, corpus):
    tree = tmp_path / "tree"
    tree.mkdir()
    odd = fsname(tree, BAD)
    shutil.copy(corpus[0], odd)
    shutil.copy(corpus[1], tree / "two\nlines.dcm")
    shutil.copy(corpus[2], tree / "plain.dcm")
    (tree / "junk\nname.dcm").write_bytes(b"not DICOM at all")
    home = str(tmp_path / "home")

    r = run("dindex", "--home", home, str(tree))
    assert r.returncode == 1, r.stderr
    assert "internal error" not in r.stderr
    # the one bad file is one line, its newline escaped
    assert f"dindex: {tree}/junk\\nname.dcm: not a DICOM file" in r.stderr
    assert "indexed 3, unchanged 0, failed 1" in r.stderr
    by_sop = {rec["SOPInstanceUID"]: rec for rec in r.records}
    assert len(by_sop) == 3
    # the name that is not UTF-8: readable path for people, exact bytes in path_b64
    rec = next(x for x in r.records if "path_b64" in x)
    assert base64.b64decode(rec["path_b64"]) == os.fsencode(odd)
    assert rec["path"] == str(tree) + "/caf\ufffd \ufffd.dcm"

    # NUL-separated paths (find -print0) reach the same rows: nothing new, nothing failed
    listing = b"".join(os.fsencode(p) + b"\0" for p in (odd, tree / "two\nlines.dcm"))
    r0 = run("dindex", "--home", home, "-0", input=listing)
    assert r0.returncode == 0 and "indexed 0, unchanged 2, failed 0" in r0.stderr, r0.stderr

    # dsearch prints it; dindex reads dsearch's records back and finds the same file
    found = run("dsearch", "--home", home, "--level", "instance")
    assert found.returncode == 0 and len(found.records) == 3
    again = run("dindex", "--home", home, input=found.stdout)
    assert again.returncode == 0 and "indexed 0, unchanged 3, failed 0" in again.stderr, again.stderr
    assert sorted(x.get("path_b64", "") for x in again.records) == sorted(x.get("path_b64", "") for x in found.records)


def test_name_not_utf8_travels_through_dseal_to_another_site(tmp_path, corpus):
    homes = make_sites(tmp_path / "sites")
    a, b = str(homes["site-a"]), str(homes["site-b"])
    tree = tmp_path / "tree"
    tree.mkdir()
    odd = fsname(tree, BAD)
    shutil.copy(corpus[0], odd)
    assert run("dindex", "--home", a, str(tree)).returncode == 0
    found = run("dsearch", "--home", a, "--level", "instance")
    assert [("path_b64" in x) for x in found.records] == [True]
    sealed = run("dseal", "--home", a, "--to", "site-b", input=found.stdout)
    assert sealed.returncode == 0, sealed.stderr
    again = run("dseal", "--home", a, "--to", "site-b", input=found.stdout)  # remembered under its exact name
    assert again.returncode == 0 and again.records == [] and "1 instance(s) already sealed" in again.stderr
    opened = run("dseal", "--home", b, "--open", input=sealed.stdout)
    assert opened.returncode == 0, opened.stderr
    [rec] = opened.records
    assert hashlib.sha256(Path(rec["path"]).read_bytes()).digest() == hashlib.sha256(odd.read_bytes()).digest()


def test_name_not_utf8_travels_through_dstore(tmp_path, corpus):
    storescp = require_tool("storescp")
    tree = tmp_path / "tree"
    tree.mkdir()
    odd = fsname(tree, BAD)
    shutil.copy(corpus[0], odd)
    home = str(tmp_path / "home")
    assert run("dindex", "--home", home, str(tree)).returncode == 0
    found = run("dsearch", "--home", home, "--level", "instance")
    port = free_port()
    scp = start_storescp(storescp, tmp_path / "recv", port, "PACS")
    try:
        res = run("dstore", f"PACS@127.0.0.1:{port}", input=found.stdout)
    finally:
        stop(scp)
    assert res.returncode == 0, res.stderr
    [out] = res.records
    assert out["status"] == "stored" and base64.b64decode(out["path_b64"]) == os.fsencode(odd)
    assert len(list((tmp_path / "recv").iterdir())) == 1


def test_records_carry_exact_names_that_orjson_cannot(tmp_path):
    name = os.fsdecode(b"/data/caf\xe9.dcm")
    with pytest.raises(orjson.JSONEncodeError):  # why path_b64 exists: JSON strings are Unicode
        orjson.dumps({"path": name})
    line = records.dumps({"kind": "instance", "path": name, "error": f"{name}: bad"})
    rec = orjson.loads(line)
    assert rec["path"] == "/data/caf\ufffd.dcm" and rec["error"] == "/data/caf\ufffd.dcm: bad"
    assert records.parse_line(line)["path"] == name and "path_b64" not in records.parse_line(line)
    # a path changed by hand (jq '.path = ...') wins over a path_b64 that no longer matches it
    edited = orjson.dumps({**rec, "path": "/elsewhere/x.dcm"})
    assert records.parse_line(edited)["path"] == "/elsewhere/x.dcm"
    # Python's json writes such a name with surrogate escapes: read as the same bytes
    assert records.parse_line(json.dumps({"path": name}).encode())["path"] == name
    got = list(records.read(io.BytesIO(line + b"/plain/path.dcm\n")))
    assert [g["path"] for g in got] == [name, "/plain/path.dcm"]


def test_stdin_records_with_names_not_utf8(tmp_path, corpus):
    tree = tmp_path / "tree"
    tree.mkdir()
    odd = fsname(tree, BAD)
    shutil.copy(corpus[0], odd)
    shutil.copy(corpus[1], tree / "ok.dcm")
    stdin = (
        json.dumps({"path": str(odd), "envelope_id": "e1"}).encode() + b"\n"  # surrogate escapes
        + os.fsencode(tree / "ok.dcm") + b"\n"
        + b'{"path": "/x/a\\u0000b"}\n'  # a NUL: no file can be named so
        + b'{"path": "/x/\\ud800"}\n'  # a lone surrogate that stands for no byte
        + b'{"path": "/x/\xff"}\n'  # raw bytes that are not UTF-8 inside JSON
    )
    r = run("dindex", "--home", str(tmp_path / "home"), input=stdin)
    assert r.returncode == 1 and "internal error" not in r.stderr, r.stderr
    assert "indexed 2, unchanged 0, failed 3" in r.stderr
    assert "dindex: /x/a\\x00b: not a usable path" in r.stderr
    assert "dindex: /x/\\ud800: not a usable path" in r.stderr
    assert len(one_line_failures(r.stderr)) == 2 and "not a valid JSON record" in r.stderr
    passed = next(x for x in r.records if x.get("envelope_id") == "e1")
    assert base64.b64decode(passed["path_b64"]) == os.fsencode(odd)


def test_tree_a_thousand_levels_deep(tmp_path, corpus):
    tree = tmp_path / "deep"
    tree.mkdir()
    shutil.copy(corpus[0], tree / "top.dcm")
    d = tree
    for _ in range(1000):
        d = d / "d"
        d.mkdir()
    shutil.copy(corpus[1], d / "bottom.dcm")
    try:
        r = run("dindex", "--home", str(tmp_path / "home"), str(tree))
    finally:
        # shutil.rmtree (pytest's tmp cleanup) recurses and would fail on this tree
        subprocess.run(["rm", "-rf", str(tree)], check=True, timeout=120)
    assert r.returncode == 0, r.stderr[-500:]
    assert sorted(Path(x["path"]).name for x in r.records) == ["bottom.dcm", "top.dcm"]


def _without_dac_override() -> list[str]:
    """root reads every directory; drop that power so a mode-000 directory is unreadable."""
    if os.geteuid() != 0:
        return []
    return [shutil.which("setpriv") or "/usr/bin/setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def test_loops_fifos_and_unreadable_directories(tmp_path, corpus):
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    shutil.copy(corpus[0], tree / "a.dcm")
    shutil.copy(corpus[1], tree / "sub" / "b.dcm")
    (tree / "self").symlink_to("self")  # a link loop
    (tree / "sub" / "up").symlink_to("..")  # a directory loop
    os.mkfifo(tree / "pipe.dcm")  # never opened: a FIFO would block a reader
    os.mkfifo(tmp_path / "named.fifo")
    locked = tree / "locked"
    locked.mkdir()
    shutil.copy(corpus[2], locked / "c.dcm")
    locked.chmod(0)
    try:
        proc = subprocess.run(
            [*_without_dac_override(), cmd_path("dindex"), "--home", str(tmp_path / "home"), str(tree),
             str(tmp_path / "named.fifo")],
            capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    finally:
        locked.chmod(0o700)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert f"dindex: {tree}/self: cannot stat (Too many levels of symbolic links)" in err
    assert f"dindex: {tree}/sub/up: directory loop" in err
    assert f"dindex: {tree}/locked: cannot list directory (Permission denied)" in err
    assert f"dindex: {tmp_path}/named.fifo: not a regular file" in err
    assert "indexed 2, unchanged 0, failed 4" in err
    names = sorted(Path(orjson.loads(x)["path"]).name for x in proc.stdout.splitlines())
    assert names == ["a.dcm", "b.dcm"]


def test_a_fifo_where_a_file_was_is_refused_not_waited_on(tmp_path):
    # The walk saw a regular file; by the time a parser opens it, it is a FIFO with no writer.
    fifo = tmp_path / "swapped.dcm"
    os.mkfifo(fifo)
    code = ("import sys\nfrom dtools.dicom.header import read_header\nfrom dtools.errors import InputError\n"
            "try:\n    read_header(sys.argv[1], 1000)\nexcept InputError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True, timeout=60)
    assert proc.stdout.decode().strip() == "not a regular file", proc.stderr.decode()
