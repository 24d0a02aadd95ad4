"""Write the synthetic FLUX LoRAs the benchmarks run on (see lora_ops/synthetic.py for the spectrum law).

Workloads, by name:
- ``flux-r42-bf16``: all 494 linear layers of FLUX.1, rank 42, bf16 (451 MB).
- ``flux-r128-bf16``: the same at rank 128 (1.37 GB).
- ``proj-out-r16-fp16``: a stand-in for the real ai-toolkit FLUX LoRA in ../shared/real-loras (its 4 layers,
  ``single_transformer_blocks.{7,12,16,20}.proj_out``, rank 16, fp16), for anyone without ../shared.

Usage (from the repository root): python -m benchmarks.make_synthetic_flux [NAME ...] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_ops.synthetic import flux_shapes, make_lora, save_lora

DATA_DIR = Path(__file__).with_name("data")
REAL_PROJ_OUT_BLOCKS = (7, 12, 16, 20)


@dataclass(frozen=True)
class SyntheticFile:
    """A synthetic LoRA file: its layers ``{module: (out, in)}``, rank and storage dtype."""

    shapes: dict[str, tuple[int, int]]
    rank: int
    dtype: torch.dtype

    def path(self, name: str, out_dir: Path = DATA_DIR) -> Path:
        return out_dir / f"{name}.safetensors"


SYNTHETIC_FILES = {
    "flux-r42-bf16": SyntheticFile(flux_shapes(), 42, torch.bfloat16),
    "flux-r128-bf16": SyntheticFile(flux_shapes(), 128, torch.bfloat16),
    "proj-out-r16-fp16": SyntheticFile(
        {f"single_transformer_blocks.{block}.proj_out": (3072, 15360) for block in REAL_PROJ_OUT_BLOCKS},
        16,
        torch.float16,
    ),
}


def write_workload(name: str, out_dir: Path = DATA_DIR) -> Path:
    """Write workload ``name`` into ``out_dir`` (same bytes on every run) and return its path."""
    workload = SYNTHETIC_FILES[name]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = workload.path(name, out_dir)
    save_lora(make_lora(workload.shapes, workload.rank, dtype=workload.dtype), path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="Write synthetic FLUX LoRAs for the benchmarks.")
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"one of {', '.join(SYNTHETIC_FILES)}")
    parser.add_argument("--out-dir", type=Path, default=DATA_DIR)
    args = parser.parse_args()
    unknown = set(args.names) - set(SYNTHETIC_FILES)
    if unknown:
        parser.error(f"unknown workload {', '.join(sorted(unknown))}; choose from {', '.join(SYNTHETIC_FILES)}")
    for name in args.names or ["flux-r42-bf16"]:
        path = write_workload(name, args.out_dir)
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
