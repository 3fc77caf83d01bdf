"""A direct lane for C-STORE requests on associations dserve accepts.

pynetdicom turns every received PDU into objects, hands it from its DUL thread to the
association thread through queues, decodes the command set with pydicom and encodes the
response the same way: several times the work of storing a small instance. On an
association that qualifies, this lane takes each whole P-DATA-TF PDU in the DUL thread
(dtools.net.internals reads it, within its bounds, and hands it here), and when
it starts a C-STORE request whose command set fits in it, collects the request's data
set and answers it there: the command set is parsed and the response encoded with
struct, and the store itself is dserve's own function, the one its EVT_C_STORE handler
also calls. Everything else (other PDUs, other DIMSE messages, command sets split over
PDUs, data sets pydicom has to decode) goes through pynetdicom unchanged.

An association qualifies when we accepted it over plain TCP, its EVT_C_STORE handler was registered
with `register`, nobody listens to its PDU, data or DIMSE events (those would see
nothing from this lane), and its peer accepts PDUs large enough for the response.
A message starts in the lane only when pynetdicom has nothing of its own in progress
on the association, so the two never interleave. A malformed request (a UID that is not
ASCII or is empty) is left to pynetdicom, which dtools.net.internals makes answer 0xC210.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
from typing import Any, Callable

log = logging.getLogger("dtools")

C_STORE_RQ = 0x0001
NO_DATA_SET = 0x0101
MIN_PEER_PDU = 512  # smaller peer maximum PDU lengths: pynetdicom fragments the response
_PDV = struct.Struct(">IBB")
_ELEM = struct.Struct("<HHI")
# Store functions by the EVT_C_STORE handler they stand in for:
# fn(assoc, context_id, sop_class, sop_instance, transfer_syntax, data) -> (status, comment or None)
_STORES: dict[Any, Callable[..., tuple[int, str | None]]] = {}
_QUIET_EVENTS: tuple[Any, ...] = ()
_FALLBACK = object()


def register(handler: Any, store: Callable[..., tuple[int, str | None]], skip: frozenset[str] = frozenset()) -> None:
    """Let associations whose EVT_C_STORE handler is `handler` store through `store`, except
    data sets in the transfer syntaxes `skip` (those go through the handler)."""
    _STORES[handler] = (store, skip)  # type: ignore[assignment]


def unregister(handler: Any) -> None:
    _STORES.pop(handler, None)


def _uid(value: bytes | memoryview) -> str:
    return bytes(value).rstrip(b"\0 ").decode("ascii")


def parse_command(data: bytes | memoryview) -> dict[int, Any] | None:
    """The elements of an Implicit VR Little Endian command set that a C-STORE request uses,
    by element number; None when it is not well formed."""
    out: dict[int, Any] = {}
    view = memoryview(data)
    pos, end = 0, len(view)
    try:
        while pos < end:
            group, elem, length = _ELEM.unpack_from(view, pos)
            pos += 8
            if group != 0 or pos + length > end:
                return None
            value = view[pos:pos + length]
            pos += length
            if elem in (0x0100, 0x0110, 0x0700, 0x0800, 0x1031):
                if length != 2:
                    return None
                out[elem] = struct.unpack("<H", value)[0]
            elif elem in (0x0002, 0x1000):
                out[elem] = _uid(value)
            elif elem == 0x1030:
                out[elem] = bytes(value).strip(b"\0 ").decode("ascii", "replace")
    except (struct.error, UnicodeDecodeError):
        return None
    return out


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def encode_store_rsp(message_id: int, status: int, sop_class: str, sop_instance: str,
                     comment: str | None = None) -> bytes:
    """A C-STORE-RSP command set (Implicit VR Little Endian, PS3.7 9.3.1.2): byte for byte what
    pynetdicom encodes for the same response (tests compare the two)."""
    cls = _even(sop_class.encode("ascii"), b"\0")
    inst = _even(sop_instance.encode("ascii"), b"\0")
    parts = [
        struct.pack("<HHI", 0, 0x0002, len(cls)), cls,
        struct.pack("<HHIH", 0, 0x0100, 2, 0x8001),  # Command Field: C-STORE-RSP
        struct.pack("<HHIH", 0, 0x0120, 2, message_id),
        struct.pack("<HHIH", 0, 0x0800, 2, NO_DATA_SET),
        struct.pack("<HHIH", 0, 0x0900, 2, status),
    ]
    if comment:
        text = _even(comment[:64].encode("ascii", "replace"), b" ")  # LO
        parts += [struct.pack("<HHI", 0, 0x0902, len(text)), text]
    parts += [struct.pack("<HHI", 0, 0x1000, len(inst)), inst]
    body = b"".join(parts)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def pdata_pdu(context_id: int, command: bytes) -> bytes:
    """A P-DATA-TF PDU holding a whole command set as its last fragment."""
    return struct.pack(">BBIIBB", 0x04, 0, len(command) + 6, len(command) + 2, context_id, 0x03) + command


class Lane:
    """The lane's state for one association: the C-STORE request being received, if any."""

    __slots__ = ("store", "skip", "contexts", "command", "context_id", "data")

    def __init__(self, store: Callable[..., tuple[int, str | None]], skip: frozenset[str],
                 contexts: dict[int, tuple[str, str]]):
        self.store = store
        self.skip = skip
        self.contexts = contexts  # context ID -> (abstract syntax, transfer syntax) we store under
        self.command: dict[int, Any] | None = None
        self.context_id = 0
        self.data = bytearray()

    def reset(self) -> None:
        self.command = None
        self.data = bytearray()


