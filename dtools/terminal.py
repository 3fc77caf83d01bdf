"""Progress on a terminal shared by a pipeline of dtools commands: one bar at a time.

Every stage of ``dindex DIR | dseal --to b | dmail-send`` has the same terminal on
stderr. Each drawing its own live bar would move the cursor under the others and
leave a mess. So a stage draws only while it holds an flock on the terminal device
(a new open file description of ``ttyname(stderr)``, so that processes which
inherited the same stderr do not share the lock): the first stage to have work takes
it, the others keep counting silently and ask again every quarter second, so when a
stage finishes, the next one still working takes over the display with its counts so
far. Stages that do not hold it start each stderr line by erasing the current line,
so that their messages replace the bar line instead of being appended to it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any, Callable, Iterator

CLEAR_LINE = "\r\x1b[2K"
RETRY_S = 0.25
_drawing = False  # this process shows a live bar now (stderr goes through rich)


def write_line(text: str) -> None:
    """Write one line (ending in a newline) to stderr, clean of any bar another stage drew."""
    stream = sys.stderr
    if not _drawing and _isatty(stream):
        text = CLEAR_LINE + text
    stream.write(text)
    stream.flush()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class _Claim:
    """The flock on the terminal that entitles a process to draw."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.next_try = 0.0

    def take(self) -> bool:
        if self.fd is not None:
            return True
        now = time.monotonic()
        if now < self.next_try:
            return False
        self.next_try = now + RETRY_S
        import fcntl

        try:
            fd = os.open(os.ttyname(sys.stderr.fileno()), os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
        except (OSError, ValueError, AttributeError):
            return True  # cannot coordinate (no device name): draw, as a lone command does
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the description drops the flock
            self.fd = None


@contextlib.contextmanager
def progress(description: str, total: float | None = None, unit: str = "files") -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1, total=None)`` (thread-safe); a rich bar is drawn on stderr
    while this process holds the terminal, from its first ``advance`` on."""
    global _drawing
    import threading

    lock = threading.Lock()
    claim = _Claim()
    state: dict[str, Any] = {"done": 0.0, "total": total, "bar": None, "task": None, "closed": False}

    def start() -> None:
        global _drawing
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TransferSpeedColumn,
        )

        columns: list[Any] = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn()]
        columns.append(TransferSpeedColumn() if unit == "bytes" else MofNCompleteColumn())
        columns.append(TimeElapsedColumn())
        # a new line first: the cursor may sit after another stage's erased bar
        bar = Progress(*columns, console=Console(stderr=True), transient=True)
        sys.stderr.write(CLEAR_LINE)
        bar.start()
        _drawing = True
        state["task"] = bar.add_task(description, total=state["total"], completed=state["done"])
        state["bar"] = bar

    def advance(n: float = 1, total: float | None = None) -> None:
        with lock:
            if state["closed"]:
                return
            if total is not None:
                state["total"] = total
            state["done"] += n
            bar = state["bar"]
            if bar is None:
                if n == 0 and total is not None:
                    return  # a new total alone is no reason to take the terminal
                if claim.take():
                    start()
                return
            if total is not None:
                bar.update(state["task"], total=total)
            bar.advance(state["task"], n)

    try:
        yield advance
    finally:
        with lock:
            state["closed"] = True
            if state["bar"] is not None:
                state["bar"].stop()
                _drawing = False
            claim.release()
