"""The DICOM SCP behind dserve: C-ECHO, C-STORE into the archive and index, C-FIND, C-MOVE, C-GET.

Association threads only write files; one indexer process (dtools.net.indexproc, running
an IndexWriter) owns the writable index connection and commits in batches, then emits one
record per stored instance. Queries open their own read-only connection, so a long C-FIND
never blocks stores (WAL).
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.multival import MultiValue
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from .. import security
from ..dicom.archive import archive_path, fsync_dir
from ..dicom.header import header_from_bytes
from ..errors import ConfigError, DtoolsError, InputError
from ..index.ingest import INDEX_KEYS
from . import fastpath, guard
from .indexproc import IndexProcess
from .common import Peer, contexts_for, nodelay_handlers, quiet_pynetdicom, set_nodelay, tune_pynetdicom

log = logging.getLogger("dtools")

# DIMSE statuses (PS3.4 Annexes B and C, PS3.7 Annex C)
SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00
OUT_OF_RESOURCES = 0xA700
MOVE_DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC210

LEVELS = {"PATIENT": "patient", "STUDY": "study", "SERIES": "series", "IMAGE": "instance"}
PATIENT_ROOT = {
    "1.2.840.10008.5.1.4.1.2.1.1",  # Patient Root Query/Retrieve Information Model - FIND
    "1.2.840.10008.5.1.4.1.2.1.2",  # - MOVE
    "1.2.840.10008.5.1.4.1.2.1.3",  # - GET
}


def status(code: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]  # LO
    return ds


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


_tmp_ids = itertools.count()
_O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def write_new_file(target: str, chunks: tuple[Any, ...], sync: bool, rename: bool = True) -> str:
    """Write `target` atomically: a temporary name beside it, then rename (AtomicFile's promise).

    With `sync`, the file is fsynced before and its directory after the rename. Without
    `rename`, the file is left at its temporary name, which is returned: the caller renames
    it once it is durable (dserve --sync batch). The same
    steps as AtomicFile, with fewer system calls and objects: it runs once per C-STORE,
    between request and response. The directory is created only when the first open
    finds it missing, and the temporary name comes from a counter, not the random pool.
    The name keeps the ".NAME.*.tmp" form that stale-temporary cleaning looks for.
    """
    parent, name = os.path.split(target)
    tmp = f"{parent}/.{name}.{os.getpid():x}-{next(_tmp_ids):x}.tmp"
    try:
        fd = os.open(tmp, _O_NEW, security.file_mode())  # patient data: owner (and site group) only
    except FileNotFoundError:
        security.makedirs(parent)
        fd = os.open(tmp, _O_NEW, security.file_mode())
    except FileExistsError:  # a stale temporary of an earlier process with our pid
        tmp = f"{parent}/.{name}.{secrets.token_hex(6)}.tmp"
        fd = os.open(tmp, _O_NEW, security.file_mode())
    try:
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if rename:
            os.rename(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if sync:
        fsync_dir(Path(parent))
    return tmp


class Inflight:
    """Counts store handlers that are writing, so shutdown can wait for them.

    Entered and left once per C-STORE: a plain lock, no Condition to notify; only
    shutdown waits, and it polls.
    """

    def __init__(self):
        self.n = 0
        self.lock = threading.Lock()

    def __enter__(self):
        with self.lock:
            self.n += 1

    def __exit__(self, *exc):
        with self.lock:
            self.n -= 1

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.n:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True


class Server:
    """One listening AE; start(), then shutdown(grace) from the main thread."""

    def __init__(self, settings: ServerSettings, emit: Callable[[dict], None], records_fd: int | None = None):
        quiet_pynetdicom()
        tune_pynetdicom()
        self.s = settings
        self.emit = emit
        self.stopping = False
        self.force = False  # a second signal: abort associations now
        self.fatal: str | None = None
        self.fatal_event = threading.Event()
        self.inflight = Inflight()
        self.stored = 0
        self.started = time.time()
        self._server: Any = None
        self.indexer = IndexProcess(settings.index_path, emit, self._on_fatal, settings.batch,
                                    sync_files=settings.sync == "batch", records_fd=records_fd)
        self.indexer.start()  # its start-up overlaps ours; start() waits until it is ready
        self.pending = guard.PendingConnections(guard.pending_limit(settings.max_associations))
        self.ae = self._make_ae()

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
        ae.require_calling_aet = list(self.s.allow)
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

        return [
            *nodelay_handlers(),
            (evt.EVT_CONN_OPEN, self.pending.on_open),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_C_FIND, self.on_find),
            (evt.EVT_C_MOVE, self.on_move),
            (evt.EVT_C_GET, self.on_get),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_REJECTED, self.on_rejected),
        ]

    def start(self) -> None:
        """Bind and serve in background threads; raises OSError if the port cannot be bound."""
        if not self.indexer.ready.wait(60):
            self.indexer.error = "the indexer did not start within 60 s"
        if self.indexer.error:
            raise ConfigError(self.indexer.error + "; check --home or [index] path")
        self._server = self.ae.start_server(
            (self.s.bind, self.s.port), block=False, evt_handlers=self.handlers(), ae_title=self.s.aet
        )
        set_nodelay(self._server.socket)  # accepted sockets inherit it on Linux; EVT_CONN_OPEN sets it anyway
        self.s.port = self._server.server_address[1]
        fastpath.register(self.on_store, self.store, _PYDICOM_ONLY)
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
        fastpath.unregister(self.on_store)
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
        log.info("association from %s (%s:%s)", r.ae_title, r.address, r.port)

    def on_rejected(self, event: Any) -> None:
        r = event.assoc.requestor
        rj = event.assoc.acceptor.primitive
        why = {(1, 3): "calling AE title not allowed", (3, 2): f"{self.s.max_associations} associations already "
               "(--max-associations)"}.get((rj.result_source, rj.diagnostic), "association refused") if rj else "?"
        log.warning("rejected association from %s (%s); %s", r.ae_title, r.address, why)

    def on_echo(self, event: Any) -> int:
        return SUCCESS

    def on_store(self, event: Any) -> Dataset | int:
        req = event.request
        code, comment = self.store(event.assoc, event.context.context_id, str(req.AffectedSOPClassUID),
                                   str(req.AffectedSOPInstanceUID), str(event.context.transfer_syntax),
                                   req.DataSet.getbuffer())
        return status(code, comment) if comment else code

    def store(self, assoc: Any, context_id: int, sop_class: str, sop_instance: str, ts: str,
              data: Any) -> tuple[int, str | None]:
        """Store one received data set: (DIMSE status, error comment or None).

        The EVT_C_STORE handler calls this, and so does the C-STORE lane (dtools.net.fastpath),
        which answers plain C-STORE requests without pynetdicom's per-message work.
        """
        if self.stopping:
            return OUT_OF_RESOURCES, "server is shutting down"
        with self.inflight:
            calling = assoc.requestor.ae_title
            if not (sop_class.isascii() and sop_instance.isascii()):
                log.error("C-STORE from %s refused: a UID in the request is not ASCII", calling)
                return CANNOT_UNDERSTAND, "a UID in the request is not ASCII"
            try:
                header = scan_header(sop_class, sop_instance, ts, calling, data)
                if header is not None:
                    attrs = header[1].attrs
                else:  # deflated or big endian: let pydicom decode it
                    attrs = decode_data_set(data, ts)
                study, series, sop = attrs.get("StudyInstanceUID"), attrs.get("SeriesInstanceUID"), attrs.get("SOPInstanceUID")
                target = archive_path(self.s.archive, study, series, sop)
            except InputError as exc:
                log.error("C-STORE from %s refused: %s", calling, exc)
                return CANNOT_UNDERSTAND, str(exc)
            except Exception as exc:  # noqa: BLE001 - undecodable dataset
                log.error("C-STORE from %s refused: cannot decode the data set (%s)", calling, exc)
                return CANNOT_UNDERSTAND, "cannot decode the data set"
            try:
                head = header[0] if header else file_header(sop_class, str(sop), ts, calling)
                always = self.s.sync == "always"
                tmp = write_new_file(str(target), (head, data), sync=always, rename=always)
            except OSError as exc:
                log.error("%s: cannot write (%s)", target, exc.strerror or exc)
                return OUT_OF_RESOURCES, f"cannot write to the archive ({exc.strerror or exc})"
            self.stored += 1
            self.indexer.put(target, header[1] if header else None, None if always else tmp)
            return SUCCESS, None

    # -- query ------------------------------------------------------------------------
    def _model(self, event: Any) -> str:
        return "patient" if str(event.request.AffectedSOPClassUID) in PATIENT_ROOT else "study"

    def on_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        try:
            ident = event.identifier
            level = self._level(ident, self._model(event))
            keys, wanted = identifier_keys(ident, level)
        except QueryError as exc:
            log.error("C-FIND from %s refused: %s", event.assoc.requestor.ae_title, exc)
            yield status(exc.code, str(exc)), None
            return
        except Exception as exc:  # noqa: BLE001
            log.error("C-FIND refused: cannot decode the identifier (%s)", exc)
            yield status(CANNOT_UNDERSTAND, "cannot decode the identifier"), None
            return
        from ..index.db import open_index
        from ..index.query import find

        try:
            conn = open_index(self.s.index_path, readonly=True)
        except Exception as exc:  # noqa: BLE001
            log.error("C-FIND: cannot open the index (%s)", exc)
            yield status(OUT_OF_RESOURCES, "index unavailable"), None
            return
        try:
            results = find(conn, LEVELS[level], keys, strict=False)
            n = 0
            while True:
                if event.is_cancelled:
                    yield CANCEL, None
                    return
                try:
                    row = next(results)
                except StopIteration:
                    break
                n += 1
                yield PENDING, response(ident, wanted, row, level, self.s.aet)
            log.info("C-FIND %s level: %d matches", level, n)
        except DtoolsError as exc:
            # the message may quote key values (patient data): details only with -v
            log.error("C-FIND from %s refused: a key value cannot be understood", event.assoc.requestor.ae_title)
            log.info("C-FIND refused: %s", exc)
            yield status(CANNOT_UNDERSTAND, str(exc)), None
            return
        except Exception as exc:  # noqa: BLE001 - sqlite busy, disk errors
            log.error("C-FIND failed: %s", exc)
            yield status(OUT_OF_RESOURCES, "query failed"), None
            return
        finally:
            conn.close()
        yield SUCCESS, None

    def _level(self, ident: Dataset, model: str) -> str:
        level = str(ident.get("QueryRetrieveLevel", "") or "").strip().upper()
        if level not in LEVELS:
            raise QueryError(IDENTIFIER_MISMATCH, f"Query/Retrieve Level {level!r} is not PATIENT, STUDY, SERIES or IMAGE")
        if model == "study" and level == "PATIENT":
            raise QueryError(IDENTIFIER_MISMATCH, "PATIENT level is not part of the Study Root model")
        return level

    # -- retrieve --------------------------------------------------------------------
    def _instances(self, event: Any) -> tuple[list[str] | None, Dataset | None]:
        """Paths of the instances a C-MOVE/C-GET identifier selects, or a failure status."""
        try:
            ident = event.identifier
            level = self._level(ident, self._model(event))
            keys = retrieve_keys(ident, level)
        except QueryError as exc:
            return None, status(exc.code, str(exc))
        except Exception:  # noqa: BLE001
            return None, status(CANNOT_UNDERSTAND, "cannot decode the identifier")
        from ..index.db import open_index
        from ..index.query import find

        try:
            conn = open_index(self.s.index_path, readonly=True)
            try:
                paths = [r["path"] for r in find(conn, "instance", keys, fields=["path"]) if r.get("path")]
            finally:
                conn.close()
        except DtoolsError as exc:
            return None, status(CANNOT_UNDERSTAND, str(exc))
        except Exception as exc:  # noqa: BLE001
            log.error("retrieve query failed: %s", exc)
            return None, status(OUT_OF_RESOURCES, "query failed")
        return paths, None

    def on_move(self, event: Any) -> Iterator[Any]:
        dest_aet = str(event.move_destination or "").strip()
        dest = self.s.destinations.get(dest_aet)
        if dest is None:
            log.error("C-MOVE to unknown destination %r; add it under [dserve.destinations]", dest_aet)
            yield None, None
            return
        paths, failure = self._instances(event)
        if failure is not None:
            yield dest.host, dest.port
            # pynetdicom answers an exception here with 0xC513, "unable to process"
            raise QueryError(failure.Status, str(failure.get("ErrorComment", "")))
        assert paths is not None
        pairs = set()
        for p in paths:
            try:
                meta = read_file_meta_info(p)
                pairs.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
            except Exception:  # noqa: BLE001 - counted as a failed sub-operation below
                pass
        yield dest.host, dest.port, {"contexts": contexts_for(pairs) or None, "evt_handlers": nodelay_handlers(),
                                     "ae_title": dest.aet}
        yield len(paths)
        yield from self._sub_operations(event, paths, f"C-MOVE to {dest}")

    def on_get(self, event: Any) -> Iterator[Any]:
        paths, failure = self._instances(event)
        if failure is not None:
            yield 1
            yield failure, None
            return
        assert paths is not None
        yield len(paths)
        yield from self._sub_operations(event, paths, "C-GET")

    def _sub_operations(self, event: Any, paths: list[str], what: str) -> Iterator[tuple[int, Dataset | None]]:
        for path in paths:
            if event.is_cancelled or self.stopping:
                yield CANCEL, None
                return
            try:
                ds = dcmread(path)
            except Exception as exc:  # noqa: BLE001
                log.error("%s: %s: cannot read (%s)", what, path, exc)
                # A dataset without file meta makes the C-STORE sub-operation fail, and
                # pynetdicom lists its SOP Instance UID as failed.
                ds = Dataset()
                ds.SOPInstanceUID = Path(path).stem
            yield PENDING, ds
        log.info("%s: %d sub-operations", what, len(paths))


def _element(tag_elem: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, tag_elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, tag_elem, vr, len(value)) + value


def scan_header(sop_class: str, sop: str, transfer_syntax: str, calling: str, data: Any) -> tuple[bytes, Any] | None:
    """(file meta bytes, parsed Header) of a received data set, without pydicom.

    Uses the index's own header scanner on the file image, so the indexer does not
    read the file again. None for encodings the scanner leaves to pydicom.
    """
    if transfer_syntax in _PYDICOM_ONLY:
        return None
    head = file_header(sop_class, sop, transfer_syntax, calling)
    image = head + data  # one copy (bytes + any buffer)
    header = header_from_bytes(image, INDEX_KEYS)
    if header is None:
        return None
    attrs = header.attrs
    if attrs.get("SOPInstanceUID") and attrs["SOPInstanceUID"] != sop:
        # the data set names another instance than the request: its own UID wins
        head = file_header(sop_class, str(attrs["SOPInstanceUID"]), transfer_syntax, calling)
    return head, header


def decode_data_set(data: Any, transfer_syntax: str) -> dict[str, Any]:
    """The UIDs of a data set the header scanner leaves to pydicom (big endian, deflate)."""
    from io import BytesIO

    from pynetdicom.dsutils import decode

    ts = UID(transfer_syntax)
    ds = decode(BytesIO(bytes(data)), ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
    return {kw: ds.get(kw) for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}


_PYDICOM_ONLY = frozenset((DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian))
_META_VERSION = _element(0x0001, b"OB", b"\x00\x01")
_META_IMPLEMENTATION = (_element(0x0012, b"UI", str(PYNETDICOM_IMPLEMENTATION_UID).encode("ascii"))
                        + _element(0x0013, b"SH", str(PYNETDICOM_IMPLEMENTATION_VERSION).encode("ascii")))
_PREAMBLE = b"\0" * 128 + b"DICM"


def file_header(sop_class: str, sop_instance: str, transfer_syntax: str, source_aet: str) -> bytes:
    """Preamble, 'DICM' and the File Meta Information group (PS3.10 7.1) for a received data set.

    Written directly: encoding these six elements with pydicom costs more than the rest of
    a small C-STORE.
    """
    body = b"".join((
        _META_VERSION,
        _element(0x0002, b"UI", sop_class.encode("ascii")),
        _element(0x0003, b"UI", sop_instance.encode("ascii")),
        _element(0x0010, b"UI", transfer_syntax.encode("ascii")),
        _META_IMPLEMENTATION,
        _element(0x0016, b"AE", (source_aet or "").strip().encode("ascii", "replace") or b"UNKNOWN"),
    ))
    return _PREAMBLE + struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body


class QueryError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


# -- identifier <-> index keys -----------------------------------------------------------
_SKIP = {0x00080052, 0x00080005}  # QueryRetrieveLevel, SpecificCharacterSet
_RETRIEVE_KEYS = {
    "PATIENT": ("PatientID",),
    "STUDY": ("PatientID", "StudyInstanceUID"),
    "SERIES": ("PatientID", "StudyInstanceUID", "SeriesInstanceUID"),
    "IMAGE": ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"),
}


def element_text(elem: Any) -> str | None:
    """An identifier element as a DICOM string (None for sequences, which we don't match)."""
    if elem.VR == "SQ":
        return None
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value)


def identifier_keys(ident: Dataset, level: str) -> tuple[dict[str, str], list[Any]]:
    """Matching/return keys for the query engine, and the identifier's elements to answer.

    Keys the index does not store are not matched and come back empty (PS3.4 C.2.2.1);
    the engine ignores them (strict=False).
    """
    keys: dict[str, str] = {}
    wanted = []
    for elem in ident:
        if elem.tag in _SKIP or elem.tag.group == 0x0002 or elem.tag.is_private or not elem.keyword:
            continue
        wanted.append(elem)
        text = element_text(elem)
        if text is not None:
            keys[elem.keyword] = text
    return keys, wanted


def retrieve_keys(ident: Dataset, level: str) -> dict[str, str]:
    """The unique keys of a C-MOVE/C-GET identifier, for an instance-level query."""
    keys: dict[str, str] = {}
    for kw in _RETRIEVE_KEYS[level]:
        if kw in ident:
            text = element_text(ident[kw])
            if text:
                keys[kw] = text
    unique = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
              "IMAGE": "SOPInstanceUID"}[level]
    if unique not in keys:
        raise QueryError(IDENTIFIER_MISMATCH, f"{unique} is required to retrieve at the {level} level")
    return keys


_INT_VRS = {"US", "UL", "SS", "SL", "UV", "SV"}
_FLOAT_VRS = {"FL", "FD"}


def _convert(vr: str, value: Any) -> Any:
    if value is None or value == "":
        return None
    if isinstance(value, list):
        return [_convert(vr, v) for v in value]
    if vr in _INT_VRS:
        return int(value)
    if vr in _FLOAT_VRS:
        return float(value)
    return str(value) if not isinstance(value, (int, float)) else str(value)


def response(ident: Dataset, wanted: list[Any], row: dict, level: str, aet: str) -> Dataset:
    """A C-FIND response: the requested keys, filled from the index row."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = level
    for elem in wanted:
        kw = elem.keyword
        vr = elem.VR
        value: Any = None
        if kw == "RetrieveAETitle":
            value = aet
        elif kw == "InstanceAvailability":
            value = "ONLINE"
        elif kw and vr != "SQ" and kw in row:
            try:
                value = _convert(vr, row[kw])
            except (TypeError, ValueError):
                value = None
        if vr == "SQ":
            ds.add_new(elem.tag, vr, [])
        else:
            ds.add_new(elem.tag, vr, value)
    return ds
