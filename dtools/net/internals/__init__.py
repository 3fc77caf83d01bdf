"""Every change dtools makes to pynetdicom's internals: here only, and only on 3.0.x.

pynetdicom 3.0 has no setting or hook for any of this, so each piece replaces one method
or module global, and `tune_pynetdicom` installs them all at once, on the releases they
were checked against (TUNED_PYNETDICOM); on any other release it changes nothing and
dserve runs stock pynetdicom. The pieces are in this package's modules; only this file
installs them. What would make each unnecessary upstream is in the note at its end.

- `reactor`: the association and DUL threads wait on their queue, socket or a wake-up
  pipe instead of sleeping 1 ms between looks.
- `reader`: the DUL reads PDUs without blocking and within bounds (length by PDU type,
  time to arrive whole, unknown types, --allow as soon as the calling AE title is in),
  and hands whole P-DATA-TF PDUs to the C-STORE lane (dtools.net.fastpath) first.
- `dimse`: C-STORE responses encoded directly when that gives pynetdicom's bytes, and
  incomplete C-STORE requests (an empty SOP Instance UID) answered 0xC210 instead of
  being ignored until the peer gives up and aborts.
- Here: the acceptor's presentation contexts are not deep-copied per association.
- `requestor`: an A-ASSOCIATE-RJ that arrives before the requesting thread has looked at
  the connection is reported as a rejection, not as a failed connection (dstore, C-MOVE).
  It only reads what pynetdicom left behind; called after every association request.
- `acceptor`: the transfer syntax a context is accepted in (the caller's order), and
  C-MOVE/C-GET served by dserve itself (stored bytes sent as they are, its own statuses).
  Unlike the pieces above, dserve's retrieve needs it: on a pynetdicom without the
  internals it uses, dserve refuses to start (`acceptor.UnsupportedPynetdicom`).
"""

from __future__ import annotations

import logging

from .reactor import IDLE_AFTER, IDLE_POLL, POLL, _reactor_sleep  # noqa: F401 - tests and benchmarks use them

log = logging.getLogger("dtools")

TUNED_PYNETDICOM = "3.0."  # the releases whose reactor, DUL, DIMSE and negotiation internals were checked


def tune_pynetdicom(poll: float = POLL) -> None:
    """Install every piece into pynetdicom (once; only on TUNED_PYNETDICOM releases).

    The reactors' logic is unchanged, they only look again sooner; each C-STORE otherwise
    waits through several 1 ms sleeps, which costs more than the store itself.
    """
    import pynetdicom
    from pynetdicom import association, dimse, dul, transport

    from . import dimse as dimse_patch, reactor, reader

    if reactor.installed(association):
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
    reader.install(dul)
    dimse_patch.install(association, dimse)
    reactor.install(association, dul, poll)


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
#  7. ACSE._negotiate_as_requestor deciding whether the connection failed from the
#     T_CONNECT result (or waiting for the response whenever the request was sent), not
#     from socket._is_connected, which a fast A-ASSOCIATE-RJ has already reset (requestor).
