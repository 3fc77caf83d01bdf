"""``dsearch --count`` without click, for the cron jobs that run it every minute.

Only the plain forms are answered here: ``--count`` with ``--home``, ``--config``,
``-q``, ``--level`` and ``Keyword=value`` or ``-k`` terms, on a config with nothing to warn
about and an index that exists. Everything else, and any error, returns None and the run
goes through the full command, which prints the same count or the error message. The home
is tightened and logged exactly as the full command does it (dtools.logs).
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs start-up time
if TYPE_CHECKING:
    from typing import Optional

_LEVELS = ("patient", "study", "series", "instance")


def _options(argv: list[str]) -> "Optional[dict]":
    opts: dict = {"home": None, "config": None, "quiet": False, "level": "instance", "terms": [], "keys": [],
                  "count": False}
    args = iter(argv)
    for arg in args:
        name, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if arg == "--count":
            opts["count"] = True
        elif arg in ("-q", "--quiet"):
            opts["quiet"] = True
        elif name in ("--home", "--config", "--level", "-L", "-k", "--key"):
            value = inline if eq else next(args, None)
            if value is None:
                return None
            slot = {"--home": "home", "--config": "config", "--level": "level", "-L": "level"}.get(name)
            if slot:
                opts[slot] = value
            else:
                opts["keys"].append(value)
        elif arg.startswith("-") or "=" not in arg:
            return None  # another option, or free text: the full command
        else:
            opts["terms"].append(arg)
    if not opts["count"] or opts["level"] not in _LEVELS:
        return None
    try:
        for arg in argv:
            arg.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return opts


def run(argv: list[str]) -> "Optional[int]":
    """The exit status, or None: let the full command answer."""
    opts = _options(argv)
    if opts is None:
        return None
    try:
        from . import security
        from .config import Config
        from .index.db import open_index
        from .index.query import count, parse_keys
        from .index.terms import split_terms
        from .logs import _setup_logging

        pairs, words = split_terms(opts["terms"], opts["keys"])
        if words:
            return None
        config = Config(opts["home"], opts["config"])
        if config.warnings or not config.index_path.exists():
            return None
        _setup_logging("dsearch", opts["quiet"], 0, False)
        import logging

        security.set_group(config.get("site.group"), f"[site] group in {config.path}")
        security.secure_home(config.home, config.index_path, logging.getLogger("dtools"))
        query = parse_keys(opts["level"], pairs, None)
        conn = open_index(config.index_path, readonly=True)
        try:
            n = count(conn, query)
        finally:
            conn.close()
    except KeyboardInterrupt:
        sys.stderr.write("dsearch: interrupted\n")
        return 130  # as the full command (EX_INTERRUPTED)
    except Exception:  # noqa: BLE001 - the full command reports it as it always does
        return None
    try:
        sys.stdout.write(f"{n}\n")
        sys.stdout.flush()
    except BrokenPipeError:
        return 0  # the reader went away, as '| head' does: quietly, like the full command
    return 0
