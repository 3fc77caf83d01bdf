"""Two or three real sites for the exchange tests: homes, keys, peers, a relay, sample studies,
and the README's two cron lines run through a real shell."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from conftest import BIN
from mailsites import make_sites

SEND = "dsearch --level instance | dseal --to {peer} | dmail-send"
RECEIVE = "dmail-recv | dseal --open | dindex | dmail-send --receipts"


@dataclass
class Out:
    code: int
    records: list[dict]
    stderr: str
    stdout: str = ""

    def kinds(self, kind: str) -> list[dict]:
        return [r for r in self.records if r.get("kind") == kind]


@dataclass
class Exchange:
    root: Path
    relay: str
    env: dict = field(default_factory=dict)
    names: tuple[str, ...] = ("site-a", "site-b")

    def __post_init__(self) -> None:
        self.homes = make_sites(self.root / "sites", self.relay, self.names)

    def home(self, site: str) -> Path:
        return self.homes[site]

    def sh(self, site: str, script: str, stdin: bytes = b"", timeout: float = 300) -> Out:
        """Run a pipeline of installed commands with DTOOLS_HOME set to the site's home."""
        env = {**os.environ, **self.env, "DTOOLS_HOME": str(self.homes[site]),
               "PATH": f"{BIN}:{os.environ['PATH']}"}
        p = subprocess.run(["bash", "-c", "set -o pipefail; " + script], input=stdin, capture_output=True,
                           env=env, timeout=timeout)
        recs = []
        for line in p.stdout.splitlines():
            if line.strip().startswith(b"{"):
                recs.append(orjson.loads(line))
        return Out(p.returncode, recs, p.stderr.decode("utf-8", "replace"), p.stdout.decode("utf-8", "replace"))

    def ok(self, site: str, script: str, stdin: bytes = b"") -> Out:
        out = self.sh(site, script, stdin)
        assert out.code == 0, f"{site}: {script}: exit {out.code}\n{out.stderr}"
        assert "Traceback" not in out.stderr
        return out

    def add_studies(self, site: str, directory: Path, studies: int = 2, series: int = 1, instances: int = 3) -> list[Path]:
        from dtools.sample import generate

        files = generate(directory, studies, series, instances)
        self.ok(site, f"dindex -q {directory} >/dev/null")
        return files

    def send(self, site: str, peer: str) -> Out:
        return self.ok(site, SEND.format(peer=peer))

    def receive(self, site: str) -> Out:
        return self.ok(site, RECEIVE)

    def status(self, site: str) -> dict[str, dict]:
        return {r["peer"]: r for r in self.ok(site, "dstatus").kinds("peer")}

    def archive(self, site: str) -> list[Path]:
        root = self.homes[site] / "archive"
        return sorted(p for p in root.rglob("*.dcm")) if root.exists() else []

    def opened_envelopes(self, site: str) -> list[tuple[str, str, int]]:
        """(envelope id, sender, instances) of every envelope the site opened, from its ledger."""
        import sqlite3

        db = sqlite3.connect(self.homes[site] / "outbox" / "ledger.db")
        try:
            return db.execute("SELECT envelope_id, sender, instances FROM opened ORDER BY opened_at").fetchall()
        finally:
            db.close()

    def set(self, site: str, section: str, key: str, value: str) -> None:
        """Set ``key = value`` (value in TOML syntax) in a section of a site's config.toml."""
        path = self.homes[site] / "config.toml"
        lines = path.read_text().splitlines()
        head = f"[{section}]"
        if head in lines:
            i = lines.index(head) + 1
            while i < len(lines) and not lines[i].startswith("["):
                if lines[i].split("=", 1)[0].strip() == key:
                    del lines[i]
                    break
                i += 1
            lines.insert(lines.index(head) + 1, f"{key} = {value}")
        else:
            lines += [head, f"{key} = {value}"]
        path.write_text("\n".join(lines) + "\n")
