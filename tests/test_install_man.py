"""The man pages are installed with the package, so `man dindex` works after `pip install -e .`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted(p.name for p in (ROOT / "man").iterdir() if p.suffix in (".1", ".5", ".7"))


def man_w(bin_dir: Path, *names: str) -> subprocess.CompletedProcess:
    # man-db derives its search path from PATH: PREFIX/bin -> PREFIX/share/man
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/")}
    return subprocess.run([require_tool("man"), "-w", *names], capture_output=True, text=True, env=env, timeout=60)


def test_editable_install_into_a_fresh_venv_installs_the_man_pages(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    # pip from the test environment, installing into the new venv: the README's editable
    # install (its dependencies are not needed to find the man pages)
    p = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                        "--no-deps", "-e", str(ROOT)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    installed = sorted(q.name for q in (venv / "share" / "man").rglob("*") if q.is_file())
    assert installed == PAGES
    r = man_w(venv / "bin", "dindex", "dtools", "dtools-envelope")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(venv / "share/man/man1/dindex.1"), str(venv / "share/man/man7/dtools.7"),
                                str(venv / "share/man/man5/dtools-envelope.5")]


def test_this_environment_has_them_too():
    bin_dir = Path(sys.executable).parent
    r = man_w(bin_dir, "dseal")
    assert r.returncode == 0 and r.stdout.strip() == str(bin_dir.parent / "share/man/man1/dseal.1"), r.stderr
