"""Helpers for DICOM network tests: free ports, servers started and stopped by pid, synthetic instances."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from loopback import loopback_env

BIN = Path(sys.executable).parent
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 15.0) -> None:
    """Bounded wait until something accepts on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
    """Stop a server by its pid; kill it if it does not exit in time."""
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return proc.returncode


def start_dserve(home: Path, port: int, *args: str, env: dict | None = None) -> subprocess.Popen:
    full_env = dict(os.environ)
    full_env.pop("DTOOLS_HOME", None)
    full_env.update(env or {})
    proc = subprocess.Popen(
        [str(BIN / "dserve"), "--home", str(home), "--bind", "127.0.0.1", "--port", str(port), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env,
    )
    # drain both pipes as they fill, so dserve never blocks writing records
    proc.out = bytearray()  # type: ignore[attr-defined]
    proc.err = bytearray()  # type: ignore[attr-defined]
    proc.readers = [  # type: ignore[attr-defined]
        threading.Thread(target=_drain, args=(proc.stdout, proc.out), daemon=True),
        threading.Thread(target=_drain, args=(proc.stderr, proc.err), daemon=True),
    ]
    for t in proc.readers:
        t.start()
    try:
        wait_port(port, proc)
    except Exception:
        stop(proc)
        raise RuntimeError(f"dserve did not start: {bytes(proc.err).decode(errors='replace')}") from None
    return proc


def _drain(stream, buf: bytearray) -> None:
    for chunk in iter(lambda: stream.read1(65536), b""):
        buf.extend(chunk)


def output(proc: subprocess.Popen) -> tuple[bytes, str]:
    """stdout and stderr of a stopped dserve."""
    for t in getattr(proc, "readers", []):
        t.join(10)
    return bytes(proc.out), bytes(proc.err).decode("utf-8", "replace")  # type: ignore[attr-defined]


def start_storescp(tool: str, outdir: Path, port: int, aet: str = "STORESCP", *args: str,
                   log: Path | None = None) -> subprocess.Popen:
    """storescp on `port`; with `log`, its output goes to that file (for -d, which would fill a pipe)."""
    outdir.mkdir(parents=True, exist_ok=True)
    accept = [] if "-xf" in args else ["+xa"]  # an association profile says what it accepts
    sink = open(log, "wb") if log is not None else subprocess.PIPE
    try:
        proc = subprocess.Popen(
            [tool, *accept, "--aetitle", aet, "--output-directory", str(outdir), *args, str(port)],
            stdout=sink, stderr=subprocess.STDOUT if log is not None else subprocess.PIPE,
            env=loopback_env(),  # storescp has no bind option
        )
    finally:
        if log is not None:
            sink.close()
    wait_port(port, proc)
    return proc


def run_tool(*argv: str, timeout: float = 120, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, timeout=timeout, input=input)


def make_instance(path: Path, *, patient: str = "DOE^JANE", patient_id: str = "P1", study_uid: str | None = None,
                  series_uid: str | None = None, sop_uid: str | None = None, study_date: str = "20240102",
                  modality: str = "CT", accession: str = "A1", description: str = "CHEST", series_number: int = 1,
                  instance_number: int = 1, rows: int = 16, columns: int = 16) -> Path:
    """A small, valid CT Image Storage file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyDate = study_date
    ds.StudyTime = "101010"
    ds.AccessionNumber = accession
    ds.Modality = modality
    ds.StudyDescription = description
    ds.PatientName = patient
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(rows * columns * 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_corpus(root: Path, n: int, studies: int = 1, series_per_study: int = 1, **kw) -> list[Path]:
    """n instances spread over studies and series (round robin), in root/."""
    plan = []
    for s in range(studies):
        study_uid = generate_uid()
        for r in range(series_per_study):
            plan.append((s, study_uid, generate_uid(), r + 1))
    paths = []
    for i in range(n):
        s, study_uid, series_uid, series_number = plan[i % len(plan)]
        paths.append(make_instance(
            root / f"{i:06d}.dcm", study_uid=study_uid, series_uid=series_uid, series_number=series_number,
            instance_number=i + 1, patient_id=f"P{s}", accession=f"A{s}", **kw,
        ))
    return paths
