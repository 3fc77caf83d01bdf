"""A pipeline of dtools commands on a terminal: one readable display, not bars drawn over each other.

The pipeline runs under a real pseudo-terminal (stdin, stderr and the last stdout on
it) and what it draws is replayed in a terminal emulator (pyte), so the test sees the
screen a person would see, during the run and at the end.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

from conftest import BIN, run

pyte = pytest.importorskip("pyte")

COLS, ROWS = 120, 40
BAR = "━"


def run_on_terminal(command: str, env: dict, timeout: float = 120, cols: int = COLS,
                    rows: int = ROWS) -> tuple[int, list[list[str]], list[str]]:
    """Run ``sh -c command`` with stdin, stdout and stderr on a new pty.

    Returns the exit status, the screens seen after each chunk of output, and the final screen.
    """
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen(["sh", "-c", command], stdin=slave, stdout=slave, stderr=slave, env=env,
                            start_new_session=True)
    os.close(slave)
    screen = pyte.Screen(cols, rows)
    stream = pyte.ByteStream(screen)
    screens = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 4096)
            except OSError as exc:
                if exc.errno == errno.EIO:  # every writer has closed the slave
                    break
                raise
            if not data:
                break
            stream.feed(data)
            screens.append([line.rstrip() for line in screen.display])
    finally:
        os.close(master)
    code = proc.wait(timeout=30)
    return code, screens, [line.rstrip() for line in screen.display]


@pytest.fixture
def two_sites(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DTOOLS_")}
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    env["TERM"] = "xterm-256color"
    env.pop("NO_COLOR", None)
    line_a = run("dseal", "--home", str(a), "keygen", "site-a").stdout.decode().strip()
    line_b = run("dseal", "--home", str(b), "keygen", "site-b").stdout.decode().strip()
    assert run("dseal", "--home", str(a), "peers", "add", "site-b", line_b).returncode == 0
    assert run("dseal", "--home", str(b), "peers", "add", "site-a", line_a).returncode == 0
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "dtools.sample", str(data), "--studies", "16"], check=True,
                   capture_output=True)
    return a, b, data, env


def test_pipeline_on_a_terminal_draws_one_display(two_sites):
    """dseal and dmail-send work at the same time (a slow reader between them keeps
    dmail-send busy while dseal seals): their bars must not take turns on the screen."""
    a, b, data, env = two_sites
    slow = 'while read -r line; do printf "%s\\n" "$line"; sleep 0.1; done'
    code, screens, final = run_on_terminal(
        f"dindex --home {a} {data} | dseal --home {a} --to site-b | ({slow}) | dmail-send --home {a} > /dev/null",
        env)
    assert code == 0, "\n".join(final)
    # while it ran: one bar at a time, never a bar in a message line, and each stage's bar
    # shown in one stretch (indexing, then sealing, then sending), not alternating
    stages = []
    for s in screens:
        bars = [line for line in s if BAR in line]
        assert len(bars) <= 1, "\n".join(s)
        for line in bars:
            assert not any(f"{cmd}:" in line for cmd in ("dindex", "dseal", "dmail-send")), line
            stage = next((w for w in ("indexing", "sealing", "sending") if w in line), None)
            if stage and (not stages or stages[-1] != stage):
                stages.append(stage)
    assert stages, "no progress bar was drawn"
    assert len(stages) == len(set(stages)), f"bars took turns: {stages}"
    # at the end: exactly the three summary lines, each whole, nothing drawn over them
    shown = [line for line in final if line.strip()]
    assert len(shown) == 3, "\n".join(final)
    assert any(line == "dindex: indexed 96, unchanged 0, failed 0" for line in shown), shown
    assert any(line == "dseal: sealed 16 envelope(s) for site-b" for line in shown), shown
    assert any(line.startswith("dmail-send: 16 envelope(s) deposited") for line in shown), shown


def test_dindex_shows_a_total_when_it_walks_directories(two_sites):
    a, _, data, env = two_sites
    code, screens, final = run_on_terminal(f"dindex --home {a} -j 1 {data} > /dev/null", env)
    assert code == 0, "\n".join(final)
    bars = [line for s in screens for line in s if BAR in line and "indexing" in line]
    assert bars, "no indexing bar was drawn"
    assert any("/96" in line for line in bars), bars  # done/total with the walked total


def test_dstatus_table_fits_an_80_column_terminal(two_sites, tmp_path):
    """Fourteen columns do not fit 80: the table turns, one row per state and a column per
    peer, and every figure and peer name shows whole."""
    a, _b, _data, env = two_sites
    for name in ("site-c", "site-d", "site-e"):
        line = run("dseal", "--home", str(tmp_path / name), "keygen", name).stdout.decode().strip()
        assert run("dseal", "--home", str(a), "peers", "add", name, line).returncode == 0
    code, _screens, final = run_on_terminal(f"dstatus --home {a} --table", env, cols=80, rows=30)
    assert code == 0
    text = "\n".join(final)
    assert "…" not in text, text
    header = next(line for line in final if "site-b" in line)
    assert all(p in header for p in ("site-b", "site-c", "site-d", "site-e")), text
    from dtools.commands.dstatus import TABLE_COLUMNS

    for _key, title in TABLE_COLUMNS[1:]:
        assert any(line.strip("│ ").startswith(title) for line in final), (title, text)
    assert max(len(line) for line in final) <= 80
