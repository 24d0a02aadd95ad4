"""sd-scripts' dense SVD merge, re-implemented to time it per layer on a sample of each layer shape.

What kohya-ss/sd-scripts ``networks/svd_merge_lora.py`` does (read at commit 077f6a4ff2ae39d43db738644b9ac6419e8812aa,
``load_state_dict`` and ``merge_lora_models``), and what this module does the same way:

- every input is loaded whole with ``safetensors.torch.load_file`` and converted to the merge precision (``--precision``,
  default ``float``: float32);
- per module, a dense ``[out, in]`` float32 matrix accumulates ``ratio * (up @ down) * scale`` over the inputs
  (``scale = alpha / dim``, alpha defaulting to the rank);
- per module, ``U, S, Vh = torch.linalg.svd(mat)`` (full matrices, the default), ``up = U[:, :r] @ diag(S[:r])``,
  ``down = Vh[:r]``;
- both are clamped to ``[-q, q]``, ``q`` the 0.99 quantile (``torch.quantile``) of their values joined
  (``CLAMP_QUANTILE``), and saved with ``alpha = r`` in the merge precision (``--save_precision`` unset).

Differences: sd-scripts reads only ``lora_down``/``lora_up`` keys; this reads diffusers' ``lora_A``/``lora_B`` too
(the synthetic benchmark files), with the same math. It does not write a file.

Every layer shape gets ``--samples`` layers (the first of that shape): each is timed (dense sum, SVD, truncation,
clamp), and the relative Frobenius error ``||S - B'A'||_F / ||S||_F`` of the clamped factors against the exact
weighted sum ``S`` is computed in float64 from the factors (``benchmarks.dense_reference.relative_error`` on the
concatenated factors), and also that of the factors before clamping (the Eckart-Young optimum). Prints a JSON report.

Usage (from the repository root):
    python -m benchmarks.dense_merge_reference A.safetensors:0.8 B.safetensors:0.5 --rank 32 --samples 1 [--json OUT]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from benchmarks.dense_reference import pairs, relative_error
from benchmarks.measure import emit_json
from lora_ops.merge_inputs import parse_weighted

CLAMP_QUANTILE = 0.99  # sd-scripts' constant of the same name


def _alpha_scale(state: dict[str, torch.Tensor], module: str, rank: int) -> float:
    """sd-scripts' ``alpha / network_dim`` with ``alpha = lora_sd.get(name + ".alpha", network_dim)``."""
    alpha = state.get(module + ".alpha")
    return 1.0 if alpha is None else float(alpha) / rank


def svd_merge(dense: torch.Tensor, rank: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
    """sd-scripts' extraction from one dense float32 sum ``[out, in]``: the clamped ``(down [r, in], up [out, r])``,
    and the same before clamping."""
    rank = min(rank, *dense.shape)
    u, s, vh = torch.linalg.svd(dense)
    up, down = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank, :]
    high = torch.quantile(torch.cat([up.flatten(), down.flatten()]), CLAMP_QUANTILE)
    return (down.clamp(-high, high), up.clamp(-high, high)), (down, up)


def sample_layers(inputs: list[tuple[Path, float]], rank: int, samples: int) -> dict:
    """Load every input as float32, merge and extract ``samples`` layers of every shape; a JSON-ready report."""
    started = time.perf_counter()
    states = [({key: t.float() for key, t in load_file(path).items()}, weight) for path, weight in inputs]
    load_seconds = time.perf_counter() - started
    found = [(pairs(state), state, weight) for state, weight in states]
    by_shape: dict[tuple[int, int], list[str]] = defaultdict(list)
    for module, (down, up) in found[0][0].items():
        by_shape[(up.shape[0], down.shape[1])].append(module)
    shapes = []
    for (out_features, in_features), modules in by_shape.items():
        seconds, errors, optimum = [], [], []
        for module in modules[:samples]:
            parts = [
                (module_pairs[module], weight * _alpha_scale(state, module, module_pairs[module][0].shape[0]))
                for module_pairs, state, weight in found
                if module in module_pairs
            ]
            begin = time.perf_counter()
            dense = torch.zeros(out_features, in_features)
            for (down, up), ratio in parts:
                dense = dense + ratio * (up @ down)
            clamped, unclamped = svd_merge(dense, rank)
            seconds.append(time.perf_counter() - begin)
            downs = torch.cat([down for (down, _), _ in parts])
            ups = torch.cat([up.double() * ratio for (_, up), ratio in parts], dim=1)
            errors.append(relative_error(downs, ups, *clamped))
            optimum.append(relative_error(downs, ups, *unclamped))
        shapes.append(
            {
                "shape": [out_features, in_features],
                "count": len(modules),
                "modules": modules[:samples],
                "seconds": seconds,
                "errors": errors,
                "optimum": optimum,
            }
        )
    return {"rank": rank, "inputs": [str(path) for path, _ in inputs], "load_seconds": load_seconds, "shapes": shapes}


def main() -> None:
    parser = argparse.ArgumentParser(description="Time sd-scripts' dense SVD merge per layer shape on a sample.")
    parser.add_argument("inputs", nargs="+", type=parse_weighted, metavar="FILE[:WEIGHT]")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--samples", type=int, default=1, help="layers timed per distinct shape")
    parser.add_argument("--json", type=Path, help="write the report here instead of printing it")
    args = parser.parse_args()
    emit_json(sample_layers(args.inputs, args.rank, args.samples), args.json)


if __name__ == "__main__":
    main()
