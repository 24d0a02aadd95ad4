"""Inspecting and resizing LoRA files: the public entry points, streaming one module at a time."""

from __future__ import annotations

import hashlib
import math
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import linalg
from .errors import LoraError
from .files import DEFAULT_LIMITS, TORCH_DTYPES, Limits, TensorInfo, file_sha256, open_tensors, read_header
from .layouts import LoraFile, LoraModule, parse_lora
from .ranks import energy_rank, threshold_ranks
from .scales import PEFT_CONFIG_NAME, load_peft_config, module_scales
from .writer import (
    PROVENANCE_PREFIX,
    Provenance,
    build_metadata,
    lora_output,
    output_alpha,
    peft_config_for_output,
    rank_histogram,
    write_json,
)

__version__ = "0.1.0"

METHODS = ("svd", "randomized_svd", "random_projection", "sparse_random_projection")
OUTPUT_DTYPES = {"keep": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_LABELS = {"F64": "fp64", "F32": "fp32", "F16": "fp16", "BF16": "bf16"}
MAX_RANK = 2048
# Stands in the header for the source sha256 until its background hashing is done (same length).
SHA256_PLACEHOLDER = "0" * 64

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ResizeOptions:
    """What to do to every layer.

    ``rank``: every layer gets exactly this rank (reduced above it, extended exactly below it) unless
    ``energy`` or ``target_size`` choose per-layer ranks, which ``rank`` then caps. ``energy``: keep at
    least this share (0-1] of each layer's squared Frobenius norm. ``target_size``: output bytes, met by
    one global singular-value threshold. ``niter``/``oversample``: randomized SVD only; ``density``: sparse
    projection only (default ``1/sqrt(rank_in)``); ``seed``: random methods and the extension's new rows.
    ``dtype``: ``keep`` or fp32/fp16/bf16 for the factors. ``device``: where the linear algebra runs.
    """

    rank: int | None = None
    method: str = "svd"
    niter: int = 2
    oversample: int = 8
    density: float | None = None
    seed: int = 0
    energy: float | None = None
    target_size: int | None = None
    dtype: str = "keep"
    device: str = "cpu"

    def __post_init__(self) -> None:
        checks = (
            (self.method in METHODS, f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}"),
            (
                any(v is not None for v in (self.rank, self.energy, self.target_size)),
                "give a rank, an energy share or a target size",
            ),
            (self.rank is None or 1 <= self.rank <= MAX_RANK, f"rank must be between 1 and {MAX_RANK}"),
            (0 <= self.niter <= 50, "niter must be between 0 and 50"),
            (0 <= self.oversample <= 1024, "oversample must be between 0 and 1024"),
            (self.density is None or 0 < self.density <= 1, "density must be in (0, 1]"),
            (self.energy is None or 0 < self.energy <= 1, "energy must be in (0, 1]"),
            (self.target_size is None or self.target_size > 0, "target size must be positive"),
            (self.dtype in OUTPUT_DTYPES, f"dtype must be one of {', '.join(OUTPUT_DTYPES)}"),
            (self.device in ("cpu", "cuda"), "device must be cpu or cuda"),
        )
        for ok, message in checks:
            if not ok:
                raise LoraError(message)

    def parameters(self) -> dict:
        """The options that shaped the result (for provenance): unset and irrelevant ones left out."""
        relevant = {
            "randomized_svd": ("niter", "oversample", "seed"),
            "random_projection": ("seed",),
            "sparse_random_projection": ("density", "seed"),
        }.get(self.method, ())
        chosen = ("rank", "energy", "target_size", "dtype", *relevant)
        return {key: value for key, value in asdict(self).items() if key in chosen and value is not None}


@dataclass(frozen=True)
class _Source:
    """An input file, opened and understood: layout, per-module scales and alpha dtype."""

    lora: LoraFile
    scales: list[float]
    scale_source: str
    alpha_dtype: torch.dtype
    peft_config: dict | None
    peft_config_path: Path | None


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
    alphas: dict[str, float] = {}
    alpha_dtype = torch.float32
    with open_tensors(lora.path) as handle:
        for module in lora.modules:
            if module.alpha_key:
                alpha = handle.get_tensor(module.alpha_key)
                alphas[module.name], alpha_dtype = float(alpha.reshape(-1)[0]), alpha.dtype
    peft_config, peft_config_path = load_peft_config(lora, config)
    scales, scale_source = module_scales(lora, alphas, peft_config)
    return _Source(lora, scales, scale_source, alpha_dtype, peft_config, peft_config_path)


def _all_finite(tensor: Tensor) -> bool:
    """No NaN or Inf in a float64 tensor: its sum is finite exactly then (values from 16/32-bit storage cannot overflow it)."""
    return math.isfinite(tensor.sum().item())


def _load_factors(handle, module: LoraModule, device: str) -> tuple[Tensor, Tensor]:
    """The module's factors as float64 matrices: ``down [r, n]`` and ``up [m, r]``; NaN/Inf refused."""
    factors = []
    for key in (module.down_key, module.up_key):
        tensor = handle.get_tensor(key).to(device=device, dtype=torch.float64)
        if not _all_finite(tensor):
            raise LoraError(f"{key!r} contains NaN or Inf values")
        factors.append(tensor)
    down, up = factors
    return down.reshape(module.rank, -1), up.reshape(up.shape[0], module.rank)


def _generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator for one module, independent of the order modules are processed in."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


# method -> (down, up, scale, rank, options, generator, exact thin SVD of the delta) -> (down', up')
REDUCERS = {
    "svd": lambda down, up, scale, rank, options, generator, thin: thin.balanced_factors(down, up, rank),
    "randomized_svd": lambda down, up, scale, rank, options, generator, thin: linalg.randomized_svd(
        down, up, scale, rank, niter=options.niter, oversample=options.oversample, generator=generator
    ),
    "random_projection": lambda down, up, scale, rank, options, generator, thin: linalg.random_projection(
        down, up, scale, rank, generator=generator
    ),
    "sparse_random_projection": lambda down, up, scale, rank, options, generator, thin: linalg.sparse_random_projection(
        down, up, scale, rank, density=options.density, generator=generator
    ),
}


def resize_factors(
    down: Tensor,
    up: Tensor,
    scale: float,
    rank: int,
    options: ResizeOptions,
    generator: torch.Generator,
    thin: linalg.FactorSVD,
) -> tuple[Tensor, Tensor]:
    """New factors ``(down' [rank, n], up' [m, rank])`` of ``scale * up @ down``: reduced by ``options.method``
    when ``rank < r``, else extended exactly; a reduction that yields fewer than ``rank`` directions
    (``rank > min(m, n)``) is extended to exactly ``rank``. ``thin`` is :func:`linalg.factor_svd` of the delta."""
    if rank >= down.shape[0]:
        return linalg.extend(down, up, scale, rank, generator=generator)
    new_down, new_up = REDUCERS[options.method](down, up, scale, rank, options, generator, thin)
    if new_down.shape[0] < rank:
        return linalg.extend(new_down, new_up, 1.0, rank, generator=generator)
    return new_down, new_up


def _spectra(source: _Source, device: str) -> list[Tensor]:
    """Singular values of every module's effective delta (descending, float64, on the CPU)."""
    spectra = []
    with open_tensors(source.lora.path) as handle:
        for module, scale in zip(source.lora.modules, source.scales):
            down, up = _load_factors(handle, module, device)
            spectra.append(linalg.factor_svd(down, up, scale).s.cpu())
    return spectra


def _out_dtype(options: ResizeOptions, stored: str) -> torch.dtype:
    return OUTPUT_DTYPES[options.dtype] or TORCH_DTYPES[stored]


def _choose_ranks(source: _Source, options: ResizeOptions) -> list[int]:
    modules = source.lora.modules
    if options.energy is None and options.target_size is None:
        return [options.rank] * len(modules)
    spectra = _spectra(source, options.device)
    caps = [options.rank or MAX_RANK] * len(modules)
    if options.energy is not None:
        caps = [min(cap, energy_rank(s, options.energy)) for cap, s in zip(caps, spectra)]
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


def _check_destination(source: Path, destination: Path, peft_config_path: Path | None) -> None:
    if destination.suffix != ".safetensors":
        raise LoraError(f"output must be a .safetensors file, not {destination.name}")
    if not destination.parent.is_dir():
        raise LoraError(f"output folder does not exist: {destination.parent}")
    if destination.resolve() == source.resolve():
        raise LoraError("the output path is the input file; choose another path")
    if peft_config_path and (destination.parent / PEFT_CONFIG_NAME).resolve() == peft_config_path.resolve():
        raise LoraError(
            f"the output folder holds the input's {PEFT_CONFIG_NAME}, which the new config would replace;"
            " choose another folder"
        )


def _output_specs(
    source: _Source, ranks: list[int], options: ResizeOptions, alpha: float | None
) -> dict[str, TensorInfo]:
    """Every tensor the output will hold: passthrough as is, factors at their new ranks, alphas if written."""
    lora = source.lora
    specs = {key: lora.header.tensors[key] for key in lora.passthrough}
    for module, rank in zip(lora.modules, ranks):
        conv_tail = (1, 1) if module.is_conv else ()
        specs[module.down_key] = TensorInfo.of(_out_dtype(options, module.down_dtype), (rank, *module.in_shape))
        specs[module.up_key] = TensorInfo.of(
            _out_dtype(options, module.up_dtype), (module.out_features, rank, *conv_tail)
        )
        if alpha is not None:
            specs[module.name + lora.layout.alpha_suffix] = TensorInfo.of(source.alpha_dtype, ())
    return specs


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

    ``config``: a PEFT ``adapter_config.json`` for the input (found beside ``src`` when not given); a new
    one is then written beside ``dst``. ``progress(done, total)`` is called after each module. Raises
    :class:`LoraError` for bad input or options; ``dst`` is written only when everything succeeded.
    The input is read one tensor at a time and the output written one tensor at a time.
    """
    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if options.device == "cuda" and not torch.cuda.is_available():
        raise LoraError("--device cuda was asked for, but no CUDA device is available")
    source = _open_source(src, config, limits, options.rank or MAX_RANK)
    _check_destination(src, dst, source.peft_config_path)
    lora = source.lora
    ranks = _choose_ranks(source, options)
    alpha = None
    if lora.layout.writes_alpha:
        alpha = torch.tensor(output_alpha(source.scales, ranks), dtype=source.alpha_dtype).item()
    layers = []
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
        metadata = build_metadata(lora, ranks, alpha, provenance)
        specs = _output_specs(source, ranks, options, alpha)
        late = lambda: {PROVENANCE_PREFIX + "source_sha256": sha256.result()}  # noqa: E731
        with open_tensors(src) as handle, lora_output(dst, specs, metadata, late) as output:
            for key in lora.passthrough:
                output.put(key, handle.get_tensor(key))
            for done, (module, scale, rank) in enumerate(zip(lora.modules, source.scales, ranks), start=1):
                out_scale = alpha / rank if alpha is not None else 1.0
                layer, down, up = _resize_module(handle, module, scale / out_scale, rank, options)
                layer["singular_values"] = [v * out_scale for v in layer["singular_values"]]
                layers.append(layer)
                output.put(module.down_key, down)
                output.put(module.up_key, up)
                if alpha is not None:
                    output.put(module.name + lora.layout.alpha_suffix, torch.tensor(alpha, dtype=source.alpha_dtype))
                if progress:
                    progress(done, len(lora.modules))
    config_out = None
    if source.peft_config is not None:
        config_out = dst.parent / PEFT_CONFIG_NAME
        write_json(config_out, peft_config_for_output(source.peft_config, lora, ranks))
    errors = [layer["rel_error"] for layer in layers]
    worst = max(range(len(layers)), key=errors.__getitem__)
    bytes_out = dst.stat().st_size
    return {
        "layout": lora.layout.name,
        "flavour": lora.flavour,
        "method": options.method,
        "params": options.parameters(),
        "scale_source": source.scale_source,
        "source": {"file": src.name, "sha256": sha256.result(), "bytes": lora.header.file_bytes},
        "output": {"file": dst.name, "bytes": bytes_out, "config": config_out.name if config_out else None},
        "bytes_in": lora.header.file_bytes,
        "bytes_out": bytes_out,
        "seconds": time.perf_counter() - started,
        "rank_in": provenance.source_ranks,
        "rank_out": rank_histogram(ranks),
        "alpha": alpha,
        "worst_error": errors[worst],
        "median_error": statistics.median(errors),
        "worst_layer": layers[worst]["name"],
        "layers": layers,
    }


def _resize_module(
    handle, module: LoraModule, fold: float, rank: int, options: ResizeOptions
) -> tuple[dict, Tensor, Tensor]:
    """Resize one module: its report row and the factors to store (``fold``: the scale left in the factors)."""
    down, up = _load_factors(handle, module, options.device)
    thin = linalg.factor_svd(down, up, fold)
    new_down, new_up = resize_factors(down, up, fold, rank, options, _generator(options.seed, module.name), thin)
    stored_down = new_down.to(_out_dtype(options, module.down_dtype))
    stored_up = new_up.to(_out_dtype(options, module.up_dtype))
    written_down, written_up = stored_down.double(), stored_up.double()
    if not (_all_finite(written_down) and _all_finite(written_up)):
        raise LoraError(
            f"module {module.name!r}: the resized factors overflow {stored_up.dtype}; choose a wider output dtype"
        )
    error = linalg.relative_error(down, up, fold, written_down, written_up, thin.norm)
    row = {
        "name": module.name,
        "shape": module.delta_shape,
        "rank_in": module.rank,
        "rank_out": rank,
        "rel_error": error,
        "energy_retained": 1 - error**2,
        "singular_values": thin.s.tolist(),
    }
    conv_tail = (1, 1) if module.is_conv else ()
    return row, stored_down.reshape(rank, *module.in_shape), stored_up.reshape(module.out_features, rank, *conv_tail)


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
        "dtype": DTYPE_LABELS[max(set(dtypes), key=dtypes.count)],
        "modules": len(lora.modules),
        "ranks": rank_histogram([m.rank for m in lora.modules]),
        "scale_source": source.scale_source,
        "metadata": dict(lora.header.metadata),
        "passthrough": len(lora.passthrough),
        "layers": [
            {
                "name": m.name,
                "shape": m.delta_shape,
                "rank": m.rank,
                "scale": scale,
                "dtype": DTYPE_LABELS[m.down_dtype],
                "singular_values": s.tolist(),
            }
            for m, scale, s in zip(lora.modules, source.scales, spectra)
        ],
    }
