"""Reading an original and staging its de-identified copy; making a batch of copies durable.

Workers write each copy to a temporary file in ``OUT/.danon-tmp`` (named after the run's
process id); the command makes a batch durable, then renames the files to
``OUT/<Study>/<Series>/<SOP>.dcm``. A killed run leaves only temporaries there, which
the next run removes once their process is gone.
"""

from __future__ import annotations

import os
import secrets
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from .. import security
from ..dicom.archive import archive_path, fsync_dir, fsync_path, pid_alive, syncfs
from ..dicom.walk import looks_like_dataset_start
from ..errors import InputError
from .deid import Deidentifier, burned_in_reason

STAGING = ".danon-tmp"


@dataclass
class Written:
    """A staged copy: where it is, where it goes, and what to print and remember once it is there."""

    tmp: str
    target: str
    record: dict
    rows: list[tuple]
    basis: str


def read_original(path: str) -> Dataset:
    """The whole data set of a file, or InputError with a short reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return pydicom.dcmread(path)
            except InvalidDicomError:
                # no preamble: accept a bare data set (older files) the way dindex does
                with open(path, "rb") as f:
                    head = f.read(16)
                if len(head) >= 8 and looks_like_dataset_start(head):
                    return pydicom.dcmread(path, force=True)
                raise InputError("not a DICOM file") from None
    except InputError:
        raise
    except IsADirectoryError:
        raise InputError("is a directory") from None
    except PermissionError:
        raise InputError("permission denied; check the file's mode or run as its owner") from None
    except FileNotFoundError:
        raise InputError("no such file") from None
    except (EOFError, struct.error):
        raise InputError("truncated DICOM file") from None
    except RecursionError:
        raise InputError("sequences nested too deeply to read") from None
    except OSError as exc:
        raise InputError(f"cannot read ({exc.strerror})") from None
    except Exception as exc:  # a damaged file must not stop the run
        raise InputError(f"unreadable DICOM file ({_why(exc)})") from None


def deidentify_file(path: str, deid: Deidentifier, out: str, parent: int, allow_burned_in: bool) -> Written:
    """Read ``path``, de-identify it and stage the copy; the original is only read."""
    ds = read_original(path)
    if not allow_burned_in:
        reason = burned_in_reason(ds)
        if reason is not None:
            raise InputError(f"{reason}; not copied (check the images, then rerun with --allow-burned-in)")
    for tag, name in ((0x0020000D, "StudyInstanceUID"), (0x0020000E, "SeriesInstanceUID"), (0x00080018, "SOPInstanceUID")):
        if tag not in ds or not str(ds[tag].value or "").strip("\0 "):
            raise InputError(f"has no {name}; danon files copies by UID")
    ts = _transfer_syntax(ds)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outcome = deid.apply(ds)
            target = archive_path(Path(out), outcome.study, outcome.series, outcome.sop)
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = outcome.sop_class or "1.2.840.10008.5.1.4.1.1.7"
            meta.MediaStorageSOPInstanceUID = outcome.sop
            meta.TransferSyntaxUID = ts
            ds.file_meta = meta
            ds.preamble = b"\0" * 128  # a preamble can hold a TIFF header with the patient's name
            tmp = Path(out) / STAGING / f".{parent}.{secrets.token_hex(8)}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), security.file_mode())
            try:
                with os.fdopen(fd, "wb") as f:
                    ds.save_as(f, enforce_file_format=True)
            except BaseException:
                _unlink(tmp)
                raise
    except InputError:
        raise
    except RecursionError:
        raise InputError("sequences nested too deeply to de-identify") from None
    except OSError:
        raise  # the output directory: the command reports it and stops
    except Exception as exc:
        raise InputError(f"cannot de-identify ({_why(exc)})") from None
    record = {"kind": "instance", "path": str(target), "PatientID": outcome.patient,
              "StudyInstanceUID": outcome.study, "SeriesInstanceUID": outcome.series,
              "SOPInstanceUID": outcome.sop, "SOPClassUID": outcome.sop_class}
    if outcome.modality:
        record["Modality"] = outcome.modality
    return Written(str(tmp), str(target), record, outcome.rows, outcome.patient_basis)


def _why(exc: BaseException) -> str:
    """An exception as one short line (pydicom's messages can span several, with a traceback)."""
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text[:120]}"


def _transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "") or "").strip("\0 ") if meta is not None else ""
    if ts:
        return ts
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit is not False:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# -- the command's side ---------------------------------------------------------------
def staging_dir(out: Path) -> Path:
    d = out / STAGING
    d.mkdir(parents=True, exist_ok=True)
    return d


def remove_temporaries(out: Path, pid: int | None = None) -> int:
    """Remove the staged files of run ``pid``, or (None) of every run that is no longer alive."""
    d = out / STAGING
    n = 0
    try:
        names = os.listdir(d)
    except OSError:
        return 0
    for name in names:
        parts = name.split(".")
        if len(parts) != 4 or parts[0] != "" or parts[3] != "tmp" or not parts[1].isdigit():
            continue
        owner = int(parts[1])
        if pid is not None and owner != pid:
            continue
        if pid is None and pid_alive(owner):
            continue
        try:
            os.unlink(d / name)
            n += 1
        except OSError:
            pass
    return n


def sync_tree(out: Path, files: list[str]) -> None:
    """Make ``files`` (and their directories) durable: syncfs(2) once for the whole batch, where the
    system has it, else one fsync per file and per directory."""
    if not files:
        return
    if syncfs(out):
        return
    for p in files:
        try:
            fsync_path(Path(p))
        except OSError:
            pass
    for d in {os.path.dirname(p) for p in files}:
        fsync_dir(Path(d))
