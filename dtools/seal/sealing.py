"""Sealing: turn instance records or paths into envelopes in the outbox, one per group.

Every input file is checked to be DICOM (its UIDs are read from the file, not trusted from
the record) before any envelope is written; a bad file is reported and the rest go on.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from ..dicom.archive import AtomicFile, check_uid
from ..errors import InputError
from . import envelope
from .envelope import Entry
from .keys import Identity, PeerKey

GROUPS = ("study", "series", "none")
_UID_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]


def read_uids(path: Path) -> tuple[str, str, str]:
    """Study, series and SOP instance UIDs of a DICOM file; InputError if it is not one."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        # pydicom's warnings may quote element values: keep them off stderr.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_UID_TAGS)
    except InvalidDicomError:
        raise InputError("not a DICOM file (no DICM prefix); only DICOM Part 10 files can be sealed") from None
    except IsADirectoryError:
        raise InputError("is a directory, not a DICOM file") from None
    except OSError as exc:
        raise InputError(f"cannot read ({exc.strerror or exc})") from None
    except Exception as exc:  # pydicom raises many types for damaged files
        raise InputError(f"unreadable DICOM file ({type(exc).__name__})") from None
    return (
        check_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID"),
        check_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID"),
        check_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID"),
    )


def entry_for(record: dict) -> Entry:
    """The envelope entry for one input record (or path); InputError for a bad one."""
    kind = record.get("kind")
    if kind in ("patient", "study", "series"):
        raise InputError(f"is a {kind} record; dseal seals files: give instance records (dsearch --level instance)")
    if kind not in (None, "instance"):
        raise InputError(f"is a {kind} record, not an instance record or a path")
    raw = record.get("path")
    if not isinstance(raw, str) or not raw:
        raise InputError("record has no path")
    path = Path(raw).expanduser().absolute()
    try:
        st = path.stat()
    except OSError as exc:
        raise InputError(f"cannot read ({exc.strerror})") from None
    if not path.is_file():
        raise InputError("not a regular file")
    study, series, sop = read_uids(path)
    return Entry(study, series, sop, st.st_size, source=path, mtime_ns=st.st_mtime_ns)


@dataclass
class Group:
    key: str
    entries: list[Entry] = field(default_factory=list)
    sops: dict[str, Path] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(e.size for e in self.entries)


def group_key(entry: Entry, how: str) -> str:
    if how == "study":
        return entry.StudyInstanceUID
    if how == "series":
        return f"{entry.StudyInstanceUID}/{entry.SeriesInstanceUID}"
    return ""


def collect(records: Iterable[dict], how: str, fail: Callable[[str, str], None],
            note: Callable[[str], None], warn: Callable[[str], None] | None = None,
            skip: Callable[[dict], bool] | None = None) -> list[Group]:
    """Read and check every input, then group; a bad input goes to ``fail(input, reason)``.

    ``skip(record)`` drops an input before its file is read (already sealed, unchanged)."""
    groups: dict[str, Group] = {}
    for record in records:
        name = str(record.get("path") or record.get("SOPInstanceUID") or record.get("StudyInstanceUID")
                   or f"{record.get('kind', 'unknown')} record")
        if skip is not None and skip(record):
            continue
        try:
            entry = entry_for(record)
        except InputError as exc:
            fail(name, str(exc))
            continue
        g = groups.setdefault(group_key(entry, how), Group(group_key(entry, how)))
        seen = g.sops.get(entry.SOPInstanceUID)
        if seen is not None:
            if seen != entry.source:
                # As dindex does: two files of one instance are a warning, and one of them travels.
                (warn or note)(f"{name}: same SOPInstanceUID {entry.SOPInstanceUID} as {seen}; "
                               "sealed once, from the first")
            else:
                note(f"{name}: given twice; sealed once")
            continue
        assert entry.source is not None
        g.sops[entry.SOPInstanceUID] = entry.source
        g.entries.append(entry)
    return list(groups.values())


def seal_group(group: Group, outbox: Path, *, identity: Identity | None, recipients: list[PeerKey],
               sender: str, recipient_names: list[str], passphrase: bytes | None,
               advance: Callable[[int], None], ledger=None, request_id: str | None = None) -> dict:
    """Write one envelope into ``outbox`` atomically; return its ``envelope`` record.

    With a ``ledger``, the envelope and the instances it carries are recorded for each
    recipient once the file is durable and before it appears in the outbox."""
    eid = envelope.new_envelope_id()
    target = outbox / f"{eid}{envelope.SUFFIX}"
    result: list = []

    def remember() -> None:
        if ledger is None:
            return
        sealed = result[0]
        ledger.note_sealed(eid, recipient_names, str(target), sealed.bytes, sealed.sha256, len(group.entries), [
            (e.StudyInstanceUID, e.SeriesInstanceUID, e.SOPInstanceUID, str(e.source), e.size,
             e.mtime_ns, digest) for e, digest in zip(sealed.entries, sealed.digests)], request_id=request_id)

    with AtomicFile(target, 0o600, before_rename=remember) as out:
        result.append(envelope.seal(
            out, eid, group.entries,
            identity=identity if passphrase is None else None,
            recipients=recipients if passphrase is None else None,
            sender=sender, recipient_names=recipient_names, passphrase=passphrase, advance=advance,
        ))
    sealed = result[0]
    studies = sorted({e.StudyInstanceUID for e in group.entries})
    return {
        "kind": "envelope",
        "path": str(target),
        "envelope_id": eid,
        "from": sender,
        "to": list(recipient_names),
        "StudyInstanceUID": studies[0] if len(studies) == 1 else studies,
        "instances": len(group.entries),
        "bytes": sealed.bytes,
        "sha256": sealed.sha256,
    }


def clean_stale_envelopes(outbox: Path, max_age: float = 3600.0) -> int:
    """Remove temporaries of envelopes left by a killed seal; returns how many.

    A running seal keeps writing its temporary, so one untouched for an hour is dead;
    younger ones may belong to a concurrent run and are left alone.
    """
    import time

    n = 0
    now = time.time()
    for p in outbox.glob(".*" + envelope.SUFFIX + ".*.tmp"):
        try:
            if now - p.lstat().st_mtime > max_age:
                p.unlink()
                n += 1
        except OSError:
            pass
    return n


def read_passphrase(path: str) -> bytes:
    """The passphrase in a file (first line, trailing newline dropped)."""
    from ..errors import UsageError

    from ..security import check_secret_file

    try:
        with open(Path(path).expanduser(), "rb") as f:
            check_secret_file(path, os.fstat(f.fileno()), "passphrase")
            data = f.read()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read passphrase file ({exc.strerror})") from None
    line = data.split(b"\n", 1)[0].rstrip(b"\r")
    if not line:
        raise UsageError(f"{path}: passphrase file is empty; put the shared passphrase on its first line")
    return line


def stat_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
