"""Modules solved in batches: same-shaped modules' factors read one pair at a time into stacked tensors, their Gram
matrices and thin SVDs (:mod:`lora_ops.linalg`), the new factors of a reduction, kept rank or extension, and each
module's report row. Shared by resizes, set resizes and merges."""

from __future__ import annotations

import functools
import hashlib
import math
import statistics
import threading
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from . import linalg
from .errors import LoraError
from .layouts import LoraModule, in_natural_order
from .options import ResizeOptions
from .outputs import out_dtype

# Factor bytes (at 4 bytes per value) of one batch of same-shaped modules: small enough to stay in cache.
BATCH_BYTES = 8 * 1024**2


# Storage dtypes whose values float32 holds exactly: their products on the tall factors run in float32, except
# for the layers linalg.float32_suffices sends back to float64 (see stacked_factors).
EXACT_IN_FLOAT32 = {"F16", "BF16"}


# Copies one module's stored factors into ``down [r, n]`` and ``up [m, r]`` (its rows of a batch's stacked factors,
# converting the dtype) when called: a batch's pairs are read by the worker that stacks them, one pair at a time,
# so that only the pairs being copied are in memory, not the batches waiting for a worker.
PairReader = Callable[[Tensor, Tensor], None]


def read_pair(handle, module: LoraModule, buffers: threading.local) -> tuple[Tensor, Tensor]:
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


def copy_pair(handle, module: LoraModule, buffers: threading.local, down: Tensor, up: Tensor) -> None:
    """A :data:`PairReader` of one module: :func:`read_pair` copied into ``down`` and ``up``."""
    stored_down, stored_up = read_pair(handle, module, buffers)
    down.copy_(stored_down)
    up.copy_(stored_up)


def read_batches(
    handle, modules: tuple[LoraModule, ...], batches: list[list[int]], scales: list[float]
) -> Iterator[tuple[list[LoraModule], list[tuple[Tensor, Tensor]], list[float]]]:
    """Per batch of module indices: the modules, a :data:`PairReader` of each one's factors and their ``scales``."""
    buffers = threading.local()  # one read buffer per thread, for the duration of this reading
    for batch in batches:
        readers = [functools.partial(copy_pair, handle, modules[i], buffers) for i in batch]
        yield [modules[i] for i in batch], readers, [scales[i] for i in batch]


def group_batches(modules: tuple[LoraModule, ...], ranks: list[int]) -> list[list[int]]:
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


def stacked_factors(
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


def module_generator(seed: int, name: str) -> torch.Generator:
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
    if extra:
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


def resize_batch(
    modules: list[LoraModule],
    stored: list[PairReader],
    folds: list[float],
    rank: int,
    options: ResizeOptions,
) -> list[tuple[dict, Tensor, Tensor]]:
    """Resize a batch of modules from their factors (read by ``stored``): each one's report row and the factors to
    store (``folds``: the scales left in the factors; the rows' singular values are those of the folded deltas).
    A reduction of a nearly low-rank 16-bit layer is solved in float64 (see :func:`stacked_factors`)."""
    first = modules[0]
    dtypes = (out_dtype(options, first.down_dtype), out_dtype(options, first.up_dtype))
    generators = [module_generator(options.seed, module.name) for module in modules]
    solved: list[tuple] = [()] * len(modules)
    for index, factors, thin in stacked_factors(
        modules, stored, folds, options.device, rank if rank < first.rank else 0
    ):
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
