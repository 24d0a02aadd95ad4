"""Synthetic FLUX LoRAs: layer table against diffusers' real FluxTransformer2DModel, spectrum law, determinism,
and the Space's example file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file

from assets.make_example_lora import EXAMPLE_PATH, RANK, write_example
from lora_ops.synthetic import energy_fraction, flux_shapes, lora_bytes, lora_pair, make_lora, spectrum
from tests.tiny_flux import TRANSFORMER_CONFIG, block_linears

SMALL_SHAPES = {"transformer_blocks.0.ff.net.2": (48, 96), "single_transformer_blocks.0.norm.linear": (72, 24)}


def linear_shapes(transformer: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every block linear of a diffusers FLUX transformer."""
    return {name: (layer.out_features, layer.in_features) for name, layer in block_linears(transformer).items()}


def test_flux1_has_494_pairs_of_10_7_mb_per_rank_in_bf16():
    shapes = flux_shapes()
    assert len(shapes) == 494
    assert lora_bytes(shapes, 42) == 451_067_904
    assert lora_bytes(shapes, 4) == 42_958_848
    assert shapes["single_transformer_blocks.37.proj_out"] == (3072, 15360)
    assert shapes["transformer_blocks.18.norm1_context.linear"] == (18432, 3072)


def test_flux1_names_and_shapes_match_diffusers_transformer():
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(guidance_embeds=True)  # diffusers' defaults are FLUX.1's sizes
    assert linear_shapes(transformer) == flux_shapes()


def test_toy_widths_match_the_tiny_test_transformer():
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    hidden = TRANSFORMER_CONFIG["num_attention_heads"] * TRANSFORMER_CONFIG["attention_head_dim"]
    expected = flux_shapes(TRANSFORMER_CONFIG["num_layers"], TRANSFORMER_CONFIG["num_single_layers"], hidden)
    assert linear_shapes(transformer) == expected


def test_delta_has_the_documented_spectrum_and_unbalanced_factors():
    rank = 12
    lora = make_lora(SMALL_SHAPES, rank, dtype=torch.float64)
    for module, (out_features, in_features) in SMALL_SHAPES.items():
        down = lora[f"transformer.{module}.lora_A.weight"]
        up = lora[f"transformer.{module}.lora_B.weight"]
        assert down.shape == (rank, in_features) and up.shape == (out_features, rank)
        torch.testing.assert_close(torch.linalg.svdvals(up @ down)[:rank], spectrum(rank), rtol=1e-9, atol=1e-9)
        gram = down @ down.T
        off_diagonal = gram - torch.diag(gram.diagonal())
        assert off_diagonal.abs().max() > 0.1 * gram.diagonal().min()


def test_energy_is_concentrated_like_a_trained_flux_lora():
    assert 0.93 < energy_fraction(42, 2) < 0.95
    assert 0.994 < energy_fraction(42, 4) < 0.997
    values = spectrum(42)
    assert torch.all(values[1:] < values[:-1])


def test_bf16_storage_keeps_the_spectrum_within_rounding():
    lora = make_lora(SMALL_SHAPES, 8, dtype=torch.bfloat16)
    down = lora["transformer.transformer_blocks.0.ff.net.2.lora_A.weight"]
    up = lora["transformer.transformer_blocks.0.ff.net.2.lora_B.weight"]
    assert down.dtype == torch.bfloat16
    values = torch.linalg.svdvals(up.double() @ down.double())[:8]
    torch.testing.assert_close(values, spectrum(8), rtol=0.0, atol=0.02 * spectrum(8)[0].item())


def test_same_seed_same_tensors_other_seed_other_tensors():
    first, again, other = (make_lora(SMALL_SHAPES, 4, seed=seed) for seed in (3, 3, 4))
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not any(torch.equal(first[key], other[key]) for key in first)


def test_rank_above_the_smaller_dimension_is_refused():
    with pytest.raises(ValueError, match="exceeds"):
        lora_pair(6, 5, 6, torch.Generator().manual_seed(0))


def test_example_file_is_current_and_small(tmp_path: Path):
    fresh = write_example(tmp_path / "example.safetensors")
    assert EXAMPLE_PATH.read_bytes() == fresh.read_bytes()
    assert EXAMPLE_PATH.stat().st_size < 2 * 1024**2


def test_example_loads_from_its_path_into_the_tiny_flux_pipeline(tiny_flux_dir: Path):
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir, dtype=torch.float32)
    pipe.load_lora_weights(EXAMPLE_PATH, adapter_name="example")
    stored = load_file(EXAMPLE_PATH)
    names = block_linears(pipe.transformer)
    assert len(stored) == 2 * len(names)
    for name in names:
        layer = pipe.transformer.get_submodule(name)
        assert layer.r["example"] == RANK
        assert layer.scaling["example"] == 1.0
        torch.testing.assert_close(layer.lora_A["example"].weight, stored[f"transformer.{name}.lora_A.weight"].float())
        torch.testing.assert_close(layer.lora_B["example"].weight, stored[f"transformer.{name}.lora_B.weight"].float())
