"""Command-line arguments that are not valid UTF-8: a usage error in every command, except file paths."""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path

import pytest

from conftest import cmd_path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
BAD = b"\xff\xfe"


def run_bytes(name: str, *args: bytes | str, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DTOOLS_")}
    env["DTOOLS_HOME"] = str(home)
    argv = [os.fsencode(cmd_path(name))] + [a if isinstance(a, bytes) else a.encode() for a in args]
    return subprocess.run(argv, capture_output=True, env=env, stdin=subprocess.DEVNULL, timeout=60)


def assert_refused(p: subprocess.CompletedProcess, what: str) -> None:
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode == 2, err
    assert len(err.splitlines()) == 1 and "is not valid UTF-8" in err and what in err, err
    assert "Traceback" not in err and "internal error" not in err


@pytest.mark.parametrize("name", SCRIPTS)
def test_an_option_value_that_is_not_utf8_is_a_usage_error(name, tmp_path):
    rest = [b"PACS@127.0.0.1:9"] if name == "dstore" else []
    p = run_bytes(name, b"--home", bytes(tmp_path) + b"/" + BAD, *rest, home=tmp_path)
    assert_refused(p, "the value of --home")


@pytest.mark.parametrize("args, what", [
    (["dsearch", b"PatientName=" + BAD], "argument b'PatientName=\\xff\\xfe'"),
    (["dsearch", b"-k", b"0010,0010=" + BAD], "the value of --key"),
    (["dsearch", b"--fields", BAD], "the value of --fields"),
    (["dseal", b"--to", b"site-" + BAD], "the value of --to"),
    (["dseal", b"keygen", b"site-" + BAD], "argument"),
    (["dseal", b"peers", b"add", b"site-" + BAD, b"dtools1 x y z"], "argument"),
    (["dstore", b"PACS" + BAD + b"@127.0.0.1:104"], "argument"),
    (["dmail-send", b"--to", BAD], "the value of --to"),
    (["dserve", b"--aet", BAD], "the value of --aet"),
])
def test_query_terms_names_and_peers_must_be_utf8(args, what, tmp_path):
    assert_refused(run_bytes(*args, home=tmp_path), what)


def test_path_arguments_may_be_any_bytes(tmp_path):
    """File names are bytes on Linux: PATH arguments are not refused by the UTF-8 check
    (what dindex then does with such a file is dindex's business)."""
    p = run_bytes("dindex", bytes(tmp_path) + b"/no-such-" + BAD, home=tmp_path)
    err = p.stderr.decode("utf-8", "replace")
    assert "is not valid UTF-8" not in err and "no such file" in err, err
