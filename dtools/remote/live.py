"""dsearch --peer NAME --live: ask peers themselves, through the relay, and print their answers."""

from __future__ import annotations

import time
from typing import Callable, Iterable

from ..errors import EX_TEMPFAIL, EX_UNAVAILABLE, UsageError
from . import transport as t
from .asking import Asker


def live_search(app, peers: list[str], level: str, pairs: list[tuple[str, str]], text: str | None,
                limit: int | None, wait: float, show: Callable[[Iterable[dict]], None]) -> int | None:
    """Send one sealed query per peer, wait up to ``wait`` seconds, show what came back.

    Exit status: 75 when a peer did not answer in time (named on stderr), else 69 when one
    refused (the message says "refused"), else 0."""
    from ..index.query import normalize_key, parse_keys

    parse_keys(level, pairs, text)  # a typo is a usage error here, not a refusal from the peer
    keys = {normalize_key(k): v for k, v in pairs}
    asker = Asker(app.config, fail=app.fail)
    try:
        sent = {peer: asker.ask(peer, t.QUERY, {"level": level, "keys": keys, "text": text, "limit": limit},
                                expires_in=wait + 60) for peer in peers}
        asker.wait(time.monotonic() + wait)
        records: list[dict] = []
        silent, refused = [], []
        for peer, rid in sent.items():
            got = asker.answers.get(rid)
            if got is None:
                silent.append(peer)
                continue
            kind, body = got
            if kind == t.REFUSAL:
                refused.append(peer)
                app.err(f"{peer} refused the query: {body.get('reason', 'no reason given')}")
                continue
            answered = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(body.get("answered_at") or time.time())))
            for rec in body.get("records") or []:
                if isinstance(rec, dict):
                    records.append({**rec, "kind": level, "peer": peer, "answered_at": answered})
            if body.get("truncated"):
                app.err(f"{peer} answered with the first {len(body.get('records') or [])} matches only; "
                        "narrow the query or use --limit")
        show(records)
    finally:
        asker.close()
    for peer in silent:
        app.err(f"{peer} did not answer within {wait:g} s; is 'dserve --relay' running there? "
                "(run again with a longer --wait)")
    if silent:
        return EX_TEMPFAIL
    if refused:
        return EX_UNAVAILABLE
    return None


def check_live_options(count_only: bool, offset: int) -> None:
    if count_only or offset:
        raise UsageError("--count and --offset do not apply with --live; the peer answers with records")
