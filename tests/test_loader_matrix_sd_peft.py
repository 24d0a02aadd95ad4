"""The loader matrix for SD 1.5, SDXL and PEFT: a resized file loads in the real consumer exactly like its input.

Every cell writes a LoRA the way one trainer family publishes it, over tiny random models shaped like the real
ones, resizes it up (exact, rank 8 -> 16) and down (rank 3), loads the input and both outputs from file paths into
one fresh model, each under its own adapter name, and compares what the consumer applies
(``tests.consumer_harness``):

- SD 1.5 / SDXL: ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline.load_lora_weights``, which patch the
  UNet and the text encoders (SDXL: ``CLIPTextModel`` + ``CLIPTextModelWithProjection``). The pipelines hold only
  the components ``load_lora_weights`` touches; SDXL's kohya files use sd-scripts' sgm block names
  (``input_blocks_4_1_...``), which diffusers maps back with ``_maybe_map_sgm_blocks_to_diffusers``.
- PEFT: ``PeftModel.from_pretrained`` and ``load_adapter`` of folders written by ``save_pretrained``.

Where diffusers reads a kohya input differently from sd-scripts, the format's owner (per-module alphas on
attention and text-encoder modules, ``alpha = 0``), the cell compares the output with the owner's meaning,
computed here from the raw tensors, and requires a report warning that names diffusers.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import lora_ops
from tests.consumer_harness import Cell, applied_deltas, assert_reported_error, assert_same_deltas, loaded_ranks
from tests.tiny_flux import _decaying_pair

RANK = 8
RANKS = (RANK + 8, 3)
"""Every input has rank ``RANK``; each cell is resized up (exact) and down."""

SD15, SDXL, PEFT = "SD 1.5", "SDXL", "PEFT"
CONSUMERS = {
    SD15: "diffusers `StableDiffusionPipeline.load_lora_weights`",
    SDXL: "diffusers `StableDiffusionXLPipeline.load_lora_weights`",
    PEFT: "peft `PeftModel.from_pretrained`",
}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """The tiny models' products take microseconds: one intra-op thread spares the thread wake-ups that cost more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# Tiny SD 1.5 and SDXL models
# ---------------------------------------------------------------------------------------------------------------

CLIP_CONFIG = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "max_position_embeddings": 16,
    "projection_dim": 32,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 1,
}
"""Both text encoders: CLIP's layout (q/k/v/out_proj, fc1, fc2 per layer) at toy width 32."""

SD15_UNET = {
    "sample_size": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (16, 32),
    "layers_per_block": 1,
    "cross_attention_dim": CLIP_CONFIG["hidden_size"],
    "attention_head_dim": 4,
    "norm_num_groups": 4,
}
"""SD 1.5's UNet layout (cross-attention in the high-resolution blocks, conv ``proj_in``) at toy size."""

TIME_EMBED_DIM = 4
SDXL_UNET = {
    "sample_size": 8,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (16, 32),
    "layers_per_block": 1,
    "cross_attention_dim": 2 * CLIP_CONFIG["hidden_size"],  # both encoders' hidden states, concatenated
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "norm_num_groups": 4,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TIME_EMBED_DIM,
    "projection_class_embeddings_input_dim": 6 * TIME_EMBED_DIM + CLIP_CONFIG["projection_dim"],
}
"""SDXL's UNet layout (no attention in the first block, linear ``proj_in``, ``text_time`` conditioning), one
transformer block per attention (SDXL has 2 and 10: the names and the loader's handling are the same)."""


def build_sd_pipeline(family: str, seed: int = 0) -> DiffusionPipeline:
    """A tiny random SD 1.5 or SDXL pipeline holding the UNet and text encoder(s), the parts LoRAs patch.

    The same ``seed`` gives the same weights, so two calls give two identical fresh models.
    """
    torch.manual_seed(seed)
    if family == SD15:
        return StableDiffusionPipeline(
            vae=None,
            text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_CONFIG)),
            tokenizer=None,
            unet=UNet2DConditionModel(**SD15_UNET),
            scheduler=None,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return StableDiffusionXLPipeline(
        vae=None,
        text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_CONFIG)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_CONFIG)),
        tokenizer=None,
        tokenizer_2=None,
        unet=UNet2DConditionModel(**SDXL_UNET),
        scheduler=None,
    )


