"""Merging LoRA files into one: the weighted sum of their deltas, exactly, computed from the factors.

One module's deltas in n files sum to one LoRA of the concatenated rank ``R = r_1 + ... + r_n``::

    sum_i w_i s_i B_i A_i = [w_1 s_1 B_1, ..., w_n s_n B_n] @ [A_1; ...; A_n]

(``w_i`` the weight given for file i, ``s_i`` the module's scale there, read the way its loaders read it,
:mod:`lora_ops.scales`). Without a rank the concatenated factors are written as they are: the merge is lossless. With
a rank they go through the resize machinery (:mod:`lora_ops.resize`: the exact SVD from the ``[R, R]`` Gram
matrices of :mod:`lora_ops.linalg`, never the dense ``[out, in]`` sum), which gives the best approximation of the sum
at that rank (Eckart-Young), every module at exactly that rank (extended exactly where the sum has fewer
directions). sd-scripts' ``networks/svd_merge_lora.py`` forms each dense sum and runs a full SVD on it instead.

Inputs must be LoRAs of one model in one layout: files of different layouts, and a module with different shapes in
two files, are refused by name before anything is written; so are tensors that are not LoRA factors (``.diff``,
biases, norm scales, PEFT ``modules_to_save`` weights: their weighted sum is not defined here). A module present in
only some files is the weighted sum of those.

The output is in the inputs' layout and carries its scale the way the first input does (:mod:`lora_ops.writer`):
the first input's ``lora_adapter_metadata``, metadata ``alpha`` or PEFT ``adapter_config.json`` covers every module
(its ``target_modules`` lists every module by name when the first input lacks some of them: PeftModel matches modules
by the config, and diffusers, which targets the state dict's modules, warns when the two disagree), and otherwise a module gets an ``.alpha`` where the first input holding the module had one. Under a
config, only the first input's own ``.alpha`` keys are kept: diffusers refuses a file with both. Every merged module
has scale 1, as sd-scripts writes merges (alpha = rank); what the written alpha does not give is folded into the
factors.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from torch import Tensor

from . import __version__, outputs
from .atomic import write_json
from .batching import group_batches, layer_errors, read_pair, resize_batch
from .digest import file_sha256
from .errors import LoraError
from .files import DEFAULT_LIMITS, Limits, TensorReader, open_tensors
from .inputs import BY_CONFIG, Source, check_limits, file_identity, open_source, scale_carriers
from .layouts import LoraFile, LoraModule, model_family
from .merge_inputs import check_weight
from .options import ResizeOptions
from .resize import Progress, check_device
from .scales import (
    DIFFUSERS_METADATA_KEY,
    FROM_DIFFUSERS_METADATA,
    FROM_METADATA_ALPHA,
    METADATA_ALPHA_KEY,
    PEFT_CONFIG_NAME,
    PEFT_PREFIX,
    split_component,
)
from .threads import in_order, workers
from .writer import (
    KOHYA_HASH_KEYS,
    PROVENANCE_PREFIX,
    Provenance,
    build_metadata,
    lora_output,
    peft_config_for_output,
    rank_histogram,
)

# The scale every merged module has; its alpha or config says so, and the factors hold the rest.
MERGED_SCALE = 1.0
# Provenance of a merge: every input's file name, sha256, weight and rank histogram, as JSON.
SOURCES_KEY = PROVENANCE_PREFIX + "sources"
# The single-source provenance entries build_metadata writes, which a merge replaces by SOURCES_KEY.
SINGLE_SOURCE_KEYS = (PROVENANCE_PREFIX + "source_file", PROVENANCE_PREFIX + "source_sha256")
# The metadata entry that carries the scale, by the first input's scale source: kept and regenerated.
METADATA_CARRIERS = {FROM_DIFFUSERS_METADATA: DIFFUSERS_METADATA_KEY, FROM_METADATA_ALPHA: METADATA_ALPHA_KEY}
# kohya entries the writer regenerates (ranks, alpha, hashes): kept from the first input even where inputs differ.
KOHYA_REGENERATED = ("ss_network_dim", "ss_network_alpha", *KOHYA_HASH_KEYS)


@dataclass(frozen=True)
class _Part:
    """One input's share of a merged module: the input's index, its module there, and ``weight x scale``."""

    source: int
    module: LoraModule
    factor: float


@dataclass(frozen=True)
class _Merged:
    """A module of the output: ``module`` has the first holding input's keys, shape and dtypes and the concatenated
    rank; ``parts`` are the inputs' factors that make it, in input order."""

    module: LoraModule
    parts: tuple[_Part, ...]


