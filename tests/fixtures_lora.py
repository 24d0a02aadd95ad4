"""LoRA files in every supported layout, built from known factors, and an independent reader of their deltas.

Each :class:`LayoutCase` writes a small file the way one trainer family does (key names, alpha tensors,
metadata, config) from factors the test knows, so a test can compare what a resized file *means* -
read back by :func:`read_deltas`, which follows the loaders' rules and PEFT's own pattern matching,
not lora_ops' code - with the dense optimum of the true delta.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.torch import save_file

# (out, in, rank): the third module's rank exceeds its output size (4 < 6), as happens in real files.
SHAPES = ((24, 16, 6), (40, 24, 6), (4, 20, 6))
CONV_SHAPES = ((12, 8, 3, 3, 6), (16, 12, 1, 1, 6), (8, 4, 3, 3, 6))


@dataclass(frozen=True)
class LayoutCase:
    """One file family: module names, factor key suffixes, how the scale is stored, extra tensors."""

    name: str
    modules: tuple[str, ...]
    down: str = ".lora_A.weight"
    up: str = ".lora_B.weight"
    alpha_suffix: str = ".alpha"
    alpha: float | None = None
    alpha_dtype: torch.dtype | None = None
    kohya: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict | None = None
    extra: tuple[str, ...] = ()
    ranks: tuple[int, ...] | None = None
    conv: bool = False
    dtype: torch.dtype = torch.float32
    zero_module: int | None = None
    module_shapes: tuple[tuple[int, ...], ...] | None = None

    def shapes(self) -> list[tuple[int, ...]]:
        """Per module ``(out, *in_shape, rank)``: ``module_shapes``, else the linear or the conv shapes."""
        base = self.module_shapes or (CONV_SHAPES if self.conv else SHAPES)
        ranks = self.ranks or [shape[-1] for shape in base]
        return [(*shape[:-1], rank) for shape, rank in zip(base, ranks)]


def _metadata(fields: dict) -> dict[str, str]:
    return {"lora_adapter_metadata": json.dumps(fields)}


FLUX_NAMES = ("transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.ff.net.2")
KOHYA_METADATA = {
    "ss_network_dim": "6",
    "ss_network_alpha": "4.0",
    "ss_training_comment": "trained",
    "sshs_model_hash": "x",
    "sshs_legacy_hash": "x",
}
PEFT_CONFIG = {
    "peft_type": "LORA",
    "r": 6,
    "lora_alpha": 12,
    "rank_pattern": {},
    "alpha_pattern": {"q_lin": 3},
    "target_modules": ["q_lin", "v_lin", "ff"],
}

CASES = (
    LayoutCase("diffusers", (*FLUX_NAMES, "transformer.single_transformer_blocks.0.proj_out")),
    LayoutCase("diffusers-alpha-tensors", (*FLUX_NAMES, "transformer.single_transformer_blocks.0.proj_out"), alpha=3.0),
    LayoutCase(
        "diffusers-metadata",
        (*FLUX_NAMES, "transformer.single_transformer_blocks.0.proj_out"),
        ranks=(6, 4, 6),
        metadata=_metadata(
            {
                "transformer.r": 6,
                "transformer.lora_alpha": 3,
                "transformer.rank_pattern": {"^transformer_blocks.0.ff.net.2": 4},
                "transformer.alpha_pattern": {"^transformer_blocks.0.ff.net.2": 8},
                "transformer.target_modules": ["to_q", "net.2", "proj_out"],
            }
        ),
    ),
    LayoutCase(
        "diffusers-rslora",
        (*FLUX_NAMES, "transformer.single_transformer_blocks.0.proj_out"),
        metadata=_metadata({"transformer.r": 6, "transformer.lora_alpha": 5, "transformer.use_rslora": True}),
    ),
    LayoutCase(
        "peft-config",
        ("base_model.model.enc.layer.0.q_lin", "base_model.model.enc.layer.0.v_lin", "base_model.model.enc.ff"),
        config=PEFT_CONFIG,
        extra=("base_model.model.classifier.weight", "base_model.model.classifier.bias"),
    ),
    LayoutCase(
        "kohya-flux",
        (
            "lora_unet_double_blocks_0_img_attn_qkv",
            "lora_unet_double_blocks_0_img_mlp_0",
            "lora_unet_single_blocks_0_linear1",
        ),
        down=".lora_down.weight",
        up=".lora_up.weight",
        alpha=4.0,
        kohya=True,
        metadata=KOHYA_METADATA,
    ),
    LayoutCase(
        "kohya-zero-alpha",
        (
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
            "lora_te1_text_model_encoder_layers_0_mlp_fc1",
            "lora_unet_mid_block_attentions_0_proj_out",
        ),
        down=".lora_down.weight",
        up=".lora_up.weight",
        alpha=0.0,
        kohya=True,
    ),
    LayoutCase(
        "kohya-locon-fp16",
        (
            "lora_unet_down_blocks_0_resnets_0_conv1",
            "lora_unet_down_blocks_0_resnets_0_conv_shortcut",
            "lora_unet_up_blocks_0_resnets_0_conv2",
        ),
        down=".lora_down.weight",
        up=".lora_up.weight",
        alpha=2.0,
        kohya=True,
        conv=True,
        dtype=torch.float16,
    ),
    LayoutCase(
        "comfyui",
        (
            "diffusion_model.double_blocks.0.img_attn.qkv",
            "diffusion_model.double_blocks.0.txt_mlp.0",
            "diffusion_model.single_blocks.0.linear2",
        ),
        down=".lora_down.weight",
        up=".lora_up.weight",
        alpha=8.0,
        kohya=True,
    ),
    LayoutCase(
        "onetrainer-bf16",
        (
            "lora_transformer_single_transformer_blocks_0_attn_to_k",
            "lora_transformer_transformer_blocks_0_ff_net_0_proj",
            "lora_transformer_transformer_blocks_0_attn_to_out_0",
        ),
        down=".lora_down.weight",
        up=".lora_up.weight",
        alpha=6.0,
        kohya=True,
        dtype=torch.bfloat16,
    ),
    LayoutCase(
        "xlabs",
        (
            "double_blocks.0.processor.qkv_lora1",
            "double_blocks.0.processor.proj_lora1",
            "double_blocks.1.processor.qkv_lora2",
        ),
        down=".down.weight",
        up=".up.weight",
    ),
    LayoutCase(
        "bfl-control",
        ("double_blocks.0.img_attn.qkv", "double_blocks.0.img_mlp.0", "single_blocks.0.linear1"),
        extra=(
            "double_blocks.0.img_attn.qkv.lora_B.bias",
            "double_blocks.0.img_attn.norm.query_norm.scale",
            "img_in.weight",
        ),
    ),
    LayoutCase(
        "fal-kontext",
        (
            "base_model.model.double_blocks.0.img_attn.qkv",
            "base_model.model.double_blocks.0.txt_attn.proj",
            "base_model.model.single_blocks.0.linear2",
        ),
    ),
    LayoutCase(
        "diffusers-legacy",
        (
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
            "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
        ),
        down=".lora.down.weight",
        up=".lora.up.weight",
    ),
    LayoutCase(
        "attn-processor",
        (
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora",
            "mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora",
            "up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora",
        ),
        down=".down.weight",
        up=".up.weight",
    ),
    LayoutCase(
        "cloneofsimo-fp16",
        ("text_encoder:0", "unet:0", "unet:1"),
        down=":down",
        up=":up",
        alpha_suffix=":alpha",
        metadata={"unet": '["CrossAttention"]', "unet:0:rank": "6", "unet:1:rank": "6", "text_encoder:0:rank": "6"},
        dtype=torch.float16,
    ),
    LayoutCase(
        # Qwen-Image / Z-Image trainers: no prefix, `.alpha` tensors (diffusers recognises the file by them); an
        # alpha that is exact in bf16 but whose value at another rank (7.3125 * 9 / 6) is not.
        "qwen-unprefixed-alpha-bf16",
        ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.img_mlp.net.2", "transformer_blocks.0.txt_mod.1"),
        alpha=7.3125,
        dtype=torch.bfloat16,
    ),
    LayoutCase(
        "kohya-int-alpha",
        ("lora_unet_double_blocks_0_img_attn_proj", "lora_unet_double_blocks_0_txt_mlp_2", "lora_unet_final_layer"),
        down=".lora_down.weight",
        up=".lora_up.weight",
        alpha=4,
        alpha_dtype=torch.int64,
        kohya=True,
    ),
    LayoutCase(
        # Video models' Conv3d ([r, in, kt, kh, kw], up [out, r, 1, 1, 1]) and a Conv1d beside a linear layer.
        "kohya-conv3d-conv1d",
        ("lora_unet_blocks_0_ffn_0", "lora_unet_patch_embedding", "lora_unet_audio_conv"),
        down=".lora_down.weight",
        up=".lora_up.weight",
        alpha=3.0,
        kohya=True,
        module_shapes=((24, 16, 6), (12, 4, 2, 3, 3, 6), (8, 4, 3, 6)),
    ),
    LayoutCase(
        # MiniMax-H3 LoRAs may keep their alpha in the safetensors metadata only.
        "minimax-metadata-alpha-bf16",
        ("transformer.blocks.0.attn.to_q", "transformer.blocks.0.attn.to_k", "transformer.blocks.0.ff.up"),
        metadata={"alpha": "2"},
        dtype=torch.bfloat16,
    ),
    LayoutCase(
        "diffusers-zero-layer-bf16", FLUX_NAMES + ("transformer.norm_out.linear",), zero_module=1, dtype=torch.bfloat16
    ),
)
CASE_BY_NAME = {case.name: case for case in CASES}


@dataclass(frozen=True)
class LoraFixture:
    """A written case: its file and the true delta of every module (float64, ``[out, in(, kh, kw)]``)."""

    case: LayoutCase
    path: Path
    deltas: dict[str, torch.Tensor]


def _factors(shape: tuple[int, ...], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random factors whose product has a decaying spectrum: ``down [r, in, *kernel]``, ``up [out, r, 1, ...]``."""
    out, *in_shape, rank = shape
    decay = torch.tensor([0.7**i for i in range(rank)], dtype=torch.float64)
    down = torch.randn(rank, math.prod(in_shape), generator=generator, dtype=torch.float64) * decay[:, None]
    up = torch.randn(out, rank, generator=generator, dtype=torch.float64)
    return down.reshape(rank, *in_shape), up.reshape(out, rank, *(1,) * (len(in_shape) - 1))