def sd_components(pipe: DiffusionPipeline) -> dict[str, nn.Module]:
    """The components ``load_lora_weights`` patches, by the prefix their keys carry in a diffusers file."""
    names = ("unet", "text_encoder", "text_encoder_2")
    return {name: getattr(pipe, name) for name in names if getattr(pipe, name, None) is not None}


# ---------------------------------------------------------------------------------------------------------------
# Which modules SD LoRAs target, and their names in each layout
# ---------------------------------------------------------------------------------------------------------------

ATTENTION = re.compile(
    r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2)))"
)
"""UNet modules of kohya's default LoRA (the transformer blocks), as diffusers names them."""
LOCON = re.compile(r".*resnets\.\d+\.(conv1|conv2|time_emb_proj)")
"""UNet modules a LoCon adds: the ResNet convolutions (3x3 kernels) and their time projections."""
TEXT = re.compile(r"(text_model\.)?encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])")
"""Text-encoder modules every SD trainer targets."""
UNET_PROCESSOR = r".*attn[12]\.to_(q|k|v|out\.0)"
PROCESSOR = re.compile(rf"{UNET_PROCESSOR}|.*self_attn\.(q|k|v|out)_proj")
"""The attention projections, the only modules the old attention-processor format could hold."""

KOHYA_TEXT_PREFIX = {
    (SD15, "text_encoder"): "lora_te",
    (SDXL, "text_encoder"): "lora_te1",
    (SDXL, "text_encoder_2"): "lora_te2",
}
SGM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1"}
"""sd-scripts' (sgm) names of a ResNet block's layers."""
SGM_MIDDLE = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}
"""The sgm ``middle_block`` index of each part of diffusers' ``mid_block``."""


def sgm_name(module: str, layers_per_block: int) -> str:
    """The sgm UNet name sd-scripts uses for SDXL of a diffusers UNet module (``down_blocks.1.attentions.0.x`` ->
    ``input_blocks.3.1.x``): the inverse of diffusers' ``_maybe_map_sgm_blocks_to_diffusers``."""
    step = layers_per_block + 1
    if match := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
        kind, block, inner, index, rest = match.groups()
        number = int(block) * step + int(index) + (1 if kind == "down" else 0)
        prefix = f"{'input' if kind == 'down' else 'output'}_blocks.{number}.{0 if inner == 'resnets' else 1}"
    else:
        inner, index, rest = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", module).groups()
        prefix = f"middle_block.{SGM_MIDDLE[inner, index]}"
    return f"{prefix}.{SGM_RESNET.get(rest, rest)}"


