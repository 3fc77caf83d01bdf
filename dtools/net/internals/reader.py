"""A bounded PDU reader for pynetdicom's DUL (3.0.x internals).

pynetdicom reads a PDU with blocking recv() calls on a socket without a timeout, trusting
the length in its header: a peer that sends part of a PDU and waits holds the DUL thread
for ever (no ARTIM, no abort, no shutdown gets through), and a header announcing 4 GiB
makes it buffer whatever follows. This reader reads only what has arrived and keeps its
thread free; refuses, from the header, a PDU longer than its type allows, and one that
does not arrive whole within the network timeout (A-ABORT, then closes); closes at once
on an unknown PDU type (PS3.8 9.3.1); rejects a calling AE title that --allow does not
list as soon as its 16 bytes are in; ends an acceptor's wait for the request when the
connection closes; and bounds sends, so a peer that stops reading cannot hold the
thread either. Whole P-DATA-TF PDUs go to the C-STORE lane (dtools.net.fastpath) first.
TLS connections keep pynetdicom's own reader.
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import time as _time
from typing import Any

log = logging.getLogger("dtools")

# How long a PDU of each type may be (the PDU length field, PS3.8 9.3). A-ASSOCIATE-RQ/AC:
# 128 presentation contexts with every transfer syntax and two user identity tokens stay
# well under 1 MiB. P-DATA-TF: the maximum length we announced; PDATA_UNANNOUNCED when we
# announced none (0, "unlimited": dtools never does). The others are 4 bytes long.
MAX_ASSOCIATE_PDU = 1 << 20
PDATA_UNANNOUNCED = 64 << 20
MAX_OTHER_PDU = 64
DEFAULT_PDU_TIMEOUT = 60.0  # seconds, when an association has no network timeout
PARTIAL_WAIT = 0.002  # seconds the reader waits in place for the rest of a PDU before it returns
REJECT_LINGER = 2.0  # seconds a rejected peer has to send the rest of its request before we close
_PDU_NAMES = {1: "A-ASSOCIATE-RQ", 2: "A-ASSOCIATE-AC", 3: "A-ASSOCIATE-RJ", 4: "P-DATA-TF",
              5: "A-RELEASE-RQ", 6: "A-RELEASE-RP", 7: "A-ABORT"}
_HEAD = struct.Struct(">BBI")
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
_CALLING_END = 42  # the calling AE title is bytes 26-41 of an A-ASSOCIATE-RQ


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
    after the connection is gone: end its wait now (None is what its timeout returns).

    Sta1 too: a request read before the reactor has processed Evt5 (the connection) is
    rejected and closed while the state machine is still in Sta1; those threads used to
    wait out the ACSE timeout, one per rejected connection."""
    assoc = dul.assoc
    if (assoc.is_acceptor and dul.state_machine.current_state in ("Sta1", "Sta2")
            and assoc.requestor.primitive is None and not dul.to_user_queue.qsize()):
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


def install(dul_module: Any) -> None:
    from .. import fastpath

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
            waited = False
            with memoryview(pdu) as view:
                while rx.got < size:
                    try:
                        n = raw.recv_into(view[rx.got:], 0, _DONTWAIT)
                    except BlockingIOError:
                        if waited:
                            raise
                        # Peers often write a PDU's header and its body separately: the body
                        # is usually a moment behind. Wait that moment here, not a trip
                        # through the reactor loop.
                        waited = True
                        select.select([raw], [], [], PARTIAL_WAIT)
                        continue
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
