"""C-STORE SCU: send instances to a DICOM peer over as few associations as possible.

An instance goes in its stored transfer syntax when the peer accepted it, streamed from
the file without decoding (byte-identical data set); otherwise it is converted to a
syntax the peer accepted (dtools.net.syntaxes chooses, dtools.net.transcode converts).
dstore uses StoreSession; dserve's C-MOVE and C-GET use `send` on their own associations.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ..errors import InputError, RemoteError
from . import syntaxes
from .common import Peer, nodelay_handlers, quiet_pynetdicom
from .internals.requestor import recover_rejection
from .transcode import ConversionError, convert, name

log = logging.getLogger("dtools")

WARNINGS = (0xB000, 0xB006, 0xB007)  # Storage warning statuses: stored, with a remark


@dataclass
class Item:
    """One instance to send, with what is needed to pick its presentation context."""

    path: str
    sop_class: str
    sop_instance: str  # the data set's own SOP Instance UID
    transfer_syntax: str
    as_is: bool  # the file can be streamed as stored (complete, matching file meta)
    record: dict = field(default_factory=dict)

    @property
    def pair(self) -> tuple[str, str]:
        return (self.sop_class, self.transfer_syntax)


def inspect(path: str, record: dict | None = None) -> Item:
    """Read just enough of a file to send it; InputError if it is not a DICOM instance.

    The SOP Instance UID sent is the data set's (from the record, which the index read
    from the data set, or from the file), never only the file meta's: when the two
    differ, the data set is re-encoded under its own UID, as storescu does.
    """
    p = Path(path)
    record = record or {}
    if not p.is_file():
        raise InputError("no such file" if not p.exists() else "not a regular file")
    try:
        meta = read_file_meta_info(p)
        sop_class = str(meta.get("MediaStorageSOPClassUID", "") or "")
        meta_inst = str(meta.get("MediaStorageSOPInstanceUID", "") or "")
        ts = str(meta.get("TransferSyntaxUID", "") or "")
        if sop_class and meta_inst and ts:
            own = record.get("SOPInstanceUID")
            sop_inst = own if isinstance(own, str) and own else _data_set_uid(p) or meta_inst
            # A deflated stream may have odd length, and fragments must be even: re-encode those.
            as_is = ts != DeflatedExplicitVRLittleEndian and sop_inst == meta_inst
            return Item(str(p.absolute()), sop_class, sop_inst, ts, as_is, record)
    except InvalidDicomError:
        pass  # no preamble/meta: a raw dataset; decode it below
    except OSError as exc:
        raise InputError(f"cannot read ({exc.strerror or exc})") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt meta
        raise InputError(f"not a readable DICOM file ({exc})") from None
    try:
        ds = dcmread(p, force=True, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"not a readable DICOM file ({exc})") from None
    sop_class = str(ds.get("SOPClassUID", "") or "")
    sop_inst = str(ds.get("SOPInstanceUID", "") or "")
    if not sop_class or not sop_inst:
        raise InputError("not a DICOM instance (no SOP Class UID or SOP Instance UID)")
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if not ts:
        implicit, little = ds.original_encoding
        ts = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return Item(str(p.absolute()), sop_class, sop_inst, ts, False, record)


def _data_set_uid(path: Path) -> str | None:
    from ..dicom.header import read_header

    try:
        value = read_header(path, keys=frozenset({"SOPInstanceUID"})).attrs.get("SOPInstanceUID")
    except Exception:  # noqa: BLE001 - the file meta's UID is used then
        return None
    return value if isinstance(value, str) and value else None


@dataclass
class Outcome:
    status: str  # "stored" or "failed"
    code: int | None = None
    error: str | None = None
    warning: str | None = None
    lost: bool = False  # the association went away: the instance may be sent again on a new one


def send(assoc: Any, item: Item, offered: dict[str, list[str]], msg_id: int, want: str | None = None,
         peer: str = "the peer", originator: tuple[str, int] | None = None) -> Outcome:
    """One C-STORE of `item` over `assoc`, converted if needed; never raises for the instance."""
    target, why = syntaxes.choose(item.sop_class, item.transfer_syntax, offered, want)
    if target is None:
        return Outcome("failed", error=why.replace("the peer", peer))
    try:
        if target == item.transfer_syntax and item.as_is:
            payload: Any = item.path  # streamed from the file: the stored bytes, unchanged
        else:
            payload = convert(item.path, target, item.sop_instance)
    except ConversionError as exc:
        return Outcome("failed", error=str(exc))
    kwargs = {"originator_aet": originator[0], "originator_id": originator[1]} if originator else {}
    try:
        status = assoc.send_c_store(payload, msg_id=msg_id, **kwargs)
    except (ValueError, AttributeError) as exc:
        return Outcome("failed", error=str(exc))
    except OSError as exc:
        return Outcome("failed", error=f"cannot read ({exc.strerror or exc})")
    code = getattr(status, "Status", None)
    if code is None:
        return Outcome("failed", error=f"no response from {peer} (association aborted or timed out)", lost=True)
    code = int(code)
    comment = str(status.get("ErrorComment", "") or "")
    note = f"0x{code:04X}" + (f" ({comment})" if comment else "")
    if code == 0x0000:
        return Outcome("stored", code)
    if code in WARNINGS:
        return Outcome("stored", code, warning=f"warning status {note}")
    return Outcome("failed", code, error=f"{peer} returned status {note}")


class StoreSession:
    """Associations to one peer, reused while they accept what comes next."""

    def __init__(self, peer: Peer, calling_aet: str, timeout: float = 30.0, want: str | None = None):
        quiet_pynetdicom()
        from pynetdicom import AE, _config

        _config.STORE_SEND_CHUNKED_DATASET = True  # stream stored files without decoding them
        self.peer = peer
        self.want = want
        self.ae = AE(ae_title=calling_aet)
        for attr in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
            setattr(self.ae, attr, timeout)
        self.assoc: Any = None
        self.proposed: set[tuple[str, str]] = set()
        self.offered: dict[str, list[str]] = {}
        self.msg_id = 0
        self.associations = 0

    # -- association ----------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.assoc is not None and self.assoc.is_established

    def can_send(self, item: Item) -> bool:
        """The current association was opened for this kind of instance (accepted or not:
        `send` says why it cannot go); otherwise a new one must propose it."""
        return self.alive and item.pair in self.proposed

    def open(self, items: list[Item]) -> None:
        self.close()
        pairs = {i.pair for i in items}
        assoc = self.ae.associate(
            self.peer.host, self.peer.port, contexts=syntaxes.contexts(pairs, self.want),
            ae_title=self.peer.aet, evt_handlers=nodelay_handlers(),
        )
        if not assoc.is_established:
            recover_rejection(assoc)
            if assoc.is_rejected:
                raise RemoteError(rejection(self.peer, self.ae.ae_title, assoc))
            if assoc.is_aborted and getattr(assoc, "rejected_contexts", None) and not assoc.accepted_contexts:
                self.associations += 1  # negotiated, then aborted by pynetdicom: nothing was accepted
                raise NoContexts(f"{self.peer} accepts none of the proposed SOP classes/transfer syntaxes")
            raise RemoteError(
                f"cannot reach {self.peer}; check the host and port and that the DICOM peer is running"
            )
        self.assoc = assoc
        self.associations += 1
        self.proposed = pairs
        self.offered = syntaxes.accepted(assoc)
        log.info("associated with %s (%d contexts accepted)", self.peer, len(assoc.accepted_contexts))

    def close(self) -> None:
        if self.assoc is not None:
            try:
                if self.assoc.is_established:
                    self.assoc.release()
            finally:
                self.assoc = None
                self.proposed = set()
                self.offered = {}

    def abort(self) -> None:
        if self.assoc is not None:
            try:
                self.assoc.abort()
            finally:
                self.assoc = None

    # -- sending ----------------------------------------------------------------------
    def send(self, item: Item) -> Outcome:
        """One C-STORE over the current association."""
        self.msg_id = self.msg_id % 65535 + 1
        outcome = send(self.assoc, item, self.offered, self.msg_id, self.want, str(self.peer))
        if outcome.lost and not self.alive:
            self.assoc = None
        return outcome


def rejection(peer: Any, calling: str, assoc: Any) -> str:
    """Why a peer rejected an association, from its A-ASSOCIATE-RJ reason, and what to check."""
    rsp = getattr(getattr(assoc, "acceptor", None), "primitive", None)
    source, reason = getattr(rsp, "result_source", None), getattr(rsp, "diagnostic", None)
    if source == 0x01 and reason == 0x07:
        return f"{peer} rejected the association: called AE title {peer.aet!r} not recognised; check --aec"
    if source == 0x01 and reason == 0x03:
        return f"{peer} rejected the association: calling AE title {calling!r} not recognised; check --aet and the peer's allowed AE titles"
    if source == 0x03 and reason == 0x02:
        return f"{peer} rejected the association: too many associations; try again later"
    return (f"{peer} rejected the association; check the called AE title (--aec) and "
            f"that the peer accepts calling AE title {calling!r} (--aet)")


class NoContexts(RemoteError):
    """The peer is reachable but accepts none of the proposed presentation contexts."""


def output_record(item: Item | None, record: dict, peer: Peer, outcome: Outcome) -> dict:
    """The input record, annotated with the result of sending it."""
    out = {"kind": "instance", **record}
    if item is not None:
        out["path"] = item.path
        out.setdefault("SOPClassUID", item.sop_class)
        out.setdefault("SOPInstanceUID", item.sop_instance)
    out["peer"] = str(peer)
    out["status"] = outcome.status
    if outcome.warning:
        out["warning"] = outcome.warning
    if outcome.error:
        out["error"] = outcome.error
    return out


def record_path(record: dict) -> str | None:
    path = record.get("path")
    if isinstance(path, str) and path:
        return os.path.expanduser(path)
    return None


__all__ = ["Item", "Outcome", "StoreSession", "NoContexts", "inspect", "send", "output_record", "record_path", "name"]
