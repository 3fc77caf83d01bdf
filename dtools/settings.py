"""Every setting dtools knows, with its type, in one table, and the check of config.toml against it.

To add a setting, add one line to SCHEMA (and document it in dtools(7) and the page of the
command that reads it). A ``*`` in a key stands for a name the user chooses
(``peers.*.identity`` is ``[peers.site-b] identity``). This module imports nothing heavy:
every command loads it, from cron, every minute.
"""

from __future__ import annotations

import os
import re
from typing import Any

from .settingtypes import (  # noqa: F401 - the value types, re-exported for the schema's readers
    NAME_PATTERN,
    Bool,
    Choice,
    Destination,
    Duration,
    Float,
    Int,
    Keep,
    Kind,
    Name,
    Size,
    Str,
    UnknownKey,
    Words,
    parse_duration,
    valid_name,
)


class Setting:
    """One key: its type, its default (written as a user would), and where it may come from.

    (A plain class: a dataclass would cost a millisecond of start-up per command.)
    """

    __slots__ = ("kind", "default", "doc", "env", "secret")

    def __init__(self, kind: Kind, default: Any = None, doc: str = "", env: bool = True, secret: bool = False):
        self.kind = kind
        self.default = default
        self.doc = doc
        self.env = env  # may be set by DTOOLS_<SECTION>_<KEY>
        self.secret = secret  # only from the environment; the file names a *_file instead


# -- the table ------------------------------------------------------------------------
SCHEMA: dict[str, Setting] = {
    "site.name": Setting(Name(), None, "this site's name: its folder on the relay and the sender of its envelopes"),
    "site.group": Setting(Str(), None, "a group that may read the site's data too (files 0640, directories 0750)"),
    "index.path": Setting(Str(), "index.db", "the index file, relative to the home"),
    "index.jobs": Setting(Int(1), None, "parser processes for dindex (default: the number of CPUs)"),
    "seal.group": Setting(Choice("study", "series", "none"), "study", "one envelope per study, per series, or one for all input"),
    "relay.url": Setting(Str(), None, "the relay: imaps://USER@HOST[:PORT]/FOLDER, imap://... or maildir:/PATH"),
    "relay.password": Setting(Str(), None, "the relay password (environment only)", secret=True),
    "relay.password_file": Setting(Str(), None, "a file holding the relay password, relative to the home"),
    "relay.timeout": Setting(Float(0), 60.0, "seconds to wait for the IMAP server"),
    "relay.insecure": Setting(Bool(), False, "skip TLS certificate checks (insecure)"),
    "relay.max_message_size": Setting(Size(), "20M", "largest message dmail-send deposits"),
    "relay.part_timeout": Setting(Duration(), "1d", "how long dmail-recv waits for the rest of a part set"),
    "relay.retry_after": Setting(Keep(), "6h", "dmail-send sends again what has had no receipt for this long"),
    "retention.outbox": Setting(Keep(), "0s", "how long delivered outbox envelopes are kept"),
    "retention.inbox": Setting(Keep(), "7d", "how long opened inbox envelopes are kept"),
    "peers.*.identity": Setting(Str(), None, "the peer's public identity line from 'dseal keygen'", env=False),
    "peers.*.relay": Setting(Str(), None, "a relay account of the peer's own, instead of relay.url", env=False),
    "peers.*.relay_password": Setting(Str(), None, "the password of that account (environment only)", secret=True),
    "peers.*.relay_password_file": Setting(Str(), None, "a file holding that password, relative to the home"),
    "peers.*.share": Setting(Bool(), False, "send the peer this site's study/series catalog", env=False),
    "peers.*.query": Setting(Bool(), False, "answer the peer's live queries (dserve --relay)", env=False),
    "peers.*.retrieve": Setting(Bool(), False, "send the peer the studies it asks for (dserve --relay)", env=False),
    "peers.*.aet": Setting(Str(), None, "dserve answers associations called this AE title for the peer (the bridge)",
                           env=False),
    "peers.*.live": Setting(Bool(), False, "the bridge asks the peer live instead of answering from its catalog",
                            env=False),
    "dserve.aet": Setting(Str(), "DTOOLS", "dserve's AE title"),
    "dserve.port": Setting(Int(1, 65535), 11112, "dserve's TCP port"),
    "dserve.bind": Setting(Str(), "0.0.0.0", "the address dserve listens on"),
    "dserve.allow": Setting(Words(), [], "calling AE titles dserve accepts (default: any)"),
    "dserve.max_associations": Setting(Int(1), 10, "concurrent associations dserve accepts"),
    "dserve.timeout": Setting(Float(0), 60.0, "dserve's idle and DIMSE timeout, seconds"),
    "dserve.sync": Setting(Choice("always", "batch"), "always", "when dserve fsyncs received files"),
    "dserve.grace": Setting(Float(0), 10.0, "seconds running associations may finish after SIGTERM"),
    "dserve.accept_any_called_aet": Setting(Bool(), False, "answer associations whatever AE title they call"),
    "dserve.bridge_wait": Setting(Duration(), 300.0, "how long a bridged C-MOVE/C-GET waits for the peer's study"),
    "dserve.publish_interval": Setting(Float(1), 60.0, "with --relay: seconds between catalog publications"),
    "dserve.destinations.*": Setting(Destination(), None, "C-MOVE destinations and dstore peers, by AE title", env=False),
    "dstore.aet": Setting(Str(), None, "dstore's calling AE title (default: dserve.aet)"),
    "dstore.timeout": Setting(Float(0), 30.0, "dstore's association and DIMSE timeout, seconds"),
    "dstore.transfer_syntax": Setting(Str(), None, "send every instance in this transfer syntax (default: as stored)"),
}

