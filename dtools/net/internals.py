"""Every change dtools makes to pynetdicom's internals: here only, and only on 3.0.x.

pynetdicom 3.0 has no setting or hook for any of this, so each piece replaces one method
or module global, and `tune_pynetdicom` installs them all at once, on the releases they
were checked against (TUNED_PYNETDICOM); on any other release it changes nothing and
dserve runs stock pynetdicom. What would make each piece unnecessary upstream is in the
note at the end of this file.

- Reactor wake-ups (`_reactor_sleep`): the association and DUL threads wait on their
  queue or socket instead of sleeping 1 ms between looks.
- The PDU reader (`_read_pdu_data`): pynetdicom reads a PDU with blocking recv() calls on
  a socket without a timeout, trusting the length in its header. One peer that sends
  part of a PDU and waits then holds its DUL thread forever (no ARTIM, no abort, no
  shutdown gets through), and a header announcing 4 GiB makes it buffer whatever
  follows. This reader reads only what has arrived, keeps its thread free, refuses a PDU
  longer than its type allows and one that does not arrive whole within the network
  timeout (A-ABORT, then closes), closes at once on an unknown PDU type (PS3.8 9.3.1),
  and rejects a calling AE title that --allow does not list as soon as its 16 bytes have
  arrived. Complete P-DATA-TF PDUs go to the C-STORE lane (dtools.net.fastpath) first.
- DIMSE: a C-STORE response is encoded directly when that gives pynetdicom's bytes, and a
  C-STORE request pynetdicom finds incomplete (an empty SOP Instance UID) is answered
  0xC210 instead of being ignored until the peer gives up and aborts.
- Negotiation: the acceptor's presentation contexts are not deep-copied per association.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
import time as _time
import weakref
from typing import Any

log = logging.getLogger("dtools")

TUNED_PYNETDICOM = "3.0."  # the releases whose reactor, DUL, DIMSE and negotiation internals were checked
POLL = 0.0002  # seconds; pynetdicom's reactors poll every 1 ms
IDLE_POLL = 0.005  # seconds an idle reactor waits before it looks at its timers and flags again
PENDING_POLL = 0.05  # ... and a DUL waiting for an A-ASSOCIATE-RQ (its only timer is ARTIM)
IDLE_AFTER = 200  # quiet looks (about 0.2 s) after which an association reactor counts as idle

# How long a PDU of each type may be (the PDU length field, PS3.8 9.3). A-ASSOCIATE-RQ/AC:
# 128 presentation contexts with every transfer syntax and two user identity tokens stay
# well under 1 MiB. P-DATA-TF: the maximum length we announced; PDATA_UNANNOUNCED when we
# announced none (0, "unlimited": dtools never does). The others are 4 bytes long.
MAX_ASSOCIATE_PDU = 1 << 20
PDATA_UNANNOUNCED = 64 << 20
MAX_OTHER_PDU = 64
DEFAULT_PDU_TIMEOUT = 60.0  # seconds, when an association has no network timeout
REJECT_LINGER = 2.0  # seconds a rejected peer has to send the rest of its request before we close
_PDU_NAMES = {1: "A-ASSOCIATE-RQ", 2: "A-ASSOCIATE-AC", 3: "A-ASSOCIATE-RJ", 4: "P-DATA-TF",
              5: "A-RELEASE-RQ", 6: "A-RELEASE-RP", 7: "A-ABORT"}
_HEAD = struct.Struct(">BBI")
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
_CALLING_END = 42  # the calling AE title is bytes 26-41 of an A-ASSOCIATE-RQ
CANNOT_UNDERSTAND = 0xC210


# -- reactor wake-ups ------------------------------------------------------------------
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
    it is queued; with neither, it still looks at its timers every IDLE_POLL seconds
    (PENDING_POLL while it waits for an association request). Other sleeps are only shortened.
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
                idle = PENDING_POLL if t.state_machine.current_state == "Sta2" else IDLE_POLL
                ready, _, _ = select.select([sock, wake[0]], [], [], idle)
                if wake[0] in ready:
                    os.read(wake[0], 4096)
                return
            except (OSError, ValueError, TypeError, AttributeError):
                pass
    _time.sleep(min(seconds, poll))


# -- the PDU reader ------------------------------------------------------------------------
class _Rx:
    """The PDU a DUL is receiving: its header so far, then the whole PDU being filled."""

    __slots__ = ("head", "pdu", "got", "deadline", "check_calling", "rejected", "pdata_limit")

    def __init__(self) -> None:
        self.head = b""
        self.pdu: bytearray | None = None
        self.got = 0
        self.deadline = 0.0  # monotonic time by which the PDU must be whole; 0 between PDUs
        self.check_calling = False
        self.rejected = False  # answered A-ASSOCIATE-RJ: read the rest of the request, then close
        self.pdata_limit = 0

    def reset(self) -> None:
        self.head = b""
        self.pdu = None
        self.got = 0
        self.deadline = 0.0
        self.check_calling = False
        self.rejected = False


def _pdu_limit(dul: Any, rx: _Rx, kind: int) -> int:
    if kind == 0x04:
        if not rx.pdata_limit:
            assoc = dul.assoc
            local = assoc.acceptor if assoc.is_acceptor else assoc.requestor
            rx.pdata_limit = local.maximum_length or PDATA_UNANNOUNCED
        return rx.pdata_limit
    return MAX_ASSOCIATE_PDU if kind in (0x01, 0x02) else MAX_OTHER_PDU


def _pdu_timeout(dul: Any) -> float:
    return dul.assoc.network_timeout or DEFAULT_PDU_TIMEOUT


def _peer(dul: Any) -> str:
    assoc = dul.assoc
    info = (assoc.requestor if assoc.is_acceptor else assoc.acceptor).address_info
    return f"{getattr(info, 'address', '?')}:{getattr(info, 'port', '?')}"


def _send_now(raw: socket.socket, data: bytes) -> None:
    """Best effort, never waiting: a peer that does not read must not hold this thread."""
    try:
        raw.send(data, _DONTWAIT)
    except OSError:
        pass


def _drop(dul: Any, rx: _Rx, answer: bytes = b"") -> None:
    """Send `answer` (an A-ABORT PDU), if any, and close the connection now.

    What the peer already sent is read first, up to a bound, so that closing does not
    reset the connection before the peer has read the answer.
    """
    rx.reset()
    raw = dul.socket.socket
    if raw is not None:
        if answer:
            _send_now(raw, answer)
        try:
            raw.shutdown(socket.SHUT_WR)
            for _ in range(16):
                if not raw.recv(65536, _DONTWAIT):
                    break
        except OSError:
            pass
    _wake_acceptor(dul)
    dul.socket.close()  # Evt17: the state machine goes to Sta1


def _abort(dul: Any, rx: _Rx, reason: int, why: str) -> None:
    log.warning("closing the connection from %s: %s (A-ABORT)", _peer(dul), why)
    # A-ABORT PDU, source 2 (service provider), PS3.8 9.3.8
    _drop(dul, rx, _HEAD.pack(0x07, 0, 4) + bytes((0, 0, 2, reason)))


def _closed(dul: Any, rx: _Rx) -> None:
    """The peer closed the connection (or reset it)."""
    rx.reset()
    _wake_acceptor(dul)
    dul.event_queue.put("Evt17")


def _bound_sends(raw: socket.socket, seconds: float) -> None:
    """Make a send() that the peer does not read for `seconds` fail, so that a peer that
    stops reading cannot hold the DUL thread (pynetdicom then closes the connection, Evt17).

    SO_SNDTIMEO, not settimeout(): with a Python timeout every recv() would first poll,
    waiting, even with MSG_DONTWAIT.
    """
    try:
        if raw.gettimeout() is not None:
            raw.settimeout(None)
        sec = int(seconds)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", sec, int((seconds - sec) * 1e6)))
    except (OSError, struct.error):
        pass


def _wake_acceptor(dul: Any) -> None:
    """An acceptor's association thread waits ACSE-timeout seconds for an A-ASSOCIATE-RQ even
    after the connection is gone: end its wait now (None is what its timeout returns)."""
    if dul.assoc.is_acceptor and dul.state_machine.current_state == "Sta2":
        dul.to_user_queue.put(None)


def _reject_calling(dul: Any, rx: _Rx, raw: socket.socket) -> None:
    """A-ASSOCIATE-RJ (rejected-permanent, service-user, calling AE title not recognized) now.

    The connection is closed once the rest of the request has arrived, at most
    REJECT_LINGER seconds later: closing with unread data would reset the connection,
    and the peer might lose the answer before reading it.
    """
    _send_now(raw, _HEAD.pack(0x03, 0, 4) + bytes((0, 1, 1, 3)))
    try:
        raw.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    rx.rejected = True
    rx.deadline = min(rx.deadline, _time.monotonic() + REJECT_LINGER)


def _calling_allowed(dul: Any, pdu: bytearray) -> bool:
    allowed = dul.assoc.ae.require_calling_aet
    calling = bytes(pdu[26:_CALLING_END]).decode("ascii", "replace").strip(" \0")
    if calling in [a.strip() for a in allowed]:
        return True
    log.warning("rejected association from %s (%s); calling AE title not allowed", calling, _peer(dul))
    return False


def _idle(dul: Any) -> bool:
    """pynetdicom has nothing of its own in progress on this association (the lane may take a message)."""
    assoc = dul.assoc
    return (dul.state_machine.current_state == "Sta6" and assoc.dimse.message is None
            and not assoc._sent_release and not dul.event_queue.qsize() and not dul._recv_pdu.qsize()
            and not dul.to_provider_queue.qsize())


def _hand_over(dul: Any, pdu: bytearray) -> None:
    """Give a whole PDU to pynetdicom, as its own reader does after reading it."""
    try:
        decoded, event = dul._decode_pdu(pdu)
    except Exception as exc:  # noqa: BLE001 - an undecodable PDU: the state machine answers Evt19 (PS3.8)
        log.info("undecodable %s from %s: %s", _PDU_NAMES.get(pdu[0], "PDU"), _peer(dul), exc)
        dul.event_queue.put("Evt19")
        return
    dul.event_queue.put(event)
    dul._recv_pdu.put(decoded)


def _install_reader(dul_module: Any) -> None:
    from . import fastpath

    DUL = dul_module.DULServiceProvider
    stock_read = DUL._read_pdu_data
    stock_transport_event = DUL._is_transport_event

    def read_pdu_data(self: Any) -> None:
        raw = getattr(self.socket, "socket", None)
        if type(raw) is not socket.socket:  # TLS: pynetdicom's own reader
            return stock_read(self)
        rx = self.__dict__.get("_dtools_rx")
        if rx is None:
            rx = self._dtools_rx = _Rx()
            _bound_sends(raw, _pdu_timeout(self))
        try:
            if rx.pdu is None:
                chunk = raw.recv(6 - len(rx.head), _DONTWAIT)
                if not chunk:
                    return _closed(self, rx)
                if not rx.head:
                    rx.deadline = _time.monotonic() + _pdu_timeout(self)
                rx.head += chunk
                if len(rx.head) < 6:
                    return None
                kind, _, length = _HEAD.unpack(rx.head)
                if kind not in _PDU_NAMES:
                    return _abort(self, rx, 0x01, f"unknown PDU type 0x{kind:02X}")  # unrecognized-PDU
                limit = _pdu_limit(self, rx, kind)
                if length > limit:
                    return _abort(self, rx, 0x06,  # invalid-PDU-parameter-value
                                  f"{_PDU_NAMES[kind]} announced as {length} bytes, more than {limit}")
                rx.pdu = bytearray(6 + length)
                rx.pdu[:6] = rx.head
                rx.got = 6
                rx.check_calling = (kind == 0x01 and self.assoc.is_acceptor
                                    and bool(self.assoc.ae.require_calling_aet))
            pdu = rx.pdu
            size = len(pdu)
            with memoryview(pdu) as view:
                while rx.got < size:
                    n = raw.recv_into(view[rx.got:], 0, _DONTWAIT)
                    if not n:
                        return _closed(self, rx)
                    rx.got += n
                    if rx.check_calling and rx.got >= _CALLING_END:
                        rx.check_calling = False
                        if not _calling_allowed(self, pdu):
                            _reject_calling(self, rx, raw)
        except (BlockingIOError, InterruptedError):
            return None  # the rest has not arrived yet
        except OSError:
            return _closed(self, rx)
        if rx.rejected:
            return _drop(self, rx)
        rx.reset()
        lane = fastpath.lane_of(self)
        if lane is not None:
            if pdu[0] != 0x04:
                lane.reset()  # a release, an abort: pynetdicom's part
            elif (lane.command is not None or _idle(self)) and fastpath.take(self, lane, pdu):
                return None
        _hand_over(self, pdu)
        return None

    def is_transport_event(self: Any) -> bool:
        rx = self.__dict__.get("_dtools_rx")
        if rx is not None and rx.deadline and _time.monotonic() > rx.deadline:
            if rx.rejected:
                _drop(self, rx)
            else:
                _abort(self, rx, 0x00, f"no whole PDU within {_pdu_timeout(self):g} s")
            return True
        return stock_transport_event(self)

    DUL._read_pdu_data = read_pdu_data
    DUL._is_transport_event = is_transport_event


# -- DIMSE ---------------------------------------------------------------------------------
def _install_dimse(association: Any, dimse: Any) -> None:
    from pynetdicom import evt
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu_primitives import P_DATA

    from . import fastpath

    send_msg = dimse.DIMSEServiceProvider.send_msg

    def send_msg_fast(self: Any, primitive: Any, context_id: int) -> None:
        if (type(primitive) is C_STORE and primitive.MessageIDBeingRespondedTo is not None
                and primitive.Status is not None and primitive.OffendingElement is None
                and primitive.AffectedSOPClassUID and primitive.AffectedSOPInstanceUID
                and primitive.AffectedSOPClassUID.isascii() and primitive.AffectedSOPInstanceUID.isascii()
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
        # Anything else (a UID that is not ASCII: pynetdicom echoes its bytes) the stock way
        send_msg(self, primitive, context_id)

    serve_request = association.Association._serve_request

    def serve_request_answering(self: Any, msg: Any, context_id: int) -> None:
        if type(msg) is C_STORE and msg.MessageID is not None and not msg.is_valid_request and not self._sent_release:
            # pynetdicom would log "unexpected message" and never answer: the peer waits
            # for its DIMSE timeout and aborts. PS3.7 C.4.2: 0xC210, cannot understand.
            missing = [k for k in C_STORE.REQUEST_KEYWORDS if getattr(msg, k) is None]
            comment = "the request has no " + ", ".join(missing)
            log.error("C-STORE from %s refused: %s", self.requestor.ae_title, comment)
            rsp = C_STORE()
            rsp.MessageIDBeingRespondedTo = msg.MessageID
            rsp.AffectedSOPClassUID = msg.AffectedSOPClassUID
            rsp.AffectedSOPInstanceUID = msg.AffectedSOPInstanceUID
            rsp.Status = CANNOT_UNDERSTAND
            rsp.ErrorComment = comment[:64]
            self.dimse.send_msg(rsp, context_id)
            return
        serve_request(self, msg, context_id)

    dimse.DIMSEServiceProvider.send_msg = send_msg_fast
    association.Association._serve_request = serve_request_answering


def tune_pynetdicom(poll: float = POLL) -> None:
    """Install everything above into pynetdicom (once; only on TUNED_PYNETDICOM releases).

    The reactors' logic is unchanged, they only look again sooner; each C-STORE otherwise
    waits through several 1 ms sleeps, which costs more than the store itself.
    """
    import types

    import pynetdicom
    from pynetdicom import association, dimse, dul, transport

    if getattr(association.time, "_dtools", False):
        return
    if not str(pynetdicom.__version__).startswith(TUNED_PYNETDICOM):
        # These are internals; on a version they were not checked against, run stock pynetdicom.
        log.warning("pynetdicom %s is not a %sx release: it runs unmodified, slower and without dserve's "
                    "limits on stalled, oversized or unknown PDUs", pynetdicom.__version__, TUNED_PYNETDICOM)
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

    dul.DULServiceProvider.send_pdu = send_pdu
    _install_reader(dul)
    _install_dimse(association, dimse)
    shim = types.ModuleType("time")
    shim.__dict__.update({k: getattr(_time, k) for k in dir(_time) if not k.startswith("__")})
    shim.sleep = lambda s: _reactor_sleep(s, poll)  # type: ignore[attr-defined]
    shim._dtools = True  # type: ignore[attr-defined]
    association.time = shim
    dul.time = shim


# What we would propose to pynetdicom, each making a piece above unnecessary:
#  1. DULServiceProvider reads without blocking: it keeps the part of a PDU received so
#     far and returns to its loop, so ARTIM, the idle timer, aborts and kill() always get
#     through; the reactor waits in select() on its socket and a wake-up pipe instead of
#     sleeping 1 ms (replaces _read_pdu_data, the time shim and the send_pdu pipe).
#  2. Limits checked against the PDU header before anything is buffered, as AE settings:
#     maximum_associate_rq_length (default 1 MiB), P-DATA-TF no longer than the
#     maximum_pdu_size we announced, and pdu_timeout (a whole PDU within N seconds of its
#     first byte). Unknown PDU types answered with A-ABORT (source 2, reason 1) and the
#     connection closed, in every state.
#  3. AE.maximum_associations counting only associations whose A-ASSOCIATE-RQ is complete,
#     plus AE.maximum_pending_connections for the others (see dtools.net.guard), and the
#     acceptor's wait for the request ending when the connection closes (Sta2 + Evt17).
#  4. require_calling_aet checked as soon as the calling AE title has arrived.
#  5. Association._serve_request answering an incomplete C-STORE request 0xC210, and
#     encoding non-ASCII UIDs in responses without failing.
#  6. A documented hook for whole received PDUs (for the C-STORE lane), and no deepcopy of
#     the supported contexts per association.
