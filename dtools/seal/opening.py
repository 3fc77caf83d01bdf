"""Opening: verify an envelope, then move its files into the archive, index them and remember it.

Files are decrypted into a private staging directory under spool/; they reach the archive
(by rename) only after the signature and every digest verify and each file proves to be
DICOM with the UIDs of its entry. A peer never replaces an archived instance it did not
send. The ledger remembers opened envelopes (and where each archived instance came from),
so a replayed envelope writes nothing.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import orjson

from .. import security
from ..config import Config
from ..dicom.archive import archive_path, fsync_dir, pid_alive, write_atomic
from ..errors import InputError
from ..exchange.ledger import Ledger, ledger_path
from . import envelope
from .keys import Identity, PeerKey

STAGING_PREFIX = "dseal-open-"


@dataclass
class OpenResult:
    envelope_id: str
    records: list[dict]
    replay: "Replay | None" = None
    peer: str = ""
    sha256: str = ""
    refused: list[tuple[str, str]] = field(default_factory=list)  # (SOPInstanceUID, why): not placed
    replaced: list[tuple[str, str]] = field(default_factory=list)  # (SOPInstanceUID, where the old one went)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, why): placed but not indexed
    messages: list[tuple[str, bytes]] = field(default_factory=list)  # (kind, JSON) of the message entries
    catalog: Any = None  # with record: what a peer's catalog update changed in the index (index.peers.Applied)


@dataclass
class Replay:
    envelope_id: str
    opened_at: str
    instances: int
    sha256: str = ""


def clean_stale_staging(spool: Path) -> int:
    """Remove staging directories left by a killed ``dseal --open``; returns how many."""
    n = 0
    for d in spool.glob(STAGING_PREFIX + "*"):
        try:
            pid = int(d.name[len(STAGING_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)
            n += 1
    return n


def _check_no_links(root: Path, target: Path) -> None:
    """Refuse a target whose directories below the archive root are symbolic links."""
    rel = target.relative_to(root)
    cur = root
    for part in rel.parts[:-1]:
        cur = cur / part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise InputError(f"archive directory {cur} is a link or not a directory; refusing to write through it")
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"archive entry {target} is a link or not a regular file; refusing to replace it")


def _stream_sha256(f) -> str:
    from cryptography.hazmat.primitives import hashes

    h = hashes.Hash(hashes.SHA256())
    while block := f.read(1 << 20):
        h.update(block)
    return h.finalize().hex()


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return _stream_sha256(f)


class Opener:
    """Opens envelopes for one site into its archive (and, with ``record``, its index and ledger)."""

    def __init__(self, config: Config, identity: Identity | None, peers: dict[str, PeerKey],
                 passphrase: bytes | None = None, log: Callable[[str], None] = lambda m: None,
                 ledger: Ledger | None = None):
        self.config = config
        self.identity = identity
        self.peers = peers
        self.passphrase = passphrase
        self.log = log
        self.archive = config.dir("archive")
        self.spool = config.dir("spool")
        self._own_ledger = ledger is None
        self.ledger = ledger if ledger is not None else Ledger(ledger_path(config.home))
        self._indexer = None
        _import_markers(self.spool / "opened", self.ledger)
        clean_stale_staging(self.spool)

    def close(self) -> None:
        if self._indexer is not None:
            self._indexer.conn.close()
            self._indexer = None
        if self._own_ledger:
            self.ledger.close()

    def replay(self, envelope_id: str) -> Replay | None:
        row = self.ledger.opened(envelope_id)
        if row is None:
            return None
        return Replay(envelope_id, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row["opened_at"])),
                      row["instances"], row["sha256"])

    def _check_replay(self, f, seen: Replay) -> Replay:
        # Only a byte-identical copy is a replay; anything else with a known id is damaged or forged.
        f.seek(0)
        if _stream_sha256(f) != seen.sha256:
            raise InputError(f"envelope {seen.envelope_id} was opened before, but this copy differs from it "
                             "(damaged or tampered)")
        return seen

    def open(self, path: Path, advance: Callable[[int], None] = lambda n: None, record: bool = False) -> OpenResult:
        """Open one envelope and move its files into the archive.

        With ``record``, the placed files are also indexed and the envelope is remembered
        in the ledger (with its receipt owed) before this returns, all under the open lock.
        A replay returns no records and nothing is written. Raises InputError for a bad
        envelope, leaving the archive untouched and no temporary behind.
        """
        try:
            f = open(path, "rb")
        except OSError as exc:
            raise InputError(f"cannot read envelope ({exc.strerror})") from None
        with f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise InputError("not a regular file")
            header = envelope.read_header(f)
            seen = self.replay(header.envelope_id)
            if seen is not None:
                return OpenResult(header.envelope_id, [], self._check_replay(f, seen))
            f.seek(0)
            with self._lock():
                seen = self.replay(header.envelope_id)  # another process may have just opened it
                if seen is not None:
                    return OpenResult(header.envelope_id, [], self._check_replay(f, seen))
                staging = self.spool / f"{STAGING_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
                staging.mkdir(mode=0o700)
                try:
                    opened = envelope.open_envelope(f, st.st_size, staging, identity=self.identity, peers=self.peers,
                                                    passphrase=self.passphrase, advance=advance)
                    headers = [None if entry.is_message else _check_payload(entry, tmp)
                               for entry, tmp, _digest in opened.files]
                    result = OpenResult(header.envelope_id, [], None, opened.peer, opened.sha256)
                    result.messages = [(entry.kind, tmp.read_bytes()) for entry, tmp, _ in opened.files
                                       if entry.is_message]
                    placed = self._commit(opened, result)
                    if record:
                        self._index(result, placed, headers)
                        self._apply_messages(result, signed=opened.header.mode == envelope.MODE_KEYS)
                        self.remember(result.envelope_id, result.peer, result.sha256, len(result.records),
                                      archived=[(r["SOPInstanceUID"], r["sha256"]) for r in result.records])
                    return result
                finally:
                    shutil.rmtree(staging, ignore_errors=True)

    def _lock(self):
        lock_path = self.spool / "dseal-open.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)

        class _Held:
            def __enter__(self_inner):
                fcntl.flock(fd, fcntl.LOCK_EX)

            def __exit__(self_inner, *exc):
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

        return _Held()

    def _commit(self, opened: envelope.Opened, result: OpenResult) -> list[int]:
        """Move the staged files into the archive; returns the indexes of the files placed."""
        # Check every target first, so a bad one leaves the archive untouched.
        targets: list[Path | None] = []
        for entry, _tmp, _digest in opened.files:
            if entry.is_message:
                targets.append(None)
                continue
            target = archive_path(self.archive, entry.StudyInstanceUID, entry.SeriesInstanceUID, entry.SOPInstanceUID)
            _check_no_links(self.archive, target)
            targets.append(target)
        placed = []
        touched: dict[Path, None] = {}  # directories whose entries changed, in order
        for i, ((entry, tmp, digest), target) in enumerate(zip(opened.files, targets)):
            if target is None:
                continue
            if target.exists():
                if target.stat().st_size == entry.size and _file_sha256(target) == digest:
                    self.log(f"{target}: already in the archive with the same content")
                else:
                    why = self._may_replace(entry.SOPInstanceUID, opened.peer)
                    if why:
                        result.refused.append((entry.SOPInstanceUID, why))
                        continue
                    aside = self._set_aside(target, entry.SOPInstanceUID)
                    result.replaced.append((entry.SOPInstanceUID, str(aside)))
                    self._place(tmp, target, touched)
            else:
                self._place(tmp, target, touched)
            placed.append(i)
            result.records.append({
                "kind": "instance",
                "path": str(target),
                "StudyInstanceUID": entry.StudyInstanceUID,
                "SeriesInstanceUID": entry.SeriesInstanceUID,
                "SOPInstanceUID": entry.SOPInstanceUID,
                "size": entry.size,
                "sha256": digest,
                "envelope_id": opened.header.envelope_id,
                "peer": opened.peer,
            })
        # One fsync per directory, not per file (a series directory holds many), and all of
        # them before the caller remembers the envelope as opened.
        for d in touched:
            fsync_dir(d)
        return placed

    def _may_replace(self, sop: str, peer: str) -> str | None:
        """Why ``peer`` may not replace the archived instance ``sop`` (None: it may)."""
        source = self.ledger.source_of(sop)
        if source is None:
            return ("is already in the archive with other content, not from a peer (stored here or by an older "
                    "dtools); not replaced")
        if source["peer"] != peer:
            return f"is already in the archive with other content, sent by {source['peer']}; not replaced"
        return None

    def _set_aside(self, target: Path, sop: str) -> Path:
        """Keep the version a peer replaces, outside the archive (HOME/replaced/)."""
        aside_dir = self.config.home / "replaced"
        aside_dir.mkdir(mode=security.dir_mode() & 0o777, exist_ok=True)
        aside = aside_dir / f"{sop}.{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.{os.urandom(2).hex()}.dcm"
        os.link(target, aside)
        fsync_dir(aside_dir)
        return aside

    def _place(self, tmp: Path, target: Path, touched: dict[Path, None]) -> None:
        self._make_dirs(target.parent, touched)
        os.chmod(tmp, security.file_mode())  # owner only, or the site's group
        try:
            os.replace(tmp, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            with open(tmp, "rb") as src:
                write_atomic(target, iter(lambda: src.read(1 << 20), b""))
        touched[target.parent] = None

    def _make_dirs(self, d: Path, touched: dict[Path, None]) -> None:
        """Create ``d`` and missing parents below the archive; their parents' entries must be synced too."""
        missing = []
        while d != self.archive and not d.is_dir():
            missing.append(d)
            d = d.parent
        for m in reversed(missing):
            m.mkdir(mode=security.dir_mode() & 0o777, exist_ok=True)
            touched[m.parent] = None

    def _index(self, result: OpenResult, placed: list[int], headers: list) -> None:
        """Index what was placed, so that 'opened' means in the archive and in the index."""
        self._index_conn()
        ix = self._indexer
        records = []
        try:
            for rec, i in zip(result.records, placed):
                st = os.stat(rec["path"])
                try:
                    records.append(ix.add_header(rec["path"], st.st_size, st.st_mtime_ns, headers[i], rec))
                except InputError as exc:
                    result.failed.append((rec["path"], f"placed in the archive but not indexed: {exc}"))
                    records.append(rec)
            ix.flush()
        except BaseException:
            ix.rollback()
            raise
        result.records = records

    def _index_conn(self):
        from ..index.db import open_index
        from ..index.ingest import Indexer

        if self._indexer is None:
            self._indexer = Indexer(open_index(self.config.index_path))
        return self._indexer.conn

    def _apply_messages(self, result: OpenResult, signed: bool) -> None:
        """Apply what messages carry for the index (a peer's catalog) before the envelope
        is remembered as opened, so that opened still means applied."""
        catalog = [data for kind, data in result.messages if kind == "catalog"]
        if catalog:
            from ..remote.catalog import apply_catalog

            site = self.identity.name if self.identity is not None else None
            result.catalog = apply_catalog(self._index_conn(), result.peer, catalog, signed=signed, site=site)

    def remember(self, envelope_id: str, peer: str, sha256: str, instances: int,
                 archived: list[tuple[str, str]] | None = None) -> None:
        """Record that an envelope was opened (so a replay writes nothing, and a receipt is owed
        to a configured peer while this site can sign one)."""
        owed = self.identity is not None and peer in self.peers
        self.ledger.mark_opened(envelope_id, peer, sha256, instances, owed, archived or [])