def _check_same_model(sources: list[Source]) -> None:
    """Refuse inputs of different layouts, a module with different shapes in two of them, and non-LoRA tensors."""
    first = sources[0].lora
    for source in sources:
        lora = source.lora
        if lora.layout.name != first.layout.name:
            raise LoraError(
                f"{first.path.name} is in the {first.layout.name} layout but {lora.path.name} in the"
                f" {lora.layout.name} layout; merge files of one layout"
            )
        if lora.passthrough:
            raise LoraError(
                f"{lora.path.name} holds {len(lora.passthrough)} tensors that are not LoRA factors, such as"
                f" {lora.passthrough[0]!r}; a merge adds LoRA deltas only"
            )
    seen: dict[str, tuple[LoraFile, LoraModule]] = {}
    for source in sources:
        for module in source.lora.modules:
            lora, other = seen.setdefault(module.name, (source.lora, module))
            if other.delta_shape != module.delta_shape:
                raise LoraError(
                    f"module {module.name!r} has shape {other.delta_shape} in {lora.path.name} but"
                    f" {module.delta_shape} in {source.lora.path.name}: the files are not LoRAs of one model"
                )


def _merged_modules(sources: list[Source], weights: list[float]) -> list[_Merged]:
    """Every module of any input, by name, with its parts; the output module has the concatenated rank."""
    parts: dict[str, list[_Part]] = {}
    for index, (source, weight) in enumerate(zip(sources, weights)):
        for module, scale in zip(source.lora.modules, source.scales):
            parts.setdefault(module.name, []).append(_Part(index, module, weight * scale))
    return [
        _Merged(replace(found[0].module, rank=sum(part.module.rank for part in found)), tuple(found))
        for name, found in sorted(parts.items())
    ]


def _alpha_part(merged: _Merged, first_only: bool) -> _Part | None:
    """The part whose ``.alpha`` tensor (key, shape, dtype) the output module keeps: the first part that has one, or
    with ``first_only`` (the module's scale is in a config) the first input's own, if it has one."""
    return next(
        (part for part in merged.parts if part.module.alpha_key is not None and (part.source == 0 or not first_only)),
        None,
    )


def _with_alpha(merged: _Merged, part: _Part | None) -> LoraModule:
    """The output module with the alpha key of ``part`` (none without one)."""
    return replace(merged.module, alpha_key=part.module.alpha_key if part else None)


def _base_metadata(sources: list[Source]) -> dict[str, str]:
    """The output's metadata before :func:`lora_ops.writer.build_metadata`: the entries every input has alike, and the
    first input's scale-carrying and kohya rank entries (regenerated for the new ranks)."""
    metadata = sources[0].lora.header.metadata
    kept = (METADATA_CARRIERS.get(sources[0].scale_source), *KOHYA_REGENERATED)
    return {
        key: value
        for key, value in metadata.items()
        if key in kept
        or key.endswith(":rank")  # cloneofsimo's per-module ranks
        or all(source.lora.header.metadata.get(key) == value for source in sources[1:])
    }


