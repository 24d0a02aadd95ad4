"""Write assets/example-flux-lora.safetensors, the small synthetic FLUX LoRA the Space offers as its example.

It covers every block linear layer of a toy FLUX transformer with FLUX.1's block structure (1 double and 1 single
block, hidden size 32: the config of tests/tiny_flux.py), in diffusers layout (`transformer.<module>.lora_A/B.weight`,
no alpha, scale 1), rank 8, bf16, with the trained-like spectrum of `lora_ops.synthetic`. It is a few tens of kB,
resizes in well under a second and loads with `FluxPipeline.load_lora_weights` into the tiny local pipeline.

Usage (from the repository root): python -m assets.make_example_lora [OUTPUT]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lora_ops.synthetic import flux_shapes, make_lora, save_lora

EXAMPLE_PATH = Path(__file__).with_name("example-flux-lora.safetensors")
NUM_DOUBLE = 1
NUM_SINGLE = 1
HIDDEN = 32  # num_attention_heads 2 x attention_head_dim 16
RANK = 8
SEED = 0
METADATA = {
    "lora_resizer_example": "synthetic FLUX-shaped LoRA (toy widths), made by assets/make_example_lora.py",
}


def write_example(path: Path = EXAMPLE_PATH) -> Path:
    """Write the example LoRA to ``path`` (byte-identical on every run) and return ``path``."""
    shapes = flux_shapes(num_double=NUM_DOUBLE, num_single=NUM_SINGLE, hidden=HIDDEN)
    save_lora(make_lora(shapes, RANK, dtype=torch.bfloat16, seed=SEED), path, metadata=METADATA)
    return path


if __name__ == "__main__":
    written = write_example(Path(sys.argv[1]) if len(sys.argv) > 1 else EXAMPLE_PATH)
    print(f"wrote {written} ({written.stat().st_size} bytes)")
