"""Helpers for the dseal tests: synthetic DICOM files and two configured site homes."""

from __future__ import annotations

import os
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dtools.config import Config
from dtools.seal import keys

SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage


def make_dicom(path: Path, study: str | None = None, series: str | None = None, sop: str | None = None,
               pixels: bytes | int = 256, patient: str = "SYNTHETIC^TEST") -> Path:
    """Write a small synthetic DICOM Part 10 file (no real patient data)."""
    if isinstance(pixels, int):
        pixels = os.urandom(pixels)
    if len(pixels) % 2:
        pixels += b"\0"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SC_IMAGE
    meta.MediaStorageSOPInstanceUID = sop or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SC_IMAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.PatientName = patient
    ds.PatientID = "SYN0001"
    ds.StudyDate = "20240101"
    ds.Modality = "OT"
    # Rows x Columns need not match the bytes exactly: dseal never decodes pixels.
    ds.Columns = min(len(pixels), 1024)
    ds.Rows = min(max(1, len(pixels) // 1024), 65535)
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = pixels
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_study(root: Path, n: int = 3, series: int = 1, pixels: int = 256) -> tuple[str, list[Path]]:
    study = generate_uid()
    series_uids = [generate_uid() for _ in range(series)]
    files = [make_dicom(root / f"img{i:04d}.dcm", study, series_uids[i % series], pixels=pixels) for i in range(n)]
    return study, files


def make_sites(tmp_path: Path, names=("site-a", "site-b")) -> dict[str, Path]:
    """Homes for several sites, each with keys and every other site configured as a peer."""
    homes = {n: tmp_path / n for n in names}
    lines = {}
    for n, h in homes.items():
        h.mkdir(mode=0o700, parents=True, exist_ok=True)
        lines[n] = keys.format_public_identity(keys.generate_identity(Config(h), n).public())
    for n, h in homes.items():
        text = f'[site]\nname = "{n}"\n'
        for other, line in lines.items():
            if other != n:
                text += f'\n[peers.{other}]\nidentity = "{line}"\n'
        (h / "config.toml").write_text(text)
    return homes


# Peak RSS of a command. A forked child's high-water mark includes the parent's pages
# from before exec, so the command is started from a small fresh interpreter, and that
# interpreter reports its children's ru_maxrss.
_LAUNCHER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[2:])\n"
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "sys.exit(rc)\n"
)


def run_measured(cmd: list[str], stdin: bytes = b"", timeout: float = 600) -> tuple[int, bytes, bytes, float, int]:
    """(returncode, stdout, stderr, wall seconds, peak RSS in KiB) of ``cmd``."""
    import subprocess
    import sys
    import tempfile
    import time

    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss, tempfile.TemporaryFile() as out, \
            tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as inp:
        inp.write(stdin)
        inp.seek(0)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, "-c", _LAUNCHER, rss.name, *cmd], stdin=inp, stdout=out, stderr=err,
                             timeout=timeout)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        text = open(rss.name).read().strip()
        return rc, out.read(), err.read(), wall, int(text) if text else 0
