"""The scale each module of a file really has, from wherever the file's loaders read it.

Priority, as the loaders apply it: a PEFT ``adapter_config.json`` (given, or lying next to the file) for
``lora_A``/``lora_B`` files; else diffusers' ``lora_adapter_metadata`` in the safetensors metadata;
else ``.alpha`` tensors (``scale = alpha / rank``); else a plain ``alpha`` entry in the safetensors metadata
(``alpha / rank`` for every module, as diffusers' ``MiniMaxH3LoraLoaderMixin.lora_state_dict`` reads it);
else 1. Where the scale came from is also where a resized file keeps it (:mod:`lora_ops.writer`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import LoraError
from .files import parse_json
from .layouts import LoraFile, LoraModule

DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
# rank_pattern / alpha_pattern keys read: module names as PEFT and diffusers write them. Each is matched as a
# regular expression, so anything richer (groups, quantifiers) could backtrack exponentially: refused.
MODULE_PATTERN = re.compile(r"\^?[\w.\-:]{1,512}")
METADATA_ALPHA_KEY = "alpha"
JSON_KINDS = {list: "a JSON array", str: "a JSON string", type(None): "null", bool: "a boolean", int: "a number"}
PEFT_CONFIG_NAME = "adapter_config.json"
# Where a file keeps its scale (``module_scales``' second value, the reports' ``scale_source``).
FROM_PEFT_CONFIG = "PEFT adapter_config.json"
FROM_DIFFUSERS_METADATA = DIFFUSERS_METADATA_KEY
FROM_ALPHA_TENSORS = "alpha tensors"
FROM_METADATA_ALPHA = "metadata alpha"
FROM_NOTHING = "none (scale 1)"
PEFT_PREFIX = "base_model.model."
# Largest |scale| (alpha / rank) accepted; real files stay within 0.01-100. Beyond it float64 products can overflow.
MAX_SCALE = 1e6


@dataclass(frozen=True)
class LoraConfigView:
    """The LoraConfig fields that set a module's scale (``r``, ``lora_alpha``, patterns, ``use_rslora``)."""

    r: int
    lora_alpha: float
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    use_rslora: bool

    @classmethod
    def from_dict(cls, fields: dict, source: str) -> LoraConfigView:
        try:
            view = cls(
                r=int(fields["r"]),
                lora_alpha=float(fields.get("lora_alpha", fields["r"])),
                rank_pattern={str(k): int(v) for k, v in (fields.get("rank_pattern") or {}).items()},
                alpha_pattern={str(k): float(v) for k, v in (fields.get("alpha_pattern") or {}).items()},
                use_rslora=bool(fields.get("use_rslora", False)),
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
            raise LoraError(f"{source} has no valid LoRA config (r, lora_alpha, rank_pattern, alpha_pattern)") from None
        odd = next((p for p in (*view.rank_pattern, *view.alpha_pattern) if not MODULE_PATTERN.fullmatch(p)), None)
        if odd is not None:
            raise LoraError(
                f"{source}: pattern {odd[:80]!r} is not a module name; only names (optionally starting with ^) are read"
            )
        return view

    def scale(self, module_name: str, rank: int, source: str) -> float:
        """Scale of one module, matching patterns the way PEFT does (``(.*\\.)?(<pattern>)$``)."""
        config_rank = _pattern_value(self.rank_pattern, module_name, self.r)
        if config_rank != rank:
            raise LoraError(f"{source} gives module {module_name!r} rank {config_rank}, but the file has rank {rank}")
        alpha = _pattern_value(self.alpha_pattern, module_name, self.lora_alpha)
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)


def _pattern_value(patterns: dict, name: str, default):
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def load_peft_config(lora: LoraFile, config: str | Path | None) -> tuple[dict | None, Path | None]:
    """The PEFT adapter config that applies to the file: the given one, else ``adapter_config.json`` beside it."""
    if config is None:
        beside = lora.path.parent / PEFT_CONFIG_NAME
        if lora.layout.name != "diffusers" or not beside.is_file():
            return None, None
        config = beside
    config = Path(config)
    if not config.is_file():
        raise LoraError(f"config file not found: {config}")
    fields = parse_json(config.read_bytes(), f"{config.name} is not valid JSON")
    if not isinstance(fields, dict):
        raise LoraError(
            f"{config.name} is not a PEFT LoRA config (it holds {JSON_KINDS.get(type(fields), 'a value')},"
            " not a JSON object)"
        )
    if fields.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{config.name} is not a PEFT LoRA config (peft_type {fields.get('peft_type')!r})")
    return fields, config


