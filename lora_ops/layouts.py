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
# An alpha may be any real number: kohya and ComfyUI read integer alphas with ``.item()`` like float ones.
ALPHA_DTYPES = (*FACTOR_DTYPES, "I64", "I32", "I16", "I8", "U8")


@dataclass(frozen=True)
class Layout:
    """How one family of files names LoRA factors and where it keeps the scale.

    ``pairs``: the ``(down, up)`` key suffixes of a module's two factors; the first pair is the layout's
    usual one, later ones are other pairs the same consumers treat as LoRA (PEFT's ``lora_embedding_A`` /
    ``lora_embedding_B`` of an ``nn.Embedding``). ``alpha_suffix``: the key of a module's alpha tensor.
    ``zero_alpha_is_rank``: the format's owner reads ``alpha == 0`` as ``alpha = rank`` (sd-scripts,
    ``networks/lora.py``); diffusers and ComfyUI read it as 0.
    """

    name: str
    pairs: tuple[tuple[str, str], ...]
    module_pattern: re.Pattern[str]
    alpha_suffix: str
    zero_alpha_is_rank: bool

    @property
    def down_suffix(self) -> str:
        """The usual down (A) suffix."""
        return self.pairs[0][0]

    @property
    def up_suffix(self) -> str:
        """The usual up (B) suffix."""
        return self.pairs[0][1]


