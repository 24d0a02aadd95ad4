"""Where a resized file keeps its scale, and what the reports say about consumers that read the input differently.

The loader matrices (``tests/test_loader_matrix*.py``) load these files in the real consumers; the tests here pin
the written values themselves: the alpha, its dtype, the untouched factors of an exact upsampling, the warnings.
"""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lora_ops
from tests.fixtures_lora import CASE_BY_NAME, write_case


def _tensors(path):
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in sorted(handle.keys())}, handle.metadata()


def test_bf16_alpha_upsampling_keeps_the_factors_and_the_exact_scale(tmp_path):
    """alpha 7.3125 (bf16) at rank 6 -> 9 needs alpha 10.96875, which bf16 cannot hold: it is written in float32."""
    fixture = write_case(CASE_BY_NAME["qwen-unprefixed-alpha-bf16"], tmp_path / "in")
    out = tmp_path / "r9.safetensors"
    report = lora_ops.resize_file(fixture.path, out, lora_ops.ResizeOptions(rank=9))
    before, _ = _tensors(fixture.path)
    after, _ = _tensors(out)
    assert report["alpha"] == 10.96875 and report["worst_error"] == 0
    for name in fixture.case.modules:
        alpha = after[name + ".alpha"]
        assert alpha.dtype == torch.float32 and alpha.item() / 9 == before[name + ".alpha"].item() / 6
        assert torch.equal(after[name + ".lora_A.weight"][:6], before[name + ".lora_A.weight"])
        assert torch.equal(after[name + ".lora_B.weight"][:, :6], before[name + ".lora_B.weight"])
        assert not after[name + ".lora_B.weight"][:, 6:].any()


def test_an_alpha_the_input_dtype_holds_keeps_that_dtype(tmp_path):
    fixture = write_case(CASE_BY_NAME["qwen-unprefixed-alpha-bf16"], tmp_path / "in")
    out = tmp_path / "r3.safetensors"
    report = lora_ops.resize_file(fixture.path, out, lora_ops.ResizeOptions(rank=3))
    after, _ = _tensors(out)
    assert report["alpha"] == 7.3125 / 2
    assert {after[name + ".alpha"].dtype for name in fixture.case.modules} == {torch.bfloat16}


def test_integer_alphas_are_read_and_written_as_integers_where_exact(tmp_path):
    fixture = write_case(CASE_BY_NAME["kohya-int-alpha"], tmp_path / "in")
    inspected = lora_ops.inspect_file(fixture.path)
    assert [layer["scale"] for layer in inspected["layers"]] == [4 / 6] * 3
    out = tmp_path / "r3.safetensors"
    lora_ops.resize_file(fixture.path, out, lora_ops.ResizeOptions(rank=3))
    after, _ = _tensors(out)
    assert {(a.dtype, a.item()) for key, a in after.items() if key.endswith(".alpha")} == {(torch.int64, 2)}


def test_metadata_alpha_is_the_scale_and_is_rewritten(tmp_path):
    """MiniMax-H3: ``__metadata__ = {"alpha": "2"}`` at rank 6 is scale 1/3; at rank 3 the output says alpha 1."""
    fixture = write_case(CASE_BY_NAME["minimax-metadata-alpha-bf16"], tmp_path / "in")
    inspected = lora_ops.inspect_file(fixture.path)
    assert inspected["scale_source"] == "metadata alpha"
    assert [layer["scale"] for layer in inspected["layers"]] == [2 / 6] * 3
    out = tmp_path / "r3.safetensors"
    report = lora_ops.resize_file(fixture.path, out, lora_ops.ResizeOptions(rank=3))
    _, metadata = _tensors(out)
    assert metadata["alpha"] == "1" and report["alpha"] == 1.0
    assert any("MiniMax-H3" in line for line in report["warnings"])


def test_conv3d_and_conv1d_pairs_are_resized_with_the_rest_of_the_file(tmp_path):
    fixture = write_case(CASE_BY_NAME["kohya-conv3d-conv1d"], tmp_path / "in")
    out = tmp_path / "r2.safetensors"
    report = lora_ops.resize_file(fixture.path, out, lora_ops.ResizeOptions(rank=2))
    after, _ = _tensors(out)
    assert [layer["shape"] for layer in report["layers"]] == [[8, 4, 3], [24, 16], [12, 4, 2, 3, 3]]
    assert after["lora_unet_patch_embedding.lora_down.weight"].shape == (2, 4, 2, 3, 3)
    assert after["lora_unet_patch_embedding.lora_up.weight"].shape == (12, 2, 1, 1, 1)
    assert after["lora_unet_audio_conv.lora_up.weight"].shape == (8, 2, 1)


