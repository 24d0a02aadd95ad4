"""What a resize is asked to do, checked before any file is opened (no torch here: the CLI reads its
arguments before torch has loaded)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .errors import LoraError

METHODS = ("svd", "randomized_svd", "random_projection", "sparse_random_projection")
OUTPUT_DTYPE_NAMES = ("keep", "fp32", "fp16", "bf16")
MAX_RANK = 2048
# The size a strength may have (ResizeOptions.strength): far beyond any weight a LoRA is loaded at, and well inside
# what the float64 products of a delta's factors and their bf16 storage hold (a strength of 1e160 overflowed them,
# 1e-100 underflowed every factor to zero).
STRENGTH_LIMITS = (1e-6, 1e6)
# Smallest share of non-zero entries of a sparse random projection (see ResizeOptions.density).
MIN_DENSITY = 1e-6


# Per-layer rank rules, by their ResizeOptions field (lora_ops.ranks.RANK_RULES evaluates them): energy, and
# sd-scripts' `resize_lora.py --dynamic_method` rules under their names there.
RANK_RULE_FIELDS = ("energy", "sv_ratio", "sv_cumulative", "sv_fro")
# Options whose default is left out of provenance (a default strength changes nothing).
DEFAULTS_LEFT_OUT = {"strength": 1.0}
NO_RANK = "give a rank, a rank rule (energy, sv_ratio, sv_cumulative, sv_fro) or a target size"


def _share(value: float | None) -> bool:
    """``value`` is unset or a share in (0, 1]."""
    return value is None or 0 < value <= 1


@dataclass(frozen=True)
class ResizeOptions:
    """What to do to every layer.

    ``rank``: every layer gets exactly this rank (reduced above it, extended exactly below it) unless a rank rule
    or ``target_size`` choose per-layer ranks, which ``rank`` then caps. Rank rules (at most one; see
    :mod:`lora_ops.ranks`): ``energy``, keep at least this share (0-1] of each layer's squared Frobenius norm;
    sd-scripts' ``sv_ratio`` (keep singular values ``>= s_max / sv_ratio``, ``sv_ratio >= 1``), ``sv_cumulative``
    (smallest rank whose share of ``sum(s)`` is ``>= sv_cumulative``) and ``sv_fro`` (smallest rank whose share of
    ``sqrt(sum(s**2))`` is ``>= sv_fro``; ``energy=E`` is ``sv_fro=sqrt(E)``). ``target_size``: output bytes, met by
    one global singular-value threshold (with ``energy`` or alone; not with the sv rules). Without any of these,
    :func:`lora_ops.resize_file` refuses and :func:`lora_ops.resize_files` takes the set's largest rank.
    ``strength``: the multiplier a user passes at load time (diffusers' adapter weight, ComfyUI's
    ``strength_model``), baked into the delta: the output at strength 1 is the input at ``strength``. It goes into
    the factors (an extension multiplies it into B, a reduction into the singular values, split as their square
    root between A and B); alphas and configs keep the input's scales. At 1 (the default) nothing changes: an
    extension keeps the factors bit for bit. ``niter``/``oversample``: randomized SVD only; ``density``: sparse
    projection only (default ``1/sqrt(rank_in)``); ``seed``: random methods and the extension's new rows.
    ``dtype``: ``keep`` or fp32/fp16/bf16 for the factors. ``device``: where the linear algebra runs.
    """

    rank: int | None = None
    method: str = "svd"
    niter: int = 2
    oversample: int = 8
    density: float | None = None
    seed: int = 0
    energy: float | None = None
    target_size: int | None = None
    dtype: str = "keep"
    device: str = "cpu"
    sv_ratio: float | None = None
    sv_cumulative: float | None = None
    sv_fro: float | None = None
    strength: float = 1.0

    def __post_init__(self) -> None:
        rules = [name for name in RANK_RULE_FIELDS if getattr(self, name) is not None]
        checks = (
            (self.method in METHODS, f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}"),
            (self.rank is None or 1 <= self.rank <= MAX_RANK, f"rank must be between 1 and {MAX_RANK}"),
            (0 <= self.niter <= 50, "niter must be between 0 and 50"),
            (0 <= self.oversample <= 1024, "oversample must be between 0 and 1024"),
            (
                self.density is None or MIN_DENSITY <= self.density <= 1,
                f"density must be between {MIN_DENSITY:g} and 1 (the projection's entries are"
                " ±1/sqrt(density·rank): a smaller density makes them overflow the factors' dtype)",
            ),
            (_share(self.energy), "energy must be in (0, 1]"),
            (
                self.sv_ratio is None or 1 <= self.sv_ratio < math.inf,
                "sv_ratio must be a finite number of at least 1 (it keeps singular values >= s_max / sv_ratio)",
            ),
            (_share(self.sv_cumulative), "sv_cumulative must be in (0, 1]"),
            (_share(self.sv_fro), "sv_fro must be in (0, 1]"),
            (len(rules) <= 1, f"give one rank rule at most, not {', '.join(rules)}"),
            (
                self.target_size is None or rules in ([], ["energy"]),
                f"{', '.join(rules)} and target size both choose the ranks: give one of them",
            ),
            (self.target_size is None or self.target_size > 0, "target size must be positive"),
            (
                STRENGTH_LIMITS[0] <= abs(self.strength) <= STRENGTH_LIMITS[1],
                f"strength must be a finite, non-zero number from {STRENGTH_LIMITS[0]:g} to {STRENGTH_LIMITS[1]:g}"
                f" in size (negative flips the delta), not {self.strength!r}",
            ),
            (self.dtype in OUTPUT_DTYPE_NAMES, f"dtype must be one of {', '.join(OUTPUT_DTYPE_NAMES)}"),
            (self.device in ("cpu", "cuda"), "device must be cpu or cuda"),
        )
        for ok, message in checks:
            if not ok:
                raise LoraError(message)

    @property
    def rank_rule(self) -> tuple[str, float] | None:
        """The per-layer rank rule asked for, as ``(field name, value)`` (a name of ``RANK_RULE_FIELDS``), or None."""
        return next(((name, getattr(self, name)) for name in RANK_RULE_FIELDS if getattr(self, name) is not None), None)

    @property
    def open_rank(self) -> bool:
        """Nothing chooses the ranks: no rank, rank rule or target size."""
        return self.rank is None and self.rank_rule is None and self.target_size is None

    def parameters(self) -> dict:
        """The options that shaped the result (for provenance): unset and irrelevant ones left out."""
        relevant = {
            "randomized_svd": ("niter", "oversample", "seed"),
            "random_projection": ("seed",),
            "sparse_random_projection": ("density", "seed"),
        }.get(self.method, ())
        chosen = ("rank", *RANK_RULE_FIELDS, "target_size", "dtype", "strength", *relevant)
        return {
            key: value
            for key, value in asdict(self).items()
            if key in chosen and value is not None and value != DEFAULTS_LEFT_OUT.get(key)
        }
