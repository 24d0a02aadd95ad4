"""Views of lora_ops reports for the Space: exact-SVD error curves, the energy budget, figures, tables, summaries.

Everything here is a pure function of the JSON reports of `inspect_file` and `resize_file`
(`layers[i]["singular_values"]` are the descending singular values of the layer's effective delta
`scale * B @ A`). Errors are relative Frobenius errors of the delta, energies are `1 - error**2`.
Figures are matplotlib `Figure` objects built without pyplot, so concurrent requests share no state.

Text from a file or a Hub repo (file names, layer names, metadata keys and values) goes through
`lora_ops.page_text` wherever it reaches Markdown or a figure; numbers use its units (`percent`, `seconds`,
`size`). Tables (pandas) keep numbers numeric, in percent where the header says "(%)", so they sort right; their
text cells stay raw, as gradio's `Dataframe` shows cells of its default datatype "str" as plain text.
"""

from __future__ import annotations

import math
import numbers
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from lora_ops.errors import LoraError
from lora_ops.layouts import natural_key
from lora_ops.options import MAX_RANK, METHODS, ResizeOptions
from lora_ops.page_text import code_span, escape_markdown, percent, plot_text, seconds, size, table_cell
from lora_ops.ranks import RANK_RULES
from lora_ops.resize import resize_file

METADATA_VALUE_LIMIT = 120  # characters of a metadata value shown in the table

SET_TABLE_COLUMNS = (
    "file",
    "layout",
    "rank in",
    "rank out",
    "worst error (%)",
    "median error (%)",
    "size in",
    "size out",
)
MERGED_STEM_CHARACTERS = 32  # of each input's name, in a merged file's name
METHOD_TABLE_COLUMNS = ("method", "rank", "worst error (%)", "median error (%)", "seconds")
LAYER_TABLE_COLUMNS = (
    "layer",
    "shape",
    "rank in",
    "rank out",
    "rel. error (%)",
    "energy kept (%)",
    "note",
)
# A relative error above 1 means the resized delta is further from the original than no delta at all (random
# projections can do this); its "energy kept" 1 - error**2 is then negative.
ABOVE_100 = "error above 100 %: this layer is further from the original than no LoRA at all"
ENERGY_MESSAGE = "energy must be between 0 and 1 (share of each layer's squared norm to keep), got {value}"

# Parts of a file stem that name a rank, dtype, method or rank rule, as ours and common trainers write them
# (`-r16`, `_rank16`, `-dim16`, `-fp16`, `-svd`, `-energy0.9`, `-40MB`): stripped from the end of a source's
# stem (repeatedly) before the output's own parts are added, so they never pile up or contradict.
STALE_NAME_PARTS = (
    r"r\d+",
    r"rank\d+",
    r"dim\d+",
    r"alpha\d+(?:\.\d+)?",
    r"fp16|fp32|bf16|float16|float32|bfloat16",
    "|".join(sorted(METHODS, key=len, reverse=True)),
    r"(?:energy|sv_ratio|sv_cumulative|sv_fro|strength)-?\d+(?:\.\d+)?(?:e-?\d+)?",
    r"\d+(?:\.\d+)?MB",
)
_STALE_TAIL = re.compile(rf"[-_.](?:{'|'.join(STALE_NAME_PARTS)})$", re.IGNORECASE)


@dataclass(frozen=True)
class ErrorCurves:
    """Relative error of the exact truncated SVD at every rank 0..max_rank.

    `per_layer` is `[layers, max_rank + 1]`; `whole_file` is `[max_rank + 1]`, the error of all deltas taken
    together (square root of lost energy over total energy). Layers whose delta is zero have error 0.
    """

    layer_names: tuple[str, ...]
    per_layer: np.ndarray
    whole_file: np.ndarray

    @property
    def ranks(self) -> np.ndarray:
        """`[max_rank + 1]` ranks 0, 1, ..., max_rank."""
        return np.arange(self.whole_file.shape[0])

    @property
    def worst(self) -> np.ndarray:
        """`[max_rank + 1]` largest per-layer error at each rank."""
        return self.per_layer.max(axis=0) if len(self.layer_names) else np.zeros_like(self.whole_file)

    @property
    def median(self) -> np.ndarray:
        """`[max_rank + 1]` median per-layer error at each rank."""
        return np.median(self.per_layer, axis=0) if len(self.layer_names) else np.zeros_like(self.whole_file)

    def worst_layer(self, rank: int) -> str | None:
        """Name of the layer with the largest error at `rank`; None when no layer loses anything there."""
        if not len(self.layer_names) or self.per_layer[:, rank].max() <= 0:
            return None
        return self.layer_names[int(np.argmax(self.per_layer[:, rank]))]