def _check_payload(entry: envelope.Entry, tmp: Path):
    """The parsed header of a staged file; InputError unless it is DICOM with its entry's UIDs."""
    from ..dicom.header import read_header
    from ..index.ingest import INDEX_KEYS

    try:
        header = read_header(tmp, entry.size, INDEX_KEYS)
    except InputError as exc:
        raise InputError(f"payload {entry.name} is not a DICOM file ({exc}); the envelope was refused") from None
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        value = header.attrs.get(key)
        if value != getattr(entry, key):
            raise InputError(f"payload {entry.name}: its {key} is {str(value)[:64]!r}, not the one of its entry; "
                             "the envelope was refused")
    return header


def _import_markers(markers: Path, ledger: Ledger) -> None:
    """Move the opened-envelope markers of dtools 0.1 (spool/opened/ID) into the ledger."""
    if not markers.is_dir():
        return
    for entry in os.scandir(markers):
        try:
            info = orjson.loads(Path(entry.path).read_bytes())
            ledger.mark_opened(entry.name, str(info.get("peer", "")), str(info.get("sha256", "")),
                               int(info.get("instances", 0)), False, opened_at=os.stat(entry.path).st_mtime)
            os.unlink(entry.path)
        except (OSError, ValueError, orjson.JSONDecodeError):
            continue
    try:
        markers.rmdir()
    except OSError:
        pass
