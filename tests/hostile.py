"""Raw DICOM upper-layer PDUs and sockets for the attacks on dserve (no pynetdicom on this side).

A misbehaving peer does not use a DICOM library: these helpers write the bytes a broken or
hostile client would, and read what dserve answers, always with a bound on the wait.
"""

from __future__ import annotations

import socket
import struct
import time

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, A_RELEASE_RP, A_ABORT = 0x02, 0x03, 0x04, 0x06, 0x07


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def associate_rq(calling: str = "HOSTILE", called: str = "DTOOLS",
                 contexts: tuple[tuple[str, tuple[str, ...]], ...] = ((VERIFICATION, (IMPLICIT_LE,)),),
                 max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2), presentation context IDs 1, 3, 5..."""
    items = _item(0x10, APPLICATION_CONTEXT.encode())
    for k, (abstract, syntaxes) in enumerate(contexts):
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, ts.encode()) for ts in syntaxes)
        items += _item(0x20, struct.pack(">BBBB", 2 * k + 1, 0, 0, 0) + sub)
    items += _item(0x50, _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, b"1.2.826.0.1.3680043.9.9999"))
    body = (struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16)
            + b"\0" * 32 + items)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def pdu_header(kind: int, length: int) -> bytes:
    return struct.pack(">BBI", kind, 0, length)


def pdata(context_id: int, control: int, value: bytes) -> bytes:
    """A P-DATA-TF PDU with one PDV (control: bit 0 command, bit 1 last fragment)."""
    pdv = struct.pack(">IBB", len(value) + 2, context_id, control) + value
    return pdu_header(P_DATA_TF, len(pdv)) + pdv


def release_rq() -> bytes:
    return pdu_header(0x05, 4) + b"\0" * 4


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_pdu(s: socket.socket, timeout: float = 10.0) -> tuple[int, bytes] | None:
    """The next PDU dserve sends (type, body), or None when it closes the connection first.

    Raises TimeoutError when nothing comes within `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    head = _read(s, 6, deadline)
    if len(head) < 6:
        return None
    kind, _, length = struct.unpack(">BBI", head)
    body = _read(s, length, deadline)
    if len(body) < length:
        return None
    return kind, body


def _read(s: socket.socket, n: int, deadline: float) -> bytes:
    out = bytearray()
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"dserve sent {len(out)} of {n} bytes and then nothing")
        s.settimeout(left)
        try:
            chunk = s.recv(n - len(out))
        except socket.timeout:
            raise TimeoutError(f"dserve sent {len(out)} of {n} bytes and then nothing") from None
        except ConnectionResetError:
            return bytes(out)
        if not chunk:
            break
        out += chunk
    return bytes(out)


def closed_after(s: socket.socket, timeout: float) -> float | None:
    """Seconds until dserve closes the connection (reading and dropping what it sends), or None."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        s.settimeout(left)
        try:
            if not s.recv(65536):
                return time.monotonic() - t0
        except socket.timeout:
            return None
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - t0


def associate(port: int, calling: str = "HOSTILE", contexts=((VERIFICATION, (IMPLICIT_LE,)),),
              timeout: float = 10.0) -> socket.socket:
    """A raw connection with an accepted association (asserted)."""
    s = connect(port, timeout)
    s.sendall(associate_rq(calling=calling, contexts=contexts))
    answer = read_pdu(s, timeout)
    assert answer is not None and answer[0] == A_ASSOCIATE_AC, answer
    return s


def stall(port: int, n: int, nbytes: int = 40) -> list[socket.socket]:
    """n connections that each send the first `nbytes` of an A-ASSOCIATE-RQ and then wait."""
    out = []
    rq = associate_rq()
    for _ in range(n):
        s = connect(port)
        s.sendall(rq[:nbytes])
        out.append(s)
    return out


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        try:
            s.close()
        except OSError:
            pass


def _element(elem: int, value: bytes, pad: bytes = b"\0") -> bytes:
    if len(value) % 2:
        value += pad
    return struct.pack("<HHI", 0, elem, len(value)) + value


def c_store_rq(message_id: int, sop_class: bytes, sop_instance: bytes) -> bytes:
    """A C-STORE-RQ command set (Implicit VR Little Endian) with the UIDs exactly as given."""
    body = b"".join((
        _element(0x0002, sop_class),
        _element(0x0100, struct.pack("<H", 0x0001)),
        _element(0x0110, struct.pack("<H", message_id)),
        _element(0x0700, struct.pack("<H", 0)),
        _element(0x0800, struct.pack("<H", 0x0000)),
        _element(0x1000, sop_instance),
    ))
    return _element(0x0000, struct.pack("<I", len(body))) + body


def status_of(pdu: tuple[int, bytes] | None) -> int | None:
    """The Status (0000,0900) of a response command set that came in one P-DATA-TF PDU."""
    if pdu is None or pdu[0] != P_DATA_TF:
        return None
    data = pdu[1][6:]  # PDV length, context ID, control header
    pos = 0
    while pos + 8 <= len(data):
        group, elem, length = struct.unpack_from("<HHI", data, pos)
        if (group, elem) == (0, 0x0900):
            return struct.unpack_from("<H", data, pos + 8)[0]
        pos += 8 + length
    return None


def c_store(s: socket.socket, command: bytes, data_set: bytes, context_id: int = 1,
            timeout: float = 10.0) -> tuple[int, bytes] | None:
    """Send a C-STORE request (command, then data set, one PDU each) and read the answer."""
    s.sendall(pdata(context_id, 0x03, command) + pdata(context_id, 0x02, data_set))
    return read_pdu(s, timeout)