ANY = re.compile(r".+")
LAYOUTS = (
    Layout(
        "diffusers",
        ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B")),
        ANY,
        ".alpha",
        False,
    ),
    Layout("kohya", ((".lora_down.weight", ".lora_up.weight"),), ANY, ".alpha", True),
    # diffusers 0.21-0.24 wrote text-encoder pairs as `.lora_linear_layer.down/up` beside UNet `.lora.down/up`.
    Layout(
        "diffusers-legacy",
        ((".lora.down.weight", ".lora.up.weight"), (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight")),
        ANY,
        ".alpha",
        False,
    ),
    Layout("lora-processor", ((".down.weight", ".up.weight"),), re.compile(r".+_lora\d*"), ".alpha", False),
    Layout("cloneofsimo", ((":down", ":up"),), re.compile(r"[A-Za-z_]+:\d+"), ":alpha", False),
)
LAYOUT_BY_NAME = {layout.name: layout for layout in LAYOUTS}

# (layout, regex on a module name, what users call files like this); the first row that matches any of the
# file's module names names the file.
FLAVOURS = (
    ("diffusers", r"^transformer\.", "diffusers/PEFT (transformer)"),
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
    ("kohya", r"", "kohya sd-scripts / LoCon"),
    ("diffusers-legacy", r"", "diffusers attention processors (legacy .lora.down)"),
    ("lora-processor", r"processor\.(qkv|proj)_lora\d", "XLabs"),
    ("lora-processor", r"", "diffusers attention processors (legacy _lora.down)"),
    ("cloneofsimo", r"", "cloneofsimo lora (positional)"),
)

# (model family, regex on a module name); the first row that matches any of the file's module names names the
# family of the model the LoRA was trained for. Rows with distinctive module names come first: FLUX.1 double
# blocks have SD3's ``add_q_proj`` too, and HunyuanVideo's token refiner is what sets it apart from FLUX.1.
_SEP = r"[._]"
MODEL_FAMILIES = (
    ("HunyuanVideo", rf"token_refiner|txt_in{_SEP}individual_token_refiner"),
    ("Qwen-Image", rf"(img|txt)_mlp{_SEP}net|(img|txt)_mod{_SEP}1\b|transformer_blocks{_SEP}\d+{_SEP}(img|txt)_mod"),
    ("Z-Image", rf"noise_refiner|context_refiner|layers{_SEP}\d+{_SEP}(attention{_SEP}to_|feed_forward{_SEP}w\d)"),
    ("Wan", rf"blocks{_SEP}\d+{_SEP}(self_attn|cross_attn|ffn){_SEP}"),
    ("FLUX.1", rf"single_transformer_blocks|(double|single)_blocks{_SEP}\d+|qkv_lora\d"),
    ("SD3", rf"transformer_blocks{_SEP}\d+{_SEP}(attn{_SEP}add_[qkv]_proj|ff_context)"),
    (
        "SDXL",
        rf"lora_te2_|text_encoder_2|add_embedding|(input|output)_blocks{_SEP}[4-8]{_SEP}1{_SEP}transformer_blocks{_SEP}[1-9]"
        rf"|(down|up)_blocks{_SEP}[12]{_SEP}attentions{_SEP}\d{_SEP}transformer_blocks{_SEP}[1-9]",
    ),
    ("SD 1.x/2.x", rf"(down|up|mid)_blocks?{_SEP}|(input|output|middle)_blocks?{_SEP}|unet|lora_te_"),
    ("CLIP text encoder", rf"lora_te\d?_|text_encoder|text_model{_SEP}encoder"),
)

# Names that look like a known layout written wrongly (hand-made conversions): (pattern, what is wrong, the fix).
# They are reported when a file has no LoRA factors, never read by guessing.
NEAR_MISSES = (
    (
        re.compile(r"[^.]_(lora_down|lora_up|lora_A|lora_B)\.weight$"),
        "join '{0}' to the module name with '_' where every layout has '.'",
        "rename '<module>_{0}.weight' to '<module>.{0}.weight'",
    ),
    (
        re.compile(r"^lora_(unet|te\d?)_(unet|text_encoder)_"),
        "repeat the component in their prefix ('lora_{0}_{1}_')",
        "drop the second one ('lora_{0}_...')",
    ),
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
    """One LoRA pair: ``down`` (A) ``[rank, *in_shape]`` and ``up`` (B) ``[out_features, rank, *up_tail]``.

    ``in_shape`` is ``(in,)`` for a linear layer or an embedding (PEFT's ``lora_embedding_A`` is
    ``[rank, num_embeddings]``, ``lora_embedding_B`` ``[embedding_dim, rank]``) and ``(in, *kernel)`` for a
    convolution of any dimension (Conv1d ``(in, k)``, Conv2d ``(in, kh, kw)``, Conv3d ``(in, kt, kh, kw)``),
    whose up factor is a 1x1 convolution: ``up_tail`` is then ``(1,) * len(kernel)``.
    """

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
    def up_tail(self) -> tuple[int, ...]:
        """The up factor's trailing 1x1 kernel dimensions: ``()`` for linear layers."""
        return (1,) * (len(self.in_shape) - 1)


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file understood from its header alone: layout, modules sorted by name (the order safetensors stores
    tensors of one dtype in, so the factors are read front to back; reports list them in natural order, see
    :func:`in_natural_order`), untouched keys."""

    path: Path
    header: Header
    layout: Layout
    flavour: str
    family: str
    modules: tuple[LoraModule, ...]
    passthrough: tuple[str, ...]


def in_natural_order(layers: list[dict]) -> list[dict]:
    """Report rows (each with a ``"name"``) sorted by :func:`natural_key` of their names, as pages, the CLI and
    JSON reports show layers."""
    return sorted(layers, key=lambda layer: natural_key(layer["name"]))


def natural_key(name: str) -> tuple[tuple[str | tuple[int, str], ...], str]:
    """Sort key putting names in natural order: runs of digits compare as numbers, so ``blocks.7`` comes before
    ``blocks.12`` and ``text_encoder:2`` before ``text_encoder:10``. A digit run compares by its length without
    leading zeros, then by its digits (no ``int()``: a name may hold thousands of digits); equal keys fall back to
    the name itself, so the order is total."""
    parts = re.split(r"(\d+)", name)
    return tuple(
        (len(part.lstrip("0")), part.lstrip("0")) if index % 2 else part for index, part in enumerate(parts)
    ), name


def model_family(module_names: list[str]) -> str:
    """The model family (``"FLUX.1"``, ``"SDXL"``, ...) a LoRA with these module names was trained for, from the
    first :data:`MODEL_FAMILIES` row any name matches; ``"unknown"`` when none does."""
    return next(
        (family for family, pattern in MODEL_FAMILIES if any(re.search(pattern, name) for name in module_names)),
        "unknown",
    )


def _match_factor(key: str) -> tuple[Layout, str, str] | None:
    for layout in LAYOUTS:
        for pair in layout.pairs:
            for role, suffix in zip(("down", "up"), pair):
                if key.endswith(suffix) and layout.module_pattern.fullmatch(key[: -len(suffix)]):
                    return layout, key[: -len(suffix)], role
    return None


def _refuse_foreign(file: str, keys: list[str]) -> None:
    for key in keys:
        for pattern, kind in FOREIGN_ADAPTERS:
            if pattern.search(key):
                raise LoraError(f"{file} is a {kind} adapter ({key!r}), not plain LoRA; only LoRA can be resized")


def _refuse_near_misses(file: str, keys: list[str]) -> None:
    """Name every :data:`NEAR_MISSES` problem the file's keys show, each with its fix."""
    problems = []
    for pattern, problem, fix in NEAR_MISSES:
        hits = [(key, match) for key in keys if (match := pattern.search(key))]
        if hits:
            key, match = hits[0]
            problems.append(
                f"{len(hits)} of its {len(keys)} tensor names, such as {key!r}, {problem.format(*match.groups())}:"
                f" {fix.format(*match.groups())}"
            )
    if problems:
        raise LoraError(f"{file} holds no LoRA factors in a known layout; " + "; ".join(problems))


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
        _refuse_near_misses(path.name, keys)
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
    names = [m.name for m in modules]
    flavour = next(
        label
        for name, pattern, label in FLAVOURS
        if name == layout.name and any(re.search(pattern, module) for module in names)
    )
    return LoraFile(
        path=path,
        header=header,
        layout=layout,
        flavour=flavour,
        family=model_family(names),
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
    if not (2 <= len(down.shape) <= 5 and len(up.shape) == len(down.shape) and set(up.shape[2:]) <= {1}):
        raise LoraError(
            f"{file}: module {name!r} has factor shapes {list(down.shape)} and {list(up.shape)}, which are not a"
            " LoRA pair (down [rank, in] or [rank, in, *kernel] with up [out, rank] or [out, rank, 1, ...])"
        )
    rank = down.shape[0]
    if up.shape[1] != rank:
        raise LoraError(f"{file}: module {name!r} has mismatched ranks: down {rank}, up {up.shape[1]}")
    if rank == 0 or up.shape[0] == 0 or math.prod(down.shape[1:]) == 0:
        raise LoraError(f"{file}: module {name!r} has an empty factor (rank {rank})")
    alpha_key = name + layout.alpha_suffix
    if alpha_key in tensors:
        if math.prod(tensors[alpha_key].shape) != 1 or tensors[alpha_key].dtype not in ALPHA_DTYPES:
            raise LoraError(
                f"{file}: {alpha_key!r} must be a single number, not {tensors[alpha_key].dtype}"
                f" {list(tensors[alpha_key].shape)}"
            )
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
