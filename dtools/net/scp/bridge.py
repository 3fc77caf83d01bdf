"""The bridge: another site as one more DICOM node on this site's network.

An association that calls a peer's AE title (``[peers.NAME] aet``) is answered on that
peer's behalf. C-FIND answers from the copy of the peer's catalog in the index (NEARLINE,
RetrieveAETitle the peer's), or asks the peer live through the relay (IMAGE level, or
``live = true``). C-MOVE and C-GET ask the peer for the studies through the relay (a
retrieve request, as dretrieve sends), take delivery of the envelopes that answer it
(opened, archived, indexed and acknowledged, as ``dretrieve --wait`` does), then send the
instances on from the local archive with the Retrieve service's own sub-operations,
sending Pending responses while they travel. A C-MOVE whose study has not arrived within
``[dserve] bridge_wait`` ends with 0xA702 and is kept as a deferred forward: dserve's relay
pass stores the study to the destination when it arrives (forwards.py).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Iterator

from pydicom.dataset import Dataset

from ...errors import ConfigError, DtoolsError, RemoteError, TempFailure
from .query import LEVELS, identifier_keys, model_of, query_level, response
from .retrieve import Request
from .statuses import (
    CANNOT_UNDERSTAND,
    IDENTIFIER_MISMATCH,
    OUT_OF_RESOURCES,
    PENDING,
    SUCCESS,
    QueryError,
    status,
)

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("dtools")

TICK = 5.0  # seconds between Pending responses while a peer's study is on its way
NOT_DELIVERED = 0xA702  # Refused: Out of Resources - Unable to perform sub-operations
PEER_REFUSED = 0xC001  # Failed: Unable to process (the peer refused: no grant, expired...)
# C-FIND's Refused: Out of Resources (PS3.4 C.4.1.1.4): the peer did not answer within the
# DIMSE timeout, or the question could not be sent (relay unreachable, refused the login)
FIND_UNANSWERED = OUT_OF_RESOURCES
# C-MOVE/C-GET's Refused: Out of Resources - Unable to calculate number of matches: the
# request could not be sent, so nothing is known of the peer's matches
RELAY_FAILED = 0xA701


class Bridge:
    def __init__(self, server: "Server"):
        self.server = server
        self.peers: dict[str, str] = dict(server.s.bridges)  # AE title -> peer name

    # -- associations ---------------------------------------------------------------
    def on_requested(self, event: Any) -> None:
        """EVT_REQUESTED: an association calling a peer's AE title is answered as that AE.

        pynetdicom accepts only associations that call the acceptor's AE title; the acceptor
        of this one association takes the peer's, before negotiation compares them."""
        rq = event.assoc.requestor.primitive
        called = str(getattr(rq, "called_ae_title", "") or "").strip()
        if called in self.peers:
            event.assoc.acceptor.ae_title = called

    def peer_of(self, assoc: Any) -> str | None:
        return self.peers.get(str(assoc.acceptor.ae_title or "").strip())

    # -- C-FIND -------------------------------------------------------------------------
    def find(self, event: Any, peer: str) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        calling = event.assoc.requestor.ae_title
        aet = str(event.assoc.acceptor.ae_title).strip()
        try:
            ident = event.identifier
            level = query_level(ident, model_of(event.request.AffectedSOPClassUID))
            keys, wanted = identifier_keys(ident)
        except QueryError as exc:
            log.error("C-FIND to %s from %s refused: %s", aet, calling, exc)
            yield status(exc.code, str(exc)), None
            return
        except Exception:  # noqa: BLE001
            yield status(CANNOT_UNDERSTAND, "cannot decode the identifier"), None
            return
        live = level == "IMAGE" or peer in self.server.s.live_peers
        try:
            rows = self._live(peer, LEVELS[level], keys) if live else self._catalog(peer, LEVELS[level], keys)
        except _PeerSilent as exc:
            log.error("C-FIND to %s from %s: %s", aet, calling, exc)
            yield status(FIND_UNANSWERED, str(exc)), None
            return
        except _PeerRefused as exc:
            log.error("C-FIND to %s from %s: %s", aet, calling, exc)
            yield status(PEER_REFUSED, str(exc)), None
            return
        except (RemoteError, TempFailure, ConfigError) as exc:
            log.error("C-FIND to %s from %s: cannot ask %s: %s", aet, calling, peer, exc)
            yield status(FIND_UNANSWERED, f"cannot ask {peer}: {exc}"), None
            return
        except DtoolsError as exc:
            log.error("C-FIND to %s from %s refused: a key value cannot be understood", aet, calling)
            log.info("C-FIND refused: %s", exc)
            yield status(CANNOT_UNDERSTAND, str(exc)), None
            return
        except Exception as exc:  # noqa: BLE001 - sqlite busy, disk errors, the relay
            log.error("C-FIND to %s failed: %s", aet, exc)
            yield status(OUT_OF_RESOURCES, "query failed"), None
            return
        n = 0
        for row in rows:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            n += 1
            yield PENDING, response(wanted, row, level, aet, availability="NEARLINE")
        log.info("C-FIND %s level to %s (%s%s) from %s: %d matches", level, aet, peer, ", live" if live else "",
                 calling, n)
        yield SUCCESS, None

    def _catalog(self, peer: str, level: str, keys: dict[str, str]) -> list[dict]:
        from ...index.db import open_index
        from ...index.query import find, peer_scope

        if not self.server.s.index_path.exists():
            return []
        conn = open_index(self.server.s.index_path, readonly=True)
        try:
            return list(find(conn, level, keys, strict=False, scope=peer_scope([peer])))
        finally:
            conn.close()

    def _live(self, peer: str, level: str, keys: dict[str, str]) -> list[dict]:
        from ...index.query import normalize_key
        from ...remote import transport as t
        from ...remote.asking import Asker

        wait = max(1.0, self.server.s.timeout - 2)  # answer within the caller's DIMSE timeout
        keys = {normalize_key(k): v for k, v in keys.items() if v not in (None, "", "*")}
        asker = Asker(self.server.s.config)
        try:
            rid = asker.ask(peer, t.QUERY, {"level": level, "keys": keys, "text": None, "limit": None},
                            expires_in=wait + 60)
            asker.wait(time.monotonic() + wait)
            got = asker.answers.get(rid)
        finally:
            asker.close()
        if got is None:
            raise _PeerSilent(f"{peer} did not answer within {wait:g} s")
        kind, body = got
        if kind == t.REFUSAL:
            raise _PeerRefused(f"{peer} refused: {body.get('reason', 'no reason given')}")
        return [r for r in body.get("records") or [] if isinstance(r, dict)]

    # -- C-MOVE, C-GET -------------------------------------------------------------------
    def retrieve(self, service: Any, req: Any, context: Any, kind: str, peer: str) -> None:
        r = Request(service, req, context, kind)
        aet = str(service.assoc.acceptor.ae_title).strip()
        parsed = self.server.retrieve.parse(r)
        if parsed is None:
            return
        level, keys, dest = parsed
        try:
            studies, series = self.targets(peer, level, keys)
        except QueryError as exc:
            return r.refuse(exc.code, str(exc))
        except Exception as exc:  # noqa: BLE001
            log.error("%s to %s: catalog query failed (%s)", r.what, aet, exc)
            return r.refuse(OUT_OF_RESOURCES, "catalog query failed")
        log.info("%s to %s from %s, %s level: asking %s for %d stud(ies), %d series%s", r.what, aet, r.calling,
                 level, peer, len(studies), len(series), f" for {dest}" if dest else "")
        if not studies and not series:
            return r.finish()  # nothing in the peer's catalog matches: no sub-operations
        try:
            outcome = self.fetch(r, peer, studies, series)
        except Exception as exc:  # noqa: BLE001 - the relay unreachable, its password wrong, a full disk
            if r.request_id is None:  # the request never left: nothing will come
                return r.refuse(RELAY_FAILED, f"cannot ask {peer}: {exc}")
            # it left: the study may still come, and a deferred forward stores it on
            log.error("%s to %s: %s while waiting for %s", r.what, aet, exc, peer)
            outcome = "late"
        if outcome == "refused":
            return
        if outcome == "late":
            comment = f"{peer} has not delivered yet"
            if dest is not None:
                from ...exchange.forwards import defer

                defer(self.server.s.config, peer, r.request_id, dest.aet, studies, series,
                      expires_in=self.server.s.forward_expiry)
                comment += f"; will store to {dest.aet} on arrival"
                log.warning("%s to %s: %s; deferred forward to %s recorded", r.what, aet, comment, dest.aet)
            else:
                log.warning("%s to %s: %s", r.what, aet, comment)
            return r.respond(NOT_DELIVERED, comment, counts=False)
        local = {"StudyInstanceUID": "\\".join(studies)} if studies else {"SeriesInstanceUID": "\\".join(series)}
        if studies and series:
            # both kinds asked for: send the studies, then the series, as one set of sub-operations
            local = {"SeriesInstanceUID": "\\".join(self._series_of(studies) + series)}
        if level == "IMAGE":
            local = {"SeriesInstanceUID": keys["SeriesInstanceUID"], "SOPInstanceUID": keys["SOPInstanceUID"]}
        self.server.retrieve.deliver(r, service, local, "STUDY" if studies else "SERIES", dest)

    def targets(self, peer: str, level: str, keys: dict[str, str]) -> tuple[list[str], list[str]]:
        """The studies and series to ask the peer for; PATIENT level takes every study of the
        patient in the peer's catalog."""
        def uids(key: str) -> list[str]:
            return [u for u in keys.get(key, "").split("\\") if u]

        if level == "STUDY":
            return uids("StudyInstanceUID"), []
        if level == "SERIES":
            return [], uids("SeriesInstanceUID")
        if level == "IMAGE":
            if not uids("SeriesInstanceUID"):
                raise QueryError(IDENTIFIER_MISMATCH, "an IMAGE-level retrieve through the bridge needs "
                                                      "SeriesInstanceUID (the series is fetched)")
            return [], uids("SeriesInstanceUID")
        from ...index.db import open_index
        from ...index.query import find, peer_scope

        if not self.server.s.index_path.exists():
            return [], []
        conn = open_index(self.server.s.index_path, readonly=True)
        try:
            rows = find(conn, "study", {"PatientID": keys["PatientID"]}, fields=["StudyInstanceUID"],
                        scope=peer_scope([peer]))
            return sorted({row["StudyInstanceUID"] for row in rows if row.get("StudyInstanceUID")}), []
        finally:
            conn.close()

    def _series_of(self, studies: list[str]) -> list[str]:
        from ...index.db import open_index
        from ...index.query import find

        conn = open_index(self.server.s.index_path, readonly=True)
        try:
            return sorted({row["SeriesInstanceUID"] for row in
                           find(conn, "series", {"StudyInstanceUID": "\\".join(studies)}, fields=["SeriesInstanceUID"])})
        finally:
            conn.close()

    def fetch(self, r: Request, peer: str, studies: list[str], series: list[str]) -> str:
        """Ask ``peer`` for these studies and series and take delivery; Pending responses every
        TICK seconds meanwhile. Returns "delivered", "late" or "refused" (answered already)."""
        import orjson

        from ...remote import transport as t
        from ...remote.asking import Asker
        from ...remote.taking import Taker

        s = self.server.s
        deadline = time.monotonic() + s.bridge_wait
        asker = Asker(s.config, fail=lambda what, why: log.error("%s: %s", what, why))
        taker = None
        try:
            rid = asker.ask(peer, t.RETRIEVE, {"studies": studies, "series": series},
                            expires_in=s.bridge_wait + 3600,
                            subject=orjson.dumps({"studies": studies, "series": series}).decode())
            r.request_id = rid
            while time.monotonic() < deadline and rid not in asker.answers:
                asker.wait(min(deadline, time.monotonic() + TICK))
                if rid not in asker.answers and r.service.assoc.is_established:
                    r.respond(PENDING)
            got = asker.answers.get(rid)
            if got is None:
                return "late"
            kind, body = got
            if kind == t.REFUSAL:
                r.refuse(PEER_REFUSED, f"{peer} refused: {body.get('reason', 'no reason given')}")
                return "refused"
            taker = Taker(asker, lambda what, why: log.error("%s: %s", what, why), log.info)
            taker.rids.add(rid)
            taker.envelopes |= {e.get("envelope_id") for e in body.get("envelopes") or [] if isinstance(e, dict)}
            while taker.outstanding() and time.monotonic() < deadline:
                taker.take(min(deadline, time.monotonic() + TICK))
                if taker.outstanding() and r.service.assoc.is_established:
                    r.respond(PENDING)
            return "late" if taker.outstanding() else "delivered"
        finally:
            if taker is not None:
                taker.close()
            asker.close()


class _PeerSilent(Exception):
    pass


class _PeerRefused(Exception):
    pass
