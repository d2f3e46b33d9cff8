"""Byte sizes as users write them and as grok1 prints them: GB = 10^9 bytes, GiB = 2^30 bytes."""

from __future__ import annotations

from .errors import Grok1Error

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str | int, what: str = "size") -> int:
    """'4GB' -> 4e9 bytes, '512MiB' -> 512 * 2**20; a bare number is bytes (an int is taken as is)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise Grok1Error(f"{what} must be positive, got {text}")
        return text
    s = str(text).strip().upper().replace(" ", "")
    number = s.rstrip("KMGTIB")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise Grok1Error(f"cannot read the {what} {text!r} (examples: 4GB, 512MiB)") from None
    if unit not in _UNITS or not value > 0:
        raise Grok1Error(f"cannot read the {what} {text!r} (examples: 4GB, 512MiB)")
    return int(value * _UNITS[unit])


def gb(n: float, digits: int = 2) -> str:
    """Decimal gigabytes: `gb(318239694848)` -> '318.24 GB'."""
    return f"{n / 1e9:.{digits}f} GB"


def gib(n: float, digits: int = 2) -> str:
    return f"{n / 2**30:.{digits}f} GiB"


def human(n: float) -> str:
    """A byte count in the decimal unit that reads best (B, kB, MB, GB, TB)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
