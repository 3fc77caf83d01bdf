"""dserve's listening AE: association settings, start and orderly shutdown, and the services
it is made of (storage.py, query.py, retrieve.py; Verification is answered here).

A service is an object built with the Server that binds its DIMSE handlers in `handlers()`.
Associations that call a peer's AE title are answered on the same port by the bridge
(bridge.py), which the Query and Retrieve services hand them to.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ...errors import ConfigError
from .. import fastpath, guard
from ..internals import acceptor as hooks
from ..common import Peer, nodelay_handlers, quiet_pynetdicom, set_nodelay, tune_pynetdicom
from ..indexproc import IndexProcess
from .query import QueryService
from .retrieve import RetrieveService
from .statuses import SUCCESS
from .storage import PYDICOM_ONLY, StorageService

log = logging.getLogger("dtools")
LISTEN_BACKLOG = 128  # connections the kernel queues for dserve to accept


@dataclass
class ServerSettings:
    aet: str
    bind: str
    port: int
    archive: Path
    index_path: Path
    allow: list[str] = field(default_factory=list)
    destinations: dict[str, Peer] = field(default_factory=dict)
    max_associations: int = 10
    timeout: float = 60.0
    batch: int = 200
    sync: str = "always"  # "always": fsync before answering C-STORE; "batch": fsync with the index batch
    any_called_aet: bool = False  # accept associations whatever AE title they call
    bridges: dict[str, str] = field(default_factory=dict)  # a peer's AE title -> the peer ([peers.NAME] aet)
    live_peers: set[str] = field(default_factory=set)  # bridged peers asked live ([peers.NAME] live)
    bridge_wait: float = 300.0  # how long a bridged C-MOVE/C-GET waits for the peer's study
    forward_expiry: float = 7 * 86400.0  # how long a deferred forward waits for its study
    config: Any = None  # the site's Config: the bridge asks peers through the relay


class Server:
    """One listening AE; start(), then shutdown(grace) from the main thread."""

    def __init__(self, settings: ServerSettings, emit: Callable[[dict], None], records_fd: int | None = None):
        quiet_pynetdicom()
        tune_pynetdicom()
        try:
            hooks.install()
        except hooks.UnsupportedPynetdicom as exc:
            raise ConfigError(str(exc)) from None
        from pynetdicom import _config

        _config.STORE_SEND_CHUNKED_DATASET = True  # C-MOVE/C-GET stream stored files as they are
        self.s = settings
        self.emit = emit
        self.stopping = False
        self.force = False  # a second signal: abort associations now
        self.fatal: str | None = None
        self.fatal_event = threading.Event()
        self.started = time.time()
        self._server: Any = None
        self.storage = StorageService(self)
        self.query = QueryService(self)
        self.retrieve = RetrieveService(self)
        self.bridge = None
        if settings.bridges:
            from .bridge import Bridge

            self.bridge = Bridge(self)
        self.indexer = IndexProcess(settings.index_path, emit, self._on_fatal, settings.batch,
                                    sync_files=settings.sync == "batch", records_fd=records_fd)
        self.indexer.start()  # its start-up overlaps ours; start() waits until it is ready
        self.pending = guard.PendingConnections(guard.pending_limit(settings.max_associations))
        self.ae = self._make_ae()
        hooks.serve_retrieve(self.ae, self.retrieve.serve)

    @property
    def stored(self) -> int:
        return self.storage.stored

    @property
    def inflight(self) -> Any:
        return self.storage.inflight

    # -- setup ---------------------------------------------------------------------
    def _make_ae(self) -> Any:
        from pynetdicom import ALL_TRANSFER_SYNTAXES
        from pynetdicom.presentation import AllStoragePresentationContexts
        from pynetdicom.sop_class import (
            PatientRootQueryRetrieveInformationModelFind,
            PatientRootQueryRetrieveInformationModelGet,
            PatientRootQueryRetrieveInformationModelMove,
            StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelGet,
            StudyRootQueryRetrieveInformationModelMove,
            Verification,
        )

        ae = guard.AcceptorAE(ae_title=self.s.aet)  # counts only associations that made their request
        ae.maximum_associations = self.s.max_associations
        ae.network_timeout = self.s.timeout
        ae.acse_timeout = min(self.s.timeout, 30)
        ae.dimse_timeout = self.s.timeout
        ae.connection_timeout = min(self.s.timeout, 30)  # C-MOVE's associations to destinations
        ae.require_calling_aet = list(self.s.allow)
        ae.require_called_aet = not self.s.any_called_aet
        ae.add_supported_context(Verification)
        # Storage: accepted as SCP (peers send to us) and, for C-GET, with the peer as SCP.
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
        for sop in (
            PatientRootQueryRetrieveInformationModelFind,
            PatientRootQueryRetrieveInformationModelMove,
            PatientRootQueryRetrieveInformationModelGet,
            StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelMove,
            StudyRootQueryRetrieveInformationModelGet,
        ):
            ae.add_supported_context(sop)
        return ae

    def handlers(self) -> list[tuple[Any, Any]]:
        from pynetdicom import evt

        # C-MOVE and C-GET reach self.retrieve through dtools.net.internals.acceptor, not through events.
        return [
            *nodelay_handlers(),
            (evt.EVT_CONN_OPEN, self.pending.on_open),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.storage.on_store),
            (evt.EVT_C_FIND, self.query.on_find),
            *([(evt.EVT_REQUESTED, self.bridge.on_requested)] if self.bridge is not None else []),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_REJECTED, self.on_rejected),
        ]

    def start(self) -> None:
        """Bind and serve in background threads; raises OSError if the port cannot be bound."""
        if not self.indexer.ready.wait(60):
            self.indexer.error = "the indexer did not start within 60 s"
        if self.indexer.error:
            raise ConfigError(self.indexer.error + "; check --home or [index] path")
        # socketserver listens with a backlog of 5: a burst of callers (24 dstores at once)
        # overflowed it under load, and a connection the kernel then reset was reported as
        # "cannot reach" although dserve would have answered. request_queue_size is the
        # documented attribute for it (pynetdicom.transport.AssociationServer).
        from pynetdicom.transport import ThreadedAssociationServer

        ThreadedAssociationServer.request_queue_size = LISTEN_BACKLOG
        self._server = self.ae.start_server(
            (self.s.bind, self.s.port), block=False, evt_handlers=self.handlers(), ae_title=self.s.aet
        )
        set_nodelay(self._server.socket)  # accepted sockets inherit it on Linux; EVT_CONN_OPEN sets it anyway
        self.s.port = self._server.server_address[1]
        fastpath.register(self.storage.on_store, self.storage.store, PYDICOM_ONLY)
        threading.Thread(target=self._clean_temporaries, name="dserve-clean", daemon=True).start()

    def _on_fatal(self, message: str) -> None:
        self.fatal = message
        self.fatal_event.set()

    def _clean_temporaries(self) -> None:
        """Remove temporaries a killed dserve left in the archive (never ones being written now)."""
        root = self.s.archive
        if not root.exists():
            return
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                if name.startswith(".") and name.endswith(".tmp"):
                    p = os.path.join(dirpath, name)
                    try:
                        if os.stat(p).st_mtime < self.started - 1:
                            os.unlink(p)
                            log.info("removed stale temporary %s", p)
                    except OSError:
                        pass

    def shutdown(self, grace: float = 10.0) -> None:
        """Stop accepting, let running associations finish for `grace` seconds, abort the
        rest, wait for files being written, then commit the index."""
        if self._server is None:
            self._stop_indexer()
            return
        self.stopping = True
        fastpath.unregister(self.storage.on_store)
        server, self._server = self._server, None
        server.shutdown()
        self.pending.close_all()
        deadline = time.monotonic() + grace
        # Only associations that are established get the grace period: a connection that
        # never sent an A-ASSOCIATE-RQ (a port probe) would otherwise hold it for its ACSE timeout.
        while (time.monotonic() < deadline and not self.force
               and any(a.is_established for a in server.active_associations)):
            time.sleep(0.05)
        for assoc in server.active_associations:
            if assoc.is_established:
                log.warning("aborting association from %s at shutdown", assoc.requestor.ae_title)
            else:
                log.info("closing a connection from %s that never associated", assoc.requestor.address)
            assoc.abort()
        self.inflight.wait_idle(30)
        self._stop_indexer()

    def _stop_indexer(self) -> None:
        self.indexer.stop(timeout=120)

    # -- events ---------------------------------------------------------------------
    def on_accepted(self, event: Any) -> None:
        r = event.assoc.requestor
        called = str(event.assoc.acceptor.ae_title or "").strip()
        log.info("association from %s (%s:%s)%s", r.ae_title, r.address, r.port,
                 f" to {called} ({self.s.bridges[called]}, bridged)" if called in self.s.bridges else "")

    def on_rejected(self, event: Any) -> None:
        assoc = event.assoc
        r = assoc.requestor
        rq = getattr(r, "primitive", None)
        called = str(getattr(rq, "called_ae_title", "") or "").strip()
        rj = getattr(assoc.acceptor, "primitive", None)  # the A-ASSOCIATE-RJ we sent
        known = {(1, 3): "calling AE title not allowed (--allow)",
                 (3, 1): "too many connections waiting to associate",
                 (3, 2): f"more than {self.s.max_associations} associations (--max-associations)"}
        reason = known.get((getattr(rj, "result_source", None), getattr(rj, "diagnostic", None)))
        if reason:
            why = reason
        elif not self.s.any_called_aet and called != self.s.aet and called not in self.s.bridges:
            known = ", ".join(repr(a) for a in [self.s.aet, *self.s.bridges])
            why = f"it called AE title {called!r}, not {known} (see --any-called-aet)"
        elif self.s.allow and r.ae_title not in self.s.allow:
            why = "calling AE title not allowed (--allow)"
        else:
            why = f"more than {self.s.max_associations} associations (--max-associations)"
        log.warning("rejected association from %s (%s): %s", r.ae_title, r.address, why)

    def on_echo(self, event: Any) -> int:
        return SUCCESS
