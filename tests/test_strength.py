"""Strength (`--scale W`, `ResizeOptions.strength`): the output, loaded at weight 1 with diffusers' real
`load_lora_weights`, applies W times the input's delta: exactly at an extension, with the reported error at a
reduction. Scale carriers (alpha tensors, configs) keep their meaning; at W = 1 nothing changes."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import lora_ops
from lora_ops.cli import main
from lora_ops.writer import PROVENANCE_PREFIX
from tests.fixtures_lora import CASE_BY_NAME, read_deltas, write_case
from tests.test_diffusers_load import _loaded_deltas, _pipeline, _rel, _render

STRENGTH = 0.7


def _tensors(path):
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()  # noqa: SIM118


def test_an_extension_at_strength_w_loads_as_w_times_the_input(tiny_flux_dir, tiny_flux_lora_file, tmp_path):
    baked = tmp_path / "baked.safetensors"
    report = lora_ops.resize_file(tiny_flux_lora_file, baked, lora_ops.ResizeOptions(rank=12, strength=STRENGTH))
    pipe = _pipeline(tiny_flux_dir, ("original", tiny_flux_lora_file), ("baked", baked))
    original, loaded = _loaded_deltas(pipe, "original"), _loaded_deltas(pipe, "baked")
    assert set(loaded) == set(original) and loaded
    for name, delta in loaded.items():
        assert _rel(delta, STRENGTH * original[name]) < 1e-6
    assert report["worst_error"] < 1e-6 and report["strength"] == STRENGTH
    # what a user sees: the baked file at weight 1 renders as the original loaded at weight W
    pipe.set_adapters("original", adapter_weights=STRENGTH)
    at_weight = _render(pipe)
    pipe.set_adapters("original")
    at_one = _render(pipe)
    pipe.set_adapters("baked")
    assert np.abs(_render(pipe) - at_weight).max() <= 1
    assert np.abs(at_one - at_weight).mean() > 1, "the strength must visibly change the image for this to mean much"


def test_a_reduction_at_strength_w_reports_its_error_against_the_scaled_delta(
    tiny_flux_dir, tiny_flux_lora_file, tmp_path
):
    baked = tmp_path / "baked-r3.safetensors"
    report = lora_ops.resize_file(tiny_flux_lora_file, baked, lora_ops.ResizeOptions(rank=3, strength=STRENGTH))
    plain = lora_ops.resize_file(tiny_flux_lora_file, tmp_path / "r3.safetensors", lora_ops.ResizeOptions(rank=3))
    pipe = _pipeline(tiny_flux_dir, ("original", tiny_flux_lora_file), ("baked", baked))
    original, loaded = _loaded_deltas(pipe, "original"), _loaded_deltas(pipe, "baked")
    errors = {layer["name"].removeprefix("transformer."): layer["rel_error"] for layer in report["layers"]}
    assert set(loaded) == set(errors)
    for name, delta in loaded.items():
        assert _rel(delta, STRENGTH * original[name]) == pytest.approx(errors[name], abs=1e-5)
        assert errors[name] > 1e-3
    # relative errors do not depend on W; the reported singular values are those of the scaled deltas
    for scaled, unscaled in zip(report["layers"], plain["layers"]):
        assert scaled["rel_error"] == pytest.approx(unscaled["rel_error"], rel=1e-6, abs=1e-9)
        assert scaled["singular_values"] == pytest.approx([STRENGTH * v for v in unscaled["singular_values"]])


@pytest.mark.parametrize("rank", [3, 12])
def test_alpha_carriers_keep_their_value_and_the_factors_take_w(
    tiny_flux_dir, tiny_flux_kohya_lora_file, tmp_path, rank
):
    """kohya file (alpha 4 at rank 8): the output's alphas are those of the W = 1 output; the loaded delta is W
    times the input's (exactly when extended)."""
    plain, baked = tmp_path / "plain.safetensors", tmp_path / "baked.safetensors"
    lora_ops.resize_file(tiny_flux_kohya_lora_file, plain, lora_ops.ResizeOptions(rank=rank))
    report = lora_ops.resize_file(
        tiny_flux_kohya_lora_file, baked, lora_ops.ResizeOptions(rank=rank, strength=STRENGTH)
    )
    (plain_tensors, _), (baked_tensors, _) = _tensors(plain), _tensors(baked)
    alphas = [key for key in plain_tensors if key.endswith(".alpha")]
    assert alphas and all(torch.equal(plain_tensors[key], baked_tensors[key]) for key in alphas)
    pipe = _pipeline(tiny_flux_dir, ("original", tiny_flux_kohya_lora_file), ("baked", baked))
    original, loaded = _loaded_deltas(pipe, "original"), _loaded_deltas(pipe, "baked")
    assert set(loaded) == set(original) and loaded
    worst = max(layer["rel_error"] for layer in report["layers"])
    for name, delta in loaded.items():
        assert _rel(delta, STRENGTH * original[name]) < (1e-6 if rank > 8 else worst + 1e-5)


