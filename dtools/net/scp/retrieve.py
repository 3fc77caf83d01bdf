"""The Retrieve service of dserve: C-MOVE to a known destination, C-GET over the caller's association.

pynetdicom routes these requests here (dtools.net.internals.acceptor), so each instance goes out as
it is stored when the receiver accepted its transfer syntax, or converted to one it
accepted (dtools.net.scu.send); every refusal is answered with its status and a comment.
"""

from __future__ import annotations

import logging
from io import BytesIO
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset

from ...errors import DtoolsError
from .. import syntaxes
from ..common import nodelay_handlers
from ..internals.requestor import recover_rejection
from ..scu import Item, Outcome, inspect, rejection, send
from .query import element_text, model_of, query_level
from .statuses import (
    CANCEL,
    CANNOT_UNDERSTAND,
    IDENTIFIER_MISMATCH,
    MOVE_DESTINATION_UNKNOWN,
    OUT_OF_RESOURCES,
    PENDING,
    SUBOPS_FAILED,
    SUCCESS,
    WARNING,
    QueryError,
)

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("dtools")

UNIQUE = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
_RETRIEVE_KEYS = {
    "PATIENT": ("PatientID",),
    "STUDY": ("PatientID", "StudyInstanceUID"),
    "SERIES": ("PatientID", "StudyInstanceUID", "SeriesInstanceUID"),
    "IMAGE": ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"),
}
_FIELDS = ["path", "SOPInstanceUID", "SOPClassUID", "TransferSyntaxUID"]


def retrieve_keys(ident: Dataset, level: str) -> dict[str, str]:
    """The unique keys of a C-MOVE/C-GET identifier, for an instance-level query.

    The level's unique key is required (the same 0xA900 for C-MOVE and C-GET)."""
    keys: dict[str, str] = {}
    for kw in _RETRIEVE_KEYS[level]:
        if kw in ident:
            text = element_text(ident[kw])
            if text:
                keys[kw] = text
    if UNIQUE[level] not in keys:
        raise QueryError(IDENTIFIER_MISMATCH, f"{UNIQUE[level]} is required to retrieve at the {level} level")
    return keys


class Request:
    """One C-MOVE or C-GET being answered: its responses and sub-operation counts."""

    def __init__(self, service: Any, req: Any, context: Any, kind: str):
        from pynetdicom.dimse_primitives import C_GET, C_MOVE

        self.service, self.req, self.kind = service, req, kind
        self.cx_id = context.context_id
        self.ts = context.transfer_syntax[0]
        self.what = "C-MOVE" if kind == "move" else "C-GET"
        self.calling = service.assoc.requestor.ae_title
        self.rsp_class = C_MOVE if kind == "move" else C_GET
        self.remaining = self.completed = self.failed = self.warnings = 0
        self.failed_uids: list[str] = []
        self.first_error: str | None = None
        self.request_id: str | None = None  # through the bridge: the retrieve request sent to the peer

    def identifier(self) -> Dataset:
        from pynetdicom.dsutils import decode

        return decode(self.req.Identifier, self.ts.is_implicit_VR, self.ts.is_little_endian, self.ts.is_deflated)

    def respond(self, code: int, comment: str | None = None, counts: bool = True, failed_list: bool = False) -> None:
        from pynetdicom.dsutils import encode

        rsp = self.rsp_class()
        rsp.MessageIDBeingRespondedTo = self.req.MessageID
        rsp.AffectedSOPClassUID = self.req.AffectedSOPClassUID
        rsp.Status = code
        if comment:
            rsp.ErrorComment = comment[:64]  # LO
        if counts:
            if code in (PENDING, CANCEL):
                rsp.NumberOfRemainingSuboperations = self.remaining
            rsp.NumberOfCompletedSuboperations = self.completed
            rsp.NumberOfFailedSuboperations = self.failed
            rsp.NumberOfWarningSuboperations = self.warnings
        if failed_list:
            ident = Dataset()
            ident.FailedSOPInstanceUIDList = self.failed_uids
            rsp.Identifier = BytesIO(encode(ident, self.ts.is_implicit_VR, self.ts.is_little_endian, self.ts.is_deflated))
        self.service.dimse.send_msg(rsp, self.cx_id)

    def refuse(self, code: int, reason: str, private: bool = False) -> None:
        """A failure status with `reason` as comment; a `private` reason may quote key values
        (patient data), so the log shows it only with -v."""
        if private:
            log.error("%s from %s refused: a key value cannot be understood", self.what, self.calling)
            log.info("%s refused: %s", self.what, reason)
        else:
            log.error("%s from %s refused: %s", self.what, self.calling, reason)
        self.respond(code, reason, counts=False)

    def count(self, item: Item, outcome: Outcome) -> None:
        self.remaining -= 1
        if outcome.status == "stored" and outcome.warning:
            self.warnings += 1
        elif outcome.status == "stored":
            self.completed += 1
        else:
            self.failed += 1
            self.failed_uids.append(item.sop_instance)
            self.first_error = self.first_error or outcome.error

    def finish(self) -> None:
        if not self.failed and not self.warnings:
            self.respond(SUCCESS)
        else:
            all_failed = self.failed and not self.completed and not self.warnings
            self.respond(SUBOPS_FAILED if all_failed else WARNING,
                         self.first_error if all_failed else None, failed_list=True)


