"""Key layouts of LoRA files, kept as data, and the pairing of a file's keys into LoRA modules.

A layout names the two factors of a module by key suffix (``<module>.lora_A.weight`` and
``<module>.lora_B.weight``, ``<module>.lora_down.weight`` and ``<module>.lora_up.weight``, ...) and
says how a resized file of that layout stores its scale. See ``shared/notes/lora-formats.md``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .errors import LoraError
from .files import Header, TensorInfo

FACTOR_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class Layout:
    """How one family of files names LoRA factors and stores the scale.

    ``writes_alpha``: a resized file carries one ``.alpha`` per module (one constant value, the scale
    folded into the factors) - the kohya family; otherwise the whole scale is folded into the factors
    and no alpha is written. ``zero_alpha_is_rank``: the trainer reads ``alpha == 0`` as ``alpha = rank``.
    """

    name: str
    down_suffix: str
    up_suffix: str
    module_pattern: re.Pattern[str]
    alpha_suffix: str
    writes_alpha: bool
    zero_alpha_is_rank: bool


LAYOUTS = (
    Layout("diffusers", ".lora_A.weight", ".lora_B.weight", re.compile(r".+"), ".alpha", False, False),
    Layout("kohya", ".lora_down.weight", ".lora_up.weight", re.compile(r".+"), ".alpha", True, True),
    Layout("diffusers-legacy", ".lora.down.weight", ".lora.up.weight", re.compile(r".+"), ".alpha", False, False),
    Layout("lora-processor", ".down.weight", ".up.weight", re.compile(r".+_lora\d*"), ".alpha", False, False),
    Layout("cloneofsimo", ":down", ":up", re.compile(r"[A-Za-z_]+:\d+"), ":alpha", False, False),
)
LAYOUT_BY_NAME = {layout.name: layout for layout in LAYOUTS}

# (layout, regex on a module name, what users call files like this); the first match names the file.
FLAVOURS = (
    ("diffusers", r"^transformer\.", "diffusers/PEFT (FLUX transformer)"),
    ("diffusers", r"^(unet|text_encoder(_2)?)\.", "diffusers/PEFT (SD/SDXL)"),
    ("diffusers", r"^base_model\.model\.double_blocks\.", "fal Kontext"),
    ("diffusers", r"^base_model\.model\.", "PEFT adapter"),
    ("diffusers", r"^(double|single)_blocks\.", "BFL Control LoRA"),
    ("diffusers", r"^diffusion_model\.", "ComfyUI (lora_A/lora_B)"),
    ("diffusers", r"", "diffusers/PEFT"),
    ("kohya", r"^lora_unet_(double|single)_blocks_", "kohya sd-scripts (FLUX)"),
    ("kohya", r"^lora_transformer_", "OneTrainer"),
    ("kohya", r"^diffusion_model\.", "ComfyUI / BFL names"),
    ("kohya", r"^transformer\.", "diffusers names with lora_down/lora_up"),
    ("kohya", r"", "kohya sd-scripts / LoCon (SD, SDXL)"),
    ("diffusers-legacy", r"", "diffusers attention processors (legacy .lora.down)"),
    ("lora-processor", r"processor\.(qkv|proj)_lora\d", "XLabs"),
    ("lora-processor", r"", "diffusers attention processors (legacy _lora.down)"),
    ("cloneofsimo", r"", "cloneofsimo lora (positional)"),
)

# Adapters that are not plain LoRA: refused by name, never resized.
FOREIGN_ADAPTERS = (
    (re.compile(r"\.hada_(w|t)\d"), "LoHa"),
    (re.compile(r"\.lokr_"), "LoKr"),
    (re.compile(r"\.(a1|a2|b1|b2)\.weight$"), "GLoRA"),
    (re.compile(r"\.b?oft_"), "OFT/BOFT"),
    (re.compile(r"\.on_input$|\.ia3_"), "(IA)3"),
    (re.compile(r"\.dora_scale$|\.lora_magnitude_vector"), "DoRA"),
    (re.compile(r"\.lora_mid\.weight$"), "Tucker/CP LoCon (lora_mid)"),
    (re.compile(r"^lycoris_"), "LyCORIS"),
)


@dataclass(frozen=True)
class LoraModule:
    """One LoRA pair: ``down`` (A) ``[rank, *in_shape]`` and ``up`` (B) ``[out_features, rank(, 1, 1)]``."""

    name: str
    down_key: str
    up_key: str
    alpha_key: str | None
    rank: int
    out_features: int
    in_shape: tuple[int, ...]
    down_dtype: str
    up_dtype: str

    @property
    def in_features(self) -> int:
        """Columns of the flattened down factor (``in * kh * kw`` for conv)."""
        return math.prod(self.in_shape)

    @property
    def delta_shape(self) -> list[int]:
        """Shape of the weight delta: ``[out, in]``, or ``[out, in, kh, kw]`` for conv."""
        return [self.out_features, *self.in_shape]

    @property
    def is_conv(self) -> bool:
        return len(self.in_shape) == 3


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file understood from its header alone: layout, modules sorted by name, untouched keys."""

    path: Path
    header: Header
    layout: Layout
    flavour: str
    modules: tuple[LoraModule, ...]
    passthrough: tuple[str, ...]


