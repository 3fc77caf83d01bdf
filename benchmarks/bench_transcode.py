#!/usr/bin/env python3
"""Benchmark decompression for transcoding against DCMTK's dcmdjpeg, dcmdjpls and dcmdrle.

    nice python benchmarks/bench_transcode.py [--ct 20] [--dx 4] [--repeat 3] [--plugin NAME]

The corpus (made once in benchmarks/scratch/transcode/): --ct synthetic CT-like images
(512x512, 12 bits in 16) and --dx DX-like ones (2048x2048), each compressed with DCMTK
as JPEG Lossless SV1 (dcmcjpeg +e1), JPEG-LS Lossless (dcmcjpls +el) and RLE (dcmcrle),
and with pylibjpeg-openjpeg as JPEG 2000 Lossless; plus 8-bit copies as JPEG Baseline
(dcmcjpeg +eb).

In the same run, for each set of files: dtools' conversion to Explicit VR Little Endian
(dtools.net.transcode.convert: read, decode, encode; then the data set written to a file),
all files in one process as dstore and dserve do; and the DCMTK decompressor on the same
files, one process per file as the tool is used (its start-up is included: about 10 ms).
Throughput is megabytes of uncompressed pixel data per second; the ratio is dtools / DCMTK
(target >= 0.5). Also, for the backend choice, pydicom's decode alone with each
installed plugin (pylibjpeg, gdcm; the RLE column of pylibjpeg is pylibjpeg-rle).
Medians of --repeat runs.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import SCRATCH, machine  # noqa: E402

SETS = {  # name -> (transfer syntax UID, DCMTK compressor argv, DCMTK decompressor)
    "JPEG Lossless SV1": ("1.2.840.10008.1.2.4.70", ["dcmcjpeg", "+e1"], "dcmdjpeg"),
    "JPEG-LS Lossless": ("1.2.840.10008.1.2.4.80", ["dcmcjpls", "+el"], "dcmdjpls"),
    "JPEG Baseline (8 bit)": ("1.2.840.10008.1.2.4.50", ["dcmcjpeg", "+eb"], "dcmdjpeg"),
    "RLE Lossless": ("1.2.840.10008.1.2.5", ["dcmcrle"], "dcmdrle"),
    "JPEG 2000 Lossless": ("1.2.840.10008.1.2.4.90", None, None),
}


def synthetic(path: Path, size: int, seed: int, bits: int) -> None:
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    body = np.hypot(x - size / 2, y - size / 2) < size * 0.45
    img = 1000 + 600 * np.sin(x / (size / 12) + seed) * np.cos(y / (size / 9)) + rng.normal(0, 25, (size, size))
    img = np.where(body, img, 0)
    if bits == 8:
        img = (img / 4096 * 255).clip(0, 255).astype(np.uint8)
    else:
        img = img.clip(0, 4095).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "BENCH", "OT"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored = 8 if bits == 8 else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = img.tobytes()
    ds.save_as(path, enforce_file_format=True)


def corpus(kind: str, n: int, size: int) -> dict[str, list[Path]]:
    """Compressed files per set; made once."""
    root = SCRATCH / "transcode" / f"{kind}-{n}"
    out: dict[str, list[Path]] = {}
    for name, (ts, compressor, _tool) in SETS.items():
        d = root / name.split()[0].lower().replace("-", "") / ("8bit" if "8 bit" in name else "")
        files = sorted(d.glob("*.dcm"))
        if len(files) != n:
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            for i in range(n):
                raw = d / f"raw{i:03d}.tmp"
                synthetic(raw, size, i, 8 if "8 bit" in name else 12)
                target = d / f"{i:03d}.dcm"
                if compressor:
                    subprocess.run([*compressor, str(raw), str(target)], check=True, capture_output=True)
                else:
                    import pydicom

                    ds = pydicom.dcmread(raw)
                    ds.compress(ts, encoding_plugin="pylibjpeg")
                    ds.save_as(target)
                raw.unlink()
            files = sorted(d.glob("*.dcm"))
        out[name] = files
    return out


def pixel_mb(files: list[Path]) -> float:
    import pydicom

    total = 0
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        total += ds.Rows * ds.Columns * ds.SamplesPerPixel * ds.BitsAllocated // 8 * int(ds.get("NumberOfFrames", 1) or 1)
    return total / 1e6


def run_dtools(files: list[Path], outdir: Path) -> float:
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom.dsutils import encode

    from dtools.net.transcode import convert

    t = time.perf_counter()
    for f in files:
        ds = convert(str(f), ExplicitVRLittleEndian)
        (outdir / f.name).write_bytes(encode(ds, False, True))
    return time.perf_counter() - t


def run_dcmtk(tool: str, files: list[Path], outdir: Path) -> float:
    t = time.perf_counter()
    for f in files:
        subprocess.run([tool, str(f), str(outdir / f.name)], check=True, capture_output=True)
    return time.perf_counter() - t


def run_decode(files: list[Path], plugin: str) -> float | None:
    import pydicom
    from pydicom.pixels import get_decoder

    ts = pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID
    if plugin not in get_decoder(ts).available_plugins:
        return None
    datasets = [pydicom.dcmread(f) for f in files]
    t = time.perf_counter()
    try:
        for ds in datasets:
            ds.decompress(decoding_plugin=plugin, generate_instance_uid=False)
    except Exception:  # noqa: BLE001 - the plugin cannot decode these files
        return None
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ct", type=int, default=20, help="512x512 images per set")
    ap.add_argument("--dx", type=int, default=4, help="2048x2048 images per set")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--plugin", default=None, help="force one decoding plugin for dtools (pylibjpeg, gdcm)")
    args = ap.parse_args(argv)
    for tool in ("dcmcjpeg", "dcmdjpeg", "dcmcjpls", "dcmdjpls", "dcmcrle", "dcmdrle"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found: apt-get install dcmtk")
    if args.plugin:
        from dtools.net import transcode

        for ts, *_rest in SETS.values():
            transcode.PLUGIN_ORDER[ts] = (args.plugin,)
    import pynetdicom
    import pydicom

    print(f"machine: {machine()}; pydicom {pydicom.__version__}, pynetdicom {pynetdicom.__version__}")
    print(f"load average at start: {Path('/proc/loadavg').read_text().split()[:3]}")
    print("\n| images | set | MB pixels | dtools s | DCMTK s | dtools MB/s | DCMTK MB/s | ratio | decode only: pylibjpeg / gdcm s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    ratios = []
    SCRATCH.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-transcode-", dir=SCRATCH))
    try:
        for kind, n, size in (("CT 512²", args.ct, 512), ("DX 2048²", args.dx, 2048)):
            if not n:
                continue
            sets = corpus(kind.split()[0].lower(), n, size)
            for name, files in sets.items():
                tool = SETS[name][2]
                mb = pixel_mb(files)
                ours, theirs, dec = [], [], {"pylibjpeg": [], "gdcm": []}
                for _ in range(args.repeat):
                    for label in ("ours", "theirs"):
                        out = work / label
                        shutil.rmtree(out, ignore_errors=True)
                        out.mkdir()
                        if label == "ours":
                            ours.append(run_dtools(files, out))
                        elif tool:
                            theirs.append(run_dcmtk(tool, files, out))
                    for plugin in dec:
                        dec[plugin].append(run_decode(files, plugin))
                o = statistics.median(ours)
                th = statistics.median(theirs) if theirs else None
                ratio = th / o if th else None
                if ratio:
                    ratios.append((kind, name, ratio))
                decs = " / ".join(f"{statistics.median(v):.3f}" if None not in v else "–" for v in dec.values())
                print(f"| {kind} ×{n} | {name} | {mb:.1f} | {o:.3f} | {f'{th:.3f}' if th else '–'} | {mb / o:.1f} | "
                      f"{f'{mb / th:.1f}' if th else '–'} | {f'**{ratio:.2f}**' if ratio else '–'} | {decs} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if ratios:
        worst = min(ratios, key=lambda r: r[2])
        print(f"\nlowest ratio: {worst[2]:.2f} ({worst[0]}, {worst[1]}); target >= 0.50")
    print(f"load average at end: {Path('/proc/loadavg').read_text().split()[:3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
