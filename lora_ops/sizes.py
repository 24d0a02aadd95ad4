"""Human file sizes: parsing ``"40MB"`` and printing byte counts in decimal (``MB``) and binary (``MiB``) units."""

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


BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_binary_size(nbytes: int) -> str:
    """``451_200_000`` -> ``"430.3 MiB"``: the number gradio's file widget shows for a file, with the right unit.

    The widget (``@gradio/file``'s ``FilePreview``, ``prettyBytes``) divides by 1024 while the value is above
    1024 and prints one decimal, but labels the result ``KB``/``MB``/``GB``: its "430.3 MB" is 430.3 MiB.
    """
    value, unit = float(nbytes), 0
    while value > 1024 and unit < len(BINARY_UNITS) - 1:
        value /= 1024
        unit += 1
    return f"{nbytes} B" if unit == 0 else f"{value:.1f} {BINARY_UNITS[unit]}"
