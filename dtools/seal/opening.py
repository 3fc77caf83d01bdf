"""Opening: verify an envelope, then move its files into the archive and remember it.

Files are decrypted into a private staging directory under spool/; they reach the archive
(by rename) only after the signature and every digest verify. spool/opened/ remembers
opened envelope ids, so a replayed envelope writes nothing.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import orjson

from .. import security
from ..config import Config
from ..dicom.archive import archive_path, fsync_dir, write_atomic
from ..errors import InputError
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


@dataclass
class Replay:
    envelope_id: str
    opened_at: str
    instances: int
    sha256: str = ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_staging(spool: Path) -> int:
    """Remove staging directories left by a killed ``dseal --open``; returns how many."""
    n = 0
    for d in spool.glob(STAGING_PREFIX + "*"):
        try:
            pid = int(d.name[len(STAGING_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
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
    """Opens envelopes for one site into its archive."""

    def __init__(self, config: Config, identity: Identity | None, peers: dict[str, PeerKey],
                 passphrase: bytes | None = None, log: Callable[[str], None] = lambda m: None):
        self.config = config
        self.identity = identity
        self.peers = peers
        self.passphrase = passphrase
        self.log = log
        self.archive = config.dir("archive")
        self.spool = config.dir("spool")
        self.ledger = self.spool / "opened"
        self.ledger.mkdir(exist_ok=True)
        clean_stale_staging(self.spool)

    def replay(self, envelope_id: str) -> Replay | None:
        marker = self.ledger / envelope_id
        try:
            info = orjson.loads(marker.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError):
            info = {}
        return Replay(envelope_id, str(info.get("opened_at", "earlier")), int(info.get("instances", 0)),
                      str(info.get("sha256", "")))

    def _check_replay(self, f, seen: Replay) -> Replay:
        # Only a byte-identical copy is a replay; anything else with a known id is damaged or forged.
        f.seek(0)
        if _stream_sha256(f) != seen.sha256:
            raise InputError(f"envelope {seen.envelope_id} was opened before, but this copy differs from it "
                             "(damaged or tampered)")
        return seen

    def open(self, path: Path, advance: Callable[[int], None] = lambda n: None) -> OpenResult:
        """Open one envelope and move its files into the archive.

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
                    records = self._commit(opened)
                    return OpenResult(header.envelope_id, records, None, opened.peer, opened.sha256)
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

    def _commit(self, opened: envelope.Opened) -> list[dict]:
        # Check every target first, so a bad one leaves the archive untouched.
        targets = []
        for entry, _tmp, _digest in opened.files:
            target = archive_path(self.archive, entry.StudyInstanceUID, entry.SeriesInstanceUID, entry.SOPInstanceUID)
            _check_no_links(self.archive, target)
            targets.append(target)
        records = []
        touched: dict[Path, None] = {}  # directories whose entries changed, in order
        for (entry, tmp, digest), target in zip(opened.files, targets):
            if target.exists() and target.stat().st_size == entry.size and _file_sha256(target) == digest:
                self.log(f"{target}: already in the archive with the same content")
            else:
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
            records.append({
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
        return records

    def _make_dirs(self, d: Path, touched: dict[Path, None]) -> None:
        """Create ``d`` and missing parents below the archive; their parents' entries must be synced too."""
        missing = []
        while d != self.archive and not d.is_dir():
            missing.append(d)
            d = d.parent
        for m in reversed(missing):
            m.mkdir(mode=security.dir_mode() & 0o777, exist_ok=True)
            touched[m.parent] = None

    def remember(self, envelope_id: str, peer: str, sha256: str, instances: int) -> None:
        """Record that an envelope was opened, so a replay writes nothing."""
        info = {"envelope_id": envelope_id, "peer": peer, "sha256": sha256, "instances": instances,
                "opened_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_atomic(self.ledger / envelope_id, orjson.dumps(info) + b"\n", mode=0o600)
