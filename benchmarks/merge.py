"""The merge benchmark: two synthetic FLUX.1 LoRAs (rank 42, bf16) merged, ours against sd-scripts' dense method.

Workload: ``flux-r42-bf16`` (``benchmarks.make_synthetic_flux``, seed 0) and the same shapes, rank and spectrum law
drawn with seed 1 (``flux-r42-bf16-seed1``, written here), weights 0.8 and 0.5. Contenders, as whole processes:

- ``python -m lora_ops merge A:0.8 B:0.5 -o OUT --rank 32`` (and without ``--rank``: lossless, rank 84);
- the I/O floor of each (``python -m benchmarks.merge --floor``): a process that imports torch, reads every byte of
  both inputs and writes a file of the merged output's size, doing no linear algebra (``benchmarks.io_floor``);
- sd-scripts' ``networks/svd_merge_lora.py`` method (``benchmarks.dense_merge_reference``), timed per layer on
  ``--dense-samples`` layers of each shape and extrapolated to the file like ``benchmarks.run`` does for the dense
  resizes: the floor plus, per shape, the layer count times the median sampled seconds.

Seconds are medians of ``--repeats`` interleaved runs; own memory and the rest as in ``benchmarks.run``. Errors are
each layer's relative Frobenius error against the exact weighted sum: from ``--report`` for ours, computed
independently for the dense method (clamped as sd-scripts clamps, and before clamping: the optimum). Writes
``merge.json`` and ``merge.md`` into ``--results``.

Usage (from the repository root): python -m benchmarks.merge [--repeats 3] [--dense-samples 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from benchmarks.io_floor import floor_copy
from benchmarks.make_synthetic_flux import DATA_DIR, SYNTHETIC_FILES, write_workload
from benchmarks.measure import Run, baseline_anon, python_module, run_process
from benchmarks.run import RESULTS_DIR, machine
from lora_ops.synthetic import make_lora, save_lora

FIRST = "flux-r42-bf16"
SECOND = "flux-r42-bf16-seed1"
WEIGHTS = (0.8, 0.5)
RANK = 32
MB = 1e6


def write_second(out_dir: Path) -> Path:
    """The second input: ``flux-r42-bf16``'s shapes, rank, dtype and spectrum law, drawn with seed 1."""
    workload = SYNTHETIC_FILES[FIRST]
    path = out_dir / f"{SECOND}.safetensors"
    save_lora(make_lora(workload.shapes, workload.rank, dtype=workload.dtype, seed=1), path)
    return path


def benchmark_inputs(data_dir: Path) -> list[Path]:
    """The two inputs in ``data_dir``, written there first where missing."""
    first = SYNTHETIC_FILES[FIRST].path(FIRST, data_dir)
    if not first.exists():
        write_workload(FIRST, data_dir)
    second = data_dir / f"{SECOND}.safetensors"
    if not second.exists():
        write_second(data_dir)
    return [first, second]


