"""pynetdicom's reactor threads woken by their work instead of polling every millisecond (3.0.x internals)."""

from __future__ import annotations

import os
import select
import threading
import time as _time
import types
import weakref
from typing import Any

POLL = 0.0002  # seconds; pynetdicom's reactors poll every 1 ms
IDLE_POLL = 0.005  # seconds an idle reactor waits before it looks at its timers and flags again
PENDING_POLL = 0.05  # ... and a DUL waiting for an A-ASSOCIATE-RQ (its only timer is ARTIM)
IDLE_AFTER = 200  # quiet looks (about 0.2 s) after which an association reactor counts as idle


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


def install(association: Any, dul: Any, poll: float = POLL) -> None:
    """send_pdu writes the wake-up pipe; both reactor modules sleep through _reactor_sleep."""
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
    shim = types.ModuleType("time")
    shim.__dict__.update({k: getattr(_time, k) for k in dir(_time) if not k.startswith("__")})
    shim.sleep = lambda s: _reactor_sleep(s, poll)  # type: ignore[attr-defined]
    shim._dtools = True  # type: ignore[attr-defined]
    association.time = shim
    dul.time = shim


def installed(association: Any) -> bool:
    return getattr(association.time, "_dtools", False)
