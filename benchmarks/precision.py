"""What float32 products cost in accuracy: resize 16-bit LoRAs with float32 tall products (the default) and with
float64 ones, and compare the reported spectra and errors.

Usage (from the repository root): python -m benchmarks.precision FILE.safetensors [FILE ...] [--rank 4 32]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from lora_ops import ResizeOptions, resize, resize_file


def reports(path: str, rank: int) -> tuple[dict, dict]:
    """The resize reports of ``path`` at ``rank``: with float32 products for 16-bit factors, and with float64."""
    with tempfile.TemporaryDirectory() as folder:
        single = resize_file(path, Path(folder) / "single.safetensors", ResizeOptions(rank=rank))
        exact, resize.EXACT_IN_FLOAT32 = resize.EXACT_IN_FLOAT32, set()
        try:
            double = resize_file(path, Path(folder) / "double.safetensors", ResizeOptions(rank=rank))
        finally:
            resize.EXACT_IN_FLOAT32 = exact
    return single, double


def main() -> None:
    parser = argparse.ArgumentParser(description="Compare float32 and float64 products on 16-bit LoRA files.")
    parser.add_argument("files", nargs="+")
    parser.add_argument("--rank", type=int, nargs="+", default=[4, 32])
    args = parser.parse_args()
    print(
        "| file | rank | worst relative spectrum difference | worst error difference | layers with fewer singular values |"
    )
    print("|---|---:|---:|---:|---:|")
    for path in args.files:
        for rank in args.rank:
            single, double = reports(path, rank)
            pairs = list(zip(single["layers"], double["layers"]))
            spectrum = max(
                abs(a - b) / b for s, d in pairs for a, b in zip(s["singular_values"], d["singular_values"]) if b > 0
            )
            error = max(abs(s["rel_error"] - d["rel_error"]) for s, d in pairs)
            fewer = sum(len(s["singular_values"]) < len(d["singular_values"]) for s, d in pairs)
            print(f"| {Path(path).name} | {rank} | {spectrum:.2g} | {error:.2g} | {fewer} of {len(pairs)} |")


if __name__ == "__main__":
    main()