def merge_floor(sources: list[str], destination: str, rank: int) -> None:
    """Read every tensor of every source but the first, then :func:`benchmarks.io_floor.floor_copy` the first (read all,
    write its pairs at ``rank``): the bytes a merge reads and writes, without the linear algebra."""
    buffer = torch.empty(0, dtype=torch.uint8)
    for source in sources[1:]:
        with safe_open(source, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                raw = handle.get_tensor(key).reshape(-1).view(torch.uint8)
                if buffer.numel() < raw.numel():
                    buffer = torch.empty(raw.numel(), dtype=torch.uint8)
                buffer[: raw.numel()].copy_(raw)
    floor_copy(sources[0], destination, rank)


def _own(run: Run, baseline: int) -> int:
    return max(run.peak_anon - baseline, 0)


def _median(runs: list[Run]) -> float:
    return statistics.median(run.seconds for run in runs)


def bench(inputs: list[Path], repeats: int, dense_samples: int, scratch: Path) -> dict:
    """Every run of the benchmark, as a JSON-ready dict."""
    weighted = [f"{path}:{weight}" for path, weight in zip(inputs, WEIGHTS)]
    output, report_path = scratch / "merged.safetensors", scratch / "report.json"
    ranks = {"rank 32": RANK, "lossless": 2 * SYNTHETIC_FILES[FIRST].rank}
    floors: dict[str, list[Run]] = {label: [] for label in ranks}
    ours: dict[str, list[Run]] = {label: [] for label in ranks}
    reports: dict[str, dict] = {}
    baseline = baseline_anon(repeats)
    for _ in range(repeats):
        for label, rank in ranks.items():
            floor = python_module("benchmarks.merge", "--floor", *map(str, inputs), str(output), "--rank", str(rank))
            floors[label].append(run_process(floor))
            output.unlink()
            command = python_module("lora_ops", "merge", *weighted, "-o", str(output), "--report", str(report_path))
            ours[label].append(run_process(command + (["--rank", str(rank)] if label == "rank 32" else [])))
            reports[label] = json.loads(report_path.read_text())
            output.unlink()
    # once, for its errors only: ours writing float32 factors, as sd-scripts does by default
    fp32 = python_module("lora_ops", "merge", *weighted, "-o", str(output), "--rank", str(RANK), "--dtype", "fp32")
    run_process([*fp32, "--report", str(report_path)])
    fp32_report = json.loads(report_path.read_text())
    output.unlink()
    dense_path = scratch / "dense.json"
    dense_command = python_module(
        "benchmarks.dense_merge_reference", *weighted, "--rank", str(RANK), "--samples", str(dense_samples),
        "--json", str(dense_path),
    )  # fmt: skip
    dense_run = run_process(dense_command)
    dense = json.loads(dense_path.read_text())
    return {
        "baseline": baseline,
        "floors": {label: [vars(run) for run in runs] for label, runs in floors.items()},
        "ours": {label: [vars(run) for run in runs] for label, runs in ours.items()},
        "reports": {label: {k: v for k, v in report.items() if k != "layers"} for label, report in reports.items()},
        # ours at rank 32, per layer: the error as written (bf16) and with float32 factors
        "layer_errors": {
            layer["name"]: [layer["rel_error"], fp32["rel_error"]]
            for layer, fp32 in zip(reports["rank 32"]["layers"], fp32_report["layers"])
        },
        "dense": dense,
        "dense_run": vars(dense_run),
    }


def format_table(results: dict) -> str:
    """Markdown: the floors, ours and the dense method, with ratios to the floor and to our seconds. *error ÷ optimum*
    compares each median error on the layers the dense method timed with the Eckart-Young optimum there (the dense
    SVD's error before sd-scripts' clamp)."""
    baseline = results["baseline"]
    floors = {label: [Run(**row) for row in rows] for label, rows in results["floors"].items()}
    ours = {label: [Run(**row) for row in rows] for label, rows in results["ours"].items()}
    shapes, errors = results["dense"]["shapes"], results["layer_errors"]
    sampled = [module for shape in shapes for module in shape["modules"]]
    dense_errors = [error for shape in shapes for error in shape["errors"]]
    optimum = statistics.median(error for shape in shapes for error in shape["optimum"])
    ours_sampled = statistics.median(errors[name][0] for name in sampled)
    dense_seconds = _median(floors["rank 32"]) + sum(
        shape["count"] * statistics.median(shape["seconds"]) for shape in shapes
    )
    lines = [
        f"**Merge of two synthetic FLUX.1 LoRAs** (494 layers each, rank 42, bf16, {results['bytes_in'] / MB:,.1f} MB"
        f" in all; weights {WEIGHTS[0]} and {WEIGHTS[1]})",
        "",
        "| method | rank | seconds | × I/O floor | × ours | own memory (MB) | median error | worst error"
        " | error ÷ optimum |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, runs in ours.items():
        floor, report = floors[label], results["reports"][label]
        rank = ", ".join(report["rank_out"])
        ratio = f"{ours_sampled / optimum:.4f}" if label == "rank 32" else "—"
        lines += [
            f"| I/O floor (read both, write the merged size) | {rank} | {_median(floor):,.2f} | 1.00 | — "
            f"| {statistics.median(_own(run, baseline) for run in floor) / MB:,.0f} | — | — | — |",
            f"| ours: `merge`{' --rank 32' if label == 'rank 32' else ' (lossless)'} | {rank} | {_median(runs):,.2f}"
            f" | {_median(runs) / _median(floor):,.2f} | 1.00 | {statistics.median(_own(run, baseline) for run in runs) / MB:,.0f}"
            f" | {report['median_error']:.3g} | {report['worst_error']:.3g} | {ratio} |",
        ]
    lines += [
        f"| sd-scripts `svd_merge_lora.py` method (dense sum, full SVD, 0.99-quantile clamp), {len(sampled)} of"
        f" {sum(shape['count'] for shape in shapes)} layers timed | {RANK} | ~{dense_seconds:,.0f} †"
        f" | {dense_seconds / _median(floors['rank 32']):,.1f} | {dense_seconds / _median(ours['rank 32']):,.0f}"
        f" | {_own(Run(**results['dense_run']), baseline) / MB:,.0f} | {statistics.median(dense_errors):.3g}"
        f" | {max(dense_errors):.3g} | {statistics.median(dense_errors) / optimum:.4f} |",
        "",
        "† the floor plus, per layer shape, the layer count times the median seconds of its timed layers; its errors "
        f"are those of the timed layers. On those layers the optimum (the dense SVD before the clamp) has median error "
        f"{optimum:.5g}; ours {ours_sampled:.5g} with bf16 factors (worst {max(errors[name][0] for name in sampled):.5g})"
        f" and {statistics.median(errors[name][1] for name in sampled):.5g} with `--dtype fp32`, float32 factors as "
        "sd-scripts writes them.",
        "",
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores; torch {results['machine']['torch']}."
        f" One-minute load average {results['load_average_before'][0]:.1f} before and"
        f" {results['load_average_after'][0]:.1f} after; started {results['started']}. Seconds are medians of"
        f" {results['repeats']} interleaved whole-process runs. Command: `{results['command']}`"
        f" ({results['total_seconds'] / 60:.1f} minutes).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark merging two synthetic FLUX LoRAs.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dense-samples", type=int, default=1, help="layers the dense method times per shape")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--floor", nargs="+", metavar="PATH", help="run the I/O floor: INPUT ... OUTPUT (internal)")
    parser.add_argument("--rank", type=int, default=RANK, help="with --floor: the output rank")
    args = parser.parse_args()
    if args.floor:
        merge_floor(args.floor[:-1], args.floor[-1], args.rank)
        return
    started, started_at = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M %Z")
    load_before = os.getloadavg()
    inputs = benchmark_inputs(args.data_dir)
    with tempfile.TemporaryDirectory() as scratch:
        results = bench(inputs, args.repeats, args.dense_samples, Path(scratch))
    results.update(
        machine=machine(),
        started=started_at,
        load_average_before=load_before,
        load_average_after=os.getloadavg(),
        repeats=args.repeats,
        bytes_in=sum(path.stat().st_size for path in inputs),
        total_seconds=time.perf_counter() - started,
        command=" ".join(["python -m benchmarks.merge", *sys.argv[1:]]),
    )
    table = format_table(results)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "merge.json").write_text(json.dumps(results, indent=1))
    (args.results / "merge.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