def _match_factor(key: str) -> tuple[Layout, str, str] | None:
    for layout in LAYOUTS:
        for role, suffix in (("down", layout.down_suffix), ("up", layout.up_suffix)):
            if key.endswith(suffix) and layout.module_pattern.fullmatch(key[: -len(suffix)]):
                return layout, key[: -len(suffix)], role
    return None


def _refuse_foreign(file: str, keys: list[str]) -> None:
    for key in keys:
        for pattern, kind in FOREIGN_ADAPTERS:
            if pattern.search(key):
                raise LoraError(f"{file} is a {kind} adapter ({key!r}), not plain LoRA; only LoRA can be resized")


def parse_lora(path: str | Path, header: Header) -> LoraFile:
    """Pair the file's keys into LoRA modules using its header only; refuse what is not plain LoRA."""
    path = Path(path)
    keys = sorted(header.tensors)
    _refuse_foreign(path.name, keys)
    factors: dict[tuple[str, str], dict[str, str]] = {}
    for key in keys:
        match = _match_factor(key)
        if match:
            layout, module, role = match
            factors.setdefault((layout.name, module), {})[role] = key
    if not factors:
        example = f" (e.g. {keys[0]!r})" if keys else ""
        raise LoraError(
            f"{path.name} holds no LoRA factors among its {len(keys)} tensors{example}: it is not a LoRA file"
            " (a full model checkpoint?)"
        )
    layout_names = Counter(layout_name for layout_name, _ in factors)
    if len(layout_names) > 1:
        raise LoraError(f"{path.name} mixes LoRA layouts ({', '.join(sorted(layout_names))}); resize them apart")
    layout = LAYOUT_BY_NAME[next(iter(layout_names))]
    modules = tuple(
        _module(path.name, layout, name, roles, header.tensors) for (_, name), roles in sorted(factors.items())
    )
    used = {key for m in modules for key in (m.down_key, m.up_key, m.alpha_key) if key}
    flavour = next(
        label for name, pattern, label in FLAVOURS if name == layout.name and re.search(pattern, modules[0].name)
    )
    return LoraFile(
        path=path,
        header=header,
        layout=layout,
        flavour=flavour,
        modules=modules,
        passthrough=tuple(key for key in keys if key not in used),
    )


def _module(file: str, layout: Layout, name: str, roles: dict[str, str], tensors: dict[str, TensorInfo]) -> LoraModule:
    if set(roles) != {"down", "up"}:
        have, missing = next(iter(roles.items()))[1], "up" if "down" in roles else "down"
        raise LoraError(f"{file}: orphan LoRA factor {have!r} has no {missing} factor")
    down, up = tensors[roles["down"]], tensors[roles["up"]]
    for key, info in ((roles["down"], down), (roles["up"], up)):
        if info.dtype not in FACTOR_DTYPES:
            raise LoraError(f"{file}: LoRA factor {key!r} has dtype {info.dtype}; expected fp16, bf16 or fp32")
    conv_up = len(up.shape) == 4 and up.shape[2:] == (1, 1)
    if not (len(down.shape) in (2, 4) and (len(up.shape) == 2 or conv_up) and len(down.shape) == len(up.shape)):
        raise LoraError(
            f"{file}: module {name!r} has factor shapes {list(down.shape)} and {list(up.shape)},"
            " which are not a LoRA pair"
        )
    rank = down.shape[0]
    if up.shape[1] != rank:
        raise LoraError(f"{file}: module {name!r} has mismatched ranks: down {rank}, up {up.shape[1]}")
    if rank == 0 or up.shape[0] == 0 or math.prod(down.shape[1:]) == 0:
        raise LoraError(f"{file}: module {name!r} has an empty factor (rank {rank})")
    alpha_key = name + layout.alpha_suffix
    if alpha_key in tensors:
        if math.prod(tensors[alpha_key].shape) != 1 or tensors[alpha_key].dtype not in FACTOR_DTYPES:
            raise LoraError(f"{file}: {alpha_key!r} must be a single float")
    else:
        alpha_key = None
    return LoraModule(
        name=name,
        down_key=roles["down"],
        up_key=roles["up"],
        alpha_key=alpha_key,
        rank=rank,
        out_features=up.shape[0],
        in_shape=tuple(down.shape[1:]),
        down_dtype=down.dtype,
        up_dtype=up.dtype,
    )
