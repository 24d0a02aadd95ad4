"""What a resize is asked to do, checked before any file is opened (no torch here: the CLI reads its
arguments before torch has loaded)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import LoraError

METHODS = ("svd", "randomized_svd", "random_projection", "sparse_random_projection")
OUTPUT_DTYPE_NAMES = ("keep", "fp32", "fp16", "bf16")
MAX_RANK = 2048
# Smallest share of non-zero entries of a sparse random projection (see ResizeOptions.density).
MIN_DENSITY = 1e-6


@dataclass(frozen=True)
class ResizeOptions:
    """What to do to every layer.

    ``rank``: every layer gets exactly this rank (reduced above it, extended exactly below it) unless
    ``energy`` or ``target_size`` choose per-layer ranks, which ``rank`` then caps. ``energy``: keep at
    least this share (0-1] of each layer's squared Frobenius norm. ``target_size``: output bytes, met by
    one global singular-value threshold. ``niter``/``oversample``: randomized SVD only; ``density``: sparse
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

    def __post_init__(self) -> None:
        checks = (
            (self.method in METHODS, f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}"),
            (
                any(v is not None for v in (self.rank, self.energy, self.target_size)),
                "give a rank, an energy share or a target size",
            ),
            (self.rank is None or 1 <= self.rank <= MAX_RANK, f"rank must be between 1 and {MAX_RANK}"),
            (0 <= self.niter <= 50, "niter must be between 0 and 50"),
            (0 <= self.oversample <= 1024, "oversample must be between 0 and 1024"),
            (
                self.density is None or MIN_DENSITY <= self.density <= 1,
                f"density must be between {MIN_DENSITY:g} and 1 (the projection's entries are"
                " ±1/sqrt(density·rank): a smaller density makes them overflow the factors' dtype)",
            ),
            (self.energy is None or 0 < self.energy <= 1, "energy must be in (0, 1]"),
            (self.target_size is None or self.target_size > 0, "target size must be positive"),
            (self.dtype in OUTPUT_DTYPE_NAMES, f"dtype must be one of {', '.join(OUTPUT_DTYPE_NAMES)}"),
            (self.device in ("cpu", "cuda"), "device must be cpu or cuda"),
        )
        for ok, message in checks:
            if not ok:
                raise LoraError(message)

    def parameters(self) -> dict:
        """The options that shaped the result (for provenance): unset and irrelevant ones left out."""
        relevant = {
            "randomized_svd": ("niter", "oversample", "seed"),
            "random_projection": ("seed",),
            "sparse_random_projection": ("density", "seed"),
        }.get(self.method, ())
        chosen = ("rank", "energy", "target_size", "dtype", *relevant)
        return {key: value for key, value in asdict(self).items() if key in chosen and value is not None}
