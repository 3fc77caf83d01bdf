"""Answering a retrieve request: seal the studies a peer asked for, for that peer only.

The same per-peer memory as 'dseal --to' decides what travels, so a study asked for twice
(or pushed to that peer before) is sealed once; each envelope is recorded with the
request's id, so the answer lists every envelope that serves it, even after a restart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import DtoolsError, InputError
from ..seal.memory import SealLock, SealMemory
from ..seal.sealing import collect, seal_group

if TYPE_CHECKING:
    from .service import RelayService


def seal_for_request(service: "RelayService", peer: str, request_id: str, studies: list[str],
                     series: list[str]) -> list[str]:
    """Seal what ``peer`` asked for and is not sealed for it yet; returns the UIDs not found here."""
    from ..index.db import open_index
    from ..index.query import find

    records: list[dict] = []
    missing: list[str] = []
    try:
        conn = open_index(service.config.index_path, readonly=True)
    except DtoolsError:
        return list(studies) + list(series)
    try:
        for key, uids in (("StudyInstanceUID", studies), ("SeriesInstanceUID", series)):
            for uid in uids:
                found = list(find(conn, "instance", {key: uid}))
                if not found:
                    missing.append(uid)
                records.extend(found)
    finally:
        conn.close()
    memory = SealMemory(service.ledger, [peer])
    failures: list[str] = []
    groups = collect(records, "study", lambda what, why: failures.append(f"{what}: {why}"), lambda m: None,
                     skip=memory.already_sealed)
    outbox = service.config.dir("outbox")
    with SealLock(outbox):
        for group in groups:
            for peers, g in memory.split(group):
                try:
                    seal_group(g, outbox, identity=service.identity, recipients=[service.peers[peer]],
                               sender=service.site, recipient_names=peers, passphrase=None,
                               advance=lambda n: None, ledger=service.ledger, request_id=request_id)
                except InputError as exc:
                    failures.append(f"{len(g.entries)} file(s): {exc}")
    for f in failures:
        service.fail(f"retrieve {request_id} from {peer}", f)
    return missing