def _output_source(sources: list[Source], merged: list[_Merged]) -> Source:
    """The merged file as if it were an input: its modules, their carriers (by the first input's scale source), and
    scale :data:`MERGED_SCALE` each."""
    first = sources[0]
    names = [m.module.name for m in merged]
    lora = replace(
        first.lora,
        path=Path(" + ".join(source.lora.path.name for source in sources)),
        header=replace(first.lora.header, metadata=_base_metadata(sources)),
        family=model_family(names),
        modules=tuple(m.module for m in merged),
        passthrough=(),
    )
    # carriers as every input's alpha keys make them, then the alpha keys they keep
    carriers = scale_carriers(
        replace(lora, modules=tuple(_with_alpha(m, _alpha_part(m, False)) for m in merged)), first.scale_source
    )
    alpha_parts = [_alpha_part(m, carrier == BY_CONFIG) for m, carrier in zip(merged, carriers)]
    modules = tuple(_with_alpha(m, part) for m, part in zip(merged, alpha_parts))
    alpha_tensors = {
        part.module.name: sources[part.source].alpha_tensors[part.module.name] for part in alpha_parts if part
    }
    return Source(
        lora=replace(lora, modules=modules),
        scales=[MERGED_SCALE] * len(merged),
        scale_source=first.scale_source,
        peft_config=first.peft_config,
        peft_config_path=None,
        carriers=carriers,
        alpha_tensors=alpha_tensors,
    )


def _targets(current: object, names: list[str], first_names: set[str]) -> object:
    """A config's ``target_modules`` for modules ``names``: the first input's (``current``) when it has every one of
    them, else all their names (PEFT matches a name in the list exactly or as a dotted suffix)."""
    return current if set(names) <= first_names else sorted(names)


def _cover_metadata_targets(metadata: dict[str, str], lora: LoraFile, first: LoraFile) -> None:
    """In a regenerated ``lora_adapter_metadata``, make each component's ``target_modules`` cover every merged module
    (diffusers builds the LoraConfig from it; PEFT targets the state dict's modules and warns where they differ)."""
    if DIFFUSERS_METADATA_KEY not in metadata:
        return
    fields = json.loads(metadata[DIFFUSERS_METADATA_KEY])
    for component in sorted({split_component(m.name)[0] for m in lora.modules}):
        key = f"{component}.target_modules"
        if key not in fields:
            continue
        names = [split_component(m.name)[1] for m in lora.modules if split_component(m.name)[0] == component]
        first_names = {split_component(m.name)[1] for m in first.modules}
        fields[key] = _targets(fields[key], names, first_names)
    metadata[DIFFUSERS_METADATA_KEY] = json.dumps(fields, indent=2, sort_keys=True)


def _peft_config(source: Source, first: LoraFile, ranks: list[int]) -> dict | None:
    """The PEFT ``adapter_config.json`` of the output, when the first input has one: the new ranks, scale 1, and
    ``target_modules`` covering every module."""
    if source.peft_config is None:
        return None
    config = peft_config_for_output(source.peft_config, source.lora, ranks, source.scales)
    if "target_modules" in config:
        names = [m.name.removeprefix(PEFT_PREFIX) for m in source.lora.modules]
        first_names = {m.name.removeprefix(PEFT_PREFIX) for m in first.modules}
        config["target_modules"] = _targets(config["target_modules"], names, first_names)
    return config


def _sources_text(sources: list[Source], weights: list[float], digests: list[str]) -> str:
    """:data:`SOURCES_KEY`'s value: per input its file name, sha256, weight and rank histogram (JSON)."""
    entries = [
        {
            "file": source.lora.path.name,
            "sha256": digest,
            "weight": weight,
            "ranks": rank_histogram([m.rank for m in source.lora.modules]),
        }
        for source, weight, digest in zip(sources, weights, digests)
    ]
    return json.dumps(entries, sort_keys=True)


def _copy_merged(
    handles: list[TensorReader], merged: _Merged, buffers: threading.local, down: Tensor, up: Tensor
) -> None:
    """A :data:`lora_ops.batching.PairReader` of a merged module: its concatenated factors copied into ``down [R, n]``
    and ``up [m, R]``, each part's rows of down (when ``n < m``) or columns of up (otherwise: the smaller factor)
    times its ``weight x scale``, in the destination's dtype (float32 for 16-bit inputs, whose values it holds
    exactly: the product is rounded to float32, 6e-8 relative)."""
    start = 0
    for part in merged.parts:
        stop = start + part.module.rank
        part_down, part_up = read_pair(handles[part.source], part.module, buffers)
        rows, columns = down[start:stop].copy_(part_down), up[:, start:stop].copy_(part_up)
        (rows if down.shape[1] < up.shape[0] else columns).mul_(part.factor)
        start = stop


