"""Resizing a set of LoRA files to one rank, all or nothing: for ``torch.compile`` and hotswapping, every LoRA kept
unfused in one model needs the same rank (diffusers' ``load_lora_weights(..., hotswap=True)`` swaps weights in
place; another rank changes the compiled shapes).

All or nothing: every input is opened and checked (header, layout, scales, limits, destination) before anything is
written; the outputs are written to hidden temporary files in the output folder and renamed to their names only when
every file is done. When one file fails, the temporaries are removed: the folder is as it was (files of the same
names there are not replaced) and the error names the file.

One scale. The compiled graph guards on more than shapes: PEFT keeps each layer's scale (``scaling[adapter]``,
``lora_alpha / r``) as a Python float, and dynamo guards on its value (``scaling['style'] == 1.0``), so a file of
the set's rank but another alpha recompiles on a swap too. So when every layer gets one rank, every output carries
one scale, :func:`common_scale`, for every module: its alphas (``alpha = scale * rank``), its regenerated
``lora_adapter_metadata`` / ``adapter_config.json`` (``lora_alpha = scale * rank``, no ``alpha_pattern``) or its
metadata ``alpha`` say that scale, and each module's own scale over it is folded into its factors (into B for an
extension, into the singular values for a reduction), so each output applies exactly its input's delta, up to
the rounding of the factors' dtype (reported as the layer's error). The common scale is:

- 1 when some module of the set has nothing that carries a scale (no alpha, no config: its loader reads scale 1,
  and an alpha carrier holds 1 with ``alpha = rank``);
- 1 when the files are not all of one flavour (:data:`lora_ops.layouts.FLAVOURS`): diffusers gives an alpha to
  PEFT as its scaling for some layouts (diffusers-layout ``.alpha`` tensors, ``lora_adapter_metadata``) but folds
  it into the factors for others (kohya FLUX files, ``_convert_kohya_flux_lora_to_diffusers``: PEFT's scaling is
  then 1), so only scale 1 reads alike across layouts;
- else the set's most common non-zero per-module scale, so that the most modules need no folding and stay bit for
  bit on an exact extension; 1 when several scales are equally common (or every scale is 0).

A rank rule or target size leaves per-layer ranks, which no hotswap survives: each file then keeps its own scales,
exactly as :func:`lora_ops.resize_file` writes it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

from .atomic import atomic_path, same_file, write_json
from .errors import LoraError
from .files import DEFAULT_LIMITS, Limits
from .inputs import BY_FACTORS
from .options import MAX_RANK, ResizeOptions
from .resize import Prepared, Progress, check_device, check_work, prepare_resize, write_resized
from .scales import PEFT_CONFIG_NAME

# The per-file report entries the summary table repeats.
SUMMARY_KEYS = ("layout", "rank_in", "rank_out", "worst_error", "median_error", "bytes_in", "bytes_out")


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Make every :class:`LoraError` raised inside name the file at ``path`` (prefixed when it does not already)."""
    try:
        yield
    except LoraError as error:
        if path.name in str(error):
            raise
        raise LoraError(f"{path.name}: {error}") from error


def _check_set(sources: list[Path], configs: list, output_dir: Path) -> None:
    """Refuse an empty set, configs that do not pair with the sources, two inputs of one name (their outputs would
    collide), and an output folder that does not exist or holds an input."""
    if not sources:
        raise LoraError("give at least one LoRA file to resize")
    if len(configs) != len(sources):
        raise LoraError(f"{len(configs)} configs for {len(sources)} files; give one per file (None: beside it)")
    twice = [name for name, count in Counter(path.name for path in sources).items() if count > 1]
    if twice:
        raise LoraError(f"two inputs are named {twice[0]}; their outputs would have one name in {output_dir}")
    if not output_dir.is_dir():
        what = "is a file, not a folder" if output_dir.exists() else "does not exist (it is not created; make it first)"
        raise LoraError(f"the output folder {output_dir} {what}")
    for path in sources:
        if same_file(output_dir, path.parent):
            raise LoraError(f"the output folder {output_dir} holds the input {path.name}; choose another folder")


def _check_configs(prepared: list[Prepared]) -> None:
    """Refuse two PEFT inputs: each would write its ``adapter_config.json`` into the one output folder."""
    with_config = [item.src.name for item in prepared if item.source.peft_config is not None]
    if len(with_config) > 1:
        raise LoraError(
            f"{with_config[0]} and {with_config[1]} both have a PEFT {PEFT_CONFIG_NAME}, which would be written to"
            " the same output folder; resize them into separate folders"
        )


