"""A site's home directory and its settings.

Precedence, highest first: command-line flags, ``DTOOLS_*`` environment variables,
``config.toml``, built-in defaults. ``Config.get("relay.url")`` reads the variable
``DTOOLS_RELAY_URL`` and then ``[relay] url`` in the file. Every key, its type and its
default are in dtools.settings.SCHEMA; the file is checked against it when it is read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import settings
from .errors import ConfigError
from .security import check_secret_file, makedirs

SUBDIRS = ("archive", "keys", "outbox", "inbox", "spool")
_MISSING = object()


def default_home() -> Path:
    env = os.environ.get("DTOOLS_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(xdg) / "dtools"


env_name = settings.env_name


class Config:
    """Settings of one site: its home directory and the parsed ``config.toml``."""

    def __init__(self, home: Path | str | None = None, config_file: Path | str | None = None):
        self.home = Path(home).expanduser().absolute() if home else default_home().absolute()
        explicit = config_file is not None or bool(os.environ.get("DTOOLS_CONFIG"))
        if config_file is None:
            config_file = os.environ.get("DTOOLS_CONFIG") or self.home / "config.toml"
        self.path = Path(config_file).expanduser()
        self.data: dict[str, Any] = {}
        if self.path.exists():
            import tomllib  # not needed (3 ms) when there is no file

            try:
                with open(self.path, "rb") as f:
                    self.data = tomllib.load(f)
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{self.path}: not valid TOML ({exc}); fix the file or point --config elsewhere") from None
            except OSError as exc:
                raise ConfigError(f"{self.path}: cannot read config ({exc.strerror})") from None
        elif explicit:
            raise ConfigError(f"{self.path}: config file not found; check --config or DTOOLS_CONFIG")
        try:
            settings.check(self.data, str(self.path))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        # Not errors: the environment is inherited by everything a cron job starts.
        self.warnings: list[str] = settings.unknown_env()

    # -- values -----------------------------------------------------------------
    def file_value(self, key: str, default: Any = None) -> Any:
        node: Any = self.data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def get(self, key: str, default: Any = _MISSING, flag: Any = None, type: Any = None) -> Any:
        """The setting ``key``: the flag if given, else the environment, else the file, else
        ``default`` (the schema's default when not given), converted by its schema type."""
        if flag is not None:
            return flag
        spec = settings.setting(key)
        if spec is None:  # a bug: every key the code reads is in the schema
            raise LookupError(f"setting {key!r} is not in dtools.settings.SCHEMA; add it there")
        env = os.environ.get(env_name(key)) if spec.env else None
        if env is not None and env != "":
            source, value = env_name(key), env
        else:
            value = self.file_value(key, _MISSING)
            if value is _MISSING:
                if default is not _MISSING:
                    return default
                # schema defaults are written as a user would write them ("1d", "20M")
                return None if spec.default is None else spec.kind.parse(spec.default)
            source = str(self.path)
        try:
            value = settings.parse(key, value, source)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if type is not None and value is not None:
            try:
                value = type(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{source}: {settings.where(key)} = {value!r} is not a valid {type.__name__}") from None
        return value

    def section(self, name: str) -> dict[str, Any]:
        value = self.file_value(name, {})
        return value if isinstance(value, dict) else {}

    def secret(self, key: str) -> str | None:
        """A secret named by ``key``: ``DTOOLS_<KEY>`` in the environment, or the file
        named by ``<key>_file`` (config or ``DTOOLS_<KEY>_FILE``). Never from argv."""
        env = os.environ.get(env_name(key))
        if env:
            return env
        path = self.get(key + "_file")
        if not path:
            return None
        p = Path(str(path)).expanduser()
        if not p.is_absolute():
            p = self.home / p
        try:
            with open(p, "rb") as f:
                check_secret_file(p, os.fstat(f.fileno()), key.rsplit(".", 1)[-1].replace("_", " "))
                return f.read().decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: secret file for {key} is not UTF-8 text; check {key}_file") from None
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read secret file for {key} ({exc.strerror}); check {key}_file") from None

    # -- paths --------------------------------------------------------------------
    def dir(self, name: str, create: bool = True) -> Path:
        """A directory in the home (archive, keys, outbox, inbox, spool), created on demand."""
        path = self.home / name
        if create:
            try:
                makedirs(path)
                if name == "keys":
                    path.chmod(0o700)  # private keys: owner only, even with [site] group
            except OSError as exc:
                raise ConfigError(f"{path}: cannot create directory ({exc.strerror}); check --home or DTOOLS_HOME") from None
        return path

    def ensure_home(self) -> Path:
        try:
            makedirs(self.home)
        except OSError as exc:
            raise ConfigError(f"{self.home}: cannot create home ({exc.strerror}); check --home or DTOOLS_HOME") from None
        return self.home

    @property
    def index_path(self) -> Path:
        value = self.get("index.path")
        if value:
            p = Path(str(value)).expanduser()
            return p if p.is_absolute() else self.home / p
        return self.home / "index.db"

    @property
    def site_name(self) -> str | None:
        return self.get("site.name")
