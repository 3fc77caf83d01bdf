"""Shared test helpers: site homes, running the installed commands, and real-tool checks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

BIN = Path(sys.executable).parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str) -> str:
    """The path of an external tool (dovecot, storescu, ...).

    Missing: the test fails under CI=true, so a green CI proves the real thing ran;
    elsewhere it is skipped.
    """
    path = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None
    )
    if path:
        return path
    message = f"{name} is not installed (apt-get install dovecot-imapd dcmtk orthanc)"
    if IN_CI:
        pytest.fail(message + " but CI=true requires it")
    pytest.skip(message)


@dataclass
class Result:
    returncode: int
    stdout: bytes
    stderr: str

    @property
    def records(self) -> list[dict]:
        return [orjson.loads(line) for line in self.stdout.splitlines() if line.strip()]


def cmd_path(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"console script {name} is not installed in {BIN}; run pip install -e ."
    return str(path)


def run(name: str, *args: str, input: bytes | str | None = None, env: dict | None = None,
        timeout: float = 120, cwd: str | None = None) -> Result:
    """Run an installed console script through a real pipe."""
    if isinstance(input, str):
        input = input.encode()
    full_env = dict(os.environ)
    full_env.pop("DTOOLS_HOME", None)
    if env:
        full_env.update(env)
    proc = subprocess.run(
        [cmd_path(name), *args],
        input=input if input is not None else b"",
        capture_output=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace"))


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh site home; DTOOLS_HOME points at it for in-process calls."""
    h = tmp_path / "home"
    h.mkdir(mode=0o700)  # as dtools makes a home: owner only
    monkeypatch.setenv("DTOOLS_HOME", str(h))
    return h


@pytest.fixture
def invoke(capfdbinary):
    """Run a command in-process: invoke(main, args, stdin=b'') -> Result."""

    def _invoke(main, args, stdin: bytes | str = b"") -> Result:
        import io

        if isinstance(stdin, str):
            stdin = stdin.encode()
        old = sys.stdin
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
        try:
            code = main(list(args))
        finally:
            sys.stdin = old
        out, err = capfdbinary.readouterr()
        return Result(code, out, err.decode("utf-8", "replace"))

    return _invoke
