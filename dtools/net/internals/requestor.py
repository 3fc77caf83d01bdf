"""A rejection that pynetdicom 3.0 reports as an abort, recovered (3.0.x internals).

ACSE._negotiate_as_requestor waits for the connection (``socket._ready``) and then checks
``socket._is_connected``. When the peer answers the A-ASSOCIATE-RQ with an A-ASSOCIATE-RJ
at once, the DUL thread may have sent the request, read the rejection and closed the
socket (``_is_connected`` False again) before the requesting thread looks. pynetdicom then
takes the connection for failed and aborts, and the A-ASSOCIATE-RJ primitive stays unread
on the DUL's ``to_user_queue``. It happened under load against dserve --allow, which
rejects as soon as the calling AE title has arrived (about 1 connection in 400), and the
user was told the peer could not be reached.
"""

from __future__ import annotations

from typing import Any


def recover_rejection(assoc: Any) -> bool:
    """If ``assoc`` failed with an A-ASSOCIATE-RJ left unread, make it what pynetdicom would
    have made it (``is_rejected``, ``acceptor.primitive``) and return True."""
    if assoc.is_established or assoc.is_rejected:
        return False
    import pynetdicom
    from pynetdicom.pdu_primitives import A_ASSOCIATE

    from . import TUNED_PYNETDICOM

    if not str(pynetdicom.__version__).startswith(TUNED_PYNETDICOM):
        return False
    queue = getattr(getattr(assoc, "dul", None), "to_user_queue", None)
    for primitive in list(getattr(queue, "queue", ())):
        if isinstance(primitive, A_ASSOCIATE) and getattr(primitive, "result", None) in (0x01, 0x02):
            assoc.acceptor.primitive = primitive
            assoc.is_rejected, assoc.is_aborted = True, False
            return True
    return False
