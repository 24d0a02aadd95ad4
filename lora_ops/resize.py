"""Inspecting and resizing LoRA files: the public entry points, streaming batches of same-shaped modules."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import __version__, linalg
from .atomic import same_file, write_json
from .consumers import ScaleReading, consumer_warnings
from .digest import file_sha256
from .errors import LoraError
from .files import DEFAULT_LIMITS, TORCH_DTYPES, Limits, TensorInfo, open_tensors, read_header
from .layouts import LoraFile, LoraModule, in_natural_order, parse_lora
from .options import MAX_RANK, NO_RANK, ResizeOptions
from .ranks import RANK_RULES, threshold_ranks
from .scales import (
    FROM_DIFFUSERS_METADATA,
    FROM_METADATA_ALPHA,
    FROM_PEFT_CONFIG,
    PEFT_CONFIG_NAME,
    diffusers_metadata,
    load_peft_config,
    module_scales,
    split_component,
)
from .threads import in_order, workers
from .writer import (
    PROVENANCE_PREFIX,
    Provenance,
    alpha_dtype,
    build_metadata,
    lora_output,
    output_alpha,
    peft_config_for_output,
    rank_histogram,
)

OUTPUT_DTYPES = {"keep": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_LABELS = {"F64": "fp64", "F32": "fp32", "F16": "fp16", "BF16": "bf16"}
# Factor bytes (at 4 bytes per value) of one batch of same-shaped modules: small enough to stay in cache.
BATCH_BYTES = 8 * 1024**2
# Stands in the header for the source sha256 until its background hashing is done (same length).
SHA256_PLACEHOLDER = "0" * 64

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class _Source:
    """An input file, opened and understood: layout, per-module scales, the alpha tensors as stored.

    ``carriers``: per module, what holds its scale, in the input and so in the output (:func:`_scale_carriers`).
    ``alpha_tensors``: the stored alpha tensor of each module that has one, by module name.
    """

    lora: LoraFile
    scales: list[float]
    scale_source: str
    peft_config: dict | None
    peft_config_path: Path | None
    carriers: list[str]
    alpha_tensors: dict[str, Tensor]

    @property
    def alphas(self) -> dict[str, float]:
        """The alpha values, by module name."""
        return _alpha_values(self.alpha_tensors)

    @property
    def alpha_dtype(self) -> torch.dtype:
        """The dtype the input stores its alphas in (float32 when it has none)."""
        return next(iter(self.alpha_tensors.values())).dtype if self.alpha_tensors else torch.float32

    def warnings(self) -> list[str]:
        """A line for each known consumer that reads this input differently from its format's owner."""
        return consumer_warnings(ScaleReading(self.lora, self.scales, self.scale_source, self.alphas))


def _alpha_values(alpha_tensors: dict[str, Tensor]) -> dict[str, float]:
    """Each alpha tensor's one value (any 1-element shape, float or integer), by module name."""
    return {name: float(alpha.reshape(-1)[0]) for name, alpha in alpha_tensors.items()}


def _check_work(lora: LoraFile, limits: Limits, rank_out: int) -> None:
    """Refuse, from the header, linear algebra beyond the limits: a module's rank, the total ``sum(rank^3)`` of
    the ``[r, r]`` eigen and singular value problems, and one module's float64 working memory
    ``8 x (max(r, rank_out) x (out + in) + 2 r^2)`` bytes (factors, new factors, Gram matrices)."""
    name = lora.path.name
    worst = max(lora.modules, key=lambda m: m.rank)
    if worst.rank > limits.rank:
        raise LoraError(f"{name}: module {worst.name!r} has rank {worst.rank}; the limit is {limits.rank}")
    cubes = sum(m.rank**3 for m in lora.modules)
    if cubes > limits.rank_cubes:
        raise LoraError(
            f"{name}: its {len(lora.modules)} modules' ranks need too much work (sum of rank^3 {cubes:.3g},"
            f" the limit is {limits.rank_cubes:.3g})"
        )
    for m in lora.modules:
        working = 8 * (max(m.rank, rank_out) * (m.out_features + m.in_features) + 2 * m.rank**2)
        if working > limits.module_bytes:
            raise LoraError(
                f"{name}: module {m.name!r} needs {working / 2**30:.1f} GiB of float64 working memory;"
                f" the limit is {limits.module_bytes / 2**30:.1f} GiB"
            )


