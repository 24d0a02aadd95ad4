"""Values typed into the Space's form or sent to its API, checked and converted before they reach lora_ops.

Gradio passes a number box's value through unchanged when the box has no precision and no bounds, so an API
caller can send anything JSON holds (``None``, ``"abc"``, ``2.7``, ``1e300``, ``true``). Each value is checked here
and a wrong one is a one-line `LoraError` naming the field, before any file is read or written; nothing is
rounded, clamped or replaced behind the caller's back. The ranges themselves stay where they are defined
(`ResizeOptions`, `lora_ops.preview`); these functions only check types and whole numbers.
"""

from __future__ import annotations

import math

from .errors import LoraError
from .merge_inputs import DEFAULT_WEIGHT, check_weight
from .options import ResizeOptions
from .sizes import parse_size

SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes a signed 64-bit integer


def number(value: object, name: str) -> float:
    """``value`` as a finite float. Raises `LoraError` for None, text, booleans, NaN and infinities."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LoraError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise LoraError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def whole_number(value: object, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int, in ``[minimum, maximum]`` when given (else the caller's own check gives the range);
    ``2.0`` is accepted, ``2.7`` is an error (never rounded)."""
    checked = number(value, name)
    if not checked.is_integer():
        raise LoraError(f"{name} must be a whole number, got {value!r}")
    if (minimum is not None and checked < minimum) or (maximum is not None and checked > maximum):
        raise LoraError(f"{name} must be between {minimum} and {maximum}, got {value!r}")
    return int(checked)


def optional_number(value: object, name: str) -> float | None:
    """A number, or None where the field is left blank: None, ``""`` and 0 (a blank number box sends 0)."""
    if value is None or value == "" or (not isinstance(value, bool) and value == 0):
        return None
    return number(value, name)


def number_or_none(value: object, name: str) -> float | None:
    """A number, or None for None and ``""``; unlike `optional_number`, 0 is a value (sd-scripts' rank rules and the
    strength refuse it in one line rather than turn off)."""
    return None if value is None or value == "" else number(value, name)


def optional_size(value: object, name: str = "target size") -> int | None:
    """Bytes of a size such as ``"40MB"`` (see `lora_ops.parse_size`), or None for blank or None."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise LoraError(f"{name} must be text such as 40MB, got {value!r}")
    return parse_size(value)


def resize_options(
    *,
    rank: object,
    method: object,
    niter: object,
    density: object,
    seed: object,
    energy: object,
    target_size: object,
    dtype: object,
    sv_ratio: object = None,
    sv_cumulative: object = None,
    sv_fro: object = None,
    strength: object = 1.0,
) -> ResizeOptions:
    """`ResizeOptions` from the resize form's raw values (the `/resize` endpoint's parameters).

    ``density``, ``energy`` and ``target_size`` may be blank (off or default: None, ``""`` or 0), sd-scripts' rank
    rules ``sv_ratio``, ``sv_cumulative`` and ``sv_fro`` None or ``""`` (off; 0 is a value, which they refuse), and
    ``strength`` None or ``""`` (1: none baked in; 0 is refused); the rest are required. Raises `LoraError` naming
    the first wrong field.
    """
    for value, name in ((method, "method"), (dtype, "dtype")):
        if not isinstance(value, str):
            raise LoraError(f"{name} must be text, got {value!r}")
    baked = number_or_none(strength, "strength")
    return ResizeOptions(
        rank=whole_number(rank, "rank"),
        method=method,
        niter=whole_number(niter, "niter"),
        density=optional_number(density, "density"),
        seed=whole_number(seed, "seed", 0, SEED_LIMIT - 1),
        energy=optional_number(energy, "energy"),
        sv_ratio=number_or_none(sv_ratio, "sv_ratio"),
        sv_cumulative=number_or_none(sv_cumulative, "sv_cumulative"),
        sv_fro=number_or_none(sv_fro, "sv_fro"),
        target_size=optional_size(target_size),
        dtype=dtype,
        strength=1.0 if baked is None else baked,
    )


def set_options(*, rank: object, method: object, dtype: object) -> ResizeOptions:
    """`ResizeOptions` for a set of files or a merge (the `/resize_many` and `/merge` parameters): ``rank`` blank
    (None, ``""`` or 0) leaves the rank open (the set's largest; a merge's concatenated rank)."""
    for value, name in ((method, "method"), (dtype, "dtype")):
        if not isinstance(value, str):
            raise LoraError(f"{name} must be text, got {value!r}")
    blank = optional_number(rank, "rank") is None
    return ResizeOptions(rank=None if blank else whole_number(rank, "rank"), method=method, dtype=dtype)


def weights(text: object, count: int) -> list[float]:
    """One merge weight per file from text such as ``"0.8, 0.5"`` (commas or spaces between); blank: 1 each.
    Raises `LoraError` for a count that differs from ``count`` or a weight that is not a finite number."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return [DEFAULT_WEIGHT] * count
    if not isinstance(text, str):
        raise LoraError(f"weights must be text such as 0.8, 0.5, got {text!r}")
    values = text.replace(",", " ").split()
    if len(values) != count:
        raise LoraError(f"{len(values)} weights for {count} files; give one per file, in order, or none")
    return [check_weight(value, f"file {index}") for index, value in enumerate(values, start=1)]
