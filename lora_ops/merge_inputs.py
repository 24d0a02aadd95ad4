"""The inputs of a merge as users write them, ``FILE[:WEIGHT]`` (no torch here: the CLI reads its arguments before
torch has loaded)."""

from __future__ import annotations

import math
from pathlib import Path

from .errors import LoraError

DEFAULT_WEIGHT = 1.0


def check_weight(weight: object, file: str | Path) -> float:
    """``weight`` as a float; :class:`LoraError` naming ``file`` unless it is a finite real number."""
    try:
        value = float(weight)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(weight, bool) or not math.isfinite(value):
        raise LoraError(f"{Path(file).name}: weight {weight!r} is not a finite number")
    return value


def parse_weighted(text: str) -> tuple[Path, float]:
    """``"A.safetensors:0.8"`` -> ``(Path("A.safetensors"), 0.8)``; without a weight, :data:`DEFAULT_WEIGHT`.

    The text is split at its last ``:`` only when what follows reads as a number (Python's ``float``), so paths
    holding a colon work: ``"run:3/A.safetensors"`` is that file at weight 1, ``"A:v2.safetensors:0.5"`` is
    ``A:v2.safetensors`` at 0.5. A file whose name itself ends in ``:`` and a number needs its weight written out
    (``"A:2:1"``). Raises :class:`LoraError` for a weight that reads as a number but is not finite (``nan``,
    ``inf``) and for an empty file name.
    """
    path, colon, tail = text.rpartition(":")
    try:
        weight = float(tail) if colon else None
    except ValueError:
        weight = None
    if weight is None:
        path, weight = text, DEFAULT_WEIGHT
    if not path:
        raise LoraError(f"{text!r} names no file; write FILE or FILE:WEIGHT")
    return Path(path), check_weight(weight, path)
