"""The fast walk: a little-endian DICOM file's top-level elements, found with ``struct``.

``scan`` returns ``(tag, VR, start, length)`` of the elements worth indexing, up to Pixel
Data, with the transfer syntax; what it cannot walk raises ``Unsupported`` (the caller
reads those files with pydicom) and what is damaged raises InputError. dtools.dicom.header
decodes the values.
"""

from __future__ import annotations

import struct

from pydicom.datadict import dictionary_VR

from ..errors import InputError

TEXT_VRS = frozenset(
    (b"AE", b"AS", b"CS", b"DA", b"DS", b"DT", b"IS", b"LO", b"LT", b"PN", b"SH", b"ST", b"TM", b"UC", b"UI", b"UR", b"UT")
)
LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"))
VALID_VRS = TEXT_VRS | LONG_VRS | frozenset((b"AT", b"FL", b"FD", b"SL", b"SS", b"UL", b"US"))
NUMERIC = {b"US": ("H", 2), b"SS": ("h", 2), b"UL": ("I", 4), b"SL": ("i", 4), b"FL": ("f", 4), b"FD": ("d", 8)}
WANTED_VRS = TEXT_VRS | frozenset(NUMERIC)

IMPLICIT_LE = "1.2.840.10008.1.2"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1")

_HH = struct.Struct("<HH")
_H = struct.Struct("<H")
_I = struct.Struct("<I")
_IMPLICIT_VR: dict[int, bytes | None] = {}


class Unsupported(Exception):
    """The fast path cannot read this file; pydicom will."""


def _implicit_vr(tag: int) -> bytes | None:
    try:
        return _IMPLICIT_VR[tag]
    except KeyError:
        try:
            vr = dictionary_VR(tag).split(" or ")[0]  # "US or SS": pydicom's first choice
            value = vr.encode() if vr and len(vr) == 2 else None
        except KeyError:
            value = None
        _IMPLICIT_VR[tag] = value
        return value


def _skip_undefined(buf, pos: int, n: int, explicit: bool) -> int:
    """Skip the items of an undefined-length sequence (or encapsulated data); return the end."""
    while True:
        if pos + 8 > n:
            raise InputError("truncated DICOM file (inside a sequence)")
        g, e = _HH.unpack_from(buf, pos)
        length = _I.unpack_from(buf, pos + 4)[0]
        pos += 8
        if g != 0xFFFE:
            raise InputError(f"corrupt DICOM sequence at byte {pos - 8}")
        if e == 0xE0DD:
            return pos
        if e != 0xE000:
            raise InputError(f"corrupt DICOM sequence item at byte {pos - 8}")
        if length == 0xFFFFFFFF:
            pos = _skip_item(buf, pos, n, explicit)
        else:
            pos += length
            if pos > n:
                raise InputError("truncated DICOM file (inside a sequence item)")


def _skip_item(buf, pos: int, n: int, explicit: bool) -> int:
    while True:
        if pos + 8 > n:
            raise InputError("truncated DICOM file (inside a sequence item)")
        g, e = _HH.unpack_from(buf, pos)
        if g == 0xFFFE and e == 0xE00D:
            return pos + 8
        pos, _vr, length = _element_header(buf, pos, n, explicit)
        if length == 0xFFFFFFFF:
            pos = _skip_undefined(buf, pos, n, explicit and _vr != b"UN")
        else:
            pos += length
            if pos > n:
                raise InputError("truncated DICOM file")


def _element_header(buf, pos: int, n: int, explicit: bool) -> tuple[int, bytes | None, int]:
    if explicit:
        vr = buf[pos + 4 : pos + 6]
        if vr in LONG_VRS:
            if pos + 12 > n:
                raise InputError("truncated DICOM file")
            return pos + 12, vr, _I.unpack_from(buf, pos + 8)[0]
        if vr not in VALID_VRS:
            raise Unsupported(f"unknown VR {vr!r}")
        return pos + 8, vr, _H.unpack_from(buf, pos + 6)[0]
    return pos + 8, None, _I.unpack_from(buf, pos + 4)[0]


