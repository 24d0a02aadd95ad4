"""Resized files load from a file path with diffusers' real `load_lora_weights` into a tiny FLUX pipeline."""

import json

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

import lora_ops
from tests.tiny_flux import load_tiny_flux

RENDER = {"prompt": "How2Draw a lighthouse", "num_inference_steps": 2, "width": 32, "height": 32, "guidance_scale": 3.5}


def _render(pipe, seed=0):
    image = pipe(**RENDER, generator=torch.Generator().manual_seed(seed)).images[0]
    return np.asarray(image, dtype=np.int16)


def _pipeline(directory, *loras):
    pipe = load_tiny_flux(directory)
    pipe.set_progress_bar_config(disable=True)
    for name, path in loras:
        pipe.load_lora_weights(str(path), adapter_name=name)
    return pipe


def _loaded_deltas(pipe, adapter):
    """Every LoRA layer's delta as PEFT applies it (scaling included), by module name."""
    return {
        name: module.get_delta_weight(adapter).double()
        for name, module in pipe.transformer.named_modules()
        if isinstance(module, LoraLayer) and adapter in module.lora_A
    }


def _rel(x, y):
    return ((x - y).norm() / y.norm()).item()


def test_upsampled_lora_renders_the_same_images(tiny_flux_dir, tiny_flux_lora_file, tmp_path):
    upsampled = tmp_path / "r12.safetensors"
    lora_ops.resize_file(tiny_flux_lora_file, upsampled, lora_ops.ResizeOptions(rank=12))
    pipe = _pipeline(tiny_flux_dir, ("original", tiny_flux_lora_file), ("upsampled", upsampled))
    pipe.set_adapters("original")
    original = _render(pipe)
    pipe.set_adapters("upsampled")
    resized = _render(pipe)
    pipe.disable_lora()
    base = _render(pipe)
    assert np.abs(base - original).mean() > 5, "the LoRA must visibly change the image for this test to mean anything"
    assert np.abs(resized - original).max() <= 1
    assert {
        m.r["upsampled"] for m in pipe.transformer.modules() if isinstance(m, LoraLayer) and "upsampled" in m.r
    } == {12}


def test_reduced_lora_loads_with_its_new_rank_and_reported_error(tiny_flux_dir, tiny_flux_lora_file, tmp_path):
    reduced = tmp_path / "r3.safetensors"
    report = lora_ops.resize_file(tiny_flux_lora_file, reduced, lora_ops.ResizeOptions(rank=3))
    pipe = _pipeline(tiny_flux_dir, ("original", tiny_flux_lora_file), ("reduced", reduced))
    original, resized = _loaded_deltas(pipe, "original"), _loaded_deltas(pipe, "reduced")
    errors = {layer["name"].removeprefix("transformer."): layer["rel_error"] for layer in report["layers"]}
    assert set(resized) == set(errors)
    for name, delta in resized.items():
        assert _rel(delta, original[name]) == pytest.approx(errors[name], abs=1e-5)


def test_metadata_file_with_per_layer_ranks_loads_with_the_right_scale(tiny_flux_dir, tiny_flux_lora_file, tmp_path):
    """Input: diffusers metadata with lora_alpha 16 (scale 2); output: per-layer ranks, regenerated metadata that
    keeps the scale 2."""
    tensors = load_file(str(tiny_flux_lora_file))
    source = tmp_path / "with-metadata.safetensors"
    modules = sorted({key.removeprefix("transformer.").split(".lora_")[0] for key in tensors})
    fields = {"transformer.r": 8, "transformer.lora_alpha": 16, "transformer.target_modules": modules}
    save_file(tensors, str(source), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(fields)})
    out = tmp_path / "energy.safetensors"
    report = lora_ops.resize_file(source, out, lora_ops.ResizeOptions(energy=0.9))
    ranks = {layer["name"].removeprefix("transformer."): layer["rank_out"] for layer in report["layers"]}
    assert len(set(ranks.values())) > 1
    pipe = _pipeline(tiny_flux_dir, ("original", source), ("energy", out))
    original, resized = _loaded_deltas(pipe, "original"), _loaded_deltas(pipe, "energy")
    errors = {layer["name"].removeprefix("transformer."): layer["rel_error"] for layer in report["layers"]}
    for name, delta in resized.items():
        module = pipe.transformer.get_submodule(name)
        assert module.r["energy"] == ranks[name] and module.scaling["energy"] == 2.0
        assert module.scaling["original"] == 2.0
        assert _rel(delta, original[name]) == pytest.approx(errors[name], abs=1e-5)


@pytest.mark.parametrize("rank", [3, 12])
def test_kohya_output_loads_like_its_input(tiny_flux_dir, tiny_flux_kohya_lora_file, tmp_path, rank):
    out = tmp_path / f"kohya-r{rank}.safetensors"
    report = lora_ops.resize_file(tiny_flux_kohya_lora_file, out, lora_ops.ResizeOptions(rank=rank))
    assert report["layout"] == "kohya"
    pipe = _pipeline(tiny_flux_dir, ("original", tiny_flux_kohya_lora_file), ("resized", out))
    original, resized = _loaded_deltas(pipe, "original"), _loaded_deltas(pipe, "resized")
    assert set(resized) == set(original) and resized
    total = sum(d.norm() ** 2 for d in original.values()) ** 0.5
    difference = sum((resized[n] - original[n]).norm() ** 2 for n in original) ** 0.5
    if rank > 8:
        assert difference / total < 1e-6
    else:
        assert 0 < difference / total < max(layer["rel_error"] for layer in report["layers"]) + 1e-6
