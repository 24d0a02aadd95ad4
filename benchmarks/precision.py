"""What float32 products cost in accuracy: resize 16-bit LoRAs the default way (float32 tall products, with the
deltas that :func:`lora_ops.linalg.float32_suffices` flags solved again in float64) and with float64 products
throughout, and compare the reported spectra and errors; also count the deltas the default way sends to float64.

Usage (from the repository root): python -m benchmarks.precision FILE.safetensors [FILE ...] [--rank 4 32]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from lora_ops import ResizeOptions, batching, resize_file
from lora_ops.files import DEFAULT_LIMITS, open_tensors
from lora_ops.inputs import open_source


def reports(path: str, rank: int) -> tuple[dict, dict]:
    """The resize reports of ``path`` at ``rank``: the default way, and with float64 products throughout."""
    with tempfile.TemporaryDirectory() as folder:
        default = resize_file(path, Path(folder) / "default.safetensors", ResizeOptions(rank=rank))
        exact, batching.EXACT_IN_FLOAT32 = batching.EXACT_IN_FLOAT32, set()
        try:
            double = resize_file(path, Path(folder) / "double.safetensors", ResizeOptions(rank=rank))
        finally:
            batching.EXACT_IN_FLOAT32 = exact
    return default, double


def solved_in_float64(path: str, rank: int) -> int:
    """How many of the 16-bit modules of ``path`` the default way solves in float64 when resizing to ``rank``."""
    source = open_source(path, None, DEFAULT_LIMITS)
    modules = source.lora.modules
    batches = batching.group_batches(modules, [rank] * len(modules))
    handle = open_tensors(source.lora.path, source.lora.header)
    count = 0
    for batch, stored, scales in batching.read_batches(handle, modules, batches, source.scales):
        if {batch[0].down_dtype, batch[0].up_dtype} <= batching.EXACT_IN_FLOAT32:
            parts = batching.stacked_factors(batch, stored, scales, "cpu", rank if rank < batch[0].rank else 0)
            count += sum(len(index) for index, factors, _ in parts if factors.down.dtype == torch.float64)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description="Compare the default products with float64 ones on 16-bit LoRAs.")
    parser.add_argument("files", nargs="+")
    parser.add_argument("--rank", type=int, nargs="+", default=[4, 32])
    args = parser.parse_args()
    print(
        "| file | rank | worst relative spectrum difference | worst error difference"
        " | layers with fewer singular values | layers solved in float64 |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for path in args.files:
        for rank in args.rank:
            default, double = reports(path, rank)
            pairs = list(zip(default["layers"], double["layers"]))
            spectrum = max(
                (abs(a - b) / b for s, d in pairs for a, b in zip(s["singular_values"], d["singular_values"]) if b > 0),
                default=0.0,
            )
            error = max(abs(s["rel_error"] - d["rel_error"]) for s, d in pairs)
            fewer = sum(len(s["singular_values"]) < len(d["singular_values"]) for s, d in pairs)
            wide = solved_in_float64(path, rank)
            print(
                f"| {Path(path).name} | {rank} | {spectrum:.2g} | {error:.2g} | {fewer} of {len(pairs)}"
                f" | {wide} of {len(pairs)} |"
            )


if __name__ == "__main__":
    main()
