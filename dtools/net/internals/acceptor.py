"""dserve's two changes to pynetdicom's behaviour as an acceptor (pynetdicom 3.x internals).

1. Transfer syntax choice. pynetdicom accepts each presentation context in the first of
   the *acceptor's* syntaxes the requestor offered, so dserve (which supports them all,
   Implicit VR Little Endian first) ignored the caller's order: `storescu` offering
   [JPEG Lossless, Explicit VR LE] for a JPEG file got Implicit VR LE and could not
   send. Here each accepted context takes the caller's first syntax dserve supports;
   in a context where dserve sends C-STOREs (C-GET), the caller's first uncompressed
   one if it offered any, since dserve can deliver every stored instance in it
   (decompressing where needed) but compresses nothing.
2. C-MOVE and C-GET. pynetdicom's SCP for them sends what the handler yields as pydicom
   Datasets (re-encoded: group lengths dropped), answers a refused identifier with
   0xC513 and no comment, and a destination that accepts none of the contexts with
   0xA801. For an AE registered with `serve_retrieve`, its function runs the whole
   request instead (dtools.net.scp.retrieve): the same DIMSE primitives, sent through
   the association's DIMSE provider as pynetdicom's own service classes do.

Upstream, these would be: an acceptor option to honour the requestor's syntax order,
and in the C-MOVE/C-GET handler protocol, a failure status before the destination, and
file paths (sent as stored) as pending sub-operations.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable

from pydicom.uid import UID

log = logging.getLogger("dtools")

_RETRIEVERS: "weakref.WeakKeyDictionary[Any, Callable[..., None]]" = weakref.WeakKeyDictionary()
_installed = False


class UnsupportedPynetdicom(RuntimeError):
    pass


def install() -> None:
    """Install both hooks once per process; raises UnsupportedPynetdicom when pynetdicom
    lacks the internals they replace."""
    global _installed
    if _installed:
        return
    from pynetdicom import acse
    from pynetdicom.service_class import QueryRetrieveServiceClass

    missing = [n for n in ("_move_scp", "_get_scp") if not hasattr(QueryRetrieveServiceClass, n)]
    if missing or not hasattr(acse, "negotiate_as_acceptor"):
        import pynetdicom

        raise UnsupportedPynetdicom(f"pynetdicom {pynetdicom.__version__} is not supported by dserve; install pynetdicom 3.x")
    negotiate = acse.negotiate_as_acceptor

    def negotiate_as_acceptor(rq_contexts: Any, ac_contexts: Any, roles: Any = None) -> Any:
        result, reply_roles = negotiate(rq_contexts, ac_contexts, roles)
        prefer_caller_order(result, rq_contexts, ac_contexts)
        return result, reply_roles

    acse.negotiate_as_acceptor = negotiate_as_acceptor
    for kind in ("move", "get"):
        _route(QueryRetrieveServiceClass, kind)
    _installed = True


def prefer_caller_order(result: Any, rq_contexts: Any, ac_contexts: Any) -> None:
    """Re-choose the transfer syntax of each accepted context (see the module docstring)."""
    offered = {cx.context_id: cx.transfer_syntax for cx in rq_contexts}
    supported = {cx.abstract_syntax: set(cx.transfer_syntax) for cx in ac_contexts}
    for cx in result:
        if cx.result != 0x00:
            continue
        usable = [ts for ts in offered.get(cx.context_id, ()) if ts in supported.get(cx.abstract_syntax, ())]
        if not usable:
            continue
        if cx.as_scu:  # we send C-STOREs on it: a syntax every stored instance can become
            plain = [ts for ts in usable if not UID(ts).is_compressed]
            usable = plain or usable
        cx.transfer_syntax = [usable[0]]


def _route(service_class: Any, kind: str) -> None:
    original = getattr(service_class, f"_{kind}_scp")

    def scp(self: Any, req: Any, context: Any) -> None:
        serve = _RETRIEVERS.get(self.ae)
        if serve is None:
            return original(self, req, context)
        return serve(self, req, context, kind)

    setattr(service_class, f"_{kind}_scp", scp)


def serve_retrieve(ae: Any, serve: Callable[..., None]) -> None:
    """Let `serve(service, request, context, "move" | "get")` answer C-MOVE and C-GET
    requests on associations that `ae` accepts."""
    install()
    _RETRIEVERS[ae] = serve