def write_case(case: LayoutCase, folder: Path, seed: int = 0) -> LoraFixture:
    """Write ``case`` as ``folder/<name>.safetensors`` (and its adapter_config.json when it has one)."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    deltas = {}
    for index, (name, shape) in enumerate(zip(case.modules, case.shapes())):
        down, up = _factors(shape, generator)
        if index == case.zero_module:
            up = torch.zeros_like(up)
        down, up = down.to(case.dtype), up.to(case.dtype)
        tensors[name + case.down], tensors[name + case.up] = down, up
        if case.alpha is not None:
            tensors[name + case.alpha_suffix] = torch.tensor(case.alpha, dtype=case.alpha_dtype or case.dtype)
        scale = _true_scale(case, name, shape[-1])
        deltas[name] = scale * _product(down.double(), up.double())
    for key in case.extra:
        tensors[key] = torch.randn(5, generator=generator).to(case.dtype)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{case.name}.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", **case.metadata})
    if case.config is not None:
        (folder / "adapter_config.json").write_text(json.dumps(case.config))
    return LoraFixture(case, path, deltas)


def _true_scale(case: LayoutCase, name: str, rank: int) -> float:
    """The scale the case's trainer means, from the case definition (not from the file)."""
    if case.name == "diffusers-metadata":
        return (8 if name.endswith("ff.net.2") else 3) / rank
    if case.name == "diffusers-rslora":
        return 5 / math.sqrt(rank)
    if case.name == "peft-config":
        return (3 if name.endswith("q_lin") else 12) / rank
    if "alpha" in case.metadata:
        return float(case.metadata["alpha"]) / rank
    if case.alpha is None:
        return 1.0
    return 1.0 if case.alpha == 0 and case.kohya else case.alpha / rank