def _lost_energy(singular_values: Sequence[float], max_rank: int) -> np.ndarray:
    """`[max_rank + 1]` squared Frobenius norm left out when keeping the top k singular values, k = 0..max_rank."""
    energies = np.square(np.asarray(singular_values, dtype=np.float64))
    kept = np.concatenate([[0.0], np.cumsum(energies)])
    kept = np.concatenate([kept, np.full(max(0, max_rank + 1 - kept.shape[0]), kept[-1])])[: max_rank + 1]
    return np.maximum(energies.sum() - kept, 0.0)


def svd_error_curves(layers: Sequence[dict], max_rank: int | None = None) -> ErrorCurves:
    """Exact-SVD error curves from report layers (each with `name` and `singular_values`).

    `max_rank` defaults to the largest number of singular values of any layer; ranks above a layer's own
    rank have error 0 (upsampling is exact).
    """
    if max_rank is None:
        max_rank = max((len(layer["singular_values"]) for layer in layers), default=0)
    lost = np.array([_lost_energy(layer["singular_values"], max_rank) for layer in layers]).reshape(
        len(layers), max_rank + 1
    )
    total = lost[:, 0]
    safe_total = np.where(total > 0, total, 1.0)[:, None]
    per_layer = np.sqrt(lost / safe_total)
    file_total = total.sum()
    whole_file = np.sqrt(lost.sum(axis=0) / file_total) if file_total > 0 else np.zeros(max_rank + 1)
    return ErrorCurves(tuple(layer["name"] for layer in layers), per_layer, whole_file)


def smallest_rank(curve: np.ndarray, max_error: float) -> int | None:
    """Smallest rank k >= 1 whose error `curve[k]` is at most `max_error`; None when no rank in the curve does."""
    meeting = np.nonzero(curve[1:] <= max_error + 1e-12)[0]
    return int(meeting[0]) + 1 if meeting.size else None


def energy_error_bound(energy: object) -> float | None:
    """The relative error a layer keeping the share `energy` (0 < energy <= 1) of its squared Frobenius norm has
    at most: `sqrt(1 - energy)` (Eckart-Young: the error of a truncated SVD is the norm of what it leaves out).
    None when `energy` is not a number in (0, 1]."""
    if isinstance(energy, bool) or not isinstance(energy, numbers.Real) or not 0 < energy <= 1:
        return None
    return math.sqrt(1 - energy)


def rule_ranks(report: dict, rule: str, value: float, cap: int) -> list[int]:
    """Each layer's rank under the rank rule `rule` (a `lora_ops.ranks.RANK_RULES` name: energy or one of
    sd-scripts' sv_ratio, sv_cumulative, sv_fro) at `value`, the rule `resize_file` applies, capped at `cap`, in the
    order of `report["layers"]`."""
    return [
        min(cap, RANK_RULES[rule](torch.tensor(layer["singular_values"], dtype=torch.float64), value))
        for layer in report["layers"]
    ]


def energy_ranks(report: dict, energy: float, cap: int) -> list[int]:
    """:func:`rule_ranks` of the energy rule."""
    return rule_ranks(report, "energy", energy, cap)


def _picked_sentence(picked: list[int], rank: int) -> str:
    """``rank k × n layers, …``: the ranks a rule picks, capped at ``rank``."""
    capped = Counter(min(rank, k) for k in picked)
    return ", ".join(f"rank {k} × {n} layer{'s' * (n != 1)}" for k, n in sorted(capped.items()))


