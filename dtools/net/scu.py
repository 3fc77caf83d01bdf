"""C-STORE SCU: send files to a DICOM peer over as few associations as possible.

Files whose file meta names their SOP class and transfer syntax are streamed as they are
stored (no decode, byte-identical dataset); others are decoded and re-encoded only when
the peer accepts no context in the file's own transfer syntax.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ..errors import InputError, RemoteError
from .common import MAX_CONTEXTS, NATIVE, Peer, contexts_for, count_contexts, nodelay_handlers, quiet_pynetdicom

log = logging.getLogger("dtools")


@dataclass
class Item:
    """One file to send, with what is needed to pick its presentation context."""

    path: str
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    as_is: bool  # complete file meta: stream the stored bytes without decoding
    record: dict = field(default_factory=dict)

    @property
    def pair(self) -> tuple[str, str]:
        return (self.sop_class, self.transfer_syntax)


def inspect(path: str, record: dict | None = None) -> Item:
    """Read just enough of a file to send it; InputError if it is not a DICOM instance."""
    p = Path(path)
    if not p.is_file():
        raise InputError("no such file" if not p.exists() else "not a regular file")
    try:
        meta = read_file_meta_info(p)
        sop_class = str(meta.get("MediaStorageSOPClassUID", "") or "")
        sop_inst = str(meta.get("MediaStorageSOPInstanceUID", "") or "")
        ts = str(meta.get("TransferSyntaxUID", "") or "")
        if sop_class and sop_inst and ts:
            # A deflated stream may have odd length, and fragments must be even: re-encode those.
            return Item(str(p.absolute()), sop_class, sop_inst, ts, ts != DeflatedExplicitVRLittleEndian, record or {})
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
    return Item(str(p.absolute()), sop_class, sop_inst, ts, False, record or {})


def split_for_contexts(items: list[Item], limit: int = MAX_CONTEXTS) -> Iterator[list[Item]]:
    """Consecutive groups of items whose presentation contexts fit one association."""
    group: list[Item] = []
    pairs: set[tuple[str, str]] = set()
    for item in items:
        trial = pairs | {item.pair}
        if group and count_contexts(trial) > limit:
            yield group
            group, pairs = [], set()
            trial = {item.pair}
        group.append(item)
        pairs = trial
    if group:
        yield group


@dataclass
class Outcome:
    status: str  # "stored" or "failed"
    code: int | None = None
    error: str | None = None
    warning: str | None = None


class StoreSession:
    """Associations to one peer, reused while they accept what comes next."""

    def __init__(self, peer: Peer, calling_aet: str, timeout: float = 30.0):
        quiet_pynetdicom()
        from pynetdicom import AE, _config

        _config.STORE_SEND_CHUNKED_DATASET = True  # stream stored files without decoding them
        self.peer = peer
        self.ae = AE(ae_title=calling_aet)
        for attr in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
            setattr(self.ae, attr, timeout)
        self.assoc: Any = None
        self.accepted: set[tuple[str, str]] = set()
        self.msg_id = 0
        self.associations = 0

    # -- association ----------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.assoc is not None and self.assoc.is_established

    def can_send(self, item: Item) -> bool:
        if not self.alive:
            return False
        if item.pair in self.accepted:
            return True
        return UID(item.transfer_syntax) in NATIVE and any(
            s == item.sop_class and UID(t) in NATIVE for s, t in self.accepted
        )

    def open(self, items: list[Item]) -> None:
        self.close()
        pairs = {i.pair for i in items}
        contexts = contexts_for(pairs)
        assoc = self.ae.associate(
            self.peer.host, self.peer.port, contexts=contexts, ae_title=self.peer.aet,
            evt_handlers=nodelay_handlers(),
        )
        if not assoc.is_established:
            if assoc.is_rejected:
                raise RemoteError(
                    f"{self.peer} rejected the association; check the called AE title (--aec) and "
                    f"that the peer accepts calling AE title {self.ae.ae_title!r} (--aet)"
                )
            if assoc.is_aborted and getattr(assoc, "rejected_contexts", None) and not assoc.accepted_contexts:
                raise NoContexts(f"{self.peer} accepts none of the proposed SOP classes/transfer syntaxes")
            raise RemoteError(
                f"cannot reach {self.peer}; check the host and port and that the DICOM peer is running"
            )
        self.assoc = assoc
        self.associations += 1
        self.accepted = {
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts
        }
        log.info("associated with %s (%d contexts accepted)", self.peer, len(self.accepted))

    def close(self) -> None:
        if self.assoc is not None:
            try:
                if self.assoc.is_established:
                    self.assoc.release()
            finally:
                self.assoc = None
                self.accepted = set()

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
        if item.pair in self.accepted and item.as_is:
            payload: Any = item.path
        elif self.can_send(item):
            try:
                payload = dcmread(item.path, force=True)
                if not getattr(payload, "file_meta", None) or "TransferSyntaxUID" not in payload.file_meta:
                    from pydicom.dataset import FileMetaDataset

                    payload.file_meta = FileMetaDataset()
                    payload.file_meta.TransferSyntaxUID = item.transfer_syntax
            except Exception as exc:  # noqa: BLE001
                return Outcome("failed", error=f"cannot decode ({exc})")
        else:
            return Outcome(
                "failed",
                error=f"{self.peer} does not accept SOP class {_uid_name(item.sop_class)} "
                f"in transfer syntax {_uid_name(item.transfer_syntax)}",
            )
        try:
            status = self.assoc.send_c_store(payload, msg_id=self.msg_id)
        except (ValueError, AttributeError) as exc:
            return Outcome("failed", error=str(exc))
        except OSError as exc:
            return Outcome("failed", error=f"cannot read ({exc.strerror or exc})")
        code = getattr(status, "Status", None)
        if code is None:
            self.assoc = None if not self.alive else self.assoc
            return Outcome("failed", error=f"no response from {self.peer} (association aborted or timed out)")
        code = int(code)
        comment = str(status.get("ErrorComment", "") or "")
        if code == 0x0000:
            return Outcome("stored", code)
        if code in (0xB000, 0xB006, 0xB007):
            return Outcome("stored", code, warning=f"warning status 0x{code:04X}" + (f" ({comment})" if comment else ""))
        return Outcome("failed", code, error=f"peer returned status 0x{code:04X}" + (f" ({comment})" if comment else ""))


class NoContexts(RemoteError):
    """The peer is reachable but accepts none of the proposed presentation contexts."""


def _uid_name(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else uid


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

