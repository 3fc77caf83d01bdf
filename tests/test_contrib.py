"""contrib/systemd: the units parse (systemd-analyze verify, where available), and their
commands work as written."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from conftest import BIN, require_tool
from exchange import Exchange

ROOT = Path(__file__).resolve().parent.parent
UNITS = sorted((ROOT / "contrib" / "systemd").iterdir())


def exec_start(unit: Path) -> str:
    [line] = [x for x in unit.read_text().splitlines() if x.startswith("ExecStart=")]
    return line.split("=", 1)[1]


def test_units_verify(tmp_path):
    tool = require_tool("systemd-analyze")  # CI installs systemd: there it must run
    user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    for unit in UNITS:
        text = re.sub(r"^(User|Group)=dtools$", rf"\1={user}", unit.read_text(), flags=re.M)
        (tmp_path / unit.name).write_text(text)
    p = subprocess.run([tool, "verify", "--man=no", *sorted(str(p) for p in tmp_path.iterdir())],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert [line for line in p.stderr.splitlines() if "dtools-" in line] == [], p.stderr


def test_every_service_has_a_timer_or_an_install_section():
    names = {u.name for u in UNITS}
    for unit in UNITS:
        if unit.suffix == ".service" and "[Install]" not in unit.read_text():
            assert unit.name.replace(".service", ".timer") in names, unit.name


def test_the_send_and_check_units_commands_run_as_written(tmp_path):
    import shlex
    import time

    from dtools.sample import make_instance

    ex = Exchange(tmp_path, f"maildir:{tmp_path}/relay")
    (tmp_path / "data").mkdir()
    for n in range(2):  # stored today: what the unit's query selects
        make_instance("CT", 1, 1, 0, n, date=time.strftime("%Y%m%d")).save_as(
            tmp_path / "data" / f"{n}.dcm", enforce_file_format=True)
    ex.ok("site-a", f"dindex -q {tmp_path / 'data'} >/dev/null")
    env = {**os.environ, "DTOOLS_HOME": str(ex.home("site-a")), "PATH": f"{BIN}:/usr/bin:/bin"}
    # systemd unescapes %% and splits like a shell; then the command is what bash runs.
    argv = shlex.split(exec_start(ROOT / "contrib" / "systemd" / "dtools-send.service").replace("%%", "%"))
    assert argv[:4] == ["/bin/bash", "-o", "pipefail", "-c"]
    for _ in range(2):
        p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        assert p.returncode == 0 and p.stderr == "", p.stderr  # quiet unless something is wrong
    st = ex.status("site-a")["site-b"]
    assert (st["sealed"], st["awaiting_receipt"]) == (1, 1)  # once, though it ran twice
    argv = shlex.split(exec_start(ROOT / "contrib" / "systemd" / "dtools-check.service"))
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