def diffusers_metadata(lora: LoraFile) -> dict | None:
    """The parsed ``lora_adapter_metadata`` JSON (keys ``"<component>.<field>"``), if the file has it."""
    raw = lora.header.metadata.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return None
    fields = parse_json(raw, f"{lora.path.name}: {DIFFUSERS_METADATA_KEY} is not valid JSON")
    if not isinstance(fields, dict):
        raise LoraError(f"{lora.path.name}: {DIFFUSERS_METADATA_KEY} is not a JSON object")
    return fields


def split_component(module_name: str) -> tuple[str, str]:
    """``"transformer.blocks.0.attn.to_q"`` -> ``("transformer", "blocks.0.attn.to_q")``."""
    component, _, rest = module_name.partition(".")
    return component, rest


def module_scales(lora: LoraFile, alphas: dict[str, float], peft_config: dict | None) -> tuple[list[float], str]:
    """Scale of every module of ``lora`` (same order) and a short text saying where it came from.

    ``alphas`` maps module names to the values of their alpha tensors.
    """
    scales, source = _scales(lora, alphas, peft_config)
    for module, scale in zip(lora.modules, scales):
        if not (math.isfinite(scale) and abs(scale) <= MAX_SCALE):
            raise LoraError(f"{lora.path.name}: module {module.name!r} has scale {scale:g} ({source}); refused")
    return scales, source


def metadata_alpha(lora: LoraFile) -> float | None:
    """The number in the safetensors metadata's ``alpha`` entry, if it has one that reads as a number.

    diffusers' MiniMax-H3 loader ignores an entry that is not a number (with a warning), and so does this.
    """
    try:
        return float(lora.header.metadata[METADATA_ALPHA_KEY])
    except (KeyError, ValueError):
        return None


def _scales(lora: LoraFile, alphas: dict[str, float], peft_config: dict | None) -> tuple[list[float], str]:
    if peft_config is not None:
        view = LoraConfigView.from_dict(peft_config, PEFT_CONFIG_NAME)
        scales = [view.scale(m.name.removeprefix(PEFT_PREFIX), m.rank, PEFT_CONFIG_NAME) for m in lora.modules]
        return scales, FROM_PEFT_CONFIG
    metadata = diffusers_metadata(lora)
    if metadata is not None:
        return [_metadata_scale(lora, metadata, m, alphas) for m in lora.modules], FROM_DIFFUSERS_METADATA
    if alphas:
        return [_alpha_scale(lora, m, alphas.get(m.name)) for m in lora.modules], FROM_ALPHA_TENSORS
    alpha = metadata_alpha(lora)
    if alpha is not None:
        return [_alpha_scale(lora, m, alpha) for m in lora.modules], FROM_METADATA_ALPHA
    return [1.0] * len(lora.modules), FROM_NOTHING


def _metadata_scale(lora: LoraFile, metadata: dict, module: LoraModule, alphas: dict[str, float]) -> float:
    component, name = split_component(module.name)
    fields = {k.removeprefix(component + "."): v for k, v in metadata.items() if k.startswith(component + ".")}
    if not fields:
        return _alpha_scale(lora, module, alphas.get(module.name))
    view = LoraConfigView.from_dict(fields, f"{lora.path.name} {DIFFUSERS_METADATA_KEY}")
    return view.scale(name, module.rank, f"{lora.path.name} {DIFFUSERS_METADATA_KEY}")


def _alpha_scale(lora: LoraFile, module: LoraModule, alpha: float | None) -> float:
    if alpha is None:
        return 1.0
    if not math.isfinite(alpha):
        raise LoraError(f"{lora.path.name}: alpha of module {module.name!r} is {alpha}")
    if alpha == 0 and lora.layout.zero_alpha_is_rank:
        return 1.0
    return alpha / module.rank