def _name_bad_input(merged: list[_Merged], handles: list[TensorReader], sources: list[Source]) -> None:
    """Raise a :class:`LoraError` naming the input file and tensor of the first part with NaN or Inf values."""
    buffers = threading.local()
    for module in merged:
        for part in module.parts:
            factors = read_pair(handles[part.source], part.module, buffers)
            for key, tensor in zip((part.module.down_key, part.module.up_key), factors):
                if not bool(tensor.isfinite().all()):
                    raise LoraError(f"{sources[part.source].lora.path.name}: {key!r} contains NaN or Inf values")


def merge_files(
    inputs: Sequence[tuple[str | Path, float]],
    output: str | Path,
    *,
    rank: int | None = None,
    method: str = "svd",
    dtype: str = "keep",
    seed: int = 0,
    device: str = "cpu",
    progress: Progress | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> dict:
    """Merge the LoRAs ``inputs`` (``(path, weight)`` pairs; weights finite, any sign) into one file at ``output``, in
    their layout; return the report.

    Each module of the output is ``sum_i weight_i * delta_i`` over the inputs that have it (``delta = scale * B @ A``
    as its loaders read the file), as the concatenated factors of rank ``sum_i r_i`` when ``rank`` is None
    (lossless), else reduced by ``method`` (``svd``: the best rank-``rank`` approximation of the sum, Eckart-Young)
    or extended exactly, to exactly ``rank``. ``dtype``: ``keep`` (each module in the first holding input's dtypes)
    or fp32/fp16/bf16; ``seed``: the random methods and extension rows; ``device``: where the linear algebra runs.
    ``progress(done, total)`` is called after each module.

    Raises :class:`LoraError` for bad input (a file of another layout, a module whose shape differs between files,
    non-LoRA tensors, and every refusal of :func:`lora_ops.resize_file`) or options, before anything is written;
    ``output`` is written atomically, only when everything succeeded, with a PEFT ``adapter_config.json`` beside it
    when the first input has one. The inputs are read one tensor at a time and the output written one tensor at a
    time.

    Report: ``layout``, ``flavour``, ``family``, ``warnings`` (each input's, prefixed by its name), ``method``,
    ``params``, ``scale_source`` (the output's), ``inputs`` (per input ``file``, ``sha256``, ``bytes``, ``weight``,
    ``ranks``), ``output``, ``bytes_in`` (all inputs), ``bytes_out``, ``seconds``, ``rank_in`` (histogram of the
    concatenated ranks), ``rank_out``, ``alpha``, ``worst_error``, ``median_error``, ``worst_layer`` and per layer
    ``name``, ``shape``, ``rank_in`` (concatenated), ``ranks_in`` (per input, None where absent), ``rank_out``,
    ``rel_error`` (``||S - S'||_F / ||S||_F`` against the exact weighted sum ``S``, computed from the factors as
    written, like a resize's), ``energy_retained`` and ``singular_values`` (of ``S``).
    """
    started = time.perf_counter()
    if not inputs:
        raise LoraError("give at least one LoRA file to merge")
    options = ResizeOptions(rank=rank, method=method, seed=seed, dtype=dtype, device=device)
    check_device(options)
    paths = [Path(path) for path, _ in inputs]
    weights = [check_weight(weight, path) for path, weight in inputs]
    dst = Path(output)
    identities = [file_identity(path) if path.is_file() else None for path in paths]
    sources = [open_source(path, None, limits, rank or 0) for path in paths]
    for path, source in zip(paths, sources):
        outputs.check_destination(path, dst, source.peft_config_path)
    _check_same_model(sources)
    merged = _merged_modules(sources, weights)
    out = _output_source(sources, merged)
    lora = out.lora
    check_limits(lora, limits, rank or 0)
    ranks = [rank or module.rank for module in lora.modules]
    config = _peft_config(out, sources[0].lora, ranks)
    if config is not None:
        outputs.check_config_destination(dst.parent / PEFT_CONFIG_NAME, config)
    alpha, alpha_tensors = outputs.output_alphas(out, ranks)
    out_scales = [outputs.out_scale(carrier, MERGED_SCALE, alpha, k) for carrier, k in zip(out.carriers, ranks)]
    layers: list[dict] = [{}] * len(merged)
    with ThreadPoolExecutor(max_workers=1) as hasher:
        digests = [hasher.submit(file_sha256, path) for path in paths]
        provenance = Provenance(
            version=__version__,
            method=f"merge-{options.method}",
            parameters={**options.parameters(), "weights": weights},
            source_file="",
            source_sha256="",
            source_ranks=rank_histogram([module.rank for module in lora.modules]),
        )
        metadata = build_metadata(lora, ranks, out.scales, alpha, out.scale_source, provenance)
        for key in SINGLE_SOURCE_KEYS:
            del metadata[key]
        metadata[SOURCES_KEY] = _sources_text(sources, weights, [outputs.SHA256_PLACEHOLDER] * len(sources))
        _cover_metadata_targets(metadata, lora, sources[0].lora)
        specs = outputs.output_specs(out, ranks, options, alpha_tensors)

        def late() -> dict[str, str]:
            values = [digest.result() for digest in digests]
            for path, identity in zip(paths, identities):
                if file_identity(path) != identity:
                    raise LoraError(f"{path.name} changed while it was being merged; nothing was written")
            return {SOURCES_KEY: _sources_text(sources, weights, values)}

        handles = [open_tensors(source.lora.path, source.lora.header) for source in sources]
        buffers = threading.local()  # one read buffer per thread, for the duration of this merge
        readers = [functools.partial(_copy_merged, handles, m, buffers) for m in merged]
        folds = [MERGED_SCALE / out_scale for out_scale in out_scales]

        def merge_batch(batch: list[int]) -> list[tuple[dict, Tensor, Tensor]]:
            modules, stored = [lora.modules[i] for i in batch], [readers[i] for i in batch]
            try:
                return resize_batch(modules, stored, [folds[i] for i in batch], ranks[batch[0]], options)
            except LoraError:
                _name_bad_input([merged[i] for i in batch], handles, sources)
                raise

        with lora_output(dst, specs, metadata, late) as writer:
            batches = group_batches(lora.modules, ranks)
            done = 0
            for batch, results in zip(batches, in_order(merge_batch, batches, workers(options.device))):
                for index, (row, down, up) in zip(batch, results):
                    row["ranks_in"] = _ranks_in(merged[index], len(sources))
                    layers[index] = outputs.store_module(
                        writer, lora.modules[index], row, down, up, out_scales[index], alpha_tensors
                    )
                    done += 1
                    if progress:
                        progress(done, len(merged))
    if config is not None:
        write_json(dst.parent / PEFT_CONFIG_NAME, config)
    bytes_in = sum(source.lora.header.file_bytes for source in sources)
    bytes_out = dst.stat().st_size
    return {
        "layout": lora.layout.name,
        "flavour": lora.flavour,
        "family": lora.family,
        "warnings": [f"{source.lora.path.name}: {line}" for source in sources for line in source.warnings()],
        "method": options.method,
        "params": options.parameters(),
        "scale_source": out.scale_source,
        "inputs": [
            {
                "file": source.lora.path.name,
                "sha256": digest.result(),
                "bytes": source.lora.header.file_bytes,
                "weight": weight,
                "ranks": rank_histogram([m.rank for m in source.lora.modules]),
            }
            for source, weight, digest in zip(sources, weights, digests)
        ],
        "output": {"file": dst.name, "bytes": bytes_out, "config": PEFT_CONFIG_NAME if config is not None else None},
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "seconds": time.perf_counter() - started,
        "rank_in": rank_histogram([module.rank for module in lora.modules]),
        "rank_out": rank_histogram(ranks),
        "alpha": alpha,
        **layer_errors(layers),
    }


def _ranks_in(merged: _Merged, inputs: int) -> list[int | None]:
    """The module's rank in each input, None where the input does not have it."""
    ranks: list[int | None] = [None] * inputs
    for part in merged.parts:
        ranks[part.source] = part.module.rank
    return ranks
