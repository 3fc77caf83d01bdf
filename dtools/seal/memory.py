"""What this site has sealed for each peer, so that each instance goes to each peer once.

An instance is sealed again for a peer only when its content changed (another SHA-256) or
when ``--resend`` asks for it. The ledger remembers, per peer and SOP Instance UID, the file
it came from (path, size, mtime) and its digest; an unchanged file is recognised from its
stat alone, a moved or touched one by its digest. An instance that came from a peer is
never sealed back for that peer (two sites sending each other "today's studies" would
otherwise echo them), unless ``--resend`` asks.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections import defaultdict
from pathlib import Path

from ..dicom.archive import recover_temporary
from ..exchange.ledger import Ledger, db_path
from .envelope import Entry
from .sealing import Group


class SealMemory:
    def __init__(self, ledger: Ledger, peers: list[str], resend: bool = False):
        self.ledger = ledger
        self.peers = peers
        self.resend = resend
        self.skipped = 0

    def already_sealed(self, record: dict) -> bool:
        """True when a record's file is, unchanged, what we sealed for every peer: the file
        need not even be read. (Only a skip: a record cannot make us send anything.)"""
        if self.resend:
            return False
        sop, path = record.get("SOPInstanceUID"), record.get("path")
        if not isinstance(sop, str) or not isinstance(path, str) or not path:
            return False
        try:
            st = os.stat(path)
        except OSError:
            return False
        path = str(Path(path).expanduser().absolute())
        for peer in self.peers:
            row = self.ledger.sealed_instance(peer, sop)
            if row is None or (row["path"], row["size"], row["mtime_ns"]) != (db_path(path), st.st_size, st.st_mtime_ns):
                return False
        self.skipped += 1
        return True

    def _needs(self, entry: Entry) -> tuple[str, ...]:
        if self.resend:
            return tuple(self.peers)
        digest: str | None = None
        out = []
        source = self.ledger.source_of(entry.SOPInstanceUID)
        for peer in self.peers:
            if source is not None and source["peer"] == peer and source["sha256"] == (
                    digest := digest or _sha256(entry.source)):
                continue  # it came from that peer, as it is
            row = self.ledger.sealed_instance(peer, entry.SOPInstanceUID)
            if row is None:
                out.append(peer)
                continue
            if (row["path"], row["size"], row["mtime_ns"]) == (db_path(str(entry.source)), entry.size, entry.mtime_ns):
                continue
            if digest is None:
                digest = _sha256(entry.source)
            if digest == row["sha256"]:
                # The same content at another path or time: remember it, to skip hashing next time.
                self.ledger.touch_sealed_instance(peer, entry.SOPInstanceUID, str(entry.source), entry.size,
                                                  entry.mtime_ns)
            else:
                out.append(peer)
        return tuple(out)

    def split(self, group: Group) -> list[tuple[list[str], Group]]:
        """The group's entries that still have to travel, by the peers they have to reach."""
        by_peers: dict[tuple[str, ...], Group] = defaultdict(lambda: Group(group.key))
        for entry in group.entries:
            peers = self._needs(entry)
            if not peers:
                self.skipped += 1
                continue
            g = by_peers[peers]
            g.entries.append(entry)
            assert entry.source is not None
            g.sops[entry.SOPInstanceUID] = entry.source
        return [(list(peers), g) for peers, g in by_peers.items()]


def _sha256(path: Path | None) -> str:
    assert path is not None
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return ""  # unreadable now: treat as changed; sealing reports the error


class SealLock:
    """One sealing run at a time per home, so two overlapping cron runs never seal the same
    instance twice. Held while sealing only, not while reading the input; a second run waits."""

    def __init__(self, outbox: Path):
        self.path = Path(outbox) / ".dseal.lock"
        self.fd: int | None = None

    def __enter__(self) -> "SealLock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def recover_sealed(ledger: Ledger) -> int:
    """Put in place envelopes recorded as sealed whose run was killed before the rename."""
    n = 0
    for row in ledger.undeposited():
        if not os.path.exists(row["path"]) and recover_temporary(Path(row["path"])):
            n += 1
    return n
