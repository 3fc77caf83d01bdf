"""Which presentation contexts to propose for a set of instances, and in which accepted
context (and so which transfer syntax) each instance is sent. dstore and dserve's C-MOVE
and C-GET share these rules; dtools.net.transcode does the converting.
"""

from __future__ import annotations

from typing import Any, Iterable

from pydicom.uid import UID, UID_dictionary, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ..errors import UsageError
from .transcode import TARGETS, UNCOMPRESSED, can_convert, name, why_not

VERIFICATION = "1.2.840.10008.1.1"
MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255
FALLBACK = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

Pair = tuple[str, str]  # (SOP class UID, transfer syntax UID)


def proposal(pairs: Iterable[Pair], want: str | None = None) -> list[tuple[str, tuple[str, ...]]]:
    """(abstract syntax, transfer syntaxes) of each context to propose, for instances of
    the given (SOP class, stored transfer syntax) pairs.

    Each pair gets a context in exactly its syntax, so an instance can go as it is stored;
    each SOP class with an instance not in Implicit VR Little Endian also gets an
    uncompressed fallback [Explicit, Implicit VR Little Endian], to convert into when the
    peer accepts neither. With `want`, one context per SOP class in that syntax only.
    A Verification context comes last: a peer that accepts none of the storage contexts
    still accepts the association, which can then be released, not aborted.
    """
    pairs = sorted(set(pairs))
    out: list[tuple[str, tuple[str, ...]]] = []
    seen = set()

    def add(sop: str, syntaxes: tuple[str, ...]) -> None:
        if (sop, syntaxes) not in seen:
            seen.add((sop, syntaxes))
            out.append((sop, syntaxes))

    if want:
        for sop, _ts in pairs:
            add(sop, (want,))
    else:
        for sop, ts in pairs:
            add(sop, (ts,))
        for sop, ts in pairs:
            if ts != ImplicitVRLittleEndian:
                add(sop, FALLBACK)
    add(VERIFICATION, (ImplicitVRLittleEndian,))
    return out


def contexts(pairs: Iterable[Pair], want: str | None = None) -> list[Any]:
    from pynetdicom.presentation import build_context

    return [build_context(sop, list(syntaxes)) for sop, syntaxes in proposal(pairs, want)]


def count(pairs: Iterable[Pair], want: str | None = None) -> int:
    return len(proposal(pairs, want))


def split(items: list[Any], want: str | None = None, limit: int = MAX_CONTEXTS) -> Iterable[list[Any]]:
    """Consecutive groups of items (each with a `.pair`) whose contexts fit one association."""
    group: list[Any] = []
    pairs: set[Pair] = set()
    for item in items:
        trial = pairs | {item.pair}
        if group and count(trial, want) > limit:
            yield group
            group, trial = [], {item.pair}
        group.append(item)
        pairs = trial
    if group:
        yield group


def accepted(assoc: Any) -> dict[str, list[str]]:
    """SOP class -> transfer syntaxes we may send it in (contexts where we are the storage SCU)."""
    out: dict[str, list[str]] = {}
    for cx in assoc.accepted_contexts:
        if cx.as_scu and cx.transfer_syntax:
            out.setdefault(str(cx.abstract_syntax), []).append(str(cx.transfer_syntax[0]))
    return out


def choose(sop: str, ts: str, offered: dict[str, list[str]], want: str | None = None) -> tuple[str | None, str]:
    """(transfer syntax to send an instance in, or None; why not) given what the peer accepted.

    The stored syntax first (the bytes go unchanged), then a conversion in TARGETS order;
    with `want`, only that syntax.
    """
    syntaxes = offered.get(sop, [])
    if not syntaxes:
        return None, f"the peer accepts no context for SOP class {name(sop)}"
    if want:
        if want not in syntaxes:
            return None, f"the peer does not accept {name(want)} for SOP class {name(sop)}"
        if not can_convert(ts, want):
            return None, f"cannot convert {name(ts)} to {name(want)}: {why_not(ts, want)}"
        return want, ""
    if ts in syntaxes:
        return ts, ""
    for target in TARGETS:
        if target in syntaxes and can_convert(ts, target):
            return target, ""
    accepted_names = ", ".join(name(s) for s in syntaxes)
    if any(s in UNCOMPRESSED for s in syntaxes):
        return None, f"{name(ts)} cannot be converted to what the peer accepts ({accepted_names}): {why_not(ts, ExplicitVRLittleEndian)}"
    return None, f"the peer accepts SOP class {name(sop)} only in {accepted_names}, and dtools does not compress"


def parse_syntax(text: str) -> str:
    """A transfer syntax given by UID or pydicom keyword (ExplicitVRLittleEndian), case-insensitive."""
    value = text.strip()
    if value in UID_dictionary and UID(value).is_transfer_syntax:
        return value
    folded = value.replace("-", "").replace("_", "").lower()
    for uid, entry in UID_dictionary.items():
        if entry[1] == "Transfer Syntax" and entry[4].lower() == folded:
            return uid
    raise UsageError(
        f"unknown transfer syntax {text!r}: give a UID (1.2.840.10008.1.2) or a name such as "
        "ImplicitVRLittleEndian, ExplicitVRLittleEndian, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless"
    )
