"""The console scripts' entry points: ``dindex = "dtools.launch:dindex"`` and so on.

Commands run from cron every minute, so ``--version`` is answered here before click,
pydicom or anything else is imported; everything else goes to the command module's
``main``. A new command needs only its line in pyproject.toml: the attribute
``dtools.launch:NAME`` runs ``dtools.commands.NAME`` (``dmail_send`` is ``dmail-send``).
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs start-up time
if TYPE_CHECKING:
    from typing import Callable


def _launcher(module: str, prog: str) -> "Callable[[], int]":
    def main() -> int:
        if sys.argv[1:] == ["--version"]:
            from ._version import __version__

            sys.stdout.write(f"{prog} (dtools) {__version__}\n")
            return 0
        if prog == "dsearch" and "--count" in sys.argv:
            from .quickcount import run  # cron's "dsearch --count", answered without click

            code = run(sys.argv[1:])
            if code is not None:
                return code
        from importlib import import_module

        return import_module(module).main()

    main.__name__ = prog
    return main


def __getattr__(name: str) -> "Callable[[], int]":
    if name.startswith("_"):
        raise AttributeError(name)
    return _launcher(f"dtools.commands.{name}", name.replace("_", "-"))
