"""Small pieces both relay commands share: ages like ``1h``, and the one-run-per-home lock."""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path

from ..errors import TempFailure, UsageError

_AGE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdw]?)\s*$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_age(text: str, option: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``1d``, ``1w`` as seconds."""
    m = _AGE.match(str(text))
    if not m:
        raise UsageError(f"{option} {text!r} is not an age; use a number with s, m, h, d or w (e.g. 6h)")
    return float(m.group(1)) * _UNIT[m.group(2)]


def parse_keep(text: object, option: str) -> float | None:
    """A retention age, or None for ``never``."""
    if str(text).strip().lower() in ("never", "forever"):
        return None
    return parse_age(str(text), option)


def retention(config) -> tuple[float | None, float | None]:
    """How long opened inbox envelopes and delivered outbox envelopes are kept (None: always)."""
    inbox = parse_keep(config.get("retention.inbox", "7d"), "[retention] inbox")
    outbox = parse_keep(config.get("retention.outbox", "0s"), "[retention] outbox")
    return inbox, outbox


class RunLock:
    """An exclusive lock so that two cron runs of the same command in one home never overlap."""

    def __init__(self, path: Path, prog: str):
        self.path = Path(path)
        self.prog = prog
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise TempFailure(f"another {self.prog} is running with this home; it will do the work "
                              "(or run again when it has finished)") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