def _open_source(path: str | Path, config: str | Path | None, limits: Limits, rank_out: int = 0) -> _Source:
    lora = parse_lora(path, read_header(path, limits))
    _check_work(lora, limits, rank_out)
    handle = open_tensors(lora.path, lora.header)
    alpha_tensors = {m.name: handle.get_tensor(m.alpha_key) for m in lora.modules if m.alpha_key}
    peft_config, peft_config_path = load_peft_config(lora, config)
    scales, scale_source = module_scales(lora, _alpha_values(alpha_tensors), peft_config)
    carriers = _scale_carriers(lora, scale_source)
    return _Source(lora, scales, scale_source, peft_config, peft_config_path, carriers, alpha_tensors)


# What holds a module's scale: an alpha (its `.alpha` tensor, or the metadata's `alpha` entry: the output writes one
# alpha value, the rest folded into the factors), a config (`lora_adapter_metadata`, `adapter_config.json`:
# regenerated with the module's scale, the factors unscaled), or nothing (the factors hold it).
BY_ALPHA, BY_CONFIG, BY_FACTORS = "alpha", "config", "factors"


def _scale_carriers(lora: LoraFile, scale_source: str) -> list[str]:
    """Per module, what holds its scale (``BY_ALPHA``, ``BY_CONFIG`` or ``BY_FACTORS``). Under
    ``lora_adapter_metadata``, the modules of the components it describes are ``BY_CONFIG``; the others keep their
    alpha tensors."""
    if scale_source == FROM_METADATA_ALPHA:
        return [BY_ALPHA] * len(lora.modules)
    if scale_source == FROM_PEFT_CONFIG:
        return [BY_CONFIG] * len(lora.modules)
    described: set[str] = set()
    if scale_source == FROM_DIFFUSERS_METADATA:
        described = {key.partition(".")[0] for key in diffusers_metadata(lora) or {}}

    def carrier(module: LoraModule) -> str:
        if split_component(module.name)[0] in described:
            return BY_CONFIG
        return BY_ALPHA if module.alpha_key is not None else BY_FACTORS

    return [carrier(module) for module in lora.modules]


# Storage dtypes whose values float32 holds exactly: their products on the tall factors run in float32, except
# for the layers linalg.float32_suffices sends back to float64 (see _factors).
EXACT_IN_FLOAT32 = {"F16", "BF16"}


# Copies one module's stored factors into ``down [r, n]`` and ``up [m, r]`` (its rows of a batch's stacked factors,
# converting the dtype) when called: a batch's pairs are read by the worker that stacks them, one pair at a time,
# so that only the pairs being copied are in memory, not the batches waiting for a worker.
PairReader = Callable[[Tensor, Tensor], None]