def lane_of(dul: Any) -> Lane | None:
    """The association's lane, decided once it is established; None if it does not qualify."""
    lane = dul.__dict__.get("_dtools_lane", _FALLBACK)
    if lane is not _FALLBACK:
        return lane
    from pynetdicom import evt

    assoc = dul.assoc
    if not assoc.is_established:
        return None  # not decided yet
    lane = None
    handler = assoc.get_handlers(evt.EVT_C_STORE)
    entry = _STORES.get(handler[0]) if isinstance(handler, tuple) else None
    peer_max = assoc.requestor.maximum_length
    plain = isinstance(getattr(dul.socket, "socket", None), socket.socket) and not isinstance(dul.socket.socket, ssl.SSLSocket)
    if (entry is not None and plain and assoc.is_acceptor and (not peer_max or peer_max >= MIN_PEER_PDU)
            and not any(assoc.get_handlers(e) for e in _quiet_events())):
        store, skip = entry
        contexts = {cx.context_id: (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                    for cx in assoc.accepted_contexts if cx.as_scp and cx.transfer_syntax}
        lane = Lane(store, skip, contexts)
    dul._dtools_lane = lane
    return lane


def _quiet_events() -> tuple[Any, ...]:
    global _QUIET_EVENTS
    if not _QUIET_EVENTS:
        from pynetdicom import evt

        _QUIET_EVENTS = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV, evt.EVT_DIMSE_RECV,
                         evt.EVT_DATA_SENT, evt.EVT_PDU_SENT, evt.EVT_DIMSE_SENT)
    return _QUIET_EVENTS


def _pdvs(pdu: bytes | bytearray) -> list[tuple[int, int, memoryview]] | None:
    view = memoryview(pdu)
    out = []
    pos, end = 6, len(view)
    while pos < end:
        if pos + 6 > end:
            return None
        length, cx, control = _PDV.unpack_from(view, pos)
        if length < 2 or pos + 4 + length > end:
            return None
        out.append((cx, control, view[pos + 6:pos + 4 + length]))
        pos += 4 + length
    return out


def take(dul: Any, lane: Lane, pdu: bytes | bytearray) -> bool:
    """Handle a whole P-DATA-TF PDU in the lane; False to give it to pynetdicom instead.

    dtools.net.internals reads the PDU (bounded) and calls this when pynetdicom has nothing
    of its own in progress on the association, or the lane is in the middle of a message.
    """
    pdvs = _pdvs(pdu)
    last = [k for k, (_cx, control, _f) in enumerate(pdvs or ()) if control & 0x03 == 0x02]
    if not pdvs or (last and last[0] != len(pdvs) - 1):
        # empty, malformed, or more after the end of a data set (the next message in the
        # same PDU): pynetdicom's part
        lane.reset()
        return False
    i = 0
    if lane.command is None:
        cx, control, fragment = pdvs[0]
        if control & 0x03 != 0x03:  # not a whole command set in one fragment
            return False
        command = parse_command(fragment)
        context = lane.contexts.get(cx)
        if (command is None or context is None or command.get(0x0100) != C_STORE_RQ
                or command.get(0x0800, NO_DATA_SET) == NO_DATA_SET or 0x0110 not in command
                or not command.get(0x1000) or command.get(0x0002) != context[0]
                or context[1] in lane.skip):
            return False
        lane.command, lane.context_id, lane.data = command, cx, bytearray()
        i = 1
    for cx, control, fragment in pdvs[i:]:
        if control & 0x01 or cx != lane.context_id:
            # a command fragment in the middle of a data set, or another context: not a
            # message this lane understands; pynetdicom answers such a peer
            lane.reset()
            return False
        lane.data += fragment
        if control & 0x02:
            _answer(dul, lane)
            return True
    return True


def _answer(dul: Any, lane: Lane) -> None:
    command, cx = lane.command, lane.context_id
    assert command is not None
    data = lane.data
    lane.reset()
    sop_class, sop_instance = command[0x0002], command[0x1000]
    try:
        status, comment = lane.store(dul.assoc, cx, sop_class, sop_instance, lane.contexts[cx][1], data)
    except Exception as exc:  # noqa: BLE001 - as pynetdicom answers an exception in the handler
        log.error("C-STORE of %s failed: %s", sop_instance, exc)
        status, comment = 0xC211, None
    rsp = encode_store_rsp(command[0x0110], status, sop_class, sop_instance, comment)
    dul.socket.send(pdata_pdu(cx, rsp))
