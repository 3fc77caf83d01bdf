"""Pieces both DICOM roles share: peer addresses, AE titles, TCP_NODELAY, presentation contexts.

pynetdicom never sets TCP_NODELAY; without it every small PDU waits for a delayed ACK
(10-75x slower on loopback), so every association socket we own gets it here.
"""

from __future__ import annotations

import logging
import os
import re
import select
import socket
import threading
import time as _time
import weakref
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


POLL = 0.0002  # seconds; pynetdicom's reactors poll every 1 ms
IDLE_POLL = 0.005  # seconds an idle reactor waits before it looks at its timers and flags again
IDLE_AFTER = 200  # quiet looks (about 0.2 s) after which an association reactor counts as idle
TUNED_PYNETDICOM = "3.0."  # the releases whose reactor, DIMSE and negotiation internals tune_pynetdicom was checked against


def _waker(dul: Any) -> tuple[int, int] | None:
    """The pipe that wakes a DUL reactor when a PDU is queued for it to send (made on first use)."""
    wake = dul.__dict__.get("_dtools_wake")
    if wake is None:
        try:
            r, w = os.pipe()
        except OSError:  # out of file descriptors: poll instead
            return None
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        wake = dul._dtools_wake = (r, w)
        weakref.finalize(dul, _close_pipe, r, w)
    return wake


def _close_pipe(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _reactor_sleep(seconds: float, poll: float = POLL) -> None:
    """time.sleep for pynetdicom's reactor threads, woken by the work they wait for.

    An association's reactor sleeps 1 ms between looks at its DIMSE queue: wait on the
    queue instead, so a request is served as soon as it is decoded. The DUL reactor
    sleeps between looks at its socket and at the PDUs queued for it to send: wait on
    the socket and on a pipe that send_pdu writes to, so a response leaves as soon as
    it is queued; with neither, it still looks at its timers every IDLE_POLL seconds.
    Other sleeps are only shortened.
    """
    if seconds >= 0.001:
        t = threading.current_thread()
        q = getattr(getattr(t, "dimse", None), "msg_queue", None)
        if q is not None:
            # After IDLE_AFTER quiet looks in a row, an association we accepted looks only
            # every IDLE_POLL: idle, it then costs a few hundred wake-ups a second, not a
            # thousand. A request still wakes it at once; a release request waits at most
            # IDLE_POLL. Not for associations we requested: their send_*() calls wait for
            # the reactor to pause, which it does only between looks.
            quiet = t.__dict__.get("_dtools_quiet", 0) if getattr(t, "is_acceptor", False) else 0
            with q.not_empty:
                if not q._qsize():
                    q.not_empty.wait(IDLE_POLL if quiet >= IDLE_AFTER else seconds)
                t._dtools_quiet = 0 if q._qsize() else quiet + 1
                if q._qsize():
                    # The put that woke us notified one waiter: pass it on, in case a
                    # send_*() call is blocked in get() for this very message (pynetdicom
                    # pauses the reactor for those, but not before it may be waiting here).
                    q.not_empty.notify()
            return
        sock = getattr(getattr(t, "socket", None), "socket", None)
        if sock is not None and getattr(t, "event_queue", None) is not None:
            wake = _waker(t)
            try:
                if wake is None:
                    select.select([sock], [], [], poll)
                    return
                ready, _, _ = select.select([sock, wake[0]], [], [], IDLE_POLL)
                if wake[0] in ready:
                    os.read(wake[0], 4096)
                return
            except (OSError, ValueError, TypeError):
                pass
    _time.sleep(min(seconds, poll))


def tune_pynetdicom(poll: float = POLL) -> None:
    """Make pynetdicom's polling reactors react at once, and answer C-STORE with less work.

    Each C-STORE otherwise waits through several 1 ms sleeps, which costs more than the
    store itself (see _reactor_sleep); the reactors' logic is unchanged, they only look
    again sooner. A C-STORE response (without an offending element, nobody listening for
    sent DIMSE messages) is encoded directly into one P-DATA primitive instead of through a
    pydicom Dataset: the same bytes (tests compare them with pynetdicom's own encoding).
    And C-STORE requests on associations dserve accepts take the lane of
    dtools.net.fastpath when its handler registered there.
    """
    import types

    import pynetdicom
    from pynetdicom import association, dimse, dul, evt, transport
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu_primitives import P_DATA

    from . import fastpath

    if getattr(association.time, "_dtools", False):
        return
    if not str(pynetdicom.__version__).startswith(TUNED_PYNETDICOM):
        # These are internals; on a version they were not checked against, run stock pynetdicom.
        logging.getLogger("dtools").debug("pynetdicom %s: reactor tuning skipped", pynetdicom.__version__)
        return
    # Every accepted association deep-copies the server's ~180 presentation contexts
    # (30 ms, most of a C-FIND's latency). Negotiation only reads them and builds new
    # result contexts, so a new list of the same contexts is enough.
    deep = transport.deepcopy
    transport.deepcopy = lambda value, memo=None: list(value) if isinstance(value, list) else deep(value, memo)

    queue_pdu = dul.DULServiceProvider.send_pdu

    def send_pdu(self: Any, primitive: Any) -> None:
        queue_pdu(self, primitive)
        wake = self.__dict__.get("_dtools_wake")
        if wake is not None:
            try:
                os.write(wake[1], b"\0")
            except OSError:  # pipe full (the reactor is awake anyway) or closed
                pass

    send_msg = dimse.DIMSEServiceProvider.send_msg

    def send_msg_fast(self: Any, primitive: Any, context_id: int) -> None:
        if (type(primitive) is C_STORE and primitive.MessageIDBeingRespondedTo is not None
                and primitive.Status is not None and primitive.OffendingElement is None
                and primitive.AffectedSOPClassUID and primitive.AffectedSOPInstanceUID
                and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)):
            command = fastpath.encode_store_rsp(primitive.MessageIDBeingRespondedTo, primitive.Status,
                                                primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID,
                                                primitive.ErrorComment)
            limit = self.maximum_pdu_size
            if not limit or len(command) + 6 <= limit:
                pdata = P_DATA()
                pdata.presentation_data_value_list.append((context_id, b"\x03" + command))  # last command fragment
                self.dul.send_pdu(pdata)
                return
        send_msg(self, primitive, context_id)

    dul.DULServiceProvider.send_pdu = send_pdu
    dimse.DIMSEServiceProvider.send_msg = send_msg_fast
    fastpath.install()
    shim = types.ModuleType("time")
    shim.__dict__.update({k: getattr(_time, k) for k in dir(_time) if not k.startswith("__")})
    shim.sleep = lambda s: _reactor_sleep(s, poll)  # type: ignore[attr-defined]
    shim._dtools = True  # type: ignore[attr-defined]
    association.time = shim
    dul.time = shim


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
