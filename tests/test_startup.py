"""Cron starts these commands every minute: --version and dsearch --count import only what they need.

No timing here (benchmarks/bench_startup.py measures); these tests pin the imports that
made start-up slow, so that a change which brings them back fails.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
HEAVY = ("pydicom", "pynetdicom", "rich", "cryptography", "imapclient", "orjson", "sqlite_utils", "click", "logging")

PROBE = """
import sys
from importlib.metadata import entry_points
(ep,) = [e for e in entry_points(group="console_scripts") if e.name == {name!r}]
sys.argv = [{name!r}] + {args!r}
try:
    code = ep.load()()
except SystemExit as exc:
    code = exc.code
sys.stdout.flush()
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
sys.stderr.write("HEAVY " + ",".join(heavy) + "\\n")
sys.exit(code or 0)
"""


def probe(name: str, *args: str, heavy=HEAVY, env=None) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run console script ``name`` as its entry point does; which of ``heavy`` it imported."""
    code = PROBE.format(name=name, args=list(args), heavy=heavy)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env,
                       stdin=subprocess.DEVNULL)
    line = [x for x in p.stderr.splitlines() if x.startswith("HEAVY ")][-1]
    return p, [m for m in line[6:].split(",") if m]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_version_imports_nothing_heavy(name):
    p, heavy = probe(name, "--version")
    assert p.returncode == 0 and p.stdout == f"{name} (dtools) " + p.stdout.split()[-1] + "\n"
    assert heavy == [], f"{name} --version imports {heavy}"


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_still_works(name):
    p, _ = probe(name, "--help")
    assert p.returncode == 0 and "--version" in p.stdout and "--home" in p.stdout


def test_dsearch_count_does_not_load_pydicom(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("DTOOLS_")}
    env["DTOOLS_HOME"] = str(tmp_path)
    (tmp_path / "config.toml").write_text('[site]\nname = "site-a"\n[relay]\nurl = "maildir:/x"\n')
    p, _ = probe("dindex", "-q", env=env)
    assert p.returncode == 0, p.stderr
    for args in (["--count"], ["--count", "StudyDate=20260101-20260131", "-k", "0010,0020=PID*"]):
        p, heavy = probe("dsearch", *args, heavy=("pydicom", "rich", "orjson", "sqlite_utils"), env=env)
        assert p.returncode == 0 and p.stdout == "0\n", p.stderr
        assert heavy == [], f"dsearch {' '.join(args)} imports {heavy}"


def test_dsearch_peer_does_not_load_pydicom(tmp_path):
    """Records from a peer's catalog carry dtools' own field "peer": knowing that it is single
    valued must not cost the import of pydicom (0.3 s) on every search."""
    import os

    from catalog_sites import grant, publish, write_studies
    from exchange import Exchange

    ex = Exchange(tmp_path, f"maildir:{tmp_path}/relay", names=("site-a", "site-b"))
    grant(ex.home("site-b"), "site-a")
    write_studies(tmp_path / "data", 0, 2)
    ex.ok("site-b", f"dindex -q {tmp_path / 'data'} >/dev/null")
    publish(ex.home("site-b"))
    ex.ok("site-b", "dmail-send")
    ex.receive("site-a")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DTOOLS_")}
    env.update(ex.env, DTOOLS_HOME=str(ex.home("site-a")))
    for args in (["--peer", "site-b"], ["--peer", "all", "--level", "series", "Modality=CT"]):
        p, heavy = probe("dsearch", *args, heavy=("pydicom",), env=env)
        assert p.returncode == 0 and '"peer":"site-b"' in p.stdout, p.stderr
        assert heavy == [], f"dsearch {' '.join(args)} imports {heavy}"


def test_dsearch_count_answers_without_click_and_as_the_full_command(tmp_path):
    """Cron's `dsearch --count` is answered without click; every answer (count, error,
    exit status) equals the full command's, run through the command module itself."""
    import os

    from dtools.sample import main as sample_main

    env = {k: v for k, v in os.environ.items() if not k.startswith("DTOOLS_")}
    env["DTOOLS_HOME"] = str(tmp_path / "home")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "config.toml").write_text('[site]\nname = "site-a"\n')
    sample_main([str(tmp_path / "data"), "--studies", "4"])
    p, _ = probe("dindex", "-q", str(tmp_path / "data"), env=env)
    assert p.returncode == 0, p.stderr
    cases = [["--count"], ["--count", "--level", "study"], ["-q", "--count", "-L", "series", "Modality=MR"],
             ["--count", "StudyDate=20260101-20260331", "-k", "0010,0010=*"], ["--count", "--level=patient"],
             ["--count", "StudyDate=2026-01-01"], ["--count", "NoSuchKey=1"], ["--count", "--level", "bogus"],
             ["--count", "CT"], ["--count", "--home", str(tmp_path / "nowhere")]]
    for args in cases:
        quick, heavy = probe("dsearch", *args, heavy=("click",), env=env)
        full = subprocess.run([sys.executable, "-m", "dtools.commands.dsearch", *args], capture_output=True,
                              text=True, env=env, stdin=subprocess.DEVNULL, timeout=60)
        assert (quick.returncode, quick.stdout) == (full.returncode, full.stdout), args
        assert quick.stderr.replace("HEAVY click\n", "").replace("HEAVY \n", "") == full.stderr, args
        if quick.returncode == 0 and args[0] != "--home" and "CT" not in args:
            assert heavy == [], f"dsearch {' '.join(args)} imports {heavy}"
    assert probe("dsearch", "--count", env=env)[0].stdout.strip() != "0"