@pytest.mark.parametrize("case_name", ["diffusers-metadata", "peft-config", "kohya-locon-fp16"])
def test_every_scale_carrier_reads_back_as_w_times_the_delta(case_name, tmp_path):
    """Independent reader (the loaders' rules): metadata alphas, PEFT configs and fp16 conv factors all give W times
    the input's delta after an extension; the configs keep the input's scales."""
    fixture = write_case(CASE_BY_NAME[case_name], tmp_path / "in")
    out = tmp_path / "out" / "baked.safetensors"
    out.parent.mkdir()
    lora_ops.resize_file(fixture.path, out, lora_ops.ResizeOptions(rank=9, strength=-1.5))
    tolerance = 1e-6 if fixture.case.dtype == torch.float32 else 2e-3
    for name, delta in read_deltas(out, fixture.case).items():
        truth = -1.5 * fixture.deltas[name]
        assert ((delta - truth).norm() / truth.norm()).item() < tolerance


def test_strength_1_changes_nothing_and_w_is_recorded(tiny_flux_lora_file, tmp_path):
    plain, one, baked = (tmp_path / f"{name}.safetensors" for name in ("plain", "one", "baked"))
    lora_ops.resize_file(tiny_flux_lora_file, plain, lora_ops.ResizeOptions(rank=12))
    lora_ops.resize_file(tiny_flux_lora_file, one, lora_ops.ResizeOptions(rank=12, strength=1.0))
    lora_ops.resize_file(tiny_flux_lora_file, baked, lora_ops.ResizeOptions(rank=12, strength=STRENGTH))
    assert one.read_bytes() == plain.read_bytes()
    source = load_file(str(tiny_flux_lora_file))
    (kept, metadata), (scaled, baked_metadata) = _tensors(one), _tensors(baked)
    for key, tensor in source.items():  # an extension at W = 1 keeps the factors bit for bit
        assert torch.equal(kept[key][: tensor.shape[0], : tensor.shape[1]], tensor)
    for key, tensor in source.items():  # at W != 1, an extension multiplies B by W and keeps A
        expected = STRENGTH * tensor if key.endswith("lora_B.weight") else tensor
        assert torch.allclose(scaled[key][: tensor.shape[0], : tensor.shape[1]], expected, rtol=1e-6, atol=0)
        assert key.endswith("lora_B.weight") or torch.equal(scaled[key][: tensor.shape[0]], tensor)
    assert "strength" not in json.loads(metadata[PROVENANCE_PREFIX + "parameters"])
    assert json.loads(baked_metadata[PROVENANCE_PREFIX + "parameters"])["strength"] == STRENGTH


def test_the_cli_scale_flag_is_the_strength(tiny_flux_lora_file, tmp_path):
    by_cli, by_api = tmp_path / "cli.safetensors", tmp_path / "api.safetensors"
    assert main(["resize", str(tiny_flux_lora_file), "-o", str(by_cli), "--rank", "4", "--scale", "0.7"]) == 0
    lora_ops.resize_file(tiny_flux_lora_file, by_api, lora_ops.ResizeOptions(rank=4, strength=0.7))
    assert by_cli.read_bytes() == by_api.read_bytes()


@pytest.mark.parametrize("strength", [0.0, math.nan, math.inf, -math.inf, 1e160, -1e-100])
def test_a_strength_that_is_zero_or_not_finite_is_refused_in_one_line(strength, tiny_flux_lora_file, tmp_path, capsys):
    with pytest.raises(lora_ops.LoraError, match="strength must be a finite, non-zero number"):
        lora_ops.ResizeOptions(rank=4, strength=strength)
    out = tmp_path / "out.safetensors"
    assert main(["resize", str(tiny_flux_lora_file), "-o", str(out), "--rank", "4", f"--scale={strength}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: strength must be a finite, non-zero number") and len(err.splitlines()) == 1
    assert not out.exists()
