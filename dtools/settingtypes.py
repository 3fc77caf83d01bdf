"""The types of dtools settings: each turns a TOML value, or the string of an environment
variable, into the value the code uses (settings.py holds the table of keys). Nothing heavy
is imported: every command loads it, from cron, every minute."""

from __future__ import annotations

import re
from typing import Any

# Patterns are compiled on first use (re caches them): compiling costs start-up time.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_AGE = r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdw]?)\s*$"
_AGE_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE = r"(?i)^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMG]?)I?B?\s*$"
_SIZE_UNIT = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


# -- value types -------------------------------------------------------------------
# Each type turns a TOML value, or the string of an environment variable, into the
# value the code uses, or raises ValueError; ``expected`` completes "expected ...".
def valid_name(value: object) -> bool:
    """A site or peer name: letters, digits, '.', '_', '-'; at most 64 characters."""
    return isinstance(value, str) and re.match(NAME_PATTERN, value) is not None


class Kind:
    expected = "a value"

    def parse(self, value: Any) -> Any:
        raise NotImplementedError


class Str(Kind):
    expected = "a string"

    def parse(self, value: Any) -> Any:
        if not isinstance(value, str):
            raise ValueError
        return value


class Name(Kind):
    expected = "a name of letters, digits, '.', '_' or '-' (at most 64)"

    def parse(self, value: Any) -> Any:
        if not valid_name(value):
            raise ValueError
        return value


class Int(Kind):
    def __init__(self, low: int | None = None, high: int | None = None):
        self.low, self.high = low, high
        if low is not None and high is not None:
            self.expected = f"an integer from {low} to {high}"
        elif low is not None:
            self.expected = f"an integer of at least {low}"
        else:
            self.expected = "an integer"

    def parse(self, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError
        n = int(value)  # a string that is no integer raises ValueError
        if (self.low is not None and n < self.low) or (self.high is not None and n > self.high):
            raise ValueError
        return n


class Float(Kind):
    def __init__(self, low: float | None = None):
        self.low = low
        self.expected = "a number" if low is None else f"a number of at least {low:g}"

    def parse(self, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        x = float(value)
        if x != x or (self.low is not None and x < self.low):
            raise ValueError
        return x


class Bool(Kind):
    expected = "true or false"

    def parse(self, value: Any) -> Any:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError


class Choice(Kind):
    def __init__(self, *choices: str):
        self.choices = choices
        self.expected = "one of " + ", ".join(repr(c) for c in choices)

    def parse(self, value: Any) -> Any:
        if value not in self.choices:
            raise ValueError
        return value


class Duration(Kind):
    """Seconds, written ``90``, ``90s``, ``15m``, ``6h``, ``7d`` or ``1w``."""

    expected = "a duration like 90s, 15m, 6h, 7d or 1w"

    def parse(self, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, (int, float)):
            if value < 0:
                raise ValueError
            return float(value)
        return parse_duration(value)


class Keep(Duration):
    """A retention or retry age, or ``never`` (returned as the string "never")."""

    expected = "a duration like 6h or 7d, or never"

    def parse(self, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in ("never", "forever"):
            return "never"
        return super().parse(value)


class Size(Kind):
    """Bytes, written ``1048576``, ``512K``, ``20M`` or ``1G`` (binary units)."""

    expected = "a size like 512K, 20M or 1G"

    def parse(self, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            if value < 0:
                raise ValueError
            return value
        if not isinstance(value, str):
            raise ValueError
        m = re.match(_SIZE, value)
        if not m:
            raise ValueError
        return int(float(m.group(1)) * _SIZE_UNIT[m.group(2).upper()])


class Words(Kind):
    """A list of strings, or one string of words separated by commas or spaces."""

    expected = "a list of strings"

    def parse(self, value: Any) -> Any:
        if isinstance(value, str):
            return [v for v in value.replace(",", " ").split() if v]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ValueError


class Destination(Kind):
    """A DICOM node: ``"host:port"``, ``"AET@host:port"`` or a table with host, port, aet."""

    expected = "\"HOST:PORT\", \"AET@HOST:PORT\" or a table with host, port and aet"
    keys = {"host": Str(), "port": Int(1, 65535), "aet": Str()}

    def parse(self, value: Any) -> Any:
        if isinstance(value, str):
            return value
        if not isinstance(value, dict):
            raise ValueError
        for k in value:
            if k not in self.keys:
                raise UnknownKey(k, list(self.keys))
        if "host" not in value:
            raise ValueError
        return {k: self.keys[k].parse(v) for k, v in value.items()}


class UnknownKey(ValueError):
    def __init__(self, key: str, known: list[str]):
        super().__init__(key)
        self.key, self.known = key, known


def parse_duration(text: Any) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``1d``, ``1w`` as seconds; ValueError otherwise."""
    m = re.match(_AGE, str(text))
    if not m:
        raise ValueError(f"{text!r} is not a duration")
    return float(m.group(1)) * _AGE_UNIT[m.group(2)]