@dataclass(frozen=True)
class Target:
    """One module a LoRA patches: its component, its name there (as PEFT reports it) and its weight's shape."""

    family: str
    component: str
    module: str
    weight_shape: tuple[int, ...]

    @property
    def key(self) -> str:
        """``"<component>.<module>"``, the name :func:`applied_deltas` reports."""
        return f"{self.component}.{self.module}"

    @property
    def is_text(self) -> bool:
        return self.component.startswith("text_encoder")

    @property
    def text_module(self) -> str:
        """A text-encoder module's name below ``text_model`` (transformers 5 flattens ``CLIPTextModel`` only)."""
        return self.module.removeprefix("text_model.")

    @property
    def diffusers(self) -> str:
        """The module's name in a diffusers file (text encoders with ``text_model.``, as published files have)."""
        return f"{self.component}.text_model.{self.text_module}" if self.is_text else f"{self.component}.{self.module}"

    @property
    def kohya(self) -> str:
        """sd-scripts' module name: ``lora_unet_…`` (SDXL: sgm block names), ``lora_te…_text_model_…``."""
        if self.is_text:
            return f"{KOHYA_TEXT_PREFIX[self.family, self.component]}_text_model_{self.text_module.replace('.', '_')}"
        name = sgm_name(self.module, SDXL_UNET["layers_per_block"]) if self.family == SDXL else self.module
        return "lora_unet_" + name.replace(".", "_")

    @property
    def processor(self) -> str:
        """The old attention-processor name: ``….attn1.processor.to_q_lora``, ``….self_attn.to_q_lora``."""
        parent, _, projection = self.module.removesuffix(".0").rpartition(".")
        projection = "to_" + projection.removesuffix("_proj").removeprefix("to_")
        middle = "" if self.is_text else "processor."
        base = self.diffusers.removesuffix(self.module.removeprefix(parent))
        return f"{base}.{middle}{projection}_lora"


@functools.cache
def sd_layers(family: str) -> tuple[Target, ...]:
    """Every linear and conv module of the family's tiny pipeline, in model order."""
    return tuple(
        Target(family, component, name, tuple(module.weight.shape))
        for component, model in sd_components(build_sd_pipeline(family)).items()
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | nn.Conv2d)
    )


def sd_targets(family: str, pattern: re.Pattern[str]) -> list[Target]:
    """The modules of the family's tiny pipeline whose name matches ``pattern``, in model order."""
    return [target for target in sd_layers(family) if pattern.fullmatch(target.module)]


# ---------------------------------------------------------------------------------------------------------------
# SD layouts: how each one names factors and stores the scale
# ---------------------------------------------------------------------------------------------------------------


def kohya_keys(target: Target) -> tuple[str, str, str]:
    """sd-scripts: ``<kohya name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``."""
    return f"{target.kohya}.lora_down.weight", f"{target.kohya}.lora_up.weight", f"{target.kohya}.alpha"


def diffusers_keys(target: Target) -> tuple[str, str, str]:
    """diffusers / PEFT: ``unet.<module>.lora_A.weight``, ``text_encoder.text_model.<module>.lora_B.weight``."""
    return f"{target.diffusers}.lora_A.weight", f"{target.diffusers}.lora_B.weight", f"{target.diffusers}.alpha"


def legacy_keys(target: Target) -> tuple[str, str, str]:
    """diffusers 0.21-0.24 (``LoRACompatibleLinear``): UNet ``.lora.down``, text encoders ``.lora_linear_layer.down``."""
    infix = "lora_linear_layer" if target.is_text else "lora"
    return f"{target.diffusers}.{infix}.down.weight", f"{target.diffusers}.{infix}.up.weight", ""


def processor_keys(target: Target) -> tuple[str, str, str]:
    """diffusers <= 0.20 attention processors (``LoRAAttnProcessor``): ``….processor.to_q_lora.down.weight``."""
    return f"{target.processor}.down.weight", f"{target.processor}.up.weight", ""


def unprefixed_processor_keys(target: Target) -> tuple[str, str, str]:
    """``UNet2DConditionModel.save_attn_procs`` files: processor names without the ``unet.`` prefix."""
    down, up, _ = processor_keys(target)
    return down.removeprefix("unet."), up.removeprefix("unet."), ""


def constant_alpha(index: int) -> float:
    """The same alpha on every module (half the rank, as many trainers default to)."""
    return RANK / 2


def varied_alpha(index: int) -> float:
    """Per-module alphas that differ: powers of two (folding them into factors is exact), and 4 the most common in
    any 6 consecutive modules, so each component's most common alpha is unambiguous."""
    return (4.0, 8.0, 4.0, 1.0, 4.0)[index % 5]


def zero_alpha(index: int) -> float:
    """``alpha = 0`` on every module, which sd-scripts reads as ``alpha = rank``."""
    return 0.0


