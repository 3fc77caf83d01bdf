"""python -m dtools.sample works from any directory, even one holding a directory named dtools.

A site home is often called dtools (the default is $XDG_DATA_HOME/dtools): from its parent,
`python -m` found that directory first and took it for the package (a namespace package
shadows an editable install's finder), and `from . import __version__` failed.
"""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("layout", ["empty", "site-home-named-dtools"])
def test_sample_from_another_directory(tmp_path, layout):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    if layout == "site-home-named-dtools":
        (cwd / "dtools" / "keys").mkdir(parents=True)
        (cwd / "dtools" / "config.toml").write_text('[site]\nname = "site-a"\n')
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "dtools.sample", str(out), "--studies", "2"], cwd=cwd,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert len(list(out.rglob("*.dcm"))) == 12
    p = subprocess.run([sys.executable, "-m", "dtools.commands.dsearch", "--version"], cwd=cwd,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.startswith("dsearch (dtools) "), p.stderr