def _read_pair(handle, module: LoraModule, buffers: threading.local) -> tuple[Tensor, Tensor]:
    """The module's stored factors as matrices, ``down [r, n]`` and ``up [m, r]``: views of this thread's buffer in
    ``buffers``, valid until the thread's next read. Each thread reuses one buffer: fresh memory for every tensor
    would cost a page fault and zeroing per 4 kB, about as much as the read itself."""
    down_bytes, up_bytes = (handle.nbytes(key) for key in (module.down_key, module.up_key))
    split = -(-down_bytes // 8) * 8  # up starts 8-byte aligned
    buffer = getattr(buffers, "buffer", None)
    if buffer is None or buffer.numel() < split + up_bytes:
        buffer = buffers.buffer = torch.empty(split + up_bytes, dtype=torch.uint8)
    down = handle.get_tensor(module.down_key, buffer[:split])
    up = handle.get_tensor(module.up_key, buffer[split:])
    return down.reshape(module.rank, -1), up.reshape(up.shape[0], module.rank)


def _copy_pair(handle, module: LoraModule, buffers: threading.local, down: Tensor, up: Tensor) -> None:
    """A :data:`PairReader` of one module: :func:`_read_pair` copied into ``down`` and ``up``."""
    stored_down, stored_up = _read_pair(handle, module, buffers)
    down.copy_(stored_down)
    up.copy_(stored_up)


def _read_batches(
    handle, modules: tuple[LoraModule, ...], batches: list[list[int]], scales: list[float]
) -> Iterator[tuple[list[LoraModule], list[tuple[Tensor, Tensor]], list[float]]]:
    """Per batch of module indices: the modules, a :data:`PairReader` of each one's factors and their ``scales``."""
    buffers = threading.local()  # one read buffer per thread, for the duration of this reading
    for batch in batches:
        readers = [functools.partial(_copy_pair, handle, modules[i], buffers) for i in batch]
        yield [modules[i] for i in batch], readers, [scales[i] for i in batch]


def _batches(modules: tuple[LoraModule, ...], ranks: list[int]) -> list[list[int]]:
    """Indices of modules to process together: same shape, rank, new rank and dtypes, at most ``BATCH_BYTES``
    of float32 factors per batch; ordered by their first module."""
    groups: dict[tuple, list[int]] = {}
    for index, (module, rank) in enumerate(zip(modules, ranks)):
        key = (module.out_features, module.in_features, module.rank, rank, module.down_dtype, module.up_dtype)
        groups.setdefault(key, []).append(index)
    batches = []
    for indices in groups.values():
        first = modules[indices[0]]
        size = max(1, BATCH_BYTES // (4 * first.rank * (first.out_features + first.in_features)))
        batches += [indices[start : start + size] for start in range(0, len(indices), size)]
    return sorted(batches)


def _factors(
    modules: list[LoraModule], stored: list[PairReader], scales: list[float], device: str, kept: int
) -> list[tuple[list[int], linalg.Factors, linalg.FactorSVD]]:
    """A batch of modules' factors (read by ``stored``), stacked ``[B, r, n]`` and ``[B, m, r]``, with their Gram
    matrices and thin SVDs, as parts ``(indices into the batch, factors, SVDs)``; NaN/Inf refused.

    16-bit factors are copied to float32, others to float64. Modules whose float32 result loses accuracy in its
    leading ``kept`` directions (:func:`linalg.float32_suffices`: nearly low-rank layers; ``kept`` is the new rank
    of a reduction, the full rank for a spectrum, 0 when the factors are kept as they are) are solved again from
    float64 copies, as a second part; the whole batch is, if a float32 Gram matrix overflows (values above about
    1e19)."""
    everything = list(range(len(modules)))
    first = modules[0]  # one shape per batch
    down_shape, up_shape = (first.rank, first.in_features), (first.out_features, first.rank)

    def stack(index: list[int], dtype: torch.dtype) -> linalg.Factors:
        # copied and converted in one pass into the stacked tensors (torch.stack would copy the 16-bit data first)
        downs = torch.empty((len(index), *down_shape), dtype=dtype, device=device)
        ups = torch.empty((len(index), *up_shape), dtype=dtype, device=device)
        for row, item in enumerate(index):
            stored[item](downs[row], ups[row])
        factors_scales = torch.tensor([scales[item] for item in index], dtype=torch.float64, device=device)
        return linalg.Factors.of(downs, ups, factors_scales)

    def solved(index: list[int], factors: linalg.Factors) -> tuple[list[int], linalg.Factors, linalg.FactorSVD]:
        return index, factors, linalg.FactorSVD.of(factors)

    if all({m.down_dtype, m.up_dtype} <= EXACT_IN_FLOAT32 for m in modules):
        single = stack(everything, torch.float32)
        if bool(single.finite().all()):
            _, _, thin = part = solved(everything, single)
            suffices = linalg.float32_suffices(single, thin, kept).tolist()
            redo = [index for index, ok in enumerate(suffices) if not ok]
            if not redo:
                return [part]
            keep = [index for index, ok in enumerate(suffices) if ok]
            parts = [(keep, single.select(keep), thin.select(keep))] if keep else []
            return [*parts, solved(redo, stack(redo, torch.float64))]
    double = stack(everything, torch.float64)
    finite = double.finite().tolist()
    if all(finite):
        return [solved(everything, double)]
    row = finite.index(False)
    module, pair = modules[row], (double.down[row], double.up[row])
    bad = [key for key, tensor in zip((module.down_key, module.up_key), pair) if not tensor.isfinite().all()]
    raise LoraError(f"{bad[0]!r} contains NaN or Inf values" if bad else f"module {module.name!r}: values too large")


def _generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator for one module, independent of the order modules are processed in."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


# method -> (factors, exact thin SVDs, rank, options, one generator per delta) -> new factors as a RankMap
REDUCERS = {
    "svd": lambda factors, thin, rank, options, generators: linalg.svd(thin, rank),
    "randomized_svd": lambda factors, thin, rank, options, generators: linalg.randomized_svd(
        factors, rank, niter=options.niter, oversample=options.oversample, generators=generators
    ),
    "random_projection": lambda factors, thin, rank, options, generators: linalg.random_projection(
        factors, rank, generators=generators
    ),
    "sparse_random_projection": lambda factors, thin, rank, options, generators: linalg.sparse_random_projection(
        factors, rank, density=options.density, generators=generators
    ),
}


def resize_factors(
    factors: linalg.Factors,
    thin: linalg.FactorSVD,
    rank: int,
    options: ResizeOptions,
    generators: list[torch.Generator],
    dtypes: tuple[torch.dtype, torch.dtype],
) -> tuple[Tensor, Tensor, Tensor]:
    """New factors ``down' [B, rank, n]`` and ``up' [B, m, rank]`` of a batch of deltas, in the storage
    ``dtypes`` (down's, up's), and the relative errors ``[B]`` of the deltas they store.

    Reduced by ``options.method`` when ``rank < r``, else kept; directions a reduction leaves empty
    (beyond the numerical rank, ``rank > min(m, n)``) and those an increase adds get rows from
    :func:`linalg.extension_rows` and zero columns in up, so every delta has exactly ``rank``.
    ``thin`` is :meth:`linalg.FactorSVD.of` the factors. An error is inf or NaN when the new factors
    overflow ``dtypes``.
    """
    if rank >= factors.rank:
        rank_map = linalg.RankMap.keep(factors)
    else:
        rank_map = REDUCERS[options.method](factors, thin, rank, options, generators)
    new_down, new_up = new = rank_map.apply(factors)
    down, up = new_down.to(dtypes[0]), new_up.to(dtypes[1])
    errors = linalg.relative_error(factors, rank_map, new, (down, up), thin.norm)
    width = rank_map.rank
    extra = rank - width
    down = torch.cat([down, down.new_zeros(*down.shape[:-2], extra, down.shape[-1])], dim=-2)
    up = torch.cat([up, up.new_zeros(*up.shape[:-1], extra)], dim=-1)
    # directions without weight: the map's zero rows, then the added ones
    unused = (rank_map.down_map == 0).all(-1).cpu()
    empty = torch.cat([unused, torch.ones(len(generators), extra, dtype=torch.bool)], dim=1)
    for index in empty.any(-1).nonzero().flatten().tolist():
        live = new_down[index][~empty[index, :width]]
        rows = linalg.extension_rows(live, int(empty[index].sum()), generator=generators[index])
        down[index, empty[index]] = rows.to(dtypes[0])
    return down, up, errors


def _spectra(source: _Source, device: str) -> list[Tensor]:
    """Singular values of every module's effective delta (descending, float64, on the CPU); batches whose
    float32 spectrum reaches below float32 resolution are computed again in float64 (see :func:`_factors`)."""
    modules = source.lora.modules
    spectra: list[Tensor] = [torch.empty(0)] * len(modules)
    batches = _batches(modules, [0] * len(modules))
    jobs = _read_batches(open_tensors(source.lora.path, source.lora.header), modules, batches, source.scales)

    def spectrum(job: tuple) -> Tensor:
        modules = job[0]
        values = torch.empty(len(modules), modules[0].rank, dtype=torch.float64)
        for index, _, thin in _factors(*job, device, modules[0].rank):
            values[index] = thin.s.cpu()
        return values

    for batch, values in zip(batches, in_order(spectrum, jobs, workers(device))):
        for index, s in zip(batch, values):
            spectra[index] = s[s > 0]
    return spectra


def _out_dtype(options: ResizeOptions, stored: str) -> torch.dtype:
    return OUTPUT_DTYPES[options.dtype] or TORCH_DTYPES[stored]


def _choose_ranks(source: _Source, options: ResizeOptions) -> list[int]:
    """Each module's new rank: ``options.rank``, or its rank rule's (:data:`ranks.RANK_RULES`) capped by it, then
    the target size's threshold. The rules read the spectra without ``options.strength``: they do not depend on
    a common factor."""
    modules = source.lora.modules
    rule = options.rank_rule
    if rule is None and options.target_size is None:
        return [options.rank] * len(modules)
    spectra = _spectra(source, options.device)
    caps = [options.rank or MAX_RANK] * len(modules)
    if rule is not None:
        name, value = rule
        caps = [min(cap, RANK_RULES[name](s, value)) for cap, s in zip(caps, spectra)]
    if options.target_size is None:
        return caps
    per_rank = [
        m.out_features * _out_dtype(options, m.up_dtype).itemsize
        + m.in_features * _out_dtype(options, m.down_dtype).itemsize
        for m in modules
    ]
    budget = options.target_size - _output_bytes_besides_factors(source, options)
    return threshold_ranks(spectra, caps, per_rank, budget)


def _output_bytes_besides_factors(source: _Source, options: ResizeOptions) -> int:
    """An upper bound of the output's bytes that do not grow with rank: passthrough data, alphas, header.

    Header: every key with a generous 96 bytes for its entry, the input's metadata, and room for what
    the writer adds (provenance, regenerated rank patterns).
    """
    lora = source.lora
    keys = [*lora.header.tensors, *(m.name + lora.layout.alpha_suffix for m in lora.modules)]
    metadata = sum(len(k) + len(v) + 8 for k, v in lora.header.metadata.items())
    rank_patterns = sum(2 * (len(m.name) + 12) for m in lora.modules)
    header = 8 + sum(len(key) + 96 for key in keys) + metadata + rank_patterns + 2048
    return header + sum(lora.header.tensors[k].nbytes for k in lora.passthrough) + 8 * len(lora.modules)


def layer_errors(layers: list[dict]) -> dict:
    """The report entries summing up per-layer rows (each with ``name`` and ``rel_error``): ``worst_error``,
    ``median_error``, ``worst_layer`` and ``layers`` (the rows in natural order)."""
    worst = max(layers, key=lambda layer: layer["rel_error"])
    return {
        "worst_error": worst["rel_error"],
        "median_error": statistics.median(layer["rel_error"] for layer in layers),
        "worst_layer": worst["name"],
        "layers": in_natural_order(layers),
    }


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


def _check_destination(source: Path, destination: Path, peft_config_path: Path | None) -> None:
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


def _check_config_destination(config_out: Path, config: dict) -> None:
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


def _file_identity(path: Path) -> tuple[int, int, int, int]:
    """What changes when a file is replaced or rewritten: device, inode, size, modification time (ns)."""
    status = path.stat()
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def _output_alphas(
    source: _Source, ranks: list[int], scales: list[float] | None = None
) -> tuple[float | None, dict[str, Tensor]]:
    """The alpha the output carries (``None``: every scale is folded into the factors) and its alpha tensors by key:
    the new alpha (:func:`output_alpha` of the ``scales`` the output is to carry, by default the input's) for each
    module that carries one, the input's own tensor for a module whose alpha a config overrides (kept as it was, so
    that the key set keeps its shape)."""
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


def _output_specs(
    source: _Source, ranks: list[int], options: ResizeOptions, alphas: dict[str, Tensor]
) -> dict[str, TensorInfo]:
    """Every tensor the output will hold: passthrough as is, factors at their new ranks, ``alphas``."""
    lora = source.lora
    specs = {key: lora.header.tensors[key] for key in lora.passthrough}
    for module, rank in zip(lora.modules, ranks):
        specs[module.down_key] = TensorInfo.of(_out_dtype(options, module.down_dtype), (rank, *module.in_shape))
        specs[module.up_key] = TensorInfo.of(
            _out_dtype(options, module.up_dtype), (module.out_features, rank, *module.up_tail)
        )
    specs.update({key: TensorInfo.of(alpha.dtype, tuple(alpha.shape)) for key, alpha in alphas.items()})
    return specs


def _out_scale(carrier: str, scale: float, alpha: float | None, rank: int) -> float:
    """The scale a loader applies to a module's written factors: ``alpha / rank`` where an alpha carries it, the
    module's own scale where its regenerated config does, else 1."""
    if carrier == BY_ALPHA and alpha is not None:
        return alpha / rank
    return scale if carrier == BY_CONFIG else 1.0


@dataclass(frozen=True)
class Prepared:
    """One resize, checked and ready to write: the opened input at ``src``, the output path ``dst``, and the
    input's identity when it was opened (:func:`_file_identity`; ``None`` for a non-file, refused on opening)."""

    src: Path
    dst: Path
    source: _Source
    identity: tuple[int, int, int, int] | None

    @property
    def largest_rank(self) -> int:
        """The input's largest module rank."""
        return max(m.rank for m in self.source.lora.modules)


def check_device(options: ResizeOptions) -> None:
    """Refuse ``device="cuda"`` where no CUDA device is available."""
    if options.device == "cuda" and not torch.cuda.is_available():
        raise LoraError("--device cuda was asked for, but no CUDA device is available")


def prepare_resize(
    src: str | Path, dst: str | Path, *, config: str | Path | None, limits: Limits, rank_out: int
) -> Prepared:
    """Open and check the input at ``src`` (header, layout, scales, the work for new ranks up to ``rank_out``) and
    the output path ``dst``; nothing is written. Raises :class:`LoraError`."""
    src, dst = Path(src), Path(dst)
    identity = _file_identity(src) if src.is_file() else None
    source = _open_source(src, config, limits, rank_out)
    _check_destination(src, dst, source.peft_config_path)
    return Prepared(src, dst, source, identity)


def check_work(prepared: Prepared, limits: Limits, rank_out: int) -> None:
    """Refuse, from the header, work beyond ``limits`` for new ranks up to ``rank_out`` (see :func:`_check_work`)."""
    _check_work(prepared.source.lora, limits, rank_out)


def write_resized(
    prepared: Prepared,
    options: ResizeOptions,
    place: Path,
    *,
    progress: Progress | None = None,
    started: float | None = None,
    scale: float | None = None,
) -> tuple[dict, dict | None]:
    """Resize ``prepared`` by ``options`` (which must choose the ranks), writing the file at ``place`` (atomically;
    the report names ``prepared.dst``); return the report and the PEFT ``adapter_config.json`` for
    ``prepared.dst``'s folder, which the caller writes (``None`` when the input has none).

    ``progress(done, total)`` is called after each module; ``started`` (``time.perf_counter()``) is when the run
    began, for the report's seconds. ``scale``: the one scale (``alpha / rank``) the output's alphas, config or
    metadata alpha give every module that carries one (:func:`lora_ops.sets.common_scale`), each module's own
    scale over it folded into its factors; ``None``: each module's own scale, as in the input. With one ``scale``
    the ranks must be one rank (one alpha value holds it for every module). The input is read one tensor at a time
    and the output written one tensor at a time. Raises :class:`LoraError`; then ``place`` is untouched.
    """
    started = time.perf_counter() if started is None else started
    src, dst, source, identity = prepared.src, prepared.dst, prepared.source, prepared.identity
    lora = source.lora
    ranks = _choose_ranks(source, options)
    carried = source.scales if scale is None else [scale] * len(lora.modules)
    config = None
    if source.peft_config is not None:
        config = peft_config_for_output(source.peft_config, lora, ranks, carried)
        _check_config_destination(dst.parent / PEFT_CONFIG_NAME, config)
    alpha, alpha_tensors = _output_alphas(source, ranks, carried)
    out_scales = [_out_scale(*args, alpha, rank) for *args, rank in zip(source.carriers, carried, ranks)]
    layers: list[dict] = [{}] * len(lora.modules)
    done = 0
    with ThreadPoolExecutor(max_workers=1) as hasher:
        sha256 = hasher.submit(file_sha256, src)
        provenance = Provenance(
            version=__version__,
            method=options.method,
            parameters=options.parameters(),
            source_file=src.name,
            source_sha256=SHA256_PLACEHOLDER,
            source_ranks=rank_histogram([m.rank for m in lora.modules]),
        )
        metadata = build_metadata(lora, ranks, carried, alpha, source.scale_source, provenance)
        specs = _output_specs(source, ranks, options, alpha_tensors)

        def late() -> dict[str, str]:
            digest = sha256.result()
            if _file_identity(src) != identity:
                raise LoraError(f"{src.name} changed while it was being resized; nothing was written")
            return {PROVENANCE_PREFIX + "source_sha256": digest}

        handle = open_tensors(src, lora.header)
        # the scale left in the factors: the strength and what the output's alpha or config does not carry
        folds = [own * options.strength / out_scale for own, out_scale in zip(source.scales, out_scales)]
        with lora_output(place, specs, metadata, late) as output:
            for key in lora.passthrough:
                output.put(key, handle.get_tensor(key))
            batches = _batches(lora.modules, ranks)
            reads = _read_batches(handle, lora.modules, batches, folds)
            jobs = ((*read, ranks[batch[0]]) for batch, read in zip(batches, reads))
            resized = in_order(lambda job: _resize_batch(*job, options), jobs, workers(options.device))
            for batch, results in zip(batches, resized):
                for index, (layer, down, up) in zip(batch, results):
                    layers[index] = store_module(
                        output, lora.modules[index], layer, down, up, out_scales[index], alpha_tensors
                    )
                    done += 1
                    if progress:
                        progress(done, len(lora.modules))
    bytes_out = place.stat().st_size
    report = {
        "layout": lora.layout.name,
        "flavour": lora.flavour,
        "family": lora.family,
        "warnings": source.warnings(),
        "method": options.method,
        "params": options.parameters(),
        "strength": options.strength,
        "scale_source": source.scale_source,
        "source": {"file": src.name, "sha256": sha256.result(), "bytes": lora.header.file_bytes},
        "output": {"file": dst.name, "bytes": bytes_out, "config": PEFT_CONFIG_NAME if config is not None else None},
        "bytes_in": lora.header.file_bytes,
        "bytes_out": bytes_out,
        "seconds": time.perf_counter() - started,
        "rank_in": provenance.source_ranks,
        "rank_out": rank_histogram(ranks),
        "alpha": alpha,
        **layer_errors(layers),
    }
    return report, config


def resize_file(
    src: str | Path,
    dst: str | Path,
    options: ResizeOptions,
    *,
    config: str | Path | None = None,
    progress: Progress | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> dict:
    """Resize the LoRA at ``src`` and write it to ``dst`` in the same layout; return the report.

    ``options`` must choose the ranks (a rank, a rank rule or a target size). ``config``: a PEFT
    ``adapter_config.json`` for the input (found beside ``src`` when not given); a new one is then written beside
    ``dst``. ``progress(done, total)`` is called after each module. Raises :class:`LoraError` for bad input or
    options; ``dst`` is written only when everything succeeded. The input is read one tensor at a time and the
    output written one tensor at a time. Report: layout, method, params, strength, source and output files, bytes,
    seconds, rank histograms in and out, the alpha, worst and median relative error of the (strength-scaled)
    deltas, and per layer ``name``, ``shape``, ``rank_in``, ``rank_out``, ``rel_error``, ``energy_retained``,
    ``singular_values``. For several files at one rank, see :func:`lora_ops.resize_files`.
    """
    started = time.perf_counter()
    if options.open_rank:
        raise LoraError(NO_RANK)
    check_device(options)
    prepared = prepare_resize(src, dst, config=config, limits=limits, rank_out=options.rank or MAX_RANK)
    report, peft_config = write_resized(prepared, options, prepared.dst, progress=progress, started=started)
    if peft_config is not None:
        write_json(prepared.dst.parent / PEFT_CONFIG_NAME, peft_config)
    return report


def _resize_batch(
    modules: list[LoraModule],
    stored: list[PairReader],
    folds: list[float],
    rank: int,
    options: ResizeOptions,
) -> list[tuple[dict, Tensor, Tensor]]:
    """Resize a batch of modules from their factors (read by ``stored``): each one's report row and the factors to
    store (``folds``: the scales left in the factors; the rows' singular values are those of the folded deltas).
    A reduction of a nearly low-rank 16-bit layer is solved in float64 (see :func:`_factors`)."""
    first = modules[0]
    dtypes = (_out_dtype(options, first.down_dtype), _out_dtype(options, first.up_dtype))
    generators = [_generator(options.seed, module.name) for module in modules]
    solved: list[tuple] = [()] * len(modules)
    for index, factors, thin in _factors(modules, stored, folds, options.device, rank if rank < first.rank else 0):
        parts = resize_factors(factors, thin, rank, options, [generators[i] for i in index], dtypes)
        for item, down, up, error, s in zip(index, *(part.cpu() for part in parts), thin.s.cpu()):
            solved[item] = down, up, error.item(), s
    results = []
    for module, (down, up, error, s) in zip(modules, solved):
        if not math.isfinite(error):
            raise LoraError(
                f"module {module.name!r}: the resized factors overflow {dtypes[1]}; choose a wider output dtype"
            )
        row = {
            "name": module.name,
            "shape": module.delta_shape,
            "rank_in": module.rank,
            "rank_out": rank,
            "rel_error": error,
            "energy_retained": 1 - error**2,
            "singular_values": s[s > 0].tolist(),
        }
        results.append(
            (row, down.reshape(rank, *module.in_shape), up.reshape(module.out_features, rank, *module.up_tail))
        )
    return results


def inspect_file(path: str | Path, *, config: str | Path | None = None, limits: Limits = DEFAULT_LIMITS) -> dict:
    """Describe a LoRA file: layout, modules, ranks, dtypes, scales, trainer metadata and every layer's spectrum."""
    source = _open_source(path, config, limits)
    lora = source.lora
    spectra = _spectra(source, "cpu")
    dtypes = [m.down_dtype for m in lora.modules]
    return {
        "file": lora.path.name,
        "bytes": lora.header.file_bytes,
        "sha256": file_sha256(lora.path),
        "layout": lora.layout.name,
        "flavour": lora.flavour,
        "family": lora.family,
        "warnings": source.warnings(),
        "dtype": DTYPE_LABELS[max(set(dtypes), key=dtypes.count)],
        "modules": len(lora.modules),
        "ranks": rank_histogram([m.rank for m in lora.modules]),
        "scale_source": source.scale_source,
        "metadata": dict(lora.header.metadata),
        "passthrough": len(lora.passthrough),
        "layers": in_natural_order(
            [
                {
                    "name": m.name,
                    "shape": m.delta_shape,
                    "rank": m.rank,
                    "scale": scale,
                    "dtype": DTYPE_LABELS[m.down_dtype],
                    "singular_values": s.tolist(),
                }
                for m, scale, s in zip(lora.modules, source.scales, spectra)
            ]
        ),
    }
