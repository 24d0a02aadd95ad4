"""Consumers that read a LoRA file differently from its format's owner, said as one warning line each.

lora-resizer reads every file the way the owner of its format does (diffusers for ``lora_adapter_metadata``,
sd-scripts for kohya files, PEFT for adapters) and writes files that diffusers, PEFT, ComfyUI and sd-scripts
read alike. Where a known consumer reads the *input* differently, the resized file therefore changes what
that consumer applies, and the user must hear it: each rule below recognises one such disagreement, found in
the consumer's own source, and names the consumer and what it does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .layouts import LoraFile
from .scales import FROM_DIFFUSERS_METADATA, FROM_METADATA_ALPHA, FROM_NOTHING

# Families whose kohya files diffusers converts with ``_convert_non_diffusers_lora_to_diffusers`` and loads with
# per-module alphas as a PEFT ``alpha_pattern`` (``diffusers.utils.peft_utils.get_peft_kwargs``).
SD_FAMILIES = frozenset({"SD 1.x/2.x", "SDXL", "CLIP text encoder"})


@dataclass(frozen=True)
class ScaleReading:
    """What the rules look at: the file, each module's scale as the owner reads it, where it came from, and the
    raw alpha values of the modules that have alpha tensors."""

    lora: LoraFile
    scales: list[float]
    scale_source: str
    alphas: dict[str, float]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _comfyui_ignores_diffusers_metadata(reading: ScaleReading) -> str | None:
    """ComfyUI (``comfy/lora.py``) reads ``.alpha`` tensors only: it applies scale 1 where the metadata says
    otherwise."""
    if reading.scale_source != FROM_DIFFUSERS_METADATA:
        return None
    scaled = [s for s in reading.scales if s != 1]
    if not scaled:
        return None
    return (
        f"ComfyUI ignores lora_adapter_metadata and applies scale 1 to this input's {_count(len(scaled), 'module')}"
        f" that diffusers scales by {_values(scaled)}, and likewise to the resized file, which keeps its scale in"
        " the metadata"
    )


def _zero_alpha(reading: ScaleReading) -> str | None:
    """sd-scripts reads ``alpha == 0`` as ``alpha = rank`` (``networks/lora.py``); diffusers' kohya conversion and
    ComfyUI compute ``alpha / rank = 0``."""
    if not reading.lora.layout.zero_alpha_is_rank:
        return None
    zeros = [name for name, alpha in reading.alphas.items() if alpha == 0]
    if not zeros:
        return None
    return (
        f"diffusers and ComfyUI read alpha = 0 as no effect on this input's {_count(len(zeros), 'module')},"
        " where sd-scripts reads it as alpha = rank (scale 1); the resized file follows"
        " sd-scripts with a non-zero alpha, so those modules take effect in diffusers and ComfyUI too"
    )


def _diffusers_sd_alpha_pattern(reading: ScaleReading) -> str | None:
    """diffusers loads an SD/SDXL kohya file's differing alphas as a PEFT ``alpha_pattern`` whose keys miss some
    attention and text-encoder modules (``get_peft_kwargs``), which then get the most common alpha."""
    if not reading.lora.layout.zero_alpha_is_rank or reading.lora.family not in SD_FAMILIES:
        return None
    values = set(reading.alphas.values())
    if len(values) < 2:
        return None
    return (
        f"diffusers applies the most common alpha to some SD attention and text-encoder modules of this input,"
        f" whose modules have {len(values)} different alphas ({_values(list(values))}); sd-scripts and ComfyUI"
        " apply each module's own. The resized file carries one alpha and folds the rest, so diffusers reads it"
        " as sd-scripts does"
    )


def _metadata_alpha_readers(reading: ScaleReading) -> str | None:
    """Only diffusers' ``MiniMaxH3LoraLoaderMixin`` reads a plain ``alpha`` metadata entry."""
    if reading.scale_source != FROM_METADATA_ALPHA:
        return None
    return (
        f"only diffusers' MiniMax-H3 loader reads the metadata alpha of this input (scale {_values(reading.scales)});"
        " other diffusers loaders, PEFT and ComfyUI apply scale 1 to it and to the resized file"
    )


def _peft_adapter_without_config(reading: ScaleReading) -> str | None:
    """PEFT takes ``lora_alpha`` (the scale) from the adapter's ``adapter_config.json``."""
    if reading.lora.flavour != "PEFT adapter" or reading.scale_source != FROM_NOTHING:
        return None
    return (
        "PEFT reads this adapter's scale (lora_alpha / r) from its adapter_config.json, which was not given;"
        " scale 1 was assumed: give the config for the right scale"
    )


RULES: tuple[Callable[[ScaleReading], str | None], ...] = (
    _comfyui_ignores_diffusers_metadata,
    _zero_alpha,
    _diffusers_sd_alpha_pattern,
    _metadata_alpha_readers,
    _peft_adapter_without_config,
)


def _values(values: list[float]) -> str:
    distinct = sorted(set(values))
    shown = ", ".join(f"{v:g}" for v in distinct[:3])
    return shown + (f" and {len(distinct) - 3} more" if len(distinct) > 3 else "")


def consumer_warnings(reading: ScaleReading) -> list[str]:
    """One line per known consumer that reads this file differently from its format's owner (empty: none)."""
    return [line for rule in RULES if (line := rule(reading))]