def budget_markdown(
    report: dict, rank: int, energy: float | None = None, sd_scripts_rule: tuple[str, float] | None = None
) -> str:
    """What exact SVD keeps at `rank` (worst layer, median, whole file), and with `energy` what that budget means:
    the error bound `sqrt(1 - energy)` it guarantees and the per-layer ranks it picks, capped at `rank`. With
    `sd_scripts_rule` (`(name, value)`, name sv_ratio, sv_cumulative or sv_fro), the per-layer ranks that rule
    picks, capped at `rank`.

    Never raises: a rank outside 1..`MAX_RANK`, an energy outside (0, 1] or a rule value its rule refuses gives a
    one-line plain message.
    """
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 1 <= rank <= MAX_RANK:
        return f"rank must be a whole number between 1 and {MAX_RANK}, got {_shown(rank)}"
    bound = energy_error_bound(energy)
    if energy is not None and bound is None:
        return ENERGY_MESSAGE.format(value=_shown(energy))
    if sd_scripts_rule is not None:
        name, value = sd_scripts_rule
        try:
            ResizeOptions(rank=rank, **{name: value})
        except LoraError as error:
            return escape_markdown(str(error))
    curves = _curves_up_to(report, rank)
    lines = [_rank_sentence(curves, rank, markdown=True)]
    if sd_scripts_rule is not None:
        picked = rule_ranks(report, name, value, MAX_RANK)
        lines.append(f"sd-scripts' {name} {value:g} picks, capped at {rank}: {_picked_sentence(picked, rank)}.")
    if bound is not None:
        picked = energy_ranks(report, energy, MAX_RANK)
        over = sum(k > rank for k in picked)
        lines.append(
            f"Keeping {percent(energy)} of each layer's energy (squared norm) means a relative error of at most"
            f" √(1−E) = √(1−{energy:g}) = **{percent(bound)}** per layer. The ranks it picks, capped at {rank}: "
            + _picked_sentence(picked, rank)
            + "."
        )
        if over:
            lines.append(
                (f"{over} layers need" if over != 1 else "1 layer needs")
                + f" more than rank {rank} for that share: the cap leaves {'them' if over != 1 else 'it'} above"
                f" {percent(bound)} error; every layer meets it from rank {max(picked)}."
            )
    return "\n\n".join(lines)


def output_name(source_name: str, options: ResizeOptions) -> str:
    """File name of a resized LoRA: the source's stem without stale rank/dtype/method parts (`STALE_NAME_PARTS`),
    then the method, how ranks were chosen (rank rule, target size, rank), the strength when not 1 and the output
    dtype when converted: `foo-r16-fp16-svd-rank4.safetensors` resized by SVD to rank 8 in bf16 is
    `foo-svd-rank8-bf16.safetensors`."""
    stem = Path(source_name).stem
    while (stale := _STALE_TAIL.search(stem)) and stale.start() > 0:
        stem = stem[: stale.start()]
    parts = [stem, options.method]
    if options.rank_rule is not None:
        parts.append("{}{:g}".format(*options.rank_rule))
    if options.target_size is not None:
        parts.append(f"{options.target_size / 1e6:g}MB")
    if options.rank is not None:
        parts.append(f"rank{options.rank}")
    if options.strength != 1:
        parts.append(f"strength{options.strength:g}")
    if options.dtype != "keep":
        parts.append(options.dtype)
    return "-".join(parts) + ".safetensors"


def merged_name(sources: Sequence[str | Path], options: ResizeOptions) -> str:
    """File name of a merge of `sources`: `merge-` and the inputs' stems joined by `+` (each cut to
    `MERGED_STEM_CHARACTERS`), then the parts `output_name` adds."""
    stems = "+".join(Path(source).stem[:MERGED_STEM_CHARACTERS] for source in sources)
    return output_name(f"merge-{stems}.safetensors", options)