def common_scale(prepared: Sequence[Prepared]) -> float:
    """The one scale (``alpha / rank``) every module of a set at one rank is written with: 1 when a module of the
    set has no scale carrier or the files are of more than one flavour, else the most common non-zero per-module
    scale, 1 on a tie (the rules and their sources: the module docstring)."""
    sources = [item.source for item in prepared]
    if len({source.lora.flavour for source in sources}) > 1 or any(BY_FACTORS in s.carriers for s in sources):
        return 1.0
    counts = Counter(scale for source in sources for scale in source.scales if scale != 0).most_common(2)
    if not counts or (len(counts) == 2 and counts[0][1] == counts[1][1]):
        return 1.0
    return counts[0][0]


def resize_files(
    sources: Sequence[str | Path],
    output_dir: str | Path,
    options: ResizeOptions | None = None,
    *,
    configs: Sequence[str | Path | None] | None = None,
    progress: Progress | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> dict:
    """Resize every LoRA in ``sources`` by ``options`` into ``output_dir``, each as ``output_dir/<its file name>``
    in its own layout; return one report per file and a summary table.

    ``sources``: the input files (a single path is a set of one). ``options`` (default ``ResizeOptions()``): with
    ``rank``, every layer of every file gets exactly that rank (the shared rank hotswapping needs). Without a rank,
    rank rule or target size, the set's largest rank: every file is extended exactly, lossless. A rank rule or
    target size applies per file, as for :func:`lora_ops.resize_file` (``rank`` then caps it): the files then keep
    per-layer ranks. At one rank, every module of every output carries one scale, :func:`common_scale` (see the
    module docstring); with per-layer ranks each file keeps its own. ``options.strength`` is baked into every file. ``configs``: each source's PEFT
    ``adapter_config.json`` (``None``: found beside it), in the order of ``sources``; at most one source may have
    one (it is written as ``output_dir/adapter_config.json``). ``progress(done, total)`` counts the modules of
    all files.

    All or nothing (see the module docstring): raises :class:`LoraError` naming the bad file, and then nothing in
    ``output_dir`` has changed. Refused before any work: no sources, two sources of one file name, an
    ``output_dir`` that is not an existing folder or is the folder of a source.

    Returns ``{"output_dir", "rank" (the rank every layer got, or None when rules chose per layer), "scale" (the
    scale every module of every output carries, or None with per-layer ranks), "reports" (resize_file's report of
    each file, in order; errors against each input's own delta), "summary" (per file: "file" and SUMMARY_KEYS),
    "seconds"}``.
    """
    started = time.perf_counter()
    options = options or ResizeOptions()
    sources = [Path(sources)] if isinstance(sources, (str, Path)) else [Path(source) for source in sources]
    configs = list(configs) if configs is not None else [None] * len(sources)
    output_dir = Path(output_dir)
    _check_set(sources, configs, output_dir)
    check_device(options)
    prepared = []
    for source, config in zip(sources, configs):
        with _naming(source):
            prepared.append(prepare_resize(source, output_dir / source.name, config=config, limits=limits, rank_out=0))
    _check_configs(prepared)
    if options.open_rank:
        options = replace(options, rank=max(item.largest_rank for item in prepared))
    for item in prepared:
        with _naming(item.src):
            check_work(item, limits, options.rank or MAX_RANK)
    uniform = options.rank_rule is None and options.target_size is None
    scale = common_scale(prepared) if uniform else None
    total = sum(len(item.source.lora.modules) for item in prepared)
    reports: list[dict] = []
    with ExitStack() as staged:  # every output renamed into place only when the last one is written
        for item in prepared:
            offset = sum(len(report["layers"]) for report in reports)

            def count(done: int, _: int, offset: int = offset) -> None:
                if progress:
                    progress(offset + done, total)

            with _naming(item.src):
                place = staged.enter_context(atomic_path(item.dst))
                report, config = write_resized(item, options, place, progress=count, scale=scale)
                if config is not None:
                    write_json(staged.enter_context(atomic_path(output_dir / PEFT_CONFIG_NAME)), config)
            reports.append(report)
    return {
        "output_dir": str(output_dir),
        "rank": options.rank if uniform else None,
        "scale": scale,
        "reports": reports,
        "summary": [
            {"file": report["output"]["file"], **{key: report[key] for key in SUMMARY_KEYS}} for report in reports
        ],
        "seconds": time.perf_counter() - started,
    }
