"""Choosing each layer's new rank: fixed, by a per-layer rule on its spectrum, or by a global size budget.

The per-layer rules read a layer's singular values ``s`` (descending, the numerical non-zeros of its delta: an
all-zero layer has none and gets rank 1) and return the smallest rank meeting the rule, at least 1:

- ``energy`` E: ``sum(s[:k]**2) / sum(s**2) >= E``;
- ``sv_fro`` P: ``sqrt(sum(s[:k]**2) / sum(s**2)) >= P``, so ``sv_fro = sqrt(E)`` is ``energy = E``;
- ``sv_cumulative`` P: ``sum(s[:k]) / sum(s) >= P``;
- ``sv_ratio`` X: every ``s_i >= s_1 / X``.

The ``sv_*`` rules are sd-scripts' ``networks/resize_lora.py --dynamic_method sv_fro|sv_cumulative|sv_ratio
--dynamic_param`` rules, with its ``--new_rank`` as the cap (``ResizeOptions.rank``), but without its off-by-one:
up to v0.10.1 (commit ae72efb) its ``index_sv_cumulative`` and ``index_sv_fro`` return
``searchsorted(...) + 1`` (lines 62 and 72), ``index_sv_ratio`` returns the count ``sum(S > min_sv)`` (line 81),
already ranks, and ``rank_resize`` adds 1 again (``new_rank = index_sv_*(S, dynamic_param) + 1``, lines 160, 165,
170): it keeps one direction more than asked, and never fewer than 2 on a non-zero layer (sd-scripts PR #2194
fixes this). A share of exactly 1 keeps every non-zero direction; shares below 1 are met up to a relative
rounding allowance of ``SHARE_RTOL``.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import torch
from torch import Tensor

from .errors import LoraError

# Cumulative shares are sums of many float64 terms: a share within this relative distance of the target meets it.
SHARE_RTOL = 1e-12


def _share_rank(values: Tensor, share: float) -> int:
    """Smallest ``k`` with ``sum(values[:k]) / sum(values) >= share`` (``values`` non-negative, ``0 < share <= 1``):
    every value at ``share = 1``, at least 1."""
    values = values.double()
    total = values.sum().item()
    if total == 0:
        return 1
    if share >= 1:
        return len(values)
    kept = torch.cumsum(values, 0) / total
    target = torch.tensor(share * (1 - SHARE_RTOL), dtype=kept.dtype)
    return min(len(values), max(1, int(torch.searchsorted(kept, target).item()) + 1))


def energy_rank(singular_values: Tensor, energy: float) -> int:
    """Smallest rank keeping at least ``energy`` (0 < energy <= 1) of ``sum(s**2)``; at least 1."""
    return _share_rank(singular_values.double() ** 2, energy)


def sv_fro_rank(singular_values: Tensor, share: float) -> int:
    """sd-scripts' ``sv_fro``: smallest rank keeping at least ``share`` (0-1] of the Frobenius norm
    ``sqrt(sum(s**2))``; at least 1. The same as :func:`energy_rank` at ``share**2``."""
    return energy_rank(singular_values, share * share)


def sv_cumulative_rank(singular_values: Tensor, share: float) -> int:
    """sd-scripts' ``sv_cumulative``: smallest rank keeping at least ``share`` (0-1] of ``sum(s)``; at least 1."""
    return _share_rank(singular_values, share)


def sv_ratio_rank(singular_values: Tensor, ratio: float) -> int:
    """sd-scripts' ``sv_ratio``: how many singular values are ``>= s_max / ratio`` (``ratio >= 1``); at least 1."""
    if len(singular_values) == 0:
        return 1
    return max(1, int((singular_values >= singular_values[0] / ratio).sum().item()))


# ResizeOptions field (options.RANK_RULE_FIELDS) -> a layer's rank from its spectrum and the field's value
RANK_RULES: dict[str, Callable[[Tensor, float], int]] = {
    "energy": energy_rank,
    "sv_ratio": sv_ratio_rank,
    "sv_cumulative": sv_cumulative_rank,
    "sv_fro": sv_fro_rank,
}


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
