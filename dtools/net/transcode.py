"""Converting a stored instance to another transfer syntax before it is sent (dstore, C-MOVE, C-GET).

What dtools converts: between the uncompressed syntaxes (Implicit and Explicit VR Little
Endian, Explicit VR Big Endian, Deflated Explicit VR Little Endian) always, and from a
compressed syntax to an uncompressed one when pydicom has a pixel data decoder for it
(pylibjpeg with its libjpeg, openjpeg and RLE plugins, python-gdcm). Never into a
compressed syntax: dtools does not compress, so nothing lossless ever becomes lossy.
An instance decompressed from a lossy syntax keeps that fact in Lossy Image Compression.
"""

from __future__ import annotations

import functools
import logging
from io import BytesIO
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

log = logging.getLogger("dtools")

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian)
# The order dtools converts into, when a peer accepted several for one SOP class:
# explicit VR keeps every VR; deflate costs time; big endian is retired.
TARGETS = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian)

# Syntaxes whose decompressed pixels differ from the original image (PS3.5 8.2): a
# decompressed copy says so in Lossy Image Compression (0028,2110), with the method.
LOSSY = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",  # JPEG Extended
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",  # JPEG-LS Near-Lossless
}

# Decoding plugins in the order tried, fastest first as benchmarks/bench_transcode.py
# measured: python-gdcm decodes the JPEG family, JPEG-LS and JPEG 2000 about twice as fast
# as pylibjpeg (which still decodes what gdcm refuses, such as 12-bit extended JPEG), and
# pylibjpeg-rle is about ten times faster than pydicom's own RLE decoder. Any other
# available plugin is tried after these.
PLUGIN_ORDER: dict[str, tuple[str, ...]] = {"1.2.840.10008.1.2.5": ("pylibjpeg",)}  # RLE Lossless
DEFAULT_ORDER = ("gdcm", "pylibjpeg")

# Byte-valued VRs whose values hold words of this many bytes, swapped between endians.
_WORD = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


class ConversionError(Exception):
    """The instance cannot be converted to the requested transfer syntax."""


def name(uid: str) -> str:
    """A transfer syntax (or SOP class) by its name, for messages."""
    n = UID(uid).name
    return n if n and n != uid else uid


@functools.lru_cache(maxsize=None)
def decodable(ts: str) -> bool:
    """pydicom has an installed decoder for the compressed syntax `ts`."""
    try:
        from pydicom.pixels import get_decoder

        return get_decoder(UID(ts)).is_available
    except Exception:  # noqa: BLE001 - no decoder for this syntax, or numpy missing
        return False


def can_convert(src: str, dst: str) -> bool:
    """An instance stored in `src` can be sent in `dst`."""
    if src == dst:
        return True
    if dst not in UNCOMPRESSED:
        return False  # never compress
    return src in UNCOMPRESSED or (UID(src).is_compressed and decodable(src))


def why_not(src: str, dst: str) -> str:
    """Why `src` cannot be sent as `dst` (can_convert is False), for a failure message."""
    if dst not in UNCOMPRESSED:
        return f"dtools does not compress ({name(src)} to {name(dst)})"
    return f"no decoder for {name(src)} is installed (pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg)"


def plugins(ts: str) -> list[str]:
    from pydicom.pixels import get_decoder

    available = list(get_decoder(UID(ts)).available_plugins)
    first = [p for p in PLUGIN_ORDER.get(str(ts), DEFAULT_ORDER) if p in available]
    return first + [p for p in available if p not in first]


