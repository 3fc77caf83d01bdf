"""Connections that have not associated yet get slots of their own, apart from --max-associations.

pynetdicom counts every accepted connection against AE.maximum_associations from the
moment it is accepted, so a few peers that connect and never finish their A-ASSOCIATE-RQ
turn everybody else away ("local limit exceeded"). Here only associations whose request
is complete count against that limit; the connections still waiting for theirs are
bounded by number (PendingConnections, the oldest from the busiest address turned away)
and, in dtools.net.internals, by time (ARTIM, the network timeout per PDU). Only
pynetdicom's public API is used here.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from pynetdicom import AE

log = logging.getLogger("dtools")

MIN_PENDING = 32  # connections waiting for their association at once: at least this many


def pending_limit(max_associations: int) -> int:
    return max(MIN_PENDING, 2 * max_associations)


def _waiting(assoc: Any) -> bool:
    """An accepted connection whose A-ASSOCIATE-RQ has not been received whole, still open."""
    if not assoc.is_acceptor or assoc.requestor.primitive is not None:
        return False
    if assoc.ident is not None and not assoc.is_alive():
        return False
    raw = getattr(assoc.dul.socket, "socket", None)
    try:
        return raw is not None and raw.fileno() != -1
    except OSError:
        return False


class AcceptorAE(AE):
    """An AE whose association limit counts only associations that have made their request
    and have not ended.

    pynetdicom's negotiation compares len(active_associations) with maximum_associations;
    connections still waiting for their request are left out (PendingConnections bounds them),
    and so are associations already released or aborted whose threads are still winding
    down (under load, for a moment, they turned away the next caller as over the limit).
    """

    @property
    def active_associations(self) -> list[Any]:
        return [a for a in super().active_associations
                if (not a.is_acceptor or a.requestor.primitive is not None) and not (a.is_released or a.is_aborted)]


class PendingConnections:
    """At most `limit` accepted connections waiting for their association request.

    One more arriving turns away the oldest from the address with the most waiting
    connections (A-ASSOCIATE-RJ, temporary congestion, then closed): a peer that opens
    many connections and stalls them pushes out its own first, and a client that sends
    its request at once (within milliseconds) is never the oldest.
    """

    def __init__(self, limit: int = MIN_PENDING):
        self.limit = limit
        self.lock = threading.Lock()
        self.entries: list[tuple[float, str, Any]] = []  # (accepted at, address, association)

    def on_open(self, event: Any) -> None:
        """EVT_CONN_OPEN handler, in the thread that accepted the connection."""
        assoc = event.assoc
        if not assoc.is_acceptor:
            return
        address = str(event.address[0]) if event.address else "?"
        with self.lock:
            self.entries = [e for e in self.entries if _waiting(e[2])]
            self.entries.append((time.monotonic(), address, assoc))
            victims = []
            while len(self.entries) > self.limit:
                victim = self._oldest_of_busiest()
                self.entries.remove(victim)
                victims.append(victim)
        for since, addr, victim in victims:
            log.warning("turned away a connection from %s that had not sent its association request in "
                        "%.1f s (%d connections waiting)", addr, time.monotonic() - since, self.limit)
            turn_away(victim)

    def _oldest_of_busiest(self) -> tuple[float, str, Any]:
        counts: dict[str, int] = {}
        for _t, addr, _a in self.entries:
            counts[addr] = counts.get(addr, 0) + 1
        busiest = max(counts.values())
        return min((e for e in self.entries if counts[e[1]] == busiest), key=lambda e: e[0])

    def waiting(self) -> int:
        with self.lock:
            return sum(1 for e in self.entries if _waiting(e[2]))

    def close_all(self) -> None:
        """Close every waiting connection (at shutdown: they have nothing to finish)."""
        with self.lock:
            entries, self.entries = self.entries, []
        for _t, _addr, assoc in entries:
            if _waiting(assoc):
                turn_away(assoc)


def turn_away(assoc: Any) -> None:
    """A-ASSOCIATE-RJ (transient, service provider, temporary congestion) and close.

    Closing wakes the association's DUL thread, which sees the end of the connection and
    ends the association (dtools.net.internals).
    """
    raw = getattr(assoc.dul.socket, "socket", None)
    if raw is None:
        return
    try:
        raw.send(b"\x03\x00\x00\x00\x00\x04\x00\x02\x03\x01", getattr(socket, "MSG_DONTWAIT", 0))
    except OSError:
        pass
    try:
        raw.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
