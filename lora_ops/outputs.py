"""What an output file holds besides its new factors: the alpha tensors, the scale a loader applies to each module,
and every tensor's dtype and shape (the header is written before the data); writing one module into an open
:func:`lora_ops.writer.lora_output`; and the checks on the output's path, made before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from .atomic import same_file
from .errors import LoraError
from .files import TORCH_DTYPES, TensorInfo
from .inputs import BY_ALPHA, BY_CONFIG, Source
from .layouts import LoraModule
from .options import ResizeOptions
from .scales import PEFT_CONFIG_NAME
from .writer import alpha_dtype, output_alpha

# The output dtypes a resize can ask for (``ResizeOptions.dtype``); keep: each factor's own.
OUTPUT_DTYPES = {"keep": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Stands in the header for the source sha256 until its background hashing is done (same length).
SHA256_PLACEHOLDER = "0" * 64


def out_dtype(options: ResizeOptions, stored: str) -> torch.dtype:
    """The dtype a factor stored as ``stored`` (a safetensors dtype name) is written in: ``options.dtype``'s, or
    its own for ``keep``."""
    return OUTPUT_DTYPES[options.dtype] or TORCH_DTYPES[stored]


def output_alphas(
    source: Source, ranks: list[int], scales: list[float] | None = None
) -> tuple[float | None, dict[str, Tensor]]:
    """The alpha the output carries (``None``: every scale is folded into the factors) and its alpha tensors by key:
    the new alpha (:func:`lora_ops.writer.output_alpha` of the ``scales`` the output is to carry, by default the
    input's) for each module that carries one, the input's own tensor for a module whose alpha a config overrides
    (kept as it was, so that the key set keeps its shape)."""
    lora, carries = source.lora, [carrier == BY_ALPHA for carrier in source.carriers]
    scales = source.scales if scales is None else scales
    if not any(carries):
        alpha = None
    else:
        alpha = output_alpha([s for s, c in zip(scales, carries) if c], [k for k, c in zip(ranks, carries) if c])
    dtype = alpha_dtype(alpha, source.alpha_dtype) if alpha is not None else None
    tensors = {}
    for module, carries_alpha in zip(lora.modules, carries):
        if module.alpha_key is None:
            continue
        stored = source.alpha_tensors[module.name]
        tensors[module.alpha_key] = torch.full(stored.shape, alpha, dtype=dtype) if carries_alpha else stored
    return alpha, tensors


def output_specs(
    source: Source, ranks: list[int], options: ResizeOptions, alphas: dict[str, Tensor]
) -> dict[str, TensorInfo]:
    """Every tensor the output will hold: passthrough as is, factors at their new ranks, ``alphas``."""
    lora = source.lora
    specs = {key: lora.header.tensors[key] for key in lora.passthrough}
    for module, rank in zip(lora.modules, ranks):
        specs[module.down_key] = TensorInfo.of(out_dtype(options, module.down_dtype), (rank, *module.in_shape))
        specs[module.up_key] = TensorInfo.of(
            out_dtype(options, module.up_dtype), (module.out_features, rank, *module.up_tail)
        )
    specs.update({key: TensorInfo.of(alpha.dtype, tuple(alpha.shape)) for key, alpha in alphas.items()})
    return specs


def out_scale(carrier: str, scale: float, alpha: float | None, rank: int) -> float:
    """The scale a loader applies to a module's written factors: ``alpha / rank`` where an alpha carries it, the
    module's own scale where its regenerated config does, else 1."""
    if carrier == BY_ALPHA and alpha is not None:
        return alpha / rank
    return scale if carrier == BY_CONFIG else 1.0


def store_module(
    output,
    module: LoraModule,
    layer: dict,
    down: Tensor,
    up: Tensor,
    out_scale: float,
    alpha_tensors: dict[str, Tensor],
) -> dict:
    """Write one resized (or merged) module's factors, and its alpha where it has one, to ``output`` (an open
    `lora_output` writer); return its report row with the singular values scaled to the delta as loaders read it
    (the output's scale ``out_scale`` times those of its stored factors)."""
    output.put(module.down_key, down)
    output.put(module.up_key, up)
    if module.alpha_key:
        output.put(module.alpha_key, alpha_tensors[module.alpha_key])
    return {**layer, "singular_values": [v * out_scale for v in layer["singular_values"]]}


def check_destination(source: Path, destination: Path, peft_config_path: Path | None) -> None:
    """Refuse an output path that is a folder, not a ``.safetensors`` file, in a folder that does not exist, the input
    ``source`` itself, or in the folder of the input's PEFT config (``peft_config_path``), which the new config would
    replace. Raises :class:`LoraError`; nothing is created."""
    if destination.is_dir():
        raise LoraError(f"the output {destination} is a folder; give a file name ending in .safetensors")
    if destination.suffix != ".safetensors":
        raise LoraError(f"output must be a .safetensors file, not {destination.name}")
    if destination.parent.exists() and not destination.parent.is_dir():
        raise LoraError(f"the output's folder {destination.parent} is a file, not a folder")
    if not destination.parent.is_dir():
        raise LoraError(f"output folder does not exist: {destination.parent} (it is not created; make it first)")
    if same_file(destination, source):
        raise LoraError("the output path is the input file; choose another path")
    if peft_config_path and (destination.parent / PEFT_CONFIG_NAME).resolve() == peft_config_path.resolve():
        raise LoraError(
            f"the output folder holds the input's {PEFT_CONFIG_NAME}, which the new config would replace;"
            " choose another folder"
        )


def check_config_destination(config_out: Path, config: dict) -> None:
    """Refuse to replace another adapter's ``adapter_config.json`` in the output folder (an identical one is fine)."""
    if not config_out.exists():
        return
    try:
        existing = json.loads(config_out.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        existing = None
    if existing != config:
        raise LoraError(
            f"the output folder already holds another adapter's {PEFT_CONFIG_NAME} ({config_out}), which the resized"
            " adapter's config would replace; choose another folder or move it away"
        )
