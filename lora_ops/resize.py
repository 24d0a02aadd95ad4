"""Inspecting and resizing LoRA files: the public entry points. An input is opened by :mod:`lora_ops.inputs`, its
modules are solved in batches of one shape by :mod:`lora_ops.batching` and written one by one as
:mod:`lora_ops.outputs` describes."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import __version__
from .atomic import write_json
from .batching import (
    group_batches,
    layer_errors,
    read_batches,
    resize_batch,
    stacked_factors,
)
from .digest import file_sha256
from .errors import LoraError
from .files import DEFAULT_LIMITS, Limits, open_tensors
from .inputs import Source, check_limits, file_identity, open_source
from .layouts import in_natural_order
from .options import MAX_RANK, NO_RANK, ResizeOptions
from .outputs import (
    SHA256_PLACEHOLDER,
    check_config_destination,
    check_destination,
    out_dtype,
    out_scale,
    output_alphas,
    output_specs,
    store_module,
)
from .ranks import RANK_RULES, threshold_ranks
from .scales import PEFT_CONFIG_NAME
from .threads import in_order, workers
from .writer import (
    PROVENANCE_PREFIX,
    Provenance,
    build_metadata,
    lora_output,
    peft_config_for_output,
    rank_histogram,
)

DTYPE_LABELS = {"F64": "fp64", "F32": "fp32", "F16": "fp16", "BF16": "bf16"}


Progress = Callable[[int, int], None]


def _spectra(source: Source, device: str) -> list[Tensor]:
    """Singular values of every module's effective delta (descending, float64, on the CPU); batches whose float32
    spectrum reaches below float32 resolution are computed again in float64
    (see :func:`lora_ops.batching.stacked_factors`)."""
    modules = source.lora.modules
    spectra: list[Tensor] = [torch.empty(0)] * len(modules)
    batches = group_batches(modules, [0] * len(modules))
    jobs = read_batches(open_tensors(source.lora.path, source.lora.header), modules, batches, source.scales)

    def spectrum(job: tuple) -> Tensor:
        modules = job[0]
        values = torch.empty(len(modules), modules[0].rank, dtype=torch.float64)
        for index, _, thin in stacked_factors(*job, device, modules[0].rank):
            values[index] = thin.s.cpu()
        return values

    for batch, values in zip(batches, in_order(spectrum, jobs, workers(device))):
        for index, s in zip(batch, values):
            spectra[index] = s[s > 0]
    return spectra


def _choose_ranks(source: Source, options: ResizeOptions) -> list[int]:
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
        m.out_features * out_dtype(options, m.up_dtype).itemsize
        + m.in_features * out_dtype(options, m.down_dtype).itemsize
        for m in modules
    ]
    budget = options.target_size - _output_bytes_besides_factors(source, options)
    return threshold_ranks(spectra, caps, per_rank, budget)


def _output_bytes_besides_factors(source: Source, options: ResizeOptions) -> int:
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


@dataclass(frozen=True)
class Prepared:
    """One resize, checked and ready to write: the opened input at ``src``, the output path ``dst``, and the input's
    identity when it was opened (:func:`lora_ops.inputs.file_identity`; ``None`` for a non-file, refused on
    opening)."""

    src: Path
    dst: Path
    source: Source
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
    identity = file_identity(src) if src.is_file() else None
    source = open_source(src, config, limits, rank_out)
    check_destination(src, dst, source.peft_config_path)
    return Prepared(src, dst, source, identity)


def check_work(prepared: Prepared, limits: Limits, rank_out: int) -> None:
    """Refuse, from the header, work beyond ``limits`` for new ranks up to ``rank_out``
    (see :func:`lora_ops.inputs.check_limits`)."""
    check_limits(prepared.source.lora, limits, rank_out)


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
        check_config_destination(dst.parent / PEFT_CONFIG_NAME, config)
    alpha, alpha_tensors = output_alphas(source, ranks, carried)
    out_scales = [out_scale(*args, alpha, rank) for *args, rank in zip(source.carriers, carried, ranks)]
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
        specs = output_specs(source, ranks, options, alpha_tensors)

        def late() -> dict[str, str]:
            digest = sha256.result()
            if file_identity(src) != identity:
                raise LoraError(f"{src.name} changed while it was being resized; nothing was written")
            return {PROVENANCE_PREFIX + "source_sha256": digest}

        handle = open_tensors(src, lora.header)
        # the scale left in the factors: the strength and what the output's alpha or config does not carry
        folds = [own * options.strength / out_scale for own, out_scale in zip(source.scales, out_scales)]
        with lora_output(place, specs, metadata, late) as output:
            for key in lora.passthrough:
                output.put(key, handle.get_tensor(key))
            batches = group_batches(lora.modules, ranks)
            reads = read_batches(handle, lora.modules, batches, folds)
            jobs = ((*read, ranks[batch[0]]) for batch, read in zip(batches, reads))
            resized = in_order(lambda job: resize_batch(*job, options), jobs, workers(options.device))
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


def inspect_file(path: str | Path, *, config: str | Path | None = None, limits: Limits = DEFAULT_LIMITS) -> dict:
    """Describe a LoRA file: layout, modules, ranks, dtypes, scales, trainer metadata and every layer's spectrum."""
    source = open_source(path, config, limits)
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
