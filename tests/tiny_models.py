"""Tiny random-weight transformers of diffusers' model families, and the consumers that load LoRAs into them.

Each family keeps its real module structure (every block linear a LoRA of that family targets) at toy widths,
so diffusers' own `load_lora_weights` runs its real conversion and PEFT injection on CPU in milliseconds.
Nothing is downloaded: models are built from their config with random weights. A consumer is the family's
real pipeline class, constructed with only the transformer (every other required component `None`; MiniMax-H3's
modular pipeline from its blocks, with only the transformer set).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    FluxPipeline,
    FluxTransformer2DModel,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    MiniMaxH3Blocks,
    MiniMaxH3ModularPipeline,
    MiniMaxH3Transformer3DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    WanPipeline,
    WanTransformer3DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from torch import nn

from tests.tiny_flux import TRANSFORMER_CONFIG as FLUX_CONFIG


def _minimax_h3_pipeline(transformer: nn.Module) -> MiniMaxH3ModularPipeline:
    """MiniMax-H3's modular pipeline with only ``transformer`` set (its blocks' other components stay empty)."""
    pipeline = MiniMaxH3Blocks().init_pipeline()
    pipeline.update_components(transformer=transformer)
    return pipeline


def _pipeline_factory(pipeline_class: type) -> Callable[[nn.Module], Any]:
    """``transformer -> pipeline_class(transformer=transformer, <every other required component>=None)``."""
    required = [
        name
        for name, parameter in inspect.signature(pipeline_class.__init__).parameters.items()
        if parameter.default is inspect.Parameter.empty and name not in ("self", "transformer")
    ]

    def consumer(transformer: nn.Module) -> Any:
        return pipeline_class(**dict.fromkeys(required), transformer=transformer)

    return consumer


@dataclass(frozen=True)
class Family:
    """A diffusers model family: its tiny transformer and the consumer whose ``load_lora_weights`` is tested."""

    name: str
    consumer_name: str
    build: Callable[[], nn.Module]
    consumer: Callable[[nn.Module], Any]


def _seeded(model_class: type, config: dict[str, Any]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return model_class(**config).eval()

    return build


QWEN_IMAGE_CONFIG = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 4,
    "num_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "axes_dims_rope": (4, 6, 6),
}
Z_IMAGE_CONFIG = {
    "all_patch_size": (2,),
    "all_f_patch_size": (1,),
    "in_channels": 4,
    "dim": 32,
    "n_layers": 1,
    "n_refiner_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 2,
    "cap_feat_dim": 16,
    "axes_dims": [4, 6, 6],
    "axes_lens": [32, 32, 32],
}
WAN_CONFIG = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 16,
    "freq_dim": 16,
    "ffn_dim": 48,
    "num_layers": 1,
    "rope_max_seq_len": 32,
}
SD3_CONFIG = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "num_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "caption_projection_dim": 32,
    "pooled_projection_dim": 16,
    "out_channels": 4,
    "pos_embed_max_size": 8,
}
HUNYUAN_VIDEO_CONFIG = {
    "in_channels": 4,
    "out_channels": 4,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "num_layers": 1,
    "num_single_layers": 1,
    "num_refiner_layers": 1,
    "patch_size": 1,
    "patch_size_t": 1,
    "text_embed_dim": 16,
    "pooled_projection_dim": 16,
    "rope_axes_dim": (4, 6, 6),
}
MINIMAX_H3_CONFIG = {
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "hidden_size": 32,
    "num_layers": 1,
    "num_refiner_layers": 1,
    "ffn_dim": 48,
    "in_channels": 4,
    "audio_in_channels": 4,
    "text_dim": 16,
    "freq_dim": 16,
    "time_embed_hidden_dim": 32,
    "time_embed_dim": 16,
    "rope_freq_dim": 4,
}

FAMILIES = {
    family.name: family
    for family in (
        Family("FLUX.1", "FluxPipeline", _seeded(FluxTransformer2DModel, FLUX_CONFIG), _pipeline_factory(FluxPipeline)),
        Family(
            "Qwen-Image",
            "QwenImagePipeline",
            _seeded(QwenImageTransformer2DModel, QWEN_IMAGE_CONFIG),
            _pipeline_factory(QwenImagePipeline),
        ),
        Family(
            "Z-Image",
            "ZImagePipeline",
            _seeded(ZImageTransformer2DModel, Z_IMAGE_CONFIG),
            _pipeline_factory(ZImagePipeline),
        ),
        Family("Wan 2.x", "WanPipeline", _seeded(WanTransformer3DModel, WAN_CONFIG), _pipeline_factory(WanPipeline)),
        Family(
            "SD3",
            "StableDiffusion3Pipeline",
            _seeded(SD3Transformer2DModel, SD3_CONFIG),
            _pipeline_factory(StableDiffusion3Pipeline),
        ),
        Family(
            "HunyuanVideo",
            "HunyuanVideoPipeline",
            _seeded(HunyuanVideoTransformer3DModel, HUNYUAN_VIDEO_CONFIG),
            _pipeline_factory(HunyuanVideoPipeline),
        ),
        Family(
            "MiniMax-H3",
            "MiniMaxH3ModularPipeline",
            _seeded(MiniMaxH3Transformer3DModel, MINIMAX_H3_CONFIG),
            _minimax_h3_pipeline,
        ),
    )
}
"""Every transformer family of the loader matrix, by the name the README uses."""


def linears_under(transformer: nn.Module, blocks: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` under the module-name prefixes ``blocks``, by diffusers module name."""
    return {
        name: module
        for name, module in transformer.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(blocks)
    }
