"""A real Orthanc for tests: a JSON config in a temporary directory, loopback ports only,
started and stopped by pid, driven through its REST API (urllib)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from conftest import require_tool
from dcmtk import free_port, stop, wait_port
from loopback import loopback_env


class Orthanc:
    """One Orthanc server. `modalities` maps a name to (AET, host, port) of DICOM peers it may call."""

    def __init__(self, workdir: Path, aet: str = "ORTHANC", modalities: dict[str, tuple[str, str, int]] | None = None,
                 **settings: Any):
        self.binary = require_tool("Orthanc")
        self.workdir = workdir
        self.aet = aet
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.config = {
            "Name": "dtools-test",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],  # not the system's plugin directory
            "DicomModalities": {name: list(m) for name, m in (modalities or {}).items()},
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "DicomAssociationCloseDelay": 0,  # release its own associations at once
            "DicomScuTimeout": 30,
            "StableAge": 1,
            "SaveJobs": False,
            "ConcurrentJobs": 1,
            **settings,
        }
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Orthanc":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return  # started already (by `with`): a second one would be left running
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(self.config, indent=2))
        self.log = open(self.workdir / "orthanc.log", "wb")
        # Orthanc 1.10 has no bind option: the loopback shim keeps it on 127.0.0.1
        self.proc = subprocess.Popen([self.binary, "--verbose", str(cfg)], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=loopback_env())
        wait_port(self.http_port, self.proc, timeout=60)
        wait_port(self.dicom_port, self.proc, timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the REST API answers once the database is open
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        raise RuntimeError("Orthanc did not answer on its REST API")

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, timeout=30)
            self.proc = None
            self.log.close()

    def logs(self) -> str:
        return (self.workdir / "orthanc.log").read_text(errors="replace")

    # -- REST -------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, timeout: float = 120) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as rsp:
                raw = rsp.read()
        except urllib.error.HTTPError as exc:
            raise OrthancError(exc.code, exc.read().decode(errors="replace")) from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return raw

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any) -> Any:
        return self.request("POST", path, body)

    def query(self, modality: str, level: str, query: dict[str, str]) -> tuple[str, list[dict]]:
        """Orthanc's C-FIND to a modality: (query id, the answers as {keyword: value})."""
        q = self.post(f"/modalities/{modality}/query", {"Level": level, "Query": query})
        answers = []
        for i in self.get(f"/queries/{q['ID']}/answers"):
            answers.append(self.get(f"/queries/{q['ID']}/answers/{i}/content?simplify"))
        return q["ID"], answers

    def instances(self) -> list[dict]:
        """Every instance Orthanc stores: its tags (simplified) and its id."""
        out = []
        for iid in self.get("/instances"):
            tags = self.get(f"/instances/{iid}/simplified-tags")
            tags["_id"] = iid
            out.append(tags)
        return out

    def file(self, instance_id: str) -> bytes:
        return self.request("GET", f"/instances/{instance_id}/file")


class OrthancError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
