"""The loader matrix for diffusers' transformer families: a resized file loads in the real consumer like its input.

Each cell is a model family (a tiny random transformer, `tests/tiny_models.py`), a layout that family's users
publish, and the family's own ``load_lora_weights``, which reads the input and the resized files from their paths.
An exact rank increase must apply the same deltas as the input; a reduction must apply the error the report
states. A layout the consumer cannot read at all is a limit of the consumer, and its test fails once diffusers
starts reading it.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lora_ops
from tests.consumer_harness import Cell, applied_deltas, assert_reported_error, assert_same_deltas, loaded_ranks
from tests.tiny_flux import KOHYA_DOUBLE_BLOCK, _decaying_pair
from tests.tiny_models import FAMILIES, linears_under

README = Path(__file__).resolve().parent.parent / "README.md"
MATRIX_START, MATRIX_END = "<!-- loader-matrix:start -->", "<!-- loader-matrix:end -->"
UPSAMPLE_BY = 8
"""An exact rank increase goes from the input's highest rank to this many more."""
REDUCED_RANK = 3

ModuleTable = Callable[[nn.Module], dict[str, tuple[int, int]]]
"""transformer -> ``{module name as the file spells it: (out_features, in_features)}``."""
InputWriter = Callable[[nn.Module, Path], int]
"""Writes a cell's input LoRA for a transformer to a path; returns the file's highest rank."""

DIFFUSERS_FACTORS = ("lora_A.weight", "lora_B.weight")
KOHYA_FACTORS = ("lora_down.weight", "lora_up.weight")
XLABS_FACTORS = ("down.weight", "up.weight")


def linears(blocks: tuple[str, ...], rename: Callable[[str], str] = lambda name: name, only: str = "") -> ModuleTable:
    """The block linears whose diffusers names start with ``blocks`` (and contain ``only``), named by ``rename``."""

    def table(transformer: nn.Module) -> dict[str, tuple[int, int]]:
        return {
            rename(name): (linear.out_features, linear.in_features)
            for name, linear in linears_under(transformer, blocks).items()
            if only in name
        }

    return table


def fused(modules: dict[str, tuple[str, ...]]) -> ModuleTable:
    """Original (non-diffusers) module names, each the row-wise concatenation of the diffusers modules it maps to."""

    def table(transformer: nn.Module) -> dict[str, tuple[int, int]]:
        parts = {name: transformer.get_submodule(name) for names in modules.values() for name in names}
        return {
            name: (sum(parts[part].out_features for part in names), parts[names[0]].in_features)
            for name, names in modules.items()
        }

    return table


def kohya_name(prefix: str) -> Callable[[str], str]:
    """kohya's flattening of a diffusers module name: ``prefix`` + the name with every ``.`` as ``_``."""
    return lambda name: prefix + name.replace(".", "_")


def adapter_metadata(lora_alpha: float, pattern_alpha: float) -> Callable[[dict[str, int]], dict[str, str]]:
    """diffusers' ``lora_adapter_metadata`` for ``transformer.``-prefixed modules, as its trainers save it.

    ``lora_alpha`` for every module but the first (by name), which gets its own rank and ``pattern_alpha``
    through ``rank_pattern`` and ``alpha_pattern``.
    """

    def metadata(ranks: dict[str, int]) -> dict[str, str]:
        names = sorted(name.removeprefix("transformer.") for name in ranks)
        first, typical = names[0], names[-1]
        fields = {
            "r": ranks[f"transformer.{typical}"],
            "lora_alpha": lora_alpha,
            "rank_pattern": {first: ranks[f"transformer.{first}"]},
            "alpha_pattern": {first: pattern_alpha},
            "target_modules": names,
            "use_rslora": False,
        }
        return {"lora_adapter_metadata": json.dumps({f"transformer.{key}": value for key, value in fields.items()})}

    return metadata