# DTOOLS_* variables that are not settings of the file.
OTHER_ENV = {
    "DTOOLS_HOME": "the site's home directory",
    "DTOOLS_CONFIG": "the config file",
    "DTOOLS_DEMO_DIR": "where demo.sh writes its two sites",
}


def env_name(key: str) -> str:
    """``relay.url`` -> ``DTOOLS_RELAY_URL``; ``peers.site-b.relay_password`` -> ``DTOOLS_PEERS_SITE_B_RELAY_PASSWORD``."""
    return "DTOOLS_" + re.sub(r"[^A-Za-z0-9]", "_", key).upper()


def setting(key: str) -> Setting | None:
    """The schema entry for a concrete key (``peers.site-b.identity`` finds ``peers.*.identity``)."""
    found = SCHEMA.get(key)
    if found is not None:
        return found
    parts = key.split(".")
    for pattern, s in SCHEMA.items():
        p = pattern.split(".")
        if len(p) == len(parts) and all(a == "*" or a == b for a, b in zip(p, parts)):
            return s
    return None


def where(key: str) -> str:
    """How a user writes a key in config.toml: ``[relay] url``."""
    section, _, name = key.rpartition(".")
    return f"[{section}] {name}" if section else name


def parse(key: str, value: Any, source: str) -> Any:
    """The value of ``key`` converted by its type; ValueError with a message naming source."""
    s = setting(key)
    if s is None:
        raise LookupError(f"setting {key!r} is not in dtools.settings.SCHEMA")
    try:
        return s.kind.parse(value)
    except UnknownKey as exc:
        raise ValueError(f"{source}: unknown key {exc.key!r} in {where(key)}{_hint(exc.key, exc.known, [])}") from None
    except (ValueError, TypeError):
        raise ValueError(f"{source}: {where(key)} = {_show(value)} is not valid: expected {s.kind.expected}") from None


# -- checking a parsed config.toml --------------------------------------------------------
def _tree() -> dict:
    tree: dict = {}
    for key in SCHEMA:
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = key
    return tree


