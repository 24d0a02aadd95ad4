"""Views of lora_ops reports for the Space: exact-SVD error curves, rank budgets, figures and tables.

Everything here is a pure function of the JSON reports of `inspect_file` and `resize_file`
(`layers[i]["singular_values"]` are the descending singular values of the layer's effective delta
`scale * B @ A`). Errors are relative Frobenius errors of the delta, energies are `1 - error**2`.
Figures are matplotlib `Figure` objects built without pyplot, so concurrent requests share no state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from lora_ops.errors import LoraError
from lora_ops.options import METHODS, ResizeOptions
from lora_ops.resize import resize_file

BUDGET_KINDS = ("error", "energy")
RANK_SLIDER_CAP = 512

METHOD_TABLE_COLUMNS = ("method", "worst error", "median error", "seconds")
LAYER_TABLE_COLUMNS = (
    "layer",
    "shape",
    "rank in",
    "rank out",
    "rel. error",
    "energy kept",
)


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


def error_budget(value: float, kind: str = "error") -> float:
    """The relative-error bound a budget means: `kind="error"` is the bound itself, `"energy"` keeps at least
    `value` of the squared Frobenius norm, i.e. error <= sqrt(1 - value)."""
    if kind not in BUDGET_KINDS:
        raise LoraError(f"budget kind must be one of {', '.join(BUDGET_KINDS)}, not {kind!r}")
    if not 0.0 <= value <= 1.0:
        raise LoraError(f"the {kind} budget must be between 0 and 1, got {value}")
    return value if kind == "error" else float(np.sqrt(1.0 - value))


def smallest_rank(curve: np.ndarray, max_error: float) -> int | None:
    """Smallest rank k >= 1 whose error `curve[k]` is at most `max_error`; None when no rank in the curve does."""
    meeting = np.nonzero(curve[1:] <= max_error + 1e-12)[0]
    return int(meeting[0]) + 1 if meeting.size else None


def rank_slider_maximum(report: dict, floor: int = 64, cap: int = RANK_SLIDER_CAP) -> int:
    """A rank slider's upper end for an inspected file: twice its largest rank (room to upsample), at least
    `floor`, at most `cap` and never above the widest layer's smaller dimension."""
    largest_rank = max((int(rank) for rank in report.get("ranks", {})), default=0)
    widest = max((min(layer["shape"][:2]) for layer in report.get("layers", [])), default=cap)
    return max(1, min(cap, widest, max(floor, 2 * largest_rank)))


def budget_markdown(report: dict, rank: int, max_error: float) -> str:
    """What exact SVD keeps at `rank`, and the smallest ranks that keep every layer (and the whole file) within
    `max_error` (0-1; exact SVD at a layer's own rank loses nothing, so both exist)."""
    curves = _curves_up_to(report, rank)
    return (
        f"Exact SVD at rank {rank}: worst layer {curves.worst[rank]:.2%}, median {curves.median[rank]:.2%}, "
        f"whole file {curves.whole_file[rank]:.2%}. Smallest rank with every layer within {max_error:.1%} error: "
        f"**{smallest_rank(curves.worst, max_error)}** (whole file: {smallest_rank(curves.whole_file, max_error)})."
    )


def output_name(source_name: str, options: ResizeOptions) -> str:
    """File name of a resized LoRA: the source's stem, the method and how ranks were chosen."""
    parts = [Path(source_name).stem, options.method]
    if options.energy is not None:
        parts.append(f"energy{options.energy:g}")
    if options.target_size is not None:
        parts.append(f"{options.target_size / 1e6:.0f}MB")
    if options.rank is not None:
        parts.append(f"rank{options.rank}")
    return "-".join(parts) + ".safetensors"


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
    method with its worst and median layer error and its time in seconds."""
    rows = []
    for done, method in enumerate(METHODS, start=1):
        options = ResizeOptions(rank=rank, method=method, niter=niter, density=density, seed=seed)
        destination = Path(work_dir) / f"compare-{method}.safetensors"
        try:
            report = resize_file(src, destination, options)
        finally:
            destination.unlink(missing_ok=True)
        rows.append(
            (method, _rounded(report["worst_error"]), _rounded(report["median_error"]), round(report["seconds"], 2))
        )
        if progress:
            progress(done, len(METHODS))
    return pd.DataFrame(rows, columns=list(METHOD_TABLE_COLUMNS))


def inspect_markdown(report: dict) -> str:
    """A short Markdown summary of an `inspect_file` report: format, size, ranks, scale and trainer metadata."""
    ranks = ", ".join(f"{rank} ({count} layers)" for rank, count in sorted(report["ranks"].items(), key=_rank_key))
    lines = [
        f"**{report['file']}**: {report['flavour']} (`{report['layout']}` layout) for {report['family']},"
        f" {report['dtype']}, {_megabytes(report['bytes'])}",
        f"- {report['modules']} LoRA modules, rank {ranks}; {report['passthrough']} tensors passed through",
        f"- scale from: {report['scale_source']}",
        f"- sha256 `{report['sha256']}`",
        *warning_lines(report),
    ]
    metadata = report.get("metadata") or {}
    if metadata:
        lines.append("\n| trainer metadata | value |\n|---|---|")
        lines += [f"| `{key}` | {_clip(value)} |" for key, value in sorted(metadata.items())]
    return "\n".join(lines)


def resize_markdown(report: dict) -> str:
    """A short Markdown summary of a `resize_file` report: ranks, sizes, worst and median error."""
    rank_in = ", ".join(sorted(report["rank_in"], key=int))
    rank_out = ", ".join(sorted(report["rank_out"], key=int))
    return (
        f"**{report['method']}**: rank {rank_in} → {rank_out}; "
        f"{_megabytes(report['bytes_in'])} → {_megabytes(report['bytes_out'])} "
        f"({report['bytes_out'] / max(report['bytes_in'], 1):.0%}) in {report['seconds']:.1f} s\n\n"
        f"worst layer error **{report['worst_error']:.2%}** (`{report['worst_layer']}`), "
        f"median **{report['median_error']:.2%}**" + "".join(f"\n{line}" for line in warning_lines(report))
    )


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
    """Per-layer rows of a `resize_file` report (numbers kept numeric so the table sorts right)."""
    rows = [
        (
            layer["name"],
            "×".join(str(size) for size in layer["shape"]),
            int(layer["rank_in"]),
            int(layer["rank_out"]),
            _rounded(layer["rel_error"]),
            _rounded(layer["energy_retained"]),
        )
        for layer in report["layers"]
    ]
    return pd.DataFrame(rows, columns=list(LAYER_TABLE_COLUMNS))


def spectra_figure(
    report: dict,
    chosen_rank: int | None = None,
    max_error: float | None = None,
    result: dict | None = None,
) -> Figure:
    """Two panels for a report's layers: normalised singular spectra, and exact-SVD error against rank.

    Marks `chosen_rank`, the budget `max_error` with the smallest rank meeting it (worst layer), and, when
    `result` (a `resize_file` report) is given, that result's worst and median error at its output rank.
    """
    layers = report["layers"]
    curves = _curves_up_to(report, chosen_rank or 0)
    figure = Figure(figsize=(11, 4), layout="constrained")
    spectra_axes, error_axes = figure.subplots(1, 2)
    _draw_spectra(spectra_axes, layers)
    _draw_error_curves(error_axes, curves)
    for axes in (spectra_axes, error_axes):
        if chosen_rank:
            axes.axvline(chosen_rank, color="tab:blue", linewidth=1.5, label=f"chosen rank {chosen_rank}")
    if max_error is not None:
        _draw_budget(error_axes, curves, max_error)
    if result is not None:
        _draw_result(error_axes, result)
    error_axes.legend(loc="upper right", fontsize="small")
    return figure


def _curves_up_to(report: dict, rank: int) -> ErrorCurves:
    """Error curves over every rank of the file's layers, and at least up to `rank`."""
    largest = max((len(layer["singular_values"]) for layer in report["layers"]), default=1)
    return svd_error_curves(report["layers"], max(largest, rank, 1))