def lora_file(
    modules: ModuleTable,
    factors: tuple[str, str] = DIFFUSERS_FACTORS,
    rank: int = 8,
    dtype: torch.dtype = torch.float32,
    alpha: float | None = None,
    alpha_dtype: torch.dtype = torch.float32,
    metadata: Callable[[dict[str, int]], dict[str, str]] | None = None,
    first_rank: int | None = None,
) -> InputWriter:
    """A writer of random LoRA files: a ``[rank, in]`` down and ``[out, rank]`` up factor per module of ``modules``.

    ``alpha``: a 0-dim ``<module>.alpha`` of that value in ``alpha_dtype`` on every module. ``metadata``: the
    ``__metadata__`` from the modules' ranks. ``first_rank``: the rank of the first module (by name), if it
    differs from ``rank``. The spectrum decays, so a reduction loses part of every delta.
    """
    down_suffix, up_suffix = factors

    def write(transformer: nn.Module, path: Path) -> int:
        generator = torch.Generator().manual_seed(0)
        shapes = modules(transformer)
        ranks = dict.fromkeys(shapes, rank)
        if first_rank is not None:
            ranks[min(shapes)] = first_rank
        tensors = {}
        for name, (out_features, in_features) in shapes.items():
            down, up = _decaying_pair(out_features, in_features, ranks[name], 3.0, generator)
            tensors[f"{name}.{down_suffix}"] = down.to(dtype)
            tensors[f"{name}.{up_suffix}"] = up.to(dtype)
            if alpha is not None:
                tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=alpha_dtype)
        save_file(tensors, str(path), metadata=metadata(ranks) if metadata else None)
        return max(ranks.values())

    return write


