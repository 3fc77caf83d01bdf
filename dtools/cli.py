"""The command layer every dtools command shares.

Common options (--home, --config, -q, -v, --debug, --version, -h), the entry wrapper
that turns exceptions into one stderr line and an exit status, BrokenPipe and Ctrl-C
handling, logging to stderr and progress bars that appear only on a terminal.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import click

from . import security
from ._version import __version__
from .config import Config
from .logs import _LineHandler, _setup_logging, _write_line, one_line  # noqa: F401 - re-exported
from .errors import (
    EX_FAILED,
    EX_INTERRUPTED,
    EX_OK,
    EX_PIPE,
    EX_SOFTWARE,
    EX_TERMINATED,
    EX_USAGE,
    DtoolsError,
    UsageError,
)

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

class _PipeClosed(Exception):
    """stdout was closed by the reader; raised instead of BrokenPipeError so click leaves it alone."""


class Terminated(BaseException):
    """SIGTERM arrived; raised like KeyboardInterrupt so that transactions roll back cleanly."""


class App:
    """What a command knows about its run: options, settings, output and the failure count."""

    def __init__(self, prog: str, home: str | None, config: str | None, quiet: bool, verbose: int, debug: bool):
        self.prog = prog
        self._home = home
        self._config_file = config
        self.quiet = quiet
        self.verbose = verbose
        self.debug = debug
        self.failures = 0
        self._config: Config | None = None
        self._log: Any = None
        # logging (with traceback and textwrap) costs start-up time a cron job pays every
        # minute: it is set up when first used, or now if a module has imported it already
        # (so module-level loggers of the "dtools" tree find its handler).
        if "logging" in sys.modules:
            self.log

    def override(self, home: str | None, config: str | None, quiet: bool, verbose: int, debug: bool) -> None:
        """The common options given after a subcommand (``dseal keygen NAME --home DIR``), which
        say the same as before it. Settings are read lazily, so nothing has used the old ones."""
        if self._config is not None and (home or config):
            raise UsageError("give --home and --config once, before the subcommand")
        self._home = home or self._home
        self._config_file = config or self._config_file
        self.quiet = self.quiet or quiet
        self.verbose += verbose
        self.debug = self.debug or debug
        if self._log is not None and (quiet or verbose or debug):
            _setup_logging(self.prog, self.quiet, self.verbose, self.debug)

    @property
    def log(self) -> Any:
        """The "dtools" logger, writing ``prog: message`` lines to stderr."""
        if self._log is None:
            import logging

            _setup_logging(self.prog, self.quiet, self.verbose, self.debug)
            self._log = logging.getLogger("dtools")
        return self._log

    @property
    def config(self) -> Config:
        if self._config is None:
            config = Config(self._home, self._config_file)
            for warning in config.warnings:
                self.err(f"warning: {warning}")
            security.set_group(config.get("site.group"), f"[site] group in {config.path}")
            security.secure_home(config.home, config.index_path, self.log)
            self._config = config
        return self._config

    @property
    def home(self) -> Path:
        return self.config.home

    # -- output -----------------------------------------------------------------
    def emit(self, record: dict) -> None:
        """Write one record on stdout (flushed)."""
        from . import records

        records.write(record)

    def fail(self, what: Any, reason: str) -> None:
        """Report one failed input as ``prog: <input>: <reason>`` and carry on."""
        self.failures += 1
        self.err(f"{what}: {reason}")

    def err(self, message: str) -> None:
        _write_line(f"{self.prog}: {one_line(message)}\n")

    def info(self, message: str) -> None:
        """A summary line: shown unless --quiet."""
        if not self.quiet:
            self.err(message)

    # -- input ------------------------------------------------------------------
    def read_records(self, null: bool = False) -> Iterator[dict]:
        """Records (or paths) from stdin; says so when stdin is a terminal instead of hanging."""
        if sys.stdin is None:
            return iter(())
        if sys.stdin.isatty():
            self.err("reading records or paths from standard input (end with Ctrl-D)")
        from . import records

        return records.read(sys.stdin.buffer, null=null, on_error=lambda line, why: self.fail(f"line {line!r}", why))

    # -- progress ---------------------------------------------------------------
    @property
    def interactive(self) -> bool:
        return not self.quiet and sys.stderr.isatty()

    def progress(self, description: str, total: float | None = None, unit: str = "files") -> Any:
        """A context yielding ``advance(n=1, total=None)``; draws a rich bar on stderr only on a
        terminal, and in a pipeline of dtools commands only one stage at a time (dtools.terminal)."""
        if not self.interactive:
            return contextlib.nullcontext(lambda n=1, total=None: None)
        from . import terminal

        return terminal.progress(description, total, unit)


# -- option bundles -------------------------------------------------------------
def common_options(f: Callable) -> Callable:
    """--home, --config, -q, -v, --debug: the same in every command."""
    opts = [
        click.option("--home", type=click.Path(file_okay=False), metavar="DIR", default=None,
                     help="Site home directory [env DTOOLS_HOME; default $XDG_DATA_HOME/dtools]."),
        click.option("--config", type=click.Path(dir_okay=False), metavar="FILE", default=None,
                     help="Config file [env DTOOLS_CONFIG; default HOME/config.toml]."),
        click.option("-q", "--quiet", is_flag=True, help="Print no summary or notices on stderr."),
        click.option("-v", "--verbose", count=True, help="More detail on stderr (-vv for debug logs)."),
        click.option("--debug", is_flag=True, help="Show Python tracebacks for internal errors."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def null_option(f: Callable) -> Callable:
    return click.option("-0", "--null", "null", is_flag=True,
                        help="Paths on stdin are separated by NUL (find -print0).")(f)


def _check_utf8(ctx: click.Context) -> None:
    """Refuse an option value or argument that is not valid UTF-8 (Python hands such argv
    bytes over as lone surrogates, which fail far away as an internal error). File PATH
    arguments (declared with click.Path) may be any bytes, as file names may."""
    for param in ctx.command.params:
        if isinstance(param, click.Argument) and isinstance(param.type, click.Path):
            continue
        value = ctx.params.get(param.name) if param.name else None
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if not isinstance(v, str):
                continue
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                if isinstance(param, click.Argument):
                    what = f"argument {os.fsencode(v)[:60]!r}"
                else:
                    what = f"the value of {max(param.opts, key=len)} ({os.fsencode(v)[:60]!r})"
                raise UsageError(f"{what} is not valid UTF-8; give it in UTF-8 (only file PATH arguments "
                                 "may be other bytes)") from None


class _Utf8Checked:
    """Mixin: check the parsed parameters (see _check_utf8) before the callback runs."""

    def invoke(self, ctx: click.Context) -> Any:
        _check_utf8(ctx)
        return super().invoke(ctx)  # type: ignore[misc]


class Command(_Utf8Checked, click.Command):
    pass


class Group(_Utf8Checked, click.Group):
    command_class = Command
    group_class = None  # set below: subgroups are plain checked groups


Group.group_class = Group


def subcommand_options(f: Callable) -> Callable:
    """The common options on a subcommand too, applied to the App its group made."""
    import functools

    @functools.wraps(f)
    def wrapper(*args: Any, home: str | None = None, config: str | None = None, quiet: bool = False,
                verbose: int = 0, debug: bool = False, **kwargs: Any) -> Any:
        app = click.get_current_context().find_object(App)
        if app is not None:
            app.override(home, config, quiet, verbose, debug)
        return f(*args, **kwargs)

    return common_options(wrapper)


def command(prog: str, **kwargs: Any) -> Callable[[Callable], click.Command]:
    """Decorator: a click command named ``prog`` whose callback receives an App first.

    The callback returns an exit status or None; None means 0, or 1 if any input failed.
    """

    def deco(f: Callable) -> click.Command:
        @functools.wraps(f)
        def callback(home, config, quiet, verbose, debug, **opts):
            app = App(prog, home, config, quiet, verbose, debug)
            try:
                rv = f(app, **opts)
            except BrokenPipeError:
                raise _PipeClosed() from None
            if rv is None:
                rv = EX_FAILED if app.failures else EX_OK
            return rv

        cmd_f = common_options(callback)
        cmd_f = click.version_option(__version__, "--version", prog_name=prog,
                                     message="%(prog)s (dtools) %(version)s")(cmd_f)
        cls = kwargs.pop("cls", Command)
        if not issubclass(cls, _Utf8Checked):
            cls = type(cls.__name__, (_Utf8Checked, cls), {})
        return click.command(prog, cls=cls, context_settings=CONTEXT_SETTINGS, **kwargs)(cmd_f)

    return deco


def group(prog: str, **kwargs: Any) -> Callable[[Callable], click.Group]:
    """Like ``command`` for a command with subcommands (dseal keygen/peers)."""

    def deco(f: Callable) -> click.Group:
        @functools.wraps(f)
        def callback(home, config, quiet, verbose, debug, **opts):
            app = App(prog, home, config, quiet, verbose, debug)
            click.get_current_context().obj = app
            try:
                rv = f(app, **opts)
            except BrokenPipeError:
                raise _PipeClosed() from None
            return rv

        cmd_f = common_options(callback)
        cmd_f = click.version_option(__version__, "--version", prog_name=prog,
                                     message="%(prog)s (dtools) %(version)s")(cmd_f)
        cls = kwargs.pop("cls", Group)
        if not issubclass(cls, _Utf8Checked):
            cls = type(cls.__name__, (_Utf8Checked, cls), {"command_class": Command, "group_class": Group})
        return click.group(prog, cls=cls, context_settings=CONTEXT_SETTINGS, **kwargs)(cmd_f)

    return deco


def _on_sigterm(signum, frame):  # pragma: no cover - exercised through subprocess tests
    raise Terminated()


def entry(cmd: click.Command) -> Callable[[Iterable[str] | None], int]:
    """The console-script entry point: ``main(args=None) -> int``, callable in-process."""
    prog = cmd.name or "dtools"

    def main(args: Iterable[str] | None = None) -> int:
        argv = sys.argv[1:] if args is None else list(args)
        debug = "--debug" in argv
        in_main_thread = _main_thread()
        old = None
        if in_main_thread:
            old = signal.signal(signal.SIGTERM, _on_sigterm)
        old_umask = security.start()  # patient data is owner-only, whatever the caller's umask
        try:
            rv = cmd.main(argv, prog_name=prog, standalone_mode=False)
            code = rv if isinstance(rv, int) else EX_OK
            _flush_stdout()
            return code
        except click.UsageError as exc:
            hint = f" (see '{prog} --help')"
            sys.stderr.write(f"{prog}: {exc.format_message()}{hint}\n")
            return EX_USAGE
        except click.ClickException as exc:
            sys.stderr.write(f"{prog}: {exc.format_message()}\n")
            return exc.exit_code
        except DtoolsError as exc:
            sys.stderr.write(f"{prog}: {one_line(str(exc))}\n")
            if debug:
                import traceback

                traceback.print_exc()
            return exc.exit_code
        except (_PipeClosed, BrokenPipeError):
            _silence_stdout()
            return EX_PIPE
        except (KeyboardInterrupt, click.Abort):
            sys.stderr.write(f"{prog}: interrupted\n")
            return EX_INTERRUPTED
        except Terminated:
            sys.stderr.write(f"{prog}: terminated\n")
            return EX_TERMINATED
        except Exception as exc:  # a bug: one line unless --debug
            if debug:
                import traceback

                traceback.print_exc()
            sys.stderr.write(
                f"{prog}: internal error: {type(exc).__name__}: {one_line(str(exc))} "
                "(rerun with --debug for a traceback)\n"
            )
            return EX_SOFTWARE
        finally:
            security.end(old_umask)
            if in_main_thread and old is not None:
                signal.signal(signal.SIGTERM, old)

    return main


def run(cmd: click.Command) -> None:
    """``sys.exit(entry(cmd)())`` for ``python -m``."""
    sys.exit(entry(cmd)())


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()


def _silence_stdout() -> None:
    # Python flushes stdout again at exit; point it at devnull so that flush is quiet.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