def _draw_spectra(axes, layers: Sequence[dict]) -> None:
    """Each layer's singular values divided by its largest, on a log scale."""
    segments = []
    for layer in layers:
        values = np.asarray(layer["singular_values"], dtype=np.float64)
        if values.size and values[0] > 0:
            positive = values[values > 0] / values[0]
            segments.append(np.column_stack([np.arange(1, positive.size + 1), positive]))
    if segments:
        axes.add_collection(LineCollection(segments, colors="tab:gray", alpha=0.25, linewidths=0.8))
        axes.set_xlim(0.5, max(segment.shape[0] for segment in segments) + 0.5)
        axes.set_ylim(min(segment[:, 1].min() for segment in segments) * 0.5, 1.5)
    axes.set_yscale("log")
    axes.set_title(f"Singular spectra ({len(segments)} layers)")
    axes.set_xlabel("index i")
    axes.set_ylabel("σᵢ / σ₁")


def _draw_error_curves(axes, curves: ErrorCurves) -> None:
    """Per-layer curves in grey, the worst and median layer and the whole file on top."""
    ranks = curves.ranks
    segments = [np.column_stack([ranks, layer_curve]) for layer_curve in curves.per_layer]
    if segments:
        axes.add_collection(LineCollection(segments, colors="tab:gray", alpha=0.2, linewidths=0.8))
    axes.plot(ranks, curves.worst, color="tab:red", label="worst layer")
    axes.plot(ranks, curves.median, color="tab:orange", label="median layer")
    axes.plot(ranks, curves.whole_file, color="black", linewidth=2, label="whole file")
    axes.set_xlim(0, ranks[-1] + 0.5)
    axes.set_ylim(0, 1.05)
    axes.yaxis.set_major_formatter(PercentFormatter(1.0))
    axes.set_title("Exact SVD: relative error of the delta vs rank")
    axes.set_xlabel("rank")
    axes.set_ylabel("relative Frobenius error")


def _draw_budget(axes, curves: ErrorCurves, max_error: float) -> None:
    axes.axhline(max_error, color="tab:green", linestyle=":", linewidth=1.2, label=f"budget {max_error:.1%}")
    rank = smallest_rank(curves.worst, max_error)
    if rank is not None:
        axes.axvline(rank, color="tab:green", linestyle="--", linewidth=1.2, label=f"smallest rank meeting it: {rank}")


def _draw_result(axes, result: dict) -> None:
    out_ranks = [layer["rank_out"] for layer in result["layers"]]
    rank = float(np.median(out_ranks)) if out_ranks else 0.0
    label = result["method"]
    axes.set_ylim(0, max(axes.get_ylim()[1], result["worst_error"] * 1.08))
    for statistic, marker, size in (("worst", "x", 70), ("median", "o", 40)):
        axes.scatter(
            [rank],
            [result[f"{statistic}_error"]],
            marker=marker,
            color="tab:purple",
            s=size,
            zorder=5,
            label=f"{label} {statistic}",
        )


def _rounded(value: float, digits: int = 6) -> float:
    """`value` to `digits` significant digits, for tables people read."""
    return float(f"{value:.{digits}g}")


def _rank_key(item: tuple[str, int]) -> int:
    return int(item[0])


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.2f} MB"


def _clip(value: object, limit: int = 120) -> str:
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"
