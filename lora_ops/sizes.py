"""Human file sizes: parsing ``"40MB"`` and printing byte counts."""

from __future__ import annotations

import re

from .errors import LoraError

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """Bytes in a size such as ``"43MB"``, ``"1.5 GiB"`` or ``"450000"`` (decimal units, binary with ``i``)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in UNITS:
        raise LoraError(f"cannot read size {text!r}; write e.g. 40MB, 1.5GiB or 450000")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def format_size(nbytes: int) -> str:
    """``45_112_000`` -> ``"45.1 MB"`` (decimal units)."""
    if nbytes < 1000:
        return f"{nbytes} B"
    value = nbytes / 1000
    for unit in ("kB", "MB"):
        if value < 1000:
            return f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"