def test_a_pair_that_is_not_lora_is_named_with_its_shapes(tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file({"m.lora_down.weight": torch.ones(2, 4, 3), "m.lora_up.weight": torch.ones(5, 2, 3)}, str(path))
    with pytest.raises(lora_ops.LoraError, match=r"module 'm' has factor shapes \[2, 4, 3\] and \[5, 2, 3\]"):
        lora_ops.inspect_file(path)


def _kohya_flux_with_text_encoder(path):
    """A kohya FLUX.1 file whose first module (sorted) is a CLIP text-encoder one."""
    tensors = {}
    for name in ("lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_unet_double_blocks_0_img_attn_qkv"):
        tensors |= {
            f"{name}.lora_down.weight": torch.randn(4, 8),
            f"{name}.lora_up.weight": torch.randn(12, 4),
            f"{name}.alpha": torch.tensor(4.0),
        }
    save_file(tensors, str(path))


def test_flavour_and_family_come_from_every_module_name(tmp_path):
    path = tmp_path / "flux-kohya.safetensors"
    _kohya_flux_with_text_encoder(path)
    report = lora_ops.inspect_file(path)
    assert (report["flavour"], report["family"]) == ("kohya sd-scripts (FLUX)", "FLUX.1")


@pytest.mark.parametrize(
    ("names", "family"),
    [
        (
            ["transformer.transformer_blocks.0.img_mlp.net.2", "transformer.transformer_blocks.0.attn.to_q"],
            "Qwen-Image",
        ),
        (["diffusion_model.blocks.0.self_attn.q", "diffusion_model.blocks.0.ffn.0"], "Wan"),
        (["transformer.layers.0.attention.to_q", "transformer.noise_refiner.0.attention.to_k"], "Z-Image"),
        (
            ["transformer.transformer_blocks.0.attn.add_q_proj", "transformer.transformer_blocks.0.ff_context.net.2"],
            "SD3",
        ),
        (["transformer.single_transformer_blocks.0.proj_out", "transformer.transformer_blocks.0.attn.to_q"], "FLUX.1"),
        (["transformer.context_embedder.token_refiner.refiner_blocks.0.attn.to_q"], "HunyuanVideo"),
        (["lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_te2_text_model_encoder_layers_0_mlp_fc1"], "SDXL"),
        (["lora_unet_down_blocks_0_attentions_0_proj_in", "lora_te_text_model_encoder_layers_0_mlp_fc1"], "SD 1.x/2.x"),
        (["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"], "CLIP text encoder"),
        (["base_model.model.distilbert.transformer.layer.0.attention.q_lin"], "unknown"),
    ],
)
def test_model_family_table(names, family):
    assert lora_ops.layouts.model_family(names) == family


@pytest.mark.parametrize(
    ("case", "consumers"),
    [
        ("diffusers", []),
        ("kohya-flux", []),
        ("diffusers-metadata", ["ComfyUI"]),
        ("kohya-zero-alpha", ["diffusers and ComfyUI"]),
        ("minimax-metadata-alpha-bf16", ["only diffusers' MiniMax-H3 loader"]),
    ],
)
def test_consumers_that_read_the_input_differently_are_named(case, consumers, tmp_path):
    fixture = write_case(CASE_BY_NAME[case], tmp_path / "in")
    report = lora_ops.resize_file(fixture.path, tmp_path / "out.safetensors", lora_ops.ResizeOptions(rank=3))
    assert [line.split(" read")[0].split(" ignores")[0] for line in report["warnings"]] == consumers
    assert lora_ops.inspect_file(fixture.path)["warnings"] == report["warnings"]


def test_sd_kohya_file_with_differing_alphas_warns_about_diffusers(tmp_path):
    path = tmp_path / "sd15.safetensors"
    tensors = {}
    for name, alpha in (
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0", 1.0),
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 4.0),
    ):
        tensors |= {
            f"{name}.lora_down.weight": torch.randn(4, 8),
            f"{name}.lora_up.weight": torch.randn(8, 4),
            f"{name}.alpha": torch.tensor(alpha),
        }
    save_file(tensors, str(path))
    (line,) = lora_ops.inspect_file(path)["warnings"]
    assert line.startswith("diffusers applies the most common alpha") and "2 different alphas (1, 4)" in line


def test_peft_adapter_without_its_config_is_flagged(tmp_path):
    fixture = write_case(CASE_BY_NAME["peft-config"], tmp_path / "in")
    (tmp_path / "in" / "adapter_config.json").unlink()
    (line,) = lora_ops.inspect_file(fixture.path)["warnings"]
    assert line.startswith("PEFT reads this adapter's scale")


def test_the_cli_prints_one_warning_line_per_disagreement(tmp_path):
    fixture = write_case(CASE_BY_NAME["kohya-zero-alpha"], tmp_path / "in")
    out = tmp_path / "r3.safetensors"
    command = [sys.executable, "-m", "lora_ops", "resize", str(fixture.path), "-o", str(out), "--rank", "3"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "sd-scripts reads it as alpha = rank" in warnings[0]
    inspected = subprocess.run(
        [sys.executable, "-m", "lora_ops", "inspect", str(fixture.path), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(inspected.stdout)["warnings"] == [warnings[0].removeprefix("warning: ")]
    assert inspected.stderr.count("warning: ") == 1
