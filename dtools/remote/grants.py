"""What a site grants each peer, in its ``[peers.NAME]`` table; nothing is granted by default.

``share``: send the peer this site's study/series catalog. ``query``: answer its live
queries. ``retrieve``: send it the studies it asks for.
"""

from __future__ import annotations

from ..config import Config

GRANTS = ("share", "query", "retrieve")


def granted(config: Config, peer: str, what: str) -> bool:
    """True when ``[peers.PEER] WHAT = true``; a peer that is not configured is granted nothing."""
    assert what in GRANTS
    if peer not in config.section("peers"):
        return False
    return bool(config.get(f"peers.{peer}.{what}"))


def peers_granted(config: Config, what: str) -> list[str]:
    """The configured peers granted ``what``, sorted."""
    return sorted(name for name in config.section("peers") if granted(config, name, what))
