"""stderr lines for every command: one printable line each, ``prog: message``, and the
"dtools" logger that writes them. Free of click, so that a command's quick path (dsearch
--count from cron) reports exactly as the full command does.
"""

from __future__ import annotations

import sys
from typing import Any

from . import security

# C0 controls and DEL in a message (a file name with a newline) become visible escapes,
# so that every failure stays one line that grep and log readers can trust.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}
_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})


def one_line(text: str) -> str:
    """``text`` as one printable line: controls escaped, undecodable bytes of a file
    name (surrogate escapes) shown as ``\\xff``."""
    if not text.isprintable():
        text = text.translate(_ESCAPES)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            try:
                text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            except UnicodeEncodeError:  # a lone surrogate that stands for no byte
                text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _write_line(text: str) -> None:
    if sys.stderr is not None and sys.stderr.isatty():
        from .terminal import write_line  # clears a bar another stage drew on this terminal

        write_line(text)
    elif sys.stderr is not None:
        sys.stderr.write(text)
        sys.stderr.flush()


def _line_handler_class() -> type:
    import logging

    class LineHandler(logging.Handler):
        """Log lines to whatever sys.stderr is at the time (rich redirects it while a bar
        is live), through _write_line."""

        def emit(self, record: logging.LogRecord) -> None:
            try:
                _write_line(self.format(record) + "\n")
            except Exception:  # noqa: BLE001 - logging must not raise
                self.handleError(record)

    return LineHandler


def _LineHandler() -> Any:  # noqa: N802 - built on first use, so importing cli needs no logging
    return _line_handler_class()()


def _setup_logging(prog: str, quiet: bool, verbose: int, debug: bool) -> None:
    import logging

    class _OneLineFormatter(logging.Formatter):
        def formatMessage(self, record: logging.LogRecord) -> str:
            record.message = one_line(record.message)
            return super().formatMessage(record)

    logger = logging.getLogger("dtools")
    for h in list(logger.handlers):
        logger.removeHandler(h)
    handler = _LineHandler()
    handler.setFormatter(_OneLineFormatter(f"{prog}: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    if debug or verbose >= 2:
        logger.setLevel(logging.DEBUG)
    elif verbose:
        logger.setLevel(logging.INFO)
    elif quiet:
        logger.setLevel(logging.ERROR)
    else:
        logger.setLevel(logging.WARNING)
    # security warnings (TLS checks off, a secret file others can read) survive -q
    security.warnings_log.setLevel(logging.DEBUG if debug or verbose >= 2 else logging.WARNING)