def _walk(buf, pos: int, n: int, explicit: bool, out: list, meta: bool = False) -> int:
    """Collect top-level ``(tag, vr, start, length)`` from ``pos``; stop at Pixel Data, at
    the end, or (``meta``) after group 0002. Returns where it stopped."""
    # the hot loop of indexing: element headers are decoded inline
    unpack_hh = _HH.unpack_from
    unpack_h = _H.unpack_from
    unpack_i = _I.unpack_from
    long_vrs, valid_vrs, wanted = LONG_VRS, VALID_VRS, WANTED_VRS
    append = out.append
    while pos + 8 <= n:
        g, e = unpack_hh(buf, pos)
        if meta and g != 0x0002:
            return pos
        if g == 0x7FE0 and e == 0x0010:
            pos, _vr, length = _element_header(buf, pos, n, explicit)
            if length != 0xFFFFFFFF and pos + length > n:
                raise InputError("truncated DICOM file (Pixel Data is cut short)")
            return pos
        if g == 0xFFFE:
            raise Unsupported("delimiter at top level")
        if explicit:
            vr = buf[pos + 4 : pos + 6]
            if vr in long_vrs:
                if pos + 12 > n:
                    raise InputError("truncated DICOM file")
                length = unpack_i(buf, pos + 8)[0]
                start = pos + 12
            elif vr in valid_vrs:
                length = unpack_h(buf, pos + 6)[0]
                start = pos + 8
            else:
                raise Unsupported(f"unknown VR {vr!r}")
        else:
            vr = None
            length = unpack_i(buf, pos + 4)[0]
            start = pos + 8
        if length == 0xFFFFFFFF:
            pos = _skip_undefined(buf, start, n, explicit and vr != b"UN")
            continue
        pos = start + length
        if pos > n:
            raise InputError(f"truncated DICOM file (element ({g:04X},{e:04X}) is cut short)")
        if vr is None or vr == b"UN":  # implicit VR, or an explicit UN pydicom would resolve
            vr = _implicit_vr((g << 16) | e)
            if vr is None:
                continue
        if vr in wanted:
            append(((g << 16) | e, vr, start, length))
    if pos != n and pos + 8 > n and not meta:
        raise InputError("truncated DICOM file (partial element header at the end)")
    return pos


def _looks_explicit(buf, pos: int) -> bool:
    vr = bytes(buf[pos + 4 : pos + 6])
    return vr in VALID_VRS


def scan(buf) -> tuple[list, str | None, bool]:
    """Walk a whole file image; returns (elements, transfer syntax, had_meta)."""
    n = len(buf)
    if n >= 132 and buf[128:132] == b"DICM":
        pos = 132
    elif n >= 8 and looks_like_dataset_start(buf):
        pos = 0
    else:
        raise InputError("not a DICOM file (no DICM marker and no recognisable data set)")
    meta: list = []
    ts = None
    if pos + 8 <= n and _HH.unpack_from(buf, pos)[0] == 0x0002:
        pos = _walk(buf, pos, n, True, meta, meta=True)
        for tag, _vr, start, length in meta:
            if tag == 0x00020010:
                ts = bytes(buf[start : start + length]).decode("ascii", "replace").strip("\0 ")
    if ts is None:
        explicit = _looks_explicit(buf, pos) if pos + 8 <= n else True
    elif ts == IMPLICIT_LE:
        explicit = False
    elif ts == BIG_ENDIAN or ts in DEFLATED:
        raise Unsupported(ts)
    else:
        explicit = True  # explicit little endian and every encapsulated syntax
    elements: list = []
    _walk(buf, pos, n, explicit, elements)
    return elements, ts, bool(meta)


def looks_like_dataset_start(buf) -> bool:
    g, _e = _HH.unpack_from(buf, 0)
    return g in (0x0002, 0x0008) and (_looks_explicit(buf, 0) or _I.unpack_from(buf, 4)[0] < 0x10000)
