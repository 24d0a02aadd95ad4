"""Write assets/preview-grid.png, the README's example of a preview grid, with the tiny pipeline of the tests.

The base model is the random-weight FLUX pipeline of tests/tiny_flux.py and the LoRA its rank-8 test LoRA, cut
to rank 2 with exact SVD by `lora_ops.resize_file`; `lora_ops.preview.render_comparison` renders the four default
prompts at 64x64 with 4 steps, with the base column. Random weights draw textured noise, not How2Draw sketches:
the grid shows the layout, and how the rank-2 column keeps most of the original's departure from the base.

Usage (from the repository root): python -m assets.make_preview_grid [OUTPUT]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

import lora_ops
from lora_ops import preview
from tests.tiny_flux import build_tiny_flux, tiny_flux_lora

GRID_PATH = Path(__file__).with_name("preview-grid.png")
SETTINGS = {"seed": 0, "steps": 4, "width": 64, "height": 64, "guidance_scale": preview.DEFAULT_GUIDANCE}


def write_grid(path: Path = GRID_PATH) -> dict:
    """Render the grid, save it as PNG at `path`, return the preview's metrics."""
    with tempfile.TemporaryDirectory() as scratch:
        model = build_tiny_flux(Path(scratch) / "tiny-flux")
        transformer = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer")
        original = Path(scratch) / "tiny-flux-r8.safetensors"
        resized = Path(scratch) / "tiny-flux-r2.safetensors"
        save_file(tiny_flux_lora(transformer, rank=8, seed=1), original)
        lora_ops.resize_file(original, resized, lora_ops.ResizeOptions(rank=2))
        os.environ[preview.BASE_MODEL_ENV] = str(model)
        result = preview.render_comparison(original, resized, preview.DEFAULT_PROMPTS, **SETTINGS, include_base=True)
    result.grid.save(path, optimize=True)
    return result.metrics


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else GRID_PATH
    metrics = write_grid(target)
    print(f"wrote {target}")
    print(json.dumps(metrics["overall"], indent=2))
