"""The Storage service of dserve: C-STORE into the archive, handed to the indexer process.

Association threads (and the C-STORE lane, dtools.net.fastpath) only write files; the
indexer (dtools.net.indexproc) owns the writable index and prints the records.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import struct
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from ... import security
from ...dicom.archive import archive_path, fsync_dir
from ...dicom.header import header_from_bytes
from ...errors import InputError
from ...index.ingest import INDEX_KEYS
from .statuses import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS, status

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("dtools")

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


class StorageService:
    """C-STORE: every received data set is written as it arrived, then indexed."""

    def __init__(self, server: "Server"):
        self.server = server
        self.inflight = Inflight()
        self.stored = 0

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
        server = self.server
        if server.stopping:
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
                target = archive_path(server.s.archive, study, series, sop)
            except InputError as exc:
                log.error("C-STORE from %s refused: %s", calling, exc)
                return CANNOT_UNDERSTAND, str(exc)
            except Exception as exc:  # noqa: BLE001 - undecodable dataset
                log.error("C-STORE from %s refused: cannot decode the data set (%s)", calling, exc)
                return CANNOT_UNDERSTAND, "cannot decode the data set"
            try:
                head = header[0] if header else file_header(sop_class, str(sop), ts, calling)
                always = server.s.sync == "always"
                tmp = write_new_file(str(target), (head, data), sync=always, rename=always)
            except OSError as exc:
                log.error("%s: cannot write (%s)", target, exc.strerror or exc)
                return OUT_OF_RESOURCES, f"cannot write to the archive ({exc.strerror or exc})"
            self.stored += 1
            server.indexer.put(target, header[1] if header else None, None if always else tmp)
            return SUCCESS, None


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
    if transfer_syntax in PYDICOM_ONLY:
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


PYDICOM_ONLY = frozenset((DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian))
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
