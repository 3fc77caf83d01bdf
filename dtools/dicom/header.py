"""DICOM headers to records: the top-level attributes of a file, decoded to Unicode.

Indexing must be faster than ``pydicom.dcmread(stop_before_pixels=True)``, and pydicom's
element-by-element value conversion is three times slower than that read alone. So
little-endian files (almost all of them) are walked with ``struct`` (dtools.dicom.walk),
stopping at Pixel Data, and their values are decoded here, text with pydicom's own charset
functions. Anything unusual (big endian, deflate, odd structure) falls back to pydicom.
tests/test_header.py checks that both paths agree on pydicom's whole test corpus.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
import warnings
from typing import Any

from pydicom.charset import TEXT_VR_DELIMS, convert_encodings, decode_bytes
from pydicom.datadict import keyword_for_tag

from ..errors import InputError
from .walk import NUMERIC, TEXT_VRS, Unsupported, scan

PN_DELIMS = {0x5E}
CHARSET_VRS = frozenset((b"LO", b"LT", b"PN", b"SH", b"ST", b"UC", b"UT"))
SINGLE_VALUE_VRS = frozenset((b"LT", b"ST", b"UT", b"UR"))  # backslash is text, not a separator
MAX_NUMBERS = 16  # longer numeric arrays (LUTs, tables) are not useful search keys
MAX_TEXT = 10240  # longer text values are cut for the index
DEFAULT_CHARSETS = ("", "ISO_IR 6", "ISO_IR 100", "ISO 2022 IR 6", "ISO 2022 IR 100")

_KEYWORDS: dict[int, str] = {}


class Header:
    """The top-level attributes of one DICOM file."""

    __slots__ = ("attrs", "transfer_syntax", "text")

    def __init__(self, attrs: dict[str, Any], transfer_syntax: str | None, text: list[str]):
        self.attrs = attrs  # keyword -> str | int | float | list
        self.transfer_syntax = transfer_syntax
        self.text = text  # every text value, for free-text search


def keyword(tag: int) -> str | None:
    try:
        return _KEYWORDS[tag]
    except KeyError:
        kw = keyword_for_tag(tag) or None if (tag >> 16) % 2 == 0 else None
        _KEYWORDS[tag] = kw
        return kw


# -- value conversion --------------------------------------------------------------
def _strip(vr: bytes, s: str) -> str:
    if vr == b"UI":
        return s.rstrip("\0 ")
    if vr in (b"LT", b"ST", b"UT", b"UC"):
        return s.rstrip("\0 ")
    return s.strip("\0 ")


def _number(vr: bytes, s: str) -> Any:
    try:
        if vr == b"IS":
            return int(float(s)) if "." in s or "e" in s.lower() else int(s)
        value = float(s)
        return value if value == value and value not in (float("inf"), float("-inf")) else s
    except ValueError:
        return s


def convert(vr: bytes, raw: bytes, encodings: list[str] | None) -> Any:
    """A raw value as a record value: str, number, or list for several values."""
    if vr in NUMERIC:
        fmt, size = NUMERIC[vr]
        count = len(raw) // size
        if count == 0 or count > MAX_NUMBERS:
            return None
        values = struct.unpack(f"<{count}{fmt}", raw[: count * size])
        if vr in (b"FL", b"FD"):
            values = tuple(v if v == v and abs(v) != float("inf") else None for v in values)
        return values[0] if count == 1 else list(values)
    if len(raw) > MAX_TEXT:
        raw = raw[:MAX_TEXT]
    if vr in SINGLE_VALUE_VRS:
        parts = [raw]
    else:
        parts = raw.split(b"\\")
    out = []
    for part in parts:
        if vr == b"PN":
            part = part.rstrip(b" \0")
        if encodings is not None and vr in CHARSET_VRS:
            if vr == b"PN":
                comps = [decode_bytes(c, encodings, PN_DELIMS) for c in part.split(b"=")]
                while comps and not comps[-1]:
                    comps.pop()
                s = "=".join(comps)
            else:
                s = decode_bytes(part, encodings, TEXT_VR_DELIMS)
        else:
            s = part.decode("latin-1")
        s = _strip(vr, s)
        if vr in (b"IS", b"DS"):
            out.append(_number(vr, s) if s else None)
        else:
            out.append(s)
    if len(out) == 1:
        return out[0]
    return out


def _encodings(raw: bytes | None) -> list[str] | None:
    """Python codecs for a Specific Character Set value; None means latin-1 is right."""
    if raw is None:
        return None
    names = [p.decode("ascii", "replace").strip("\0 ") for p in raw.split(b"\\")]
    if len(names) == 1 and names[0] in DEFAULT_CHARSETS:
        return None
    if all(n in DEFAULT_CHARSETS for n in names):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_encodings(names)


FTS_VRS = CHARSET_VRS | frozenset((b"CS", b"AE"))


def _attrs_from_elements(buf, elements: list, keys: frozenset[str] | None) -> tuple[dict, list[str]]:
    charset_raw = None
    for tag, _vr, start, length in elements:
        if tag == 0x00080005:
            charset_raw = buf[start : start + length]
            break
        if tag > 0x00080005:
            break
    encodings = _encodings(charset_raw)
    attrs: dict[str, Any] = {}
    text: list[str] = []
    with warnings.catch_warnings():
        # pydicom warns about odd charsets and values; a bad value is still indexed as decoded
        warnings.simplefilter("ignore")
        for tag, vr, start, length in elements:
            if length == 0:
                continue
            is_text = vr in FTS_VRS
            kw = _KEYWORDS[tag] if tag in _KEYWORDS else keyword(tag)
            if kw is None or (keys is not None and not is_text and kw not in keys):
                continue
            value = convert(vr, buf[start : start + length], encodings)
            if value is None or value == "" or value == []:
                continue
            if keys is None or kw in keys:
                attrs[kw] = value
            if is_text:
                if isinstance(value, list):
                    text.extend(str(v) for v in value if v)
                else:
                    text.append(value)
    return attrs, text


# -- the pydicom path --------------------------------------------------------------
def _read_with_pydicom(path: str) -> Header:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with _open_regular(path) as f:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
            ds.decode()
    except InvalidDicomError:
        raise InputError("not a DICOM file") from None
    except (EOFError, struct.error):
        raise InputError("truncated DICOM file") from None
    except (ValueError, KeyError, TypeError, AttributeError, NotImplementedError, LookupError) as exc:
        raise InputError(f"unreadable DICOM file ({type(exc).__name__}: {str(exc)[:120]})") from None
    attrs: dict[str, Any] = {}
    text: list[str] = []
    try:
        for elem in ds:
            vr = str(elem.VR).encode()
            kw = elem.keyword
            if not kw or elem.tag.is_private or (vr not in TEXT_VRS and vr not in NUMERIC) or elem.is_empty:
                continue
            value = elem.value
            values = list(value) if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
            conv = []
            for v in values:
                if vr in NUMERIC or vr in (b"IS", b"DS"):
                    try:
                        conv.append(int(v) if vr == b"IS" or vr in (b"US", b"SS", b"UL", b"SL") else float(v))
                    except (TypeError, ValueError):
                        conv.append(str(v))
                else:
                    conv.append(_strip(vr, str(v)))
            if not conv or (vr in NUMERIC and len(conv) > MAX_NUMBERS):
                continue
            out = conv[0] if len(conv) == 1 else conv
            if out == "":
                continue
            attrs[kw] = out
            if vr in CHARSET_VRS or vr in (b"CS", b"AE"):
                text.extend(str(v) for v in conv if v)
    except (ValueError, TypeError, EOFError, struct.error) as exc:
        raise InputError(f"unreadable DICOM file ({type(exc).__name__}: {str(exc)[:120]})") from None
    ts = None
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        ts = str(meta.TransferSyntaxUID)
    return Header(attrs, ts, text)


# -- entry points --------------------------------------------------------------------
def header_from_bytes(image: bytes, keys: frozenset[str] | None = None) -> Header | None:
    """Parse a whole file image held in memory (as a C-STORE receives it).

    Returns None when the encoding is one the fast walk leaves to pydicom (big endian,
    deflate); raises InputError for a damaged image."""
    try:
        elements, ts, _had_meta = scan(image)
    except (Unsupported, struct.error):
        return None
    attrs, text = _attrs_from_elements(image, elements, keys)
    return Header(attrs, ts, text)


def _open_regular(path: str):
    """Open a file for reading, refusing anything but a regular file. A FIFO put where a
    file was (between the walk and the read) would block a plain open() for ever."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise InputError("is a directory")
        if not stat.S_ISREG(mode):
            raise InputError("not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_header(path: str | os.PathLike, size: int | None = None, keys: frozenset[str] | None = None) -> Header:
    """Parse a file's header. Raises InputError with a short reason for bad files.

    With ``keys``, only those attributes are converted into ``attrs`` (text for free
    search is still collected from every text attribute); without, all of them are."""
    path = os.fspath(path)
    try:
        with _open_regular(path) as f:
            if size is None:
                size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise InputError("empty file, not a DICOM file")
            if size > 1 << 20:
                buf: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            else:
                buf = f.read()
    except IsADirectoryError:
        raise InputError("is a directory") from None
    except PermissionError:
        raise InputError("permission denied; check the file's mode or run as its owner") from None
    except FileNotFoundError:
        raise InputError("no such file") from None
    except OSError as exc:
        raise InputError(f"cannot read ({exc.strerror})") from None
    try:
        try:
            elements, ts, _had_meta = scan(buf)
        except (Unsupported, struct.error):
            return _read_with_pydicom(path)
        attrs, text = _attrs_from_elements(buf, elements, keys)
        return Header(attrs, ts, text)
    finally:
        if isinstance(buf, mmap.mmap):
            buf.close()