def check(data: dict, path: str) -> None:
    """Raise ValueError (one line naming the key, the file and the nearest known key) if
    ``data`` holds an unknown section or key, a secret, or a value of the wrong type."""
    _walk(data, _tree(), [], path)


def _walk(data: dict, tree: dict, prefix: list[str], path: str) -> None:
    for name, value in data.items():
        here = prefix + [name]
        spec = tree.get(name, tree.get("*"))
        if spec is None:
            raise ValueError(_unknown(here, value, tree, path))
        if here[0] == "peers" and len(here) == 2 and not valid_name(name):
            raise ValueError(f"{path}: [peers.{name}]: a peer name is letters, digits, '.', '_' or '-' (at most 64)")
        if isinstance(spec, str):  # a setting
            s = SCHEMA[spec]
            key = ".".join(here)
            if s.secret:
                raise ValueError(f"{path}: {where(key)}: secrets are not read from config.toml; put it in a "
                                 f"file named by {where(key)}_file, or in {env_name(key)}")
            parse(key, value, path)
        elif not isinstance(value, dict):
            raise ValueError(f"{path}: {'.'.join(here)} must be a table [{'.'.join(here)}], not {_show(value)}")
        else:
            _walk(value, spec, here, path)


def _unknown(here: list[str], value: Any, tree: dict, path: str) -> str:
    name = here[-1]
    known = [k for k, v in tree.items() if k != "*" and not (isinstance(v, str) and SCHEMA[v].secret)]
    if len(here) == 1 and isinstance(value, dict):
        return f"{path}: unknown section [{name}]{_hint(name, known, [], '[{}]')}"
    if len(here) == 1:
        return f"{path}: unknown key {name!r} outside any section{_hint(name, [], [])}"
    return f"{path}: unknown key {name!r} in [{'.'.join(here[:-1])}]{_hint(name, known, here[:-1])}"


def _hint(name: str, known: list[str], section: list[str], fmt: str = "{}") -> str:
    """"; did you mean X?" with the nearest known name, else the same key in another
    section, else the list of known names."""
    close = _nearest(name, known)
    if close:
        return f"; did you mean {fmt.format(close)}?"
    other = _elsewhere(name, section)
    if other:
        return f"; did you mean {other}?"
    return f"; known: {', '.join(sorted(known))}" if known else ""


def _nearest(name: str, known: list[str]) -> str | None:
    import difflib  # only when there is something to suggest

    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return close[0] if close else None


def _elsewhere(name: str, section: list[str]) -> str | None:
    """A key that belongs in another section: ``[relay] aet`` -> ``[dserve] aet``."""
    for key in SCHEMA:
        if key.rsplit(".", 1)[-1] == name and key.split(".")[:-1] != section and "*" not in key:
            return where(key)
    return None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- the environment ---------------------------------------------------------------------
def _env_patterns() -> tuple[set[str], list[re.Pattern]]:
    exact = set(OTHER_ENV)
    patterns = []
    for key, s in SCHEMA.items():
        if not s.env:
            continue
        if "*" in key:
            parts = [re.escape(env_name(p)[7:]) if p != "*" else "[A-Z0-9_]+" for p in key.split(".")]
            patterns.append(re.compile("DTOOLS_" + "_".join(parts) + "$"))
        else:
            exact.add(env_name(key))
    return exact, patterns


def unknown_env(environ: Any = None) -> list[str]:
    """One warning per ``DTOOLS_*`` variable that is no setting, with the nearest known name."""
    environ = os.environ if environ is None else environ
    names = [n for n in environ if n.startswith("DTOOLS_")]
    if not names:
        return []
    exact, patterns = _env_patterns()
    out = []
    for n in sorted(names):
        if n in exact or any(p.match(n) for p in patterns):
            continue
        close = _nearest(n, sorted(exact))
        hint = f"; did you mean {close}?" if close else ""
        out.append(f"environment variable {n} is not a dtools setting and is ignored{hint}")
    return out