METADATA_ALPHA = {"unet": 16, "text_encoder": 4, "text_encoder_2": 2}
"""``lora_alpha`` per component in the ``lora_adapter_metadata`` layout (scales 2, 0.5 and 0.25 at rank 8)."""


@dataclass(frozen=True)
class SdLayout:
    """One layout SD users publish: key names, targeted modules, how the scale is stored, storage dtype.

    ``keys``: a target's down, up and alpha keys (the alpha key is used only where ``alpha`` is set); ``alpha``: the ``.alpha`` tensor of module ``i`` (``None``: no alpha tensors); ``metadata``: the scale is in
    ``lora_adapter_metadata``; ``alpha_dtype``: the alpha tensors' dtype; ``diffusers_misreads``: diffusers reads this *input* differently from its owner.
    """

    label: str
    keys: Callable[[Target], tuple[str, str, str]]
    modules: re.Pattern[str]
    alpha: Callable[[int], float] | None = None
    dtype: torch.dtype = torch.float32
    alpha_dtype: torch.dtype = torch.float32
    metadata: bool = False
    diffusers_misreads: bool = False

    def owner_scale(self, target: Target, index: int) -> float:
        """The scale the format's owner applies (sd-scripts: ``alpha / rank``, ``alpha = 0`` meaning rank)."""
        if self.metadata:
            return METADATA_ALPHA[target.component] / RANK
        if self.alpha is None:
            return 1.0
        return (self.alpha(index) or RANK) / RANK


LINEAR = re.compile(f"{ATTENTION.pattern}|{TEXT.pattern}")
WITH_CONV = re.compile(f"{LINEAR.pattern}|{LOCON.pattern}")
KOHYA = "kohya `lora_unet_`, `lora_te*_`"
MISREAD_NOTE = "diffusers misreads the input; the output applies sd-scripts' reading, with a warning"
SD_LAYOUTS = (
    SdLayout(f"{KOHYA}, constant `.alpha`", kohya_keys, LINEAR, constant_alpha),
    SdLayout(f"{KOHYA} LoCon (conv `lora_down` `[r, in, 3, 3]`)", kohya_keys, WITH_CONV, constant_alpha),
    SdLayout(f"{KOHYA}, fp16", kohya_keys, LINEAR, constant_alpha, dtype=torch.float16),
    SdLayout(f"{KOHYA}, bf16", kohya_keys, LINEAR, constant_alpha, dtype=torch.bfloat16),
    SdLayout(f"{KOHYA}, int64 `.alpha`", kohya_keys, LINEAR, constant_alpha, alpha_dtype=torch.int64),
    SdLayout(
        f"{KOHYA} LoCon, per-module `.alpha` ({MISREAD_NOTE})",
        kohya_keys,
        WITH_CONV,
        varied_alpha,
        diffusers_misreads=True,
    ),
    SdLayout(f"{KOHYA}, `.alpha` 0 ({MISREAD_NOTE})", kohya_keys, LINEAR, zero_alpha, diffusers_misreads=True),
    SdLayout("diffusers `unet.`/`text_encoder.` `lora_A/lora_B`", diffusers_keys, LINEAR),
    SdLayout("diffusers `lora_A/lora_B`, bf16", diffusers_keys, LINEAR, dtype=torch.bfloat16),
    SdLayout("diffusers + `lora_adapter_metadata`", diffusers_keys, LINEAR, metadata=True),
    SdLayout("older diffusers `.lora.down` (UNet), `.lora_linear_layer.down` (text)", legacy_keys, LINEAR),
    SdLayout("older diffusers attention processors `processor.to_q_lora.down`", processor_keys, PROCESSOR),
)
SD_LIMITS = {
    SdLayout(
        "`save_attn_procs` file (`….processor.to_q_lora.down`, no `unet.` prefix)",
        unprefixed_processor_keys,
        re.compile(UNET_PROCESSOR),
    ): (
        "diffusers loads no module: `load_lora_adapter` (`loaders/peft.py`) keeps only the keys that start with `unet.`"
    ),
}
"""Layouts diffusers cannot read at all, and why (the cell asserts that the input loads no module)."""


