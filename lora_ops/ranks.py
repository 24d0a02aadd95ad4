"""Choosing each layer's new rank: fixed, by retained energy, or by a global size budget."""

from __future__ import annotations

import bisect

import torch
from torch import Tensor

from .errors import LoraError


def energy_rank(singular_values: Tensor, energy: float) -> int:
    """Smallest rank keeping at least ``energy`` (0 < energy <= 1) of ``sum(s**2)``; at least 1."""
    squares = singular_values.double() ** 2
    total = squares.sum().item()
    if total == 0:
        return 1
    kept = torch.cumsum(squares, 0) / total
    return max(1, int(torch.searchsorted(kept, torch.tensor(energy * (1 - 1e-12), dtype=kept.dtype)).item()) + 1)


def threshold_ranks(spectra: list[Tensor], caps: list[int], bytes_per_rank: list[int], budget: int) -> list[int]:
    """Ranks from one global singular-value threshold ``t`` so that ``sum(rank_l * bytes_per_rank_l) <= budget``.

    Layer ``l`` keeps its singular values ``>= t`` (at least 1, at most ``caps[l]``); the smallest
    threshold whose ranks fit is chosen, which keeps the most energy a single threshold can.
    """
    floor_cost = sum(bytes_per_rank)
    if floor_cost > budget:
        raise LoraError(
            f"the target size is too small: rank 1 everywhere already needs {floor_cost:,} bytes of factors"
        )
    candidates = sorted({float(v) for s, cap in zip(spectra, caps) for v in s[:cap].tolist()}, reverse=True)

    def ranks_at(threshold: float) -> list[int]:
        return [min(cap, max(1, int((s[:cap] >= threshold).sum().item()))) for s, cap in zip(spectra, caps)]

    def fits(index: int) -> bool:
        return sum(k * c for k, c in zip(ranks_at(candidates[index]), bytes_per_rank)) <= budget

    # candidates are descending, so "fits" turns from True to False once as the index grows.
    last_fitting = bisect.bisect_left(range(len(candidates)), True, key=lambda i: not fits(i)) - 1
    return ranks_at(candidates[last_fitting]) if last_fitting >= 0 else [1] * len(spectra)