def _product(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``up @ down`` reshaped to the weight's shape (conv factors included)."""
    rank = down.shape[0]
    return (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape(up.shape[0], *down.shape[1:])


def read_deltas(path: Path, case: LayoutCase) -> dict[str, torch.Tensor]:
    """Every module's delta as the case's loaders compute it from the file at ``path`` (float64).

    Scale: ``lora_adapter_metadata`` or an ``adapter_config.json`` beside the file (PEFT's pattern
    matching), else ``.alpha`` tensors (kohya family: alpha 0 means alpha = rank), else the metadata's ``alpha``, else 1.
    """
    deltas = {}
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        metadata = handle.metadata() or {}
        config = _config_fields(path, metadata)
        for name in case.modules:
            down = handle.get_tensor(name + case.down).double()
            up = handle.get_tensor(name + case.up).double()
            rank = down.shape[0]
            alpha_key = name + case.alpha_suffix
            if config is not None:
                # PEFT matches patterns against module names inside the model: no component or wrapper prefix.
                module = (
                    name.removeprefix("base_model.model.") if name.startswith("base_model.") else name.partition(".")[2]
                )
                rank_in_config = config.get("rank_pattern", {}).get(
                    get_pattern_key(config.get("rank_pattern", {}), module), config["r"]
                )
                assert rank_in_config == rank, f"config says rank {rank_in_config} for {module}, factors have {rank}"
                alpha = config.get("alpha_pattern", {}).get(
                    get_pattern_key(config.get("alpha_pattern", {}), module), config["lora_alpha"]
                )
                scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
            elif alpha_key in keys:
                alpha = handle.get_tensor(alpha_key).item()
                scale = 1.0 if alpha == 0 and case.kohya else alpha / rank
            elif "alpha" in metadata:  # diffusers' MiniMax-H3 loader: a uniform network alpha
                scale = float(metadata["alpha"]) / rank
            else:
                scale = 1.0
            deltas[name] = scale * _product(down, up)
    return deltas


def _config_fields(path: Path, metadata: dict[str, str]) -> dict | None:
    if "lora_adapter_metadata" in metadata:
        fields = json.loads(metadata["lora_adapter_metadata"])
        return {key.partition(".")[2]: value for key, value in fields.items()}
    beside = path.parent / "adapter_config.json"
    return json.loads(beside.read_text()) if beside.is_file() else None


@pytest.fixture(params=[case.name for case in CASES])
def layout_case(request, tmp_path) -> LoraFixture:
    """Each layout case written to its own folder."""
    return write_case(CASE_BY_NAME[request.param], tmp_path / "in")