class RetrieveService:
    """C-MOVE and C-GET at every level of Patient Root and Study Root (PATIENT in both)."""

    def __init__(self, server: "Server"):
        self.server = server

    def serve(self, service: Any, req: Any, context: Any, kind: str) -> None:
        """Answer one request (called by pynetdicom's association thread, see dtools.net.internals.acceptor)."""
        bridge = self.server.bridge
        peer = bridge.peer_of(service.assoc) if bridge is not None else None
        if peer is not None:
            return bridge.retrieve(service, req, context, kind, peer)
        r = Request(service, req, context, kind)
        parsed = self.parse(r)
        if parsed is not None:
            level, keys, dest = parsed
            self.deliver(r, service, keys, level, dest)

    def parse(self, r: Request) -> tuple[str, dict[str, str], Any] | None:
        """The request's level, unique keys and (C-MOVE) destination; None once it has been
        refused with its status."""
        req = r.req
        try:
            ident = r.identifier()
            level = query_level(ident, model_of(req.AffectedSOPClassUID), retrieve=True)
            keys = retrieve_keys(ident, level)
        except QueryError as exc:
            r.refuse(exc.code, str(exc))
            return None
        except Exception as exc:  # noqa: BLE001 - undecodable identifier
            log.info("%s identifier from %s: %s", r.what, r.calling, exc)
            r.refuse(CANNOT_UNDERSTAND, "cannot decode the identifier")
            return None
        dest = None
        if r.kind == "move":
            dest_aet = str(req.MoveDestination or "").strip()
            dest = self.server.s.destinations.get(dest_aet)
            if dest is None:
                r.refuse(MOVE_DESTINATION_UNKNOWN,
                         f"move destination {dest_aet!r} unknown; add it under [dserve.destinations]")
                return None
        return level, keys, dest

    def deliver(self, r: Request, service: Any, keys: dict[str, str], level: str, dest: Any) -> None:
        """Send the instances ``keys`` select in the local archive to ``dest`` (C-MOVE) or back
        over the caller's association (C-GET, ``dest`` None), and answer with the counts."""
        req = r.req
        try:
            items, unreadable = self.items(keys)
        except DtoolsError as exc:
            return r.refuse(CANNOT_UNDERSTAND, str(exc), private=True)
        except Exception as exc:  # noqa: BLE001 - sqlite busy, disk errors
            log.error("%s: index query failed (%s)", r.what, exc)
            return r.refuse(OUT_OF_RESOURCES, "index query failed")
        total = len(items) + len(unreadable)
        log.info("%s from %s, %s level: %d instance(s)%s", r.what, r.calling, level, total,
                 f" to {dest}" if dest else "")
        if total > 65535:
            return r.refuse(OUT_OF_RESOURCES, f"{total} instances match; retrieve fewer at once (at most 65535)")
        r.remaining = total
        for uid, reason in unreadable:
            log.error("%s: sub-operation for %s failed: %s", r.what, uid, reason)
            r.count(Item("", "", uid, "", False), Outcome("failed", error=reason))
            if r.remaining:
                r.respond(PENDING)
        if not items:
            return r.finish()
        if dest is None:
            return self.sub_operations(r, service.assoc, items, originator=None)
        # The sub-operations come from the AE title the caller called (dserve's own, or a bridged
        # peer's) and name the caller as their Move Originator (PS3.7 9.3.1.1), as dcmqrscp does.
        called = str(service.assoc.acceptor.ae_title or "").strip() or self.server.s.aet
        sub = _requestor(service.ae, called).associate(
            dest.host, dest.port, contexts=syntaxes.contexts({i.pair for i in items}), ae_title=dest.aet,
            evt_handlers=nodelay_handlers())
        if not sub.is_established:
            recover_rejection(sub)
            if sub.is_aborted and sub.rejected_contexts and not sub.accepted_contexts:
                # negotiated, but nothing usable accepted: every sub-operation fails
                reason = f"{dest} accepts none of the contexts proposed"
                for item in items:
                    log.error("C-MOVE: sub-operation for %s failed: %s", item.sop_instance, reason)
                    r.count(item, Outcome("failed", error=reason))
                return r.respond(SUBOPS_FAILED, reason, failed_list=True)
            reason = rejection(dest, called, sub) if sub.is_rejected else f"cannot reach {dest}"
            log.error("C-MOVE from %s: %s", r.calling, reason)
            return r.respond(MOVE_DESTINATION_UNKNOWN, reason, counts=False)
        try:
            self.sub_operations(r, sub, items, originator=(r.calling, req.MessageID))
        finally:
            if sub.is_established:
                sub.release()

    def sub_operations(self, r: Request, assoc: Any, items: list[Item], originator: tuple[str, int] | None) -> None:
        offered = syntaxes.accepted(assoc)
        peer = f"{assoc.acceptor.ae_title}" if originator else r.calling
        msg_id = r.req.MessageID
        for n, item in enumerate(items):
            if r.service.is_cancelled(r.req.MessageID) or self.server.stopping:
                r.failed_uids += [i.sop_instance for i in items[n:]]
                log.info("%s from %s cancelled with %d sub-operation(s) left", r.what, r.calling, r.remaining)
                return r.respond(CANCEL, failed_list=True)
            if not assoc.is_established:
                outcome = Outcome("failed", error=f"{peer} went away")
            else:
                msg_id = msg_id % 65535 + 1
                outcome = send(assoc, item, offered, msg_id, peer=peer, originator=originator)
            if outcome.status != "stored":
                log.error("%s: sub-operation for %s failed: %s", r.what, item.sop_instance, outcome.error)
            elif outcome.warning:
                log.warning("%s: sub-operation for %s: %s", r.what, item.sop_instance, outcome.warning)
            r.count(item, outcome)
            if r.remaining and r.service.assoc.is_established:
                r.respond(PENDING)
        if not r.service.assoc.is_established:
            return
        log.info("%s from %s: %d completed, %d failed, %d warning(s)", r.what, r.calling, r.completed, r.failed,
                 r.warnings)
        r.finish()

    def items(self, keys: dict[str, str]) -> tuple[list[Item], list[tuple[str, str]]]:
        """The instances the keys select, ready to send, and (UID, reason) of those that cannot be read."""
        from ...index.db import open_index
        from ...index.query import find

        conn = open_index(self.server.s.index_path, readonly=True)
        try:
            rows = [r for r in find(conn, "instance", keys, fields=_FIELDS) if r.get("path")]
        finally:
            conn.close()
        items, unreadable = [], []
        for row in rows:
            try:
                items.append(inspect(row["path"], {"SOPInstanceUID": row.get("SOPInstanceUID")}))
            except Exception as exc:  # noqa: BLE001 - InputError, or pydicom on a damaged file
                unreadable.append((str(row.get("SOPInstanceUID") or row["path"]), f"{row['path']}: {exc}"))
        return items, unreadable


def _requestor(ae: Any, aet: str) -> Any:
    """The AE that opens a C-MOVE's association to its destination: ``ae`` itself when it has
    the AE title ``aet``, else an AE of that title with the same timeouts (a bridged peer's)."""
    if str(ae.ae_title).strip() == aet:
        return ae
    from pynetdicom import AE

    other = AE(ae_title=aet)
    for attr in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout", "maximum_pdu_size"):
        setattr(other, attr, getattr(ae, attr))
    return other
