"""Every command is documented: a man page with the standard sections and every option."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from conftest import cmd_path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
SECTIONS = ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "ENVIRONMENT", "FILES", "EXAMPLES"]


def man_text(name: str) -> str:
    return (ROOT / "man" / f"{name}.1").read_text().replace("\\-", "-")


def help_text(name: str) -> str:
    p = subprocess.run([cmd_path(name), "--help"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.mark.parametrize("name", SCRIPTS)
def test_man_page_has_sections(name):
    text = man_text(name)
    for section in SECTIONS:
        assert re.search(rf"^\.SH {section}$", text, re.M), f"man/{name}.1 lacks {section}"
    for code in ("0", "1", "2", "69", "75"):
        assert re.search(rf"^\.B {code}$", text, re.M), f"man/{name}.1 does not list exit status {code}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_long_option_is_documented(name):
    text = man_text(name)
    help_ = help_text(name)
    options = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", help_))
    assert "--home" in options and "--version" in options
    missing = sorted(o for o in options if o not in text)
    assert not missing, f"man/{name}.1 does not document {missing}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_version_and_bad_option(name):
    p = subprocess.run([cmd_path(name), "--version"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 0 and "dtools" in p.stdout
    p = subprocess.run([cmd_path(name), "--no-such-option"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "--help" in p.stderr


def test_conventions_page_lists_every_command():
    text = (ROOT / "man" / "dtools.7").read_text().replace("\\-", "-")
    for name in SCRIPTS:
        assert f".BR {name} (1)" in text, f"dtools(7) does not mention {name}"
    for code in ("0", "1", "2", "69", "75", "130"):
        assert re.search(rf"^\.B {code}$", text, re.M)


def test_man_pages_render():
    if subprocess.run(["sh", "-c", "command -v man"], capture_output=True).returncode != 0:
        pytest.skip("man is not installed")
    for page in sorted((ROOT / "man").iterdir()):
        p = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True,
                           env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin"}, timeout=60)
        assert p.returncode == 0, p.stderr
        assert "warning" not in p.stderr.lower(), (page.name, p.stderr)


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    readme = (ROOT / "README.md").read_text()
    marker = ci.index("# README: the test command")
    command = ci[marker + 1].strip()
    assert command in readme, "README.md and .ci/run must give the same test command"