def convert(path: str, dst: str, sop_instance: str | None = None) -> Dataset:
    """The instance in file `path`, converted to `dst`, as a Dataset pynetdicom sends unchanged.

    When the VR encoding or byte order changes, the data set is encoded in `dst` here and
    read back, so that pynetdicom writes its elements as they are (it refuses a data set
    read in another encoding). `sop_instance` is the data set's own UID, sent as the
    Affected SOP Instance UID. Raises ConversionError.
    """
    try:
        ds = dcmread(path, force=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt files
        raise ConversionError(f"cannot read ({exc})") from None
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    ds.file_meta = meta
    if "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                  ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    src = UID(meta.TransferSyntaxUID)
    if not can_convert(src, dst):
        raise ConversionError(why_not(src, dst))
    dst = UID(dst)
    uid = str(sop_instance or ds.SOPInstanceUID)
    if _encoding(src) == _encoding(dst) and not src.is_deflated and not dst.is_deflated:
        # Same VR and byte order (decompressing to Explicit VR Little Endian, the common
        # case): pynetdicom encodes the data set once, as read; no encode-and-reread here.
        if src != dst:
            decompress(ds, src)
        meta.TransferSyntaxUID = dst
        meta.MediaStorageSOPInstanceUID = uid
        return ds
    return wrap(encode(ds, src, dst), str(ds.SOPClassUID), uid, dst)


def _encoding(ts: UID) -> tuple[bool, bool]:
    return ts.is_implicit_VR, ts.is_little_endian


def encode(ds: Dataset, src: UID, dst: UID) -> bytes:
    """The data set `ds` (read in `src`) encoded in `dst`: data set bytes, no file meta."""
    from pynetdicom.dsutils import encode as encode_dataset

    if src.is_compressed and src != dst:
        decompress(ds, src)
    little = ds.original_encoding[1]
    little = src.is_little_endian if little is None else little
    if little != dst.is_little_endian:
        swap_words(ds)
    try:
        data = encode_dataset(ds, dst.is_implicit_VR, dst.is_little_endian, dst.is_deflated)
    except Exception as exc:  # noqa: BLE001 - values pydicom cannot write in this syntax
        raise ConversionError(f"cannot encode in {name(dst)} ({exc})") from None
    if data is None:
        raise ConversionError(f"cannot encode in {name(dst)}")
    return data


def decompress(ds: Dataset, src: UID) -> None:
    """Decode the pixel data in place, trying the installed plugins fastest first."""
    if "PixelData" not in ds:
        return  # a compressed syntax without pixel data: nothing to decode
    errors = []
    for plugin in plugins(src):
        try:
            ds.decompress(decoding_plugin=plugin, generate_instance_uid=False)
            break
        except Exception as exc:  # noqa: BLE001 - try the next plugin
            errors.append(f"{plugin}: {exc}")
    else:
        raise ConversionError(f"cannot decode {name(src)} pixel data ({'; '.join(errors) or 'no decoder'})")
    if str(src) in LOSSY and ds.get("LossyImageCompression") != "01":
        ds.LossyImageCompression = "01"
        methods = list(ds.get("LossyImageCompressionMethod") or [])
        if LOSSY[str(src)] not in methods:
            ds.LossyImageCompressionMethod = [*methods, LOSSY[str(src)]] if methods else LOSSY[str(src)]


def swap_words(ds: Dataset) -> None:
    """Swap the bytes of word-valued byte strings (OW, OF, OL, OD, OV), in sequence items
    too, for a change of endianness; pydicom converts the numbers it parses itself.

    Pixel Data in OW holds words of Bits Allocated (at least 16 bits): the same reading
    pydicom's own decoder makes of big-endian pixel data.
    """
    bits = ds.get("BitsAllocated")
    for elem in ds:  # parses each element, in the data set's own encoding
        if elem.VR == "SQ":
            for item in elem.value or ():
                swap_words(item)
            continue
        size = _WORD.get(str(elem.VR))
        if elem.tag == 0x7FE00010 and size and isinstance(bits, int) and bits > 16:
            size = bits // 8
        if size and isinstance(elem.value, (bytes, bytearray)) and len(elem.value) % size == 0:
            elem.value = _swapped(elem.value, size)


def _swapped(value: bytes, size: int) -> bytes:
    import numpy as np

    return np.frombuffer(value, dtype=f">u{size}").astype(f"<u{size}").tobytes()


def wrap(data: bytes, sop_class: str, sop_instance: str, ts: str) -> Dataset:
    """Data set bytes in `ts` as a Dataset whose elements pynetdicom will write unchanged."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ts
    uid = UID(ts)
    if uid.is_deflated:  # pynetdicom deflates it again
        import zlib

        data = zlib.decompress(data, -zlib.MAX_WBITS)
    ds = read_dataset(BytesIO(data), uid.is_implicit_VR, uid.is_little_endian)
    ds.file_meta = meta
    return ds


def reencode(path: str, sop_instance: str) -> Any:
    """The file's data set as it is (same syntax), to send under the data set's own UID
    when the file meta names another instance (as storescu does)."""
    return convert(path, str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID), sop_instance)
