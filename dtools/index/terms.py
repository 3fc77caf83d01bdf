"""Query terms on the command line: ``Keyword=value`` (or DCMTK's ``gggg,eeee=value``) and
``-k`` keys as key pairs, other words as free text. Shared by dsearch and its quick path."""

from __future__ import annotations

import re

from ..errors import UsageError

_TERM = r"(?s)^([A-Za-z][A-Za-z0-9]*|\(?[0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\)?)=(.*)$"  # compiled on first use


def split_terms(terms, keys) -> tuple[list[tuple[str, str]], list[str]]:
    """``Keyword=value`` terms (and -k keys) as key pairs; the other words are free text."""
    pairs: list[tuple[str, str]] = []
    words: list[str] = []
    for term in list(keys) + list(terms):
        m = re.match(_TERM, term)
        if m:
            pairs.append((m.group(1), m.group(2)))
        elif term in keys:
            raise UsageError(f"-k {term!r}: expected KEY=VALUE, e.g. -k PatientName=DOE* or -k 0010,0010=DOE*")
        else:
            words.append(term)
    return pairs, words