def owner_delta(down: torch.Tensor, up: torch.Tensor, scale: float, weight_shape: tuple[int, ...]) -> torch.Tensor:
    """``scale * up @ down`` in float64, in the weight's shape (conv: ``[out, in, kh, kw]``)."""
    rank = down.shape[0]
    product = up.double().reshape(up.shape[0], rank) @ down.double().reshape(rank, -1)
    return (scale * product).reshape(weight_shape)


def write_sd_lora(path: Path, family: str, layout: SdLayout, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write ``layout``'s file for ``family``'s tiny pipeline to ``path``; return what it means to its owner.

    The meaning, ``"<component>.<module>" -> delta``, is computed from the tensors read back from the file.
    """
    generator = torch.Generator().manual_seed(seed)
    targets = sd_targets(family, layout.modules)
    tensors, keys = {}, {}
    for index, target in enumerate(targets):
        down_key, up_key, alpha_key = keys[target.key] = layout.keys(target)
        out_features, *in_shape = target.weight_shape
        down, up = _decaying_pair(out_features, math.prod(in_shape), RANK, 1.0, generator)
        tensors[down_key] = down.reshape(RANK, *in_shape).to(layout.dtype)
        tensors[up_key] = up.reshape(out_features, RANK, *[1] * (len(in_shape) - 1)).to(layout.dtype)
        if layout.alpha is not None:
            tensors[alpha_key] = torch.tensor(layout.alpha(index), dtype=layout.alpha_dtype)
    metadata = {"format": "pt"}
    if layout.metadata:
        fields = {}
        for component in sorted({target.component for target in targets}):
            modules = sorted(t.module for t in targets if t.component == component)
            fields |= {f"{component}.r": RANK, f"{component}.lora_alpha": METADATA_ALPHA[component]}
            fields[f"{component}.target_modules"] = modules
        metadata["lora_adapter_metadata"] = json.dumps(fields)
    save_file(tensors, path, metadata=metadata)
    stored = load_file(path)
    return {
        target.key: owner_delta(
            stored[keys[target.key][0]], stored[keys[target.key][1]], layout.owner_scale(target, i), target.weight_shape
        )
        for i, target in enumerate(targets)
    }


def load_sd(family: str, *files: tuple[str, Path]) -> dict[str, nn.Module]:
    """A fresh tiny pipeline with each ``(adapter name, file path)`` loaded by ``load_lora_weights``."""
    pipe = build_sd_pipeline(family)
    for adapter, path in files:
        pipe.load_lora_weights(str(path), adapter_name=adapter)
    return sd_components(pipe)


def resize_both_ways(source: Path, folder: Path, name: str) -> dict[int, tuple[Path, dict]]:
    """Resize ``source`` to every rank of ``RANKS``, into ``folder/r<rank>/<name>``: ``rank -> (output, report)``."""
    outputs = {}
    for rank in RANKS:
        output = folder / f"r{rank}" / name
        output.parent.mkdir(parents=True)
        outputs[rank] = output, lora_ops.resize_file(source, output, lora_ops.ResizeOptions(rank=rank))
    return outputs


def assert_outputs_load_like(
    components: dict[str, nn.Module], before: dict[str, torch.Tensor], outputs: dict[int, tuple[Path, dict]]
) -> None:
    """Each output, loaded as adapter ``r<rank>``, has its new rank everywhere and applies ``before`` exactly
    (a rank increase) or with the error its report states (a reduction)."""
    for rank, (_, report) in outputs.items():
        adapter = f"r{rank}"
        other = {name: r for name, r in loaded_ranks(components, adapter).items() if r != rank}
        assert not other, f"{len(other)} layers of {adapter} loaded at another rank, e.g. {sorted(other.items())[:3]}"
        after = applied_deltas(components, adapter)
        if rank > RANK:
            assert_same_deltas(before, after, rtol=1e-6)
        else:
            assert_reported_error(before, after, report)


def misread(owner: dict[str, torch.Tensor], read: dict[str, torch.Tensor]) -> list[str]:
    """Modules whose delta as the consumer applies it differs from the owner's meaning (beyond float32 rounding)."""
    return sorted(
        name for name, delta in owner.items() if float((read[name] - delta).norm()) > 1e-5 * float(delta.norm())
    )


def diffusers_alpha_pattern_lost(name: str) -> bool:
    """Whether diffusers cannot apply this module's own kohya alpha (``get_peft_kwargs`` in ``utils/peft_utils.py``).

    ``_get_alpha_name`` (``loaders/lora_conversion_utils.py``) names a kohya alpha after the converted key cut at
    ``.lora.``. Attention projections convert to ``….processor.to_q_lora.down.weight`` (UNet) and
    ``….self_attn.to_q_lora.down.weight`` (text encoders), whose ``alpha_pattern`` keys match no module; text
    MLPs keep ``text_model.``, which transformers 5's flattened ``CLIPTextModel`` no longer has. Those modules
    get their component's most common alpha (``lora_alpha``).
    """
    attention = re.search(r"(attn[12]\.to_(q|k|v|out\.0)|self_attn\.(q|k|v|out)_proj)$", name) is not None
    flattened_text_mlp = name.startswith("text_encoder") and ".text_model." not in name
    return attention or flattened_text_mlp


def diffusers_misread_modules(layout: SdLayout, names: list[str]) -> list[str]:
    """The modules of ``layout``'s input (``names`` in file order) diffusers applies at a scale sd-scripts does not.

    ``alpha = 0``: diffusers builds ``LoraConfig(lora_alpha=0)``, scale 0, where sd-scripts reads ``alpha = rank``.
    Per-module alphas: those whose alpha pattern is lost and whose alpha is not their component's most common one
    (``network_alphas`` are split by component before ``get_peft_kwargs`` picks the most common).
    """
    if not layout.diffusers_misreads:
        return []
    alphas = {name: layout.alpha(index) for index, name in enumerate(names)}
    component = {name: name.split(".")[0] for name in names}
    common = {
        part: Counter(alpha for name, alpha in alphas.items() if component[name] == part).most_common(1)[0][0]
        for part in set(component.values())
    }
    return sorted(
        name
        for name, alpha in alphas.items()
        if alpha == 0 or (alpha != common[component[name]] and diffusers_alpha_pattern_lost(name))
    )


SD_CELLS = [(family, layout) for family in (SD15, SDXL) for layout in SD_LAYOUTS]


@pytest.mark.parametrize(("family", "layout"), SD_CELLS, ids=[f"{f}-{layout.label}" for f, layout in SD_CELLS])
def test_sd_output_loads_like_its_input(family: str, layout: SdLayout, tmp_path: Path) -> None:
    source = tmp_path / "input.safetensors"
    owner = write_sd_lora(source, family, layout)
    outputs = resize_both_ways(source, tmp_path, "lora.safetensors")
    components = load_sd(family, ("input", source), *((f"r{rank}", path) for rank, (path, _) in outputs.items()))
    read = applied_deltas(components, "input")
    assert set(read) == set(owner), f"diffusers patched {sorted(set(read) ^ set(owner))[:5]} differently"
    wrong = misread(owner, read)
    assert wrong == diffusers_misread_modules(layout, list(owner))
    assert wrong or not layout.diffusers_misreads, "the consumer disagreement this cell documents must be real"
    assert_outputs_load_like(components, owner, outputs)
    if layout.diffusers_misreads:
        for _, report in outputs.values():
            assert any("diffusers" in line for line in report["warnings"]), report.get("warnings")


@pytest.mark.parametrize("layout", list(SD_LIMITS), ids=lambda layout: layout.label)
def test_sd_layout_diffusers_cannot_read_is_a_real_limit(layout: SdLayout, tmp_path: Path) -> None:
    source = tmp_path / "input.safetensors"
    owner = write_sd_lora(source, SD15, layout)
    assert owner, "the file must hold LoRA pairs for the limit to mean anything"
    assert applied_deltas(load_sd(SD15, ("input", source)), "input") == {}


# ---------------------------------------------------------------------------------------------------------------
# PEFT adapters
# ---------------------------------------------------------------------------------------------------------------


class TinyPeftBase(nn.Module):
    """A base model with one layer of every kind PEFT's LoRA wraps: Embedding, Linear, Conv1d, Conv2d, Conv3d."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(24, 16)
        self.proj = nn.Linear(16, 12)
        self.conv1d = nn.Conv1d(4, 6, 3)
        self.conv2d = nn.Conv2d(4, 6, 3)
        self.conv3d = nn.Conv3d(2, 4, 3)


def build_peft_base(seed: int = 0) -> TinyPeftBase:
    """A fresh :class:`TinyPeftBase`; the same ``seed`` gives the same weights."""
    torch.manual_seed(seed)
    return TinyPeftBase()


ADAPTER_FOLDER = "`save_pretrained` folder"
PEFT_CELLS = {
    f"{ADAPTER_FOLDER}, Linear": {"target_modules": ["proj"]},
    f"{ADAPTER_FOLDER}, Embedding (`lora_embedding_A/B`) + Linear": {"target_modules": ["embed", "proj"]},
    f"{ADAPTER_FOLDER}, Conv2d": {"target_modules": ["conv2d"]},
    f"{ADAPTER_FOLDER}, Conv1d": {"target_modules": ["conv1d"]},
    f"{ADAPTER_FOLDER}, Conv3d": {"target_modules": ["conv3d"]},
    f"{ADAPTER_FOLDER}, `rank_pattern` + `alpha_pattern`": {
        "target_modules": ["proj", "conv2d", "embed"],
        "rank_pattern": {"conv2d": RANK // 2},
        "alpha_pattern": {"proj": 4, "embed": 32},
    },
    f"{ADAPTER_FOLDER}, `use_rslora`": {"target_modules": ["proj", "conv2d"], "use_rslora": True},
}
"""PEFT adapters: LoraConfig fields besides ``r = 8``, ``lora_alpha = 16``."""


def write_peft_adapter(folder: Path, fields: dict, seed: int = 1) -> Path:
    """``save_pretrained`` a random (non-zero) LoRA adapter over :func:`build_peft_base`; return its weights file."""
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, init_lora_weights=False, **fields)
    torch.manual_seed(seed)
    get_peft_model(build_peft_base(), config).save_pretrained(folder)
    return folder / "adapter_model.safetensors"


@pytest.mark.parametrize("label", list(PEFT_CELLS))
def test_peft_output_loads_like_its_input(label: str, tmp_path: Path) -> None:
    source = write_peft_adapter(tmp_path / "input", PEFT_CELLS[label])
    outputs = resize_both_ways(source, tmp_path, source.name)
    model = PeftModel.from_pretrained(build_peft_base(), source.parent, adapter_name="input")
    for rank, (path, _) in outputs.items():
        model.load_adapter(path.parent, adapter_name=f"r{rank}")
    components = {"model": model}
    assert_outputs_load_like(components, applied_deltas(components, "input"), outputs)


CELLS = (
    *(Cell(family, layout.label, CONSUMERS[family]) for family, layout in SD_CELLS),
    *(Cell(SD15, layout.label, CONSUMERS[SD15], limit) for layout, limit in SD_LIMITS.items()),
    *(Cell(PEFT, label, CONSUMERS[PEFT]) for label in PEFT_CELLS),
)
"""The cells this module tests (``limit`` set: a layout the consumer cannot read, asserted to be so)."""
