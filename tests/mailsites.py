"""Two site homes that know each other (keys, peers, one relay), for the dmail tests."""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

import orjson

from dtools.config import Config
from dtools.seal.keys import format_public_identity, generate_identity


def make_sites(root: Path, relay: str, names: tuple[str, ...] = ("site-a", "site-b")) -> dict[str, Path]:
    homes = {}
    idents = {}
    for name in names:
        home = root / name
        home.mkdir(mode=0o700, parents=True)
        idents[name] = generate_identity(Config(home), name)
        homes[name] = home
    for name in names:
        peers = "".join(
            f'[peers.{other}]\nidentity = "{format_public_identity(idents[other].public())}"\n'
            for other in names if other != name)
        (homes[name] / "config.toml").write_text(f'[site]\nname = "{name}"\n[relay]\nurl = "{relay}"\n{peers}')
    return homes


def fake_envelope(directory: Path, size: int, to: str = "site-b", sender: str = "site-a") -> dict:
    """Random bytes standing in for a sealed envelope (dmail treats envelopes as opaque)."""
    envelope_id = secrets.token_hex(16)
    path = Path(directory) / f"{envelope_id}.dtenv"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size)
    path.write_bytes(data)
    return {"kind": "envelope", "path": str(path), "envelope_id": envelope_id, "from": sender, "to": [to],
            "bytes": size, "sha256": hashlib.sha256(data).hexdigest()}


def lines(records: list[dict]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in records)


def mark_opened(home: Path, envelope_id: str, sender: str = "site-a", instances: int = 1, owed: bool = True) -> None:
    """What 'dseal --open' records for an envelope it opened (the fake ones cannot be opened)."""
    from dtools.exchange.ledger import Ledger, ledger_path

    led = Ledger(ledger_path(home))
    try:
        led.mark_opened(envelope_id, sender, "0" * 64, instances, owed)
    finally:
        led.close()