def compare_methods(
    src: str | Path,
    work_dir: str | Path,
    *,
    rank: int,
    niter: int = 2,
    density: float | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    """Resize `src` to `rank` with every method (outputs written to `work_dir`, then deleted); one row per
    method (`METHOD_TABLE_COLUMNS`): the rank, its worst and median layer error in percent and its time in
    seconds."""
    rows = []
    for done, method in enumerate(METHODS, start=1):
        options = ResizeOptions(rank=rank, method=method, niter=niter, density=density, seed=seed)
        destination = Path(work_dir) / f"compare-{method}.safetensors"
        try:
            report = resize_file(src, destination, options)
        finally:
            destination.unlink(missing_ok=True)
        rows.append(
            (
                method,
                rank,
                _in_percent(report["worst_error"]),
                _in_percent(report["median_error"]),
                _rounded(report["seconds"], 3),
            )
        )
        if progress:
            progress(done, len(METHODS))
    return pd.DataFrame(rows, columns=list(METHOD_TABLE_COLUMNS))


def methods_at_rank(table: pd.DataFrame | None, rank: object) -> pd.DataFrame | None:
    """A `compare_methods` table while it is still for ``rank``; None (cleared) once the rank has changed, so the
    page never shows one rank's numbers beside another. Order-proof: a late check keeps a table made at ``rank``."""
    if table is None or len(table) == 0 or "rank" not in table:
        return None
    return table if all(value == rank for value in table["rank"]) else None


def inspect_markdown(report: dict) -> str:
    """A short Markdown summary of an `inspect_file` report: format, size, ranks and scale. The trainer metadata
    (`metadata_markdown`) and the consumer warnings (`warning_lines`) are shown apart."""
    ranks = ", ".join(f"{rank} ({count} layers)" for rank, count in sorted(report["ranks"].items(), key=_rank_key))
    return "\n".join(
        [
            f"**{escape_markdown(report['file'])}**: {report['flavour']} (`{report['layout']}` layout) for"
            f" {report['family']}, {report['dtype']}, {size(report['bytes'])}",
            f"- {report['modules']} LoRA modules, rank {ranks}; {report['passthrough']} tensors passed through",
            f"- scale from: {escape_markdown(report['scale_source'])}",
            f"- sha256 `{report['sha256']}`",
        ]
    )


def metadata_count(report: dict) -> int:
    """How many trainer metadata entries (safetensors `__metadata__`) an `inspect_file` report holds."""
    return len(report.get("metadata") or {})


def metadata_title(report: dict) -> str:
    """The heading of the trainer-metadata table: "trainer metadata (1 entry)", "(190 entries)"."""
    count = metadata_count(report)
    return f"trainer metadata ({count} {'entry' if count == 1 else 'entries'})"


def metadata_markdown(report: dict) -> str:
    """The trainer metadata of an `inspect_file` report as a Markdown table, keys in natural order, keys and values
    escaped (values clipped to `METADATA_VALUE_LIMIT` characters); "" when the file has none."""
    metadata = report.get("metadata") or {}
    if not metadata:
        return ""
    rows = [
        f"| {table_cell(key)} | {table_cell(metadata[key], METADATA_VALUE_LIMIT)} |"
        for key in sorted(metadata, key=natural_key)
    ]
    return "\n".join(["| trainer metadata | value |", "|---|---|", *rows])


def resize_markdown(report: dict) -> str:
    """A short Markdown summary of a `resize_file` report: ranks, sizes, time, worst and median error, a warning
    for layers with an error above 100 %, and the consumer warnings."""
    rank_in = ", ".join(sorted(report["rank_in"], key=int))
    rank_out = ", ".join(sorted(report["rank_out"], key=int))
    above = [layer for layer in report["layers"] if layer["rel_error"] > 1]
    warnings = [f"- ⚠️ {len(above)} of {len(report['layers'])} layers: {ABOVE_100}"] if above else []
    return (
        f"**{report['method']}**: rank {rank_in} → {rank_out}; {size(report['bytes_in'])} → "
        f"{size(report['bytes_out'])} ({percent(report['bytes_out'] / max(report['bytes_in'], 1))}) in "
        f"{seconds(report['seconds'])}\n\n"
        f"worst layer error **{percent(report['worst_error'])}** ({code_span(report['worst_layer'])}), "
        f"median **{percent(report['median_error'])}**"
        + "".join(f"\n{line}" for line in [*warnings, *warning_lines(report)])
    )


def merge_markdown(report: dict) -> str:
    """A short Markdown summary of a `lora_ops.merge_files` report: the inputs and their weights, then what
    `resize_markdown` says (errors are against the exact weighted sum)."""
    inputs = ", ".join(f"{escape_markdown(entry['file'])} × {entry['weight']:g}" for entry in report["inputs"])
    return f"Merged {inputs}; errors against their exact weighted sum.\n\n{resize_markdown(report)}"


def set_table(result: dict) -> pd.DataFrame:
    """One row per file of a `lora_ops.resize_files` result (`SET_TABLE_COLUMNS`): ranks as "rank (layers)",
    errors in percent (numeric), sizes as text. File names stay raw: show them as plain text (see `layer_table`)."""
    rows = [
        (
            row["file"],
            row["layout"],
            _ranks_text(row["rank_in"]),
            _ranks_text(row["rank_out"]),
            _in_percent(row["worst_error"]),
            _in_percent(row["median_error"]),
            size(row["bytes_in"]),
            size(row["bytes_out"]),
        )
        for row in result["summary"]
    ]
    return pd.DataFrame(rows, columns=list(SET_TABLE_COLUMNS))


def _ranks_text(histogram: dict[str, int]) -> str:
    """`{"8": 20, "4": 2}` -> "4 (2), 8 (20)": each rank and how many layers have it."""
    return ", ".join(f"{rank} ({count})" for rank, count in sorted(histogram.items(), key=_rank_key))


def warning_lines(report: dict) -> list[str]:
    """The report's consumer warnings as Markdown list items (the lines are lora_ops' own text, no file text)."""
    return [f"- ⚠️ {line}" for line in report.get("warnings", [])]


def card_metrics(metrics: dict) -> dict[str, float | str]:
    """The headline numbers of a preview's metrics (`lora_ops.preview.render_comparison`) for a model card:
    overall PSNR and SSIM of resized against original, the share of the LoRA's effect that survived (when a
    base column was rendered) and the render settings."""
    overall = metrics.get("overall", {})
    rows = {
        "PSNR, resized vs original (dB)": overall.get("psnr_db"),
        "SSIM, resized vs original": overall.get("ssim"),
        "share of the LoRA's effect kept": overall.get("effect_survived"),
    }
    settings = ("steps", "width", "height", "guidance_scale", "seed")
    if all(key in metrics for key in settings):
        rows["settings"] = (
            f"{metrics['steps']} steps, {metrics['width']}x{metrics['height']}, "
            f"guidance {metrics['guidance_scale']}, seed {metrics['seed']}"
        )
    return {name: value for name, value in rows.items() if value is not None}


def layer_table(report: dict) -> pd.DataFrame:
    """Per-layer rows of a `resize_file` report (`LAYER_TABLE_COLUMNS`), layers in natural order: errors and kept
    energy in percent, numeric so the table sorts right, and `ABOVE_100` in "note" where the error is above 100 %
    (kept energy is then negative). Layer names stay raw: show them as plain text (gradio's Dataframe does for its
    default datatype "str"), never as Markdown or HTML."""
    rows = [
        (
            layer["name"],
            "×".join(str(size) for size in layer["shape"]),
            int(layer["rank_in"]),
            int(layer["rank_out"]),
            _in_percent(layer["rel_error"]),
            _in_percent(layer["energy_retained"]),
            ABOVE_100 if layer["rel_error"] > 1 else "",
        )
        for layer in sorted(report["layers"], key=lambda layer: natural_key(layer["name"]))
    ]
    return pd.DataFrame(rows, columns=list(LAYER_TABLE_COLUMNS))


def spectra_figure(report: dict, chosen_rank: int, energy: float | None = None, result: dict | None = None) -> Figure:
    """Two panels for a report's layers: normalised singular spectra, and exact-SVD error against rank.

    Layers are coloured by their natural order (first blue, last yellow) and the worst layer at `chosen_rank` is
    drawn in red and named. Marks `chosen_rank` (any rank 1..`MAX_RANK`: one beyond the plotted range, which
    ends at twice the file's largest rank, is drawn at the right edge and says so), with a valid `energy` the
    error bound `sqrt(1 - energy)` and the smallest rank at which every layer meets it, and, when `result` (a
    `resize_file` report) is given, that result's worst and median error at its median output rank. The legend
    sits below both panels, so it never covers a line. Text from the file goes through `page_text.plot_text`.
    """
    layers = sorted(report["layers"], key=lambda layer: natural_key(layer["name"]))
    largest = max((len(layer["singular_values"]) for layer in layers), default=1)
    plot_max = max(largest + max(1, largest // 4), min(chosen_rank, 2 * largest))
    curves = svd_error_curves(layers, max(plot_max, chosen_rank))
    worst_name = curves.worst_layer(min(chosen_rank, curves.ranks[-1]))
    colours = _layer_colours(len(layers))
    figure = Figure(figsize=(11, 5), layout="constrained")
    spectra_axes, error_axes = figure.subplots(1, 2)
    _draw_spectra(spectra_axes, layers, colours, worst_name)
    _draw_error_curves(error_axes, curves, plot_max, colours, worst_name)
    _draw_chosen_rank((spectra_axes, error_axes), chosen_rank)
    bound = energy_error_bound(energy)
    if bound is not None:
        _draw_energy_bound(error_axes, curves, energy, bound, plot_max)
    if result is not None:
        _draw_result(error_axes, result)
    for axes in (spectra_axes, error_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles = [*spectra_axes.get_legend_handles_labels()[0], *error_axes.get_legend_handles_labels()[0]]
    figure.legend(handles=handles, loc="outside lower center", ncols=3, fontsize="small")
    figure.suptitle(plot_text(f"{report.get('file', 'LoRA')}: {len(layers)} layers"), fontsize="medium")
    return figure


def spectra_alt_text(report: dict, chosen_rank: int, energy: float | None = None, result: dict | None = None) -> str:
    """A plain-text description of `spectra_figure(report, chosen_rank, energy, result)` for its image's alt text:
    the file, the numbers at the chosen rank, the energy bound and the result. gradio's `gr.Plot` writes its alt as
    "{value.chart} plot visualising provided data", so the text ends with what the plot shows, ready for that
    suffix."""
    curves = _curves_up_to(report, chosen_rank)
    parts = [f"{report.get('file', 'LoRA')}, {len(report['layers'])} layers. {_rank_sentence(curves, chosen_rank)}"]
    bound = energy_error_bound(energy)
    if bound is not None:
        everyone = smallest_rank(curves.worst, bound)
        parts.append(
            f"Keeping {percent(energy)} of each layer's energy bounds its error by {percent(bound)}"
            + (f", met by every layer from rank {everyone}." if everyone is not None else ".")
        )
    if result is not None:
        parts.append(
            f"The {result['method']} result has worst layer error {percent(result['worst_error'])} and median"
            f" {percent(result['median_error'])}."
        )
    parts.append("Singular spectra and exact-SVD error against rank")
    return " ".join(" ".join(part.splitlines()) for part in parts)


def _rank_sentence(curves: ErrorCurves, rank: int, markdown: bool = False) -> str:
    """Exact SVD's worst-layer, median and whole-file error at `rank`, naming the worst layer."""
    worst_name = curves.worst_layer(rank)
    named = ""
    if worst_name is not None:
        named = f" ({code_span(worst_name)})" if markdown else f" ({worst_name})"
    strong = "**" if markdown else ""
    return (
        f"Exact SVD at rank {rank}: relative error of the worst layer {strong}{percent(curves.worst[rank])}{strong}"
        f"{named}, median {percent(curves.median[rank])}, whole file {percent(curves.whole_file[rank])}."
    )


def _curves_up_to(report: dict, rank: int) -> ErrorCurves:
    """Error curves over every rank of the file's layers, and at least up to `rank`."""
    largest = max((len(layer["singular_values"]) for layer in report["layers"]), default=1)
    return svd_error_curves(report["layers"], max(largest, rank, 1))


def _layer_colours(count: int) -> np.ndarray:
    """`[count, 4]` RGBA colours from matplotlib's viridis along the layers' natural order."""
    return colormaps["viridis"](np.linspace(0.0, 1.0, max(count, 1)))[:count]


def _draw_spectra(axes: Axes, layers: Sequence[dict], colours: np.ndarray, worst_name: str | None) -> None:
    """Each layer's singular values divided by its largest, on a log scale; the worst layer in red, named."""
    segments, segment_colours = [], []
    for layer, colour in zip(layers, colours):
        values = np.asarray(layer["singular_values"], dtype=np.float64)
        if values.size and values[0] > 0:
            positive = values[values > 0] / values[0]
            line = np.column_stack([np.arange(1, positive.size + 1), positive])
            if layer["name"] == worst_name:
                axes.plot(*line.T, color="tab:red", linewidth=2.2, zorder=4, label=_worst_label(worst_name))
            segments.append(line)
            segment_colours.append(colour)
    if segments:
        axes.add_collection(LineCollection(segments, colors=segment_colours, alpha=0.7, linewidths=1.0))
        axes.set_xlim(0.5, max(segment.shape[0] for segment in segments) + 0.5)
        axes.set_ylim(min(segment[:, 1].min() for segment in segments) * 0.5, 1.5)
    axes.set_yscale("log")
    axes.set_title(f"Singular spectra of {len(segments)} layers (colour: first → last layer)", fontsize="medium")
    axes.set_xlabel("index i")
    axes.set_ylabel("σᵢ / σ₁")


def _worst_label(name: str) -> str:
    return plot_text(f"worst layer at the chosen rank: {name}", limit=90)


def _draw_error_curves(
    axes: Axes, curves: ErrorCurves, plot_max: int, colours: np.ndarray, worst_name: str | None
) -> None:
    """Per-layer curves in their layer colours, the worst layer's own curve in red, the worst-layer envelope,
    the median layer and the whole file on top."""
    ranks = curves.ranks[: plot_max + 1]
    segments = [np.column_stack([ranks, layer_curve[: plot_max + 1]]) for layer_curve in curves.per_layer]
    if segments:
        axes.add_collection(LineCollection(segments, colors=colours, alpha=0.45, linewidths=0.9))
    if worst_name is not None:
        own = curves.per_layer[curves.layer_names.index(worst_name), : plot_max + 1]
        axes.plot(ranks, own, color="tab:red", linewidth=2.2, zorder=4)
    axes.plot(ranks, curves.worst[: plot_max + 1], color="tab:red", linestyle="--", label="worst of all layers")
    axes.plot(ranks, curves.median[: plot_max + 1], color="tab:orange", linewidth=2, label="median layer")
    axes.plot(ranks, curves.whole_file[: plot_max + 1], color="black", linewidth=2, label="whole file")
    axes.set_xlim(0, plot_max + 0.5)
    axes.set_ylim(0, 1.05)
    axes.yaxis.set_major_formatter(PercentFormatter(1.0))
    axes.set_title("Exact SVD: relative error of the delta vs rank", fontsize="medium")
    axes.set_xlabel("rank")
    axes.set_ylabel("relative Frobenius error")


def _draw_chosen_rank(all_axes: Sequence[Axes], chosen_rank: int) -> None:
    """The chosen rank on each panel (named in the legend once, by the last); past a panel's range, dashed at its
    right edge with "rank N →" (every layer is exact there: its rank is below the chosen one)."""
    for index, axes in enumerate(all_axes):
        left, right = axes.get_xlim()
        beyond = chosen_rank > right
        label = f"chosen rank {chosen_rank}" + (" (beyond the plot: every layer exact)" if beyond else "")
        axes.axvline(
            right - 0.01 * (right - left) if beyond else chosen_rank,
            color="tab:blue",
            linewidth=1.8,
            linestyle=(0, (6, 2)) if beyond else "-",
            label=label if index == len(all_axes) - 1 else None,
        )
        if beyond:
            axes.annotate(
                f"rank {chosen_rank} →",
                xy=(0.98, 0.97),
                xycoords="axes fraction",
                ha="right",
                va="top",
                color="tab:blue",
                fontsize="small",
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8},
            )


def _draw_energy_bound(axes: Axes, curves: ErrorCurves, energy: float, bound: float, plot_max: int) -> None:
    """The error bound `bound = sqrt(1 - energy)` and the smallest rank at which every layer meets it."""
    axes.axhline(
        bound,
        color="tab:green",
        linestyle=":",
        linewidth=1.5,
        label=f"keep {percent(energy)} energy: error ≤ √(1−{energy:g}) = {percent(bound)}",
    )
    rank = smallest_rank(curves.worst, bound)
    if rank is not None and rank <= plot_max:
        axes.axvline(
            rank, color="tab:green", linestyle="--", linewidth=1.2, label=f"every layer within it: rank {rank}"
        )


def _draw_result(axes: Axes, result: dict) -> None:
    out_ranks = [layer["rank_out"] for layer in result["layers"]]
    rank = float(np.median(out_ranks)) if out_ranks else 0.0
    label = result["method"]
    axes.set_ylim(0, max(axes.get_ylim()[1], result["worst_error"] * 1.08))
    for statistic, marker, marker_size in (("worst", "x", 70), ("median", "o", 40)):
        axes.scatter(
            [rank],
            [result[f"{statistic}_error"]],
            marker=marker,
            color="tab:purple",
            s=marker_size,
            zorder=5,
            label=f"{label} result, {statistic} layer",
        )


def _shown(value: object) -> str:
    """A value a visitor typed, for a one-line message: numbers as written, anything else quoted and escaped."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return f"{value:g}"
    return escape_markdown(repr(value))


def _in_percent(fraction: float) -> float:
    """A fraction as a percentage rounded for tables people read (6 significant digits)."""
    return _rounded(100 * fraction)


def _rounded(value: float, digits: int = 6) -> float:
    """`value` to `digits` significant digits, for tables people read."""
    return float(f"{value:.{digits}g}")


def _rank_key(item: tuple[str, int]) -> int:
    return int(item[0])
