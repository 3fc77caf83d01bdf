"""What a site grants each peer, in its ``[peers.NAME]`` table; nothing is granted by default.

``share``: send the peer this site's study/series catalog. ``query``: answer its live
queries. ``retrieve``: send it the studies it asks for.
"""

from __future__ import annotations

from ..config import Config
from ..errors import ConfigError

GRANTS = ("share", "query", "retrieve")


def granted(config: Config, peer: str, what: str) -> bool:
    """True when ``[peers.PEER] WHAT = true``; a peer that is not configured is granted nothing."""
    assert what in GRANTS
    section = config.section("peers").get(peer)
    if not isinstance(section, dict):
        return False
    value = section.get(what, False)
    if not isinstance(value, bool):
        raise ConfigError(f"[peers.{peer}] {what} = {value!r} in {config.path}: use true or false")
    return value


def peers_granted(config: Config, what: str) -> list[str]:
    """The configured peers granted ``what``, sorted."""
    return sorted(name for name in config.section("peers") if granted(config, name, what))