FLUX_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")
FLUX_KOHYA = {
    f"lora_unet_double_blocks_0_{bfl}": tuple(f"transformer_blocks.0.{part}" for part in parts)
    for bfl, parts in KOHYA_DOUBLE_BLOCK.items()
}
FLUX_BFL = {
    "diffusion_model.double_blocks.0." + ".".join(bfl.rsplit("_", 1)): parts
    for bfl, parts in zip(KOHYA_DOUBLE_BLOCK, FLUX_KOHYA.values())
}
FLUX_XLABS = {
    "double_blocks.0.processor.qkv_lora1": ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                            "transformer_blocks.0.attn.to_v"),
    "double_blocks.0.processor.proj_lora1": ("transformer_blocks.0.attn.to_out.0",),
    "double_blocks.0.processor.qkv_lora2": ("transformer_blocks.0.attn.add_q_proj",
                                            "transformer_blocks.0.attn.add_k_proj",
                                            "transformer_blocks.0.attn.add_v_proj"),
    "double_blocks.0.processor.proj_lora2": ("transformer_blocks.0.attn.to_add_out",),
}  # fmt: skip
WAN_ORIGINAL = {
    **{f"blocks.0.self_attn.{o}": (f"blocks.0.attn1.{c}",) for o, c in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"))},
    **{f"blocks.0.cross_attn.{o}": (f"blocks.0.attn2.{c}",) for o, c in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"))},
    "blocks.0.ffn.0": ("blocks.0.ffn.net.0.proj",),
    "blocks.0.ffn.2": ("blocks.0.ffn.net.2",),
}  # fmt: skip
HUNYUAN_VIDEO_ORIGINAL = {
    f"double_blocks.0.{stream}_{original}": tuple(f"transformer_blocks.0.{part}" for part in parts)
    for stream, modules in (
        ("img", {"attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "attn_proj": ("attn.to_out.0",),
                 "mlp.fc1": ("ff.net.0.proj",), "mlp.fc2": ("ff.net.2",), "mod.linear": ("norm1.linear",)}),
        ("txt", {"attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                 "attn_proj": ("attn.to_add_out",), "mlp.fc1": ("ff_context.net.0.proj",),
                 "mlp.fc2": ("ff_context.net.2",), "mod.linear": ("norm1_context.linear",)}),
    )
    for original, parts in modules.items()
}  # fmt: skip
"""HunyuanVideo's original double-block names. Single blocks are left out: diffusers 0.42.1 splits their fused
``linear1`` with the real model's hard-coded width 3072 (``_convert_hunyuan_video_lora_to_diffusers``)."""


def _diffusers(blocks: tuple[str, ...]) -> ModuleTable:
    return linears(blocks, lambda name: f"transformer.{name}")


def _original(prefix: str, modules: dict[str, tuple[str, ...]]) -> ModuleTable:
    return fused({prefix + name: parts for name, parts in modules.items()})


def _cell(family: str, layout: str, writer: InputWriter, limit: str | None = None) -> tuple[Cell, InputWriter]:
    consumer = f"diffusers `{FAMILIES[family].consumer_name}.load_lora_weights`"
    return Cell(family, layout, consumer, limit), writer


FLUX = _diffusers(FLUX_BLOCKS)
QWEN_IMAGE_BLOCKS = ("transformer_blocks.",)
Z_IMAGE_BLOCKS = ("layers.", "noise_refiner.", "context_refiner.")
WAN_BLOCKS = ("blocks.",)
SD3_BLOCKS = ("transformer_blocks.",)
HUNYUAN_VIDEO_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")
MINIMAX_H3_BLOCKS = ("transformer_blocks.",)
PREFIXED = "diffusers/PEFT, `transformer.` prefix"
WITH_METADATA = "diffusers + `lora_adapter_metadata` (`rank_pattern`, `alpha_pattern`)"
UNPREFIXED_ALPHA = "unprefixed `lora_A/lora_B` + `.alpha` (bf16, no metadata)"
PREFIXED_ALPHA = "diffusers names + `.alpha` tensors"
COMFYUI_LORA_A = "`diffusion_model.` + `lora_A/lora_B`"
KOHYA_ALPHA = "kohya `lora_unet_` + `.alpha`"
COMFYUI_ALPHA = "ComfyUI `diffusion_model.` + `lora_down/lora_up` + `.alpha`"


def alpha_refused(mixin: str) -> str:
    """The limit of a family whose loader reads ``.alpha`` tensors in no layout."""
    return (
        f"`{mixin}.load_lora_weights` refuses a file with any key lacking `lora` (`Invalid LoRA checkpoint`):"
        " its `lora_state_dict` has no converter that would consume the `.alpha` tensors"
    )


def prefixed_twice(converter: str) -> str:
    """The limit of a family whose ``.alpha`` converter assumes unprefixed keys."""
    return (
        f"the `.alpha` keys send the file through `{converter}`, which prefixes every key with `transformer.`"
        " a second time: PEFT finds no target module and raises `NoMatchingPeftModuleError`"
    )


MATRIX: tuple[tuple[Cell, InputWriter], ...] = (
    _cell("FLUX.1", PREFIXED + " (fp32)", lora_file(FLUX)),
    _cell("FLUX.1", "ai-toolkit (diffusers names, fp16)", lora_file(FLUX, dtype=torch.float16)),
    _cell("FLUX.1", PREFIXED_ALPHA, lora_file(FLUX, alpha=4.0)),
    _cell("FLUX.1", WITH_METADATA, lora_file(FLUX, first_rank=4, metadata=adapter_metadata(12.0, 7.3))),
    _cell(
        "FLUX.1", "kohya `lora_unet_` (fused qkv) + `.alpha`", lora_file(fused(FLUX_KOHYA), KOHYA_FACTORS, alpha=4.0)
    ),
    _cell(
        "FLUX.1",
        "ComfyUI/BFL names `diffusion_model.` + `lora_down/lora_up` + `.alpha` (bf16, alpha 7.3)",
        lora_file(fused(FLUX_BFL), KOHYA_FACTORS, 16, torch.bfloat16, alpha=7.3, alpha_dtype=torch.bfloat16),
    ),
    _cell(
        "FLUX.1",
        "OneTrainer `lora_transformer_` + `.alpha`, attention layers",
        lora_file(linears(FLUX_BLOCKS, kohya_name("lora_transformer_"), only=".attn."), KOHYA_FACTORS, alpha=8.0),
    ),
    _cell(
        "FLUX.1",
        "OneTrainer `lora_transformer_` + `.alpha`, with `ff`/`norm`/`proj_mlp` layers",
        lora_file(linears(FLUX_BLOCKS, kohya_name("lora_transformer_")), KOHYA_FACTORS, alpha=8.0),
        limit="`_convert_kohya_flux_lora_to_diffusers` (its `_convert_mixture_state_dict_to_diffusers`) maps only"
        " attention layers; any other layer becomes its block's name and loading raises a `KeyError` in"
        " `FluxLoraLoaderMixin._maybe_expand_lora_state_dict`",
    ),
    _cell("FLUX.1", "XLabs (`processor.qkv_lora1.down`)", lora_file(fused(FLUX_XLABS), XLABS_FACTORS)),
    _cell(
        "FLUX.1",
        "`diffusion_model.` + `lora_A/lora_B` (BFL names)",
        lora_file(fused(FLUX_BFL)),
        limit="`FluxLoraLoaderMixin.lora_state_dict` converts only `lora_down` and XLabs files; these keys match"
        " no `transformer.` module, so nothing is loaded",
    ),
    _cell("Qwen-Image", PREFIXED, lora_file(_diffusers(QWEN_IMAGE_BLOCKS))),
    _cell(
        "Qwen-Image",
        UNPREFIXED_ALPHA,
        lora_file(linears(QWEN_IMAGE_BLOCKS), rank=16, dtype=torch.bfloat16, alpha=8.0, alpha_dtype=torch.bfloat16),
    ),
    _cell(
        "Qwen-Image",
        PREFIXED_ALPHA,
        lora_file(_diffusers(QWEN_IMAGE_BLOCKS), alpha=4.0),
        limit=prefixed_twice("_convert_non_diffusers_qwen_lora_to_diffusers"),
    ),
    _cell(
        "Qwen-Image",
        WITH_METADATA,
        lora_file(_diffusers(QWEN_IMAGE_BLOCKS), first_rank=4, metadata=adapter_metadata(12.0, 7.3)),
    ),
    _cell(
        "Qwen-Image",
        KOHYA_ALPHA,
        lora_file(linears(QWEN_IMAGE_BLOCKS, kohya_name("lora_unet_")), KOHYA_FACTORS, alpha=4.0),
    ),
    _cell(
        "Qwen-Image",
        COMFYUI_LORA_A,
        lora_file(linears(QWEN_IMAGE_BLOCKS, lambda name: f"diffusion_model.{name}"), dtype=torch.bfloat16),
    ),
    _cell(
        "Z-Image",
        UNPREFIXED_ALPHA + ", alpha 7.3",
        lora_file(linears(Z_IMAGE_BLOCKS), rank=16, dtype=torch.bfloat16, alpha=7.3, alpha_dtype=torch.bfloat16),
    ),
    _cell("Z-Image", PREFIXED, lora_file(_diffusers(Z_IMAGE_BLOCKS))),
    _cell(
        "Z-Image",
        PREFIXED_ALPHA,
        lora_file(_diffusers(Z_IMAGE_BLOCKS), alpha=4.0),
        limit=prefixed_twice("_convert_non_diffusers_z_image_lora_to_diffusers"),
    ),
    _cell(
        "Z-Image",
        WITH_METADATA,
        lora_file(_diffusers(Z_IMAGE_BLOCKS), first_rank=4, metadata=adapter_metadata(12.0, 7.3)),
    ),
    _cell(
        "Z-Image",
        KOHYA_ALPHA,
        lora_file(linears(Z_IMAGE_BLOCKS, kohya_name("lora_unet_")), KOHYA_FACTORS, alpha=4.0),
    ),
    _cell(
        "Z-Image",
        COMFYUI_ALPHA,
        lora_file(linears(Z_IMAGE_BLOCKS, lambda name: f"diffusion_model.{name}"), KOHYA_FACTORS, alpha=12.0),
    ),
    _cell("Wan 2.x", PREFIXED + " (fp16)", lora_file(_diffusers(WAN_BLOCKS), dtype=torch.float16)),
    _cell("Wan 2.x", COMFYUI_LORA_A + " (original names)", lora_file(_original("diffusion_model.", WAN_ORIGINAL))),
    _cell(
        "Wan 2.x",
        COMFYUI_LORA_A + " (original names) + `.alpha`",
        lora_file(_original("diffusion_model.", WAN_ORIGINAL), alpha=4.0),
    ),
    _cell(
        "Wan 2.x",
        "musubi-tuner `lora_unet_` + `.alpha` (bf16)",
        lora_file(
            fused({kohya_name("lora_unet_")(name): parts for name, parts in WAN_ORIGINAL.items()}),
            KOHYA_FACTORS,
            dtype=torch.bfloat16,
            alpha=4.0,
        ),
    ),
    _cell(
        "Wan 2.x", WITH_METADATA, lora_file(_diffusers(WAN_BLOCKS), first_rank=4, metadata=adapter_metadata(12.0, 7.3))
    ),
    _cell(
        "Wan 2.x",
        PREFIXED_ALPHA,
        lora_file(_diffusers(WAN_BLOCKS), alpha=4.0),
        limit=alpha_refused("WanLoraLoaderMixin"),
    ),
    _cell("SD3", PREFIXED, lora_file(_diffusers(SD3_BLOCKS))),
    _cell("SD3", WITH_METADATA, lora_file(_diffusers(SD3_BLOCKS), first_rank=4, metadata=adapter_metadata(12.0, 7.3))),
    _cell(
        "SD3", PREFIXED_ALPHA, lora_file(_diffusers(SD3_BLOCKS), alpha=4.0), limit=alpha_refused("SD3LoraLoaderMixin")
    ),
    _cell(
        "SD3",
        KOHYA_ALPHA,
        lora_file(linears(SD3_BLOCKS, kohya_name("lora_unet_")), KOHYA_FACTORS, alpha=4.0),
        limit="`SD3LoraLoaderMixin.lora_state_dict` converts no kohya names; no key starts with `transformer.`,"
        " so nothing is loaded",
    ),
    _cell("HunyuanVideo", PREFIXED, lora_file(_diffusers(HUNYUAN_VIDEO_BLOCKS))),
    _cell(
        "HunyuanVideo",
        COMFYUI_LORA_A + " (original names, fused qkv)",
        lora_file(_original("diffusion_model.", HUNYUAN_VIDEO_ORIGINAL)),
    ),
    _cell(
        "HunyuanVideo",
        WITH_METADATA,
        lora_file(_diffusers(HUNYUAN_VIDEO_BLOCKS), first_rank=4, metadata=adapter_metadata(12.0, 7.3)),
    ),
    _cell(
        "HunyuanVideo",
        PREFIXED_ALPHA,
        lora_file(_diffusers(HUNYUAN_VIDEO_BLOCKS), alpha=4.0),
        limit=alpha_refused("HunyuanVideoLoraLoaderMixin"),
    ),
    _cell("MiniMax-H3", PREFIXED + " (no alpha: scale 1)", lora_file(_diffusers(MINIMAX_H3_BLOCKS))),
    _cell(
        "MiniMax-H3",
        "diffusers names + `__metadata__` `alpha` (`alpha / rank`)",
        lora_file(_diffusers(MINIMAX_H3_BLOCKS), metadata=lambda ranks: {"alpha": "2"}),
    ),
)
CELLS = tuple(cell for cell, _ in MATRIX)
TESTED = [pytest.param(cell, writer, id=f"{cell.family}: {cell.layout}") for cell, writer in MATRIX if not cell.limit]
LIMITS = [pytest.param(cell, writer, id=f"{cell.family}: {cell.layout}") for cell, writer in MATRIX if cell.limit]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread while this module runs: on toy widths two threads only fight over busy cores (5x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_transformers() -> dict[str, nn.Module]:
    """One tiny random transformer per family; tests load LoRAs into deep copies, never into these."""
    return {name: family.build() for name, family in FAMILIES.items()}


def _consumer(cell: Cell, tiny_transformers: dict[str, nn.Module]) -> Any:
    """The cell's consumer around a fresh copy of its family's transformer."""
    return FAMILIES[cell.family].consumer(copy.deepcopy(tiny_transformers[cell.family]))


class Loaded(NamedTuple):
    """What the consumer applied for the input and for its resized file, loaded into one model."""

    before: dict[str, torch.Tensor]
    after: dict[str, torch.Tensor]
    report: dict
    new_rank: int
    ranks_loaded: set[int]


def resize_and_load(
    cell: Cell,
    write_input: InputWriter,
    new_rank: Callable[[int], int],
    tiny_transformers: dict[str, nn.Module],
    directory: Path,
) -> Loaded:
    """Write the input, resize it to ``new_rank(input's highest rank)``, load both from their paths into one model.

    ``ranks_loaded``: every ``r`` PEFT gave the resized file's layers.
    """
    source, resized = directory / "input.safetensors", directory / "resized.safetensors"
    rank = new_rank(write_input(tiny_transformers[cell.family], source))
    report = lora_ops.resize_file(source, resized, lora_ops.ResizeOptions(rank=rank))
    consumer = _consumer(cell, tiny_transformers)
    consumer.load_lora_weights(str(source), adapter_name="input")
    consumer.load_lora_weights(str(resized), adapter_name="resized")
    components = {"transformer": consumer.transformer}
    return Loaded(
        applied_deltas(components, "input"),
        applied_deltas(components, "resized"),
        report,
        rank,
        set(loaded_ranks(components, "resized").values()),
    )


@pytest.mark.parametrize(("cell", "write_input"), TESTED)
def test_exact_upsample_loads_like_its_input(cell, write_input, tiny_transformers, tmp_path):
    loaded = resize_and_load(cell, write_input, lambda rank: rank + UPSAMPLE_BY, tiny_transformers, tmp_path)
    assert_same_deltas(loaded.before, loaded.after, rtol=1e-6)
    assert loaded.ranks_loaded == {loaded.new_rank}


@pytest.mark.parametrize(("cell", "write_input"), TESTED)
def test_reduction_applies_the_reported_error(cell, write_input, tiny_transformers, tmp_path):
    loaded = resize_and_load(cell, write_input, lambda rank: REDUCED_RANK, tiny_transformers, tmp_path)
    assert_reported_error(loaded.before, loaded.after, loaded.report)
    assert loaded.ranks_loaded == {loaded.new_rank}


@pytest.mark.parametrize(("cell", "write_input"), LIMITS)
def test_limit_input_is_not_read_by_the_consumer(cell, write_input, tiny_transformers, tmp_path):
    source = tmp_path / "input.safetensors"
    write_input(tiny_transformers[cell.family], source)
    consumer = _consumer(cell, tiny_transformers)
    with contextlib.suppress(ValueError, KeyError):  # the ways these limits fail; any other error is a new one
        consumer.load_lora_weights(str(source), adapter_name="input")
    assert not applied_deltas({"transformer": consumer.transformer}, "input")


LOADS_LIKE_ITS_INPUT = "loads like its input"


def matrix_markdown(cells: tuple[Cell, ...]) -> str:
    """The README's loader-matrix table: family | layout | consumer | result (or the consumer's limit)."""

    def row(*fields: str) -> str:
        return "| " + " | ".join(field.replace("|", "\\|") for field in fields) + " |"

    lines = [row("family", "layout", "consumer", "result"), "|---|---|---|---|"]
    lines += [
        row(cell.family, cell.layout, cell.consumer, f"limit: {cell.limit}" if cell.limit else LOADS_LIKE_ITS_INPUT)
        for cell in cells
    ]
    return "\n".join(lines)


def all_cells() -> tuple[Cell, ...]:
    """This module's cells, then those of the SD 1.5/SDXL and PEFT matrix where that module exists."""
    if importlib.util.find_spec("tests.test_loader_matrix_sd_peft") is None:
        return CELLS
    from tests.test_loader_matrix_sd_peft import CELLS as SD_PEFT_CELLS

    return CELLS + tuple(SD_PEFT_CELLS)


def test_readme_shows_the_loader_matrix():
    readme = README.read_text(encoding="utf-8")
    block = re.search(f"{re.escape(MATRIX_START)}\n(.*?)\n{re.escape(MATRIX_END)}", readme, re.DOTALL)
    assert block, f"README.md has no {MATRIX_START} ... {MATRIX_END} block"
    assert block.group(1) == matrix_markdown(all_cells()), (
        "regenerate the README block with matrix_markdown(all_cells())"
    )
