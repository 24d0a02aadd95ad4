"""Re-implementations of the dense approaches users run today, timed per layer on a sample of each layer shape.

- ``full_svd`` (the original reference scripts): form the dense delta ``B @ A`` in float32 and run a full
  ``torch.linalg.svd`` on it; keep ``A' = Vh[:k]``, ``B' = U[:, :k] * S[:k]``.
- ``svd_lowrank`` (kohya sd-scripts ``networks/resize_lora.py``): the same dense delta, then
  ``torch.svd_lowrank(delta, q=min(2k, out, in), niter=2)`` when both sides are wider than 2048, else the full SVD.

Like sd-scripts, the process first loads the whole file into memory as float32. Every layer shape then gets
``--samples`` layers (the first ones of that shape): each is timed (dense delta, SVD, truncated factors) and its
relative Frobenius error ``||D - B'A'||_F / ||D||_F`` is computed exactly in float64 from the factors, by a
formula written here independently of ``lora_ops``. Files are read as scale 1 (no ``.alpha``; the benchmark
workloads have none). Prints a JSON report.

Usage (from the repository root):
    python -m benchmarks.dense_reference IN.safetensors --method full_svd --rank 4 --samples 1 [--json OUT]
"""

from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from benchmarks.measure import emit_json

PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora_down.weight", ".lora_up.weight"))
LOWRANK_MIN_WIDTH = 2048
LOWRANK_NITER = 2


def _truncated(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A' [k, in], B' [out, k])`` from an SVD of the delta, singular values on B's side."""
    return vh[:rank].contiguous(), (u[:, :rank] * s[:rank]).contiguous()


def full_svd(down: torch.Tensor, up: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense float32 delta ``[out, in]`` and its full SVD (``full_matrices=True``, as the scripts call it)."""
    return _truncated(*torch.linalg.svd(up @ down), rank)


def svd_lowrank(down: torch.Tensor, up: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense float32 delta; ``torch.svd_lowrank`` (q = 2k, 2 power iterations) for layers wider than 2048."""
    delta = up @ down
    out_features, in_features = delta.shape
    if min(out_features, in_features) <= LOWRANK_MIN_WIDTH:
        return _truncated(*torch.linalg.svd(delta), rank)
    u, s, v = torch.svd_lowrank(delta, q=min(2 * rank, out_features, in_features), niter=LOWRANK_NITER)
    return _truncated(u, s, v.T, rank)


METHODS: dict[str, Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]] = {
    "full_svd": full_svd,
    "svd_lowrank": svd_lowrank,
}


def relative_error(down: torch.Tensor, up: torch.Tensor, new_down: torch.Tensor, new_up: torch.Tensor) -> float:
    """``||up down - new_up new_down||_F / ||up down||_F`` in float64 via traces of small Gram products.

    ``||X||^2 = sum((up^T up) * (down down^T))``, ``<X, Y> = sum((up^T new_up) * (down new_down^T))``.
    """
    down, up, new_down, new_up = (t.double() for t in (down, up, new_down, new_up))

    def inner(left_up, left_down, right_up, right_down) -> float:
        return float(((left_up.T @ right_up) * (left_down @ right_down.T)).sum())

    total = inner(up, down, up, down)
    if total == 0:
        return 0.0
    squared = total - 2 * inner(up, down, new_up, new_down) + inner(new_up, new_down, new_up, new_down)
    return math.sqrt(max(squared, 0.0) / total)


def pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (down [r, in], up [out, r])}`` of every LoRA pair in ``state``, in key order."""
    found = {}
    for key in state:
        for down_suffix, up_suffix in PAIRS:
            if key.endswith(down_suffix):
                module = key.removesuffix(down_suffix)
                found[module] = (state[key], state[module + up_suffix])
    return found


def sample_layers(path: Path, method: str, rank: int, samples: int) -> dict:
    """Load ``path`` as float32, time ``method`` on ``samples`` layers of every shape; a JSON-ready report."""
    torch.manual_seed(0)
    started = time.perf_counter()
    state = {key: tensor.float() for key, tensor in load_file(path).items()}
    load_seconds = time.perf_counter() - started
    by_shape: dict[tuple[int, int], list[str]] = defaultdict(list)
    found = pairs(state)
    for module, (down, up) in found.items():
        by_shape[(up.shape[0], down.shape[1])].append(module)
    shapes = []
    for (out_features, in_features), modules in by_shape.items():
        seconds, errors = [], []
        for module in modules[:samples]:
            down, up = found[module]
            begin = time.perf_counter()
            new_down, new_up = METHODS[method](down, up, rank)
            seconds.append(time.perf_counter() - begin)
            errors.append(relative_error(down, up, new_down, new_up))
        shapes.append(
            {
                "shape": [out_features, in_features],
                "count": len(modules),
                "modules": modules[:samples],
                "seconds": seconds,
                "errors": errors,
            }
        )
    return {"method": method, "rank": rank, "load_seconds": load_seconds, "shapes": shapes}


def main() -> None:
    parser = argparse.ArgumentParser(description="Time dense-delta resizing per layer shape on a sample.")
    parser.add_argument("source", type=Path)
    parser.add_argument("--method", choices=list(METHODS), required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--samples", type=int, default=1, help="layers timed per distinct shape")
    parser.add_argument("--json", type=Path, help="write the report here instead of printing it")
    args = parser.parse_args()
    emit_json(sample_layers(args.source, args.method, args.rank, args.samples), args.json)


if __name__ == "__main__":
    main()
