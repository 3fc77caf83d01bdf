"""Pieces both DICOM roles share: peer addresses, AE titles, TCP_NODELAY, presentation contexts.

pynetdicom never sets TCP_NODELAY; without it every small PDU waits for a delayed ACK
(10-75x slower on loopback), so every association socket we own gets it here. What
dtools changes inside pynetdicom is in dtools.net.internals (tune_pynetdicom).
"""

from __future__ import annotations

import logging
import re
import socket
from dataclasses import dataclass
from typing import Any

from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from ..errors import ConfigError, UsageError
from .internals import tune_pynetdicom  # noqa: F401 - dserve's SCP imports it from here

DEFAULT_AET = "DTOOLS"
DEFAULT_PORT = 11112
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)
NATIVE = (*UNCOMPRESSED, DeflatedExplicitVRLittleEndian)
MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255

_AET_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire, no backslash


def quiet_pynetdicom(level: int = logging.CRITICAL) -> None:
    """pynetdicom logs every PDU at INFO and dumps tracebacks at ERROR; our own log says what matters.

    Above INFO, pynetdicom's standard logging handlers (bound to every association for
    each PDU and DIMSE message) would only build messages nobody sees: they are not
    bound at all (its documented LOG_HANDLER_LEVEL setting), which saves CPU per message.
    """
    from pynetdicom import _config

    logging.getLogger("pynetdicom").setLevel(level)
    _config.LOG_HANDLER_LEVEL = "none" if level > logging.INFO else "standard"


def check_aet(value: str, what: str = "AE title") -> str:
    """An AE title: 1-16 characters of the default repertoire, not all spaces, no backslash."""
    aet = (value or "").strip()
    if not aet or not _AET_RE.match(aet):
        raise UsageError(f"{what} {value!r} is not valid: use 1-16 printable ASCII characters, no backslash")
    return aet


@dataclass(frozen=True)
class Peer:
    aet: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"


def parse_port(value: Any, what: str = "port") -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"{what} {value!r} is not a number; give a TCP port 1-65535") from None
    if not 0 < port < 65536:
        raise UsageError(f"{what} {port} is out of range; give a TCP port 1-65535")
    return port


def parse_host_port(text: str, what: str) -> tuple[str, int]:
    """``host:port`` or ``[v6addr]:port``."""
    m = re.match(r"^\[([^\]]+)\]:(\d+)$", text) or re.match(r"^([^:@\s]+):(\d+)$", text)
    if not m:
        raise UsageError(f"{what} {text!r} is not HOST:PORT (e.g. 10.0.0.5:104)")
    return m.group(1), parse_port(m.group(2), f"{what} port")


def parse_peer(text: str, default_aet: str = "ANY-SCP") -> Peer:
    """``AET@host:port`` (dcm4che style) or ``host:port``."""
    text = text.strip()
    if "@" in text:
        aet, _, rest = text.rpartition("@")
        aet = check_aet(aet, "called AE title")
    else:
        aet, rest = default_aet, text
    host, port = parse_host_port(rest, "peer")
    return Peer(aet, host, port)


def destinations(config: Any, extra: tuple[str, ...] = ()) -> dict[str, Peer]:
    """Known DICOM nodes by AE title: ``[dserve.destinations]`` plus ``--destination`` flags.

    In config.toml a value is ``"host:port"``, ``"AET@host:port"`` or a table with
    ``host`` and ``port``; the key is the AE title the node is called by.
    """
    out: dict[str, Peer] = {}
    for key, value in config.section("dserve").get("destinations", {}).items():
        try:
            if isinstance(value, dict):
                aet = check_aet(str(value.get("aet", key)))
                out[aet] = Peer(aet, str(value["host"]), parse_port(value.get("port", 104)))
            else:
                peer = parse_peer(str(value), default_aet=check_aet(key))
                out[peer.aet] = peer
        except (UsageError, KeyError) as exc:
            raise ConfigError(f"[dserve.destinations] {key}: {exc}; fix it in {config.path}") from None
    for item in extra:
        if "=" in item:
            aet, _, addr = item.partition("=")
            aet = check_aet(aet, "destination AE title")
            host, port = parse_host_port(addr, "destination")
            out[aet] = Peer(aet, host, port)
        else:
            peer = parse_peer(item, default_aet="")
            if not peer.aet:
                raise UsageError(f"destination {item!r} is not AET=HOST:PORT or AET@HOST:PORT")
            out[peer.aet] = peer
    return out


def set_nodelay(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not TCP (tests with socketpair) or already closed
        pass


def on_conn_open(event: Any) -> None:
    """EVT_CONN_OPEN handler: TCP_NODELAY on the association's socket (acceptor and requestor)."""
    try:
        set_nodelay(event.assoc.dul.socket.socket)
    except AttributeError:
        pass


def nodelay_handlers() -> list[tuple[Any, Any]]:
    from pynetdicom import evt

    return [(evt.EVT_CONN_OPEN, on_conn_open)]


def contexts_for(pairs: set[tuple[str, str]], limit: int = MAX_CONTEXTS) -> list[Any]:
    """Presentation contexts to send files of the given (SOP class, transfer syntax) pairs.

    One context per pair with exactly the file's transfer syntax (so a file goes out as it
    is stored), plus one uncompressed fallback context per SOP class whose files are
    uncompressed but not in Implicit VR Little Endian, the syntax every SCP must accept.
    """
    from pynetdicom.presentation import build_context

    contexts = []
    seen: set[tuple[str, tuple[str, ...]]] = set()

    def add(sop: str, syntaxes: tuple[str, ...]) -> None:
        key = (sop, syntaxes)
        if key not in seen and len(contexts) < limit:
            seen.add(key)
            contexts.append(build_context(sop, list(syntaxes)))

    for sop, ts in sorted(pairs):
        add(sop, (ts,))
    for sop, ts in sorted(pairs):
        if UID(ts) in NATIVE and ts != ImplicitVRLittleEndian:
            add(sop, (ImplicitVRLittleEndian, ExplicitVRLittleEndian))
    return contexts


def count_contexts(pairs: set[tuple[str, str]]) -> int:
    n = len(pairs)
    n += len({sop for sop, ts in pairs if UID(ts) in NATIVE and ts != ImplicitVRLittleEndian})
    return n
