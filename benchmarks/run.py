"""Regenerate the benchmark tables: every contender on every workload, on this machine, in one run.

Whole processes are timed: ``python -m lora_ops resize IN -o OUT --rank R --method ...`` against the I/O floor
(``benchmarks/io_floor.py`` writing the same output size), medians over ``--repeats`` runs taken round-robin so
that load from other processes spreads over all contenders. The dense re-implementations
(``benchmarks/dense_reference.py``) are timed per layer on a sample of each layer shape and extrapolated to
the whole file. Errors are each layer's relative Frobenius error of the delta: from ``--report`` for our
methods, computed independently for the dense ones. Own memory is defined in ``benchmarks/measure.py``.

Writes ``benchmarks/results/results.json`` (every run) and ``benchmarks/results/table.md`` (the README tables).

Usage (from the repository root): python -m benchmarks.run [--repeats 3] [--workloads NAME ...] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks.make_synthetic_flux import SYNTHETIC_FILES
from benchmarks.measure import BASELINE_IMPORTS, Run, baseline_anon, python_module, run_process

RESULTS_DIR = Path(__file__).with_name("results")
REAL_FLUX = Path(__file__).resolve().parents[2] / "shared" / "real-loras" / "flux-aitoolkit-r16-fp16.safetensors"
MB = 1e6


@dataclass(frozen=True)
class Contender:
    """One of our methods at one output rank: the extra ``python -m lora_ops resize`` arguments."""

    label: str
    rank: int
    arguments: tuple[str, ...]


OURS = (
    Contender("exact SVD", 4, ("--method", "svd")),
    Contender("exact SVD", 16, ("--method", "svd")),
    Contender("exact SVD", 32, ("--method", "svd")),
    Contender("orthogonal upsampling", 64, ("--method", "svd")),
    Contender("randomized SVD, niter 1", 4, ("--method", "randomized_svd", "--niter", "1")),
    Contender("randomized SVD, niter 2", 4, ("--method", "randomized_svd", "--niter", "2")),
    Contender("randomized SVD, niter 5", 4, ("--method", "randomized_svd", "--niter", "5")),
    Contender("Gaussian random projection", 4, ("--method", "random_projection")),
    Contender("sparse random projection", 4, ("--method", "sparse_random_projection")),
)
# dense method (benchmarks/dense_reference.py) -> label
DENSE = {
    "full_svd": "dense delta + full SVD (reference scripts)",
    "svd_lowrank": "dense delta + svd_lowrank (sd-scripts)",
}
DENSE_RANK = 4


@dataclass(frozen=True)
class Workload:
    """A file to resize: which of our output ranks to run and how many layers per shape the dense methods sample."""

    title: str
    ranks: tuple[int, ...]
    dense_samples: dict[str, int] = field(default_factory=dict)
    only: tuple[str, ...] = ()  # contender labels to run; empty: all


WORKLOADS = {
    "flux-r42-bf16": Workload(
        "Synthetic FLUX.1 LoRA: 494 layers, rank 42, bf16", (4, 16, 32, 64), {"full_svd": 1, "svd_lowrank": 2}
    ),
    "flux-r128-bf16": Workload(
        "Synthetic FLUX.1 LoRA: 494 layers, rank 128, bf16",
        (4, 16, 32),
        only=("exact SVD", "randomized SVD, niter 2", "Gaussian random projection"),
    ),
    "real-flux-r16-fp16": Workload(
        "Real FLUX.1 LoRA (ai-toolkit, 4 proj_out layers, rank 16, fp16)", (4,), {"full_svd": 1, "svd_lowrank": 4}
    ),
    "proj-out-r16-fp16": Workload(
        "Synthetic stand-in for the real FLUX LoRA (4 proj_out layers, rank 16, fp16)",
        (4,),
        {"full_svd": 1, "svd_lowrank": 4},
    ),
}


@dataclass
class Row:
    """One table row: timings in seconds, own memory in bytes, relative errors (median and worst over layers)."""

    workload: str
    contender: str
    rank: int
    seconds: list[float]
    cpu_seconds: list[float]
    own_memory: int
    median_error: float
    worst_error: float
    optimum_error: float | None = None
    extrapolated: bool = False
    sampled_layers: int = 0
    layers: int = 0


def _workload_path(name: str, data_dir: Path) -> Path:
    """The input file of a workload: the real file from ../shared, else a synthetic file written now (in a
    separate process, so that this one stays small)."""
    if name == "real-flux-r16-fp16":
        return REAL_FLUX
    run_process(python_module("benchmarks.make_synthetic_flux", name, "--out-dir", str(data_dir)))
    return SYNTHETIC_FILES[name].path(name, data_dir)


def _own(run: Run, baseline: int) -> int:
    return max(run.peak_anon - baseline, 0)


def bench_workload(
    name: str, source: Path, repeats: int, baseline: int, scratch: Path, device: str
) -> tuple[list[Row], dict]:
    """All rows of one workload (our methods computing on ``device``), plus the I/O floor's runs per output rank."""
    workload = WORKLOADS[name]
    contenders = [c for c in OURS if c.rank in workload.ranks and (c.label in workload.only or not workload.only)]
    output = scratch / "out.safetensors"
    floor_runs: dict[int, list[Run]] = {rank: [] for rank in workload.ranks}
    our_runs: dict[Contender, list[Run]] = {c: [] for c in contenders}
    reports: dict[Contender, dict] = {}
    for _ in range(repeats):
        for rank in workload.ranks:
            command = python_module("benchmarks.io_floor", str(source), str(output), "--rank", str(rank))
            floor_runs[rank].append(run_process(command))
            output.unlink()
        for contender in contenders:
            report_path = scratch / "report.json"
            command = python_module(
                "lora_ops", "resize", str(source), "-o", str(output), "--rank", str(contender.rank),
                *contender.arguments, "--device", device, "--report", str(report_path),
            )  # fmt: skip
            our_runs[contender].append(run_process(command))
            reports[contender] = json.loads(report_path.read_text())
            output.unlink()
    optimum = {c.rank: reports[c] for c in contenders if c.label == "exact SVD"}
    rows = [
        Row(
            name,
            contender.label,
            contender.rank,
            [run.seconds for run in runs],
            [run.cpu_seconds for run in runs],
            int(statistics.median(_own(run, baseline) for run in runs)),
            reports[contender]["median_error"],
            reports[contender]["worst_error"],
            optimum[contender.rank]["median_error"] if contender.rank in optimum else None,
        )
        for contender, runs in our_runs.items()
    ]
    floor_seconds = statistics.median(run.seconds for run in floor_runs[DENSE_RANK])
    layer_optimum = {layer["name"]: layer["rel_error"] for layer in optimum[DENSE_RANK]["layers"]}
    for method, samples in workload.dense_samples.items():
        rows.append(_bench_dense(name, source, method, samples, floor_seconds, layer_optimum, baseline, scratch))
    floors = {
        rank: {
            "seconds": [r.seconds for r in runs],
            "cpu_seconds": [r.cpu_seconds for r in runs],
            "own_memory": [_own(r, baseline) for r in runs],
        }
        for rank, runs in floor_runs.items()
    }
    return rows, floors


def _bench_dense(
    name: str,
    source: Path,
    method: str,
    samples: int,
    floor_seconds: float,
    layer_optimum: dict[str, float],
    baseline: int,
    scratch: Path,
) -> Row:
    """Whole-file estimate of a dense method: the I/O floor plus, per layer shape, count x median sampled seconds.

    ``layer_optimum``: our exact SVD's error per module, compared with the dense errors on the same layers."""
    report_path = scratch / "dense.json"
    command = python_module(
        "benchmarks.dense_reference", str(source), "--method", method, "--rank", str(DENSE_RANK),
        "--samples", str(samples), "--json", str(report_path),
    )  # fmt: skip
    run = run_process(command)
    report = json.loads(report_path.read_text())
    shapes = report["shapes"]
    compute = sum(shape["count"] * statistics.median(shape["seconds"]) for shape in shapes)
    errors = [error for shape in shapes for error in shape["errors"]]
    modules = [module for shape in shapes for module in shape["modules"]]
    return Row(
        name,
        DENSE[method],
        DENSE_RANK,
        [floor_seconds + compute],
        [run.cpu_seconds],
        _own(run, baseline),
        statistics.median(errors),
        max(errors),
        statistics.median(layer_optimum[module] for module in modules),
        extrapolated=any(len(shape["seconds"]) < shape["count"] for shape in shapes),
        sampled_layers=len(errors),
        layers=sum(shape["count"] for shape in shapes),
    )


def _proc_value(path: str, prefix: str) -> str:
    """The value after ``prefix:`` on the first matching line of a /proc file."""
    line = next(line for line in Path(path).read_text().splitlines() if line.startswith(prefix))
    return line.split(":", 1)[1].strip()


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = _proc_value("/proc/cpuinfo", "model name")
    memory_kb = int(_proc_value("/proc/meminfo", "MemTotal").split()[0])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kb / 1024**2, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _seconds(row: Row) -> float:
    return statistics.median(row.seconds)


def _cell(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def format_tables(rows: list[Row], floors: dict[str, dict], sources: dict[str, dict], gpu_note: str) -> str:
    """Markdown: one table per workload, with ratios to the I/O floor and to our exact SVD at the same rank.

    ``gpu_note``: the text of a row saying why our methods were not run on a GPU, or empty.
    """
    parts = []
    for name, source in sources.items():
        workload_rows = [row for row in rows if row.workload == name]
        svd = {row.rank: row for row in workload_rows if row.contender == "exact SVD"}
        floor = {rank: statistics.median(f["seconds"]) for rank, f in floors[name].items()}
        parts += [
            f"**{WORKLOADS[name].title}** (`{source['file']}`, {source['bytes'] / MB:,.1f} MB)",
            "",
            "| method | rank | seconds | × I/O floor | × our SVD | own memory (MB) | median error | worst error"
            " | error ÷ optimum |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for rank in sorted(floor):
            parts.append(
                f"| I/O floor (read all, write rank-{rank} size) | {rank} | {floor[rank]:,.2f} | 1.00 | — "
                f"| {statistics.median(floors[name][rank]['own_memory']) / MB:,.0f} | — | — | — |"
            )
        for row in workload_rows:
            reference = svd.get(row.rank) if row.contender != "orthogonal upsampling" else None
            seconds = _seconds(row)
            timing = (
                f"~{seconds:,.0f} †" if row.extrapolated else f"{seconds:,.2f}" + (" †" if row.sampled_layers else "")
            )
            ratio = seconds / _seconds(reference) if reference else None
            error_ratio = row.median_error / row.optimum_error if row.optimum_error else None
            label = row.contender + (f", {row.sampled_layers} of {row.layers} layers timed" if row.layers else "")
            parts.append(
                f"| {label} | {row.rank} | {timing} | {_cell(seconds / floor[row.rank], 2)} "
                f"| {_cell(ratio, 2)} | {row.own_memory / MB:,.0f} | {row.median_error:.3g} | {row.worst_error:.3g} "
                f"| {_cell(error_ratio, 2)} |"
            )
        if gpu_note:
            parts.append(f"| our methods with `--device cuda` | — | {gpu_note} | | | | | | |")
        parts.append("")
    return "\n".join(parts)


def format_footer(results: dict) -> str:
    """Markdown under the tables: the machine, the load it was under, the command and its run time."""
    machine_info = results["machine"]
    load_before, load_after = results["load_average_before"][0], results["load_average_after"][0]
    return "\n".join(
        [
            "† dense rows: the I/O floor plus, for every layer shape, the layer count times the median time of the "
            "timed layers of that shape (dense delta, SVD, truncation); `~` marks an extrapolation. Their errors "
            "are the timed layers' errors.",
            "",
            f"Machine: {machine_info['cpu']}, {machine_info['cores']} cores, {machine_info['memory_gib']} GiB RAM, "
            f"GPU: {machine_info['gpu'] or 'none'}; Python {machine_info['python']}, torch {machine_info['torch']} "
            f"({machine_info['torch_threads']} threads). One-minute load average {load_before:.1f} before and "
            f"{load_after:.1f} after the run. Seconds are medians of {results['repeats']} whole-process runs.",
            "",
            f"Command: `{results['command']}` ({results['total_seconds'] / 60:.1f} minutes).",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Regenerate the benchmark tables.")
    parser.add_argument("--repeats", type=int, default=3, help="runs per process timing (median reported)")
    parser.add_argument("--workloads", nargs="*", metavar="NAME", help=f"a subset of {', '.join(WORKLOADS)}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where our methods compute")
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).with_name("data"))
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    unknown = set(args.workloads or ()) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workload {', '.join(sorted(unknown))}; choose from {', '.join(WORKLOADS)}")
    names = args.workloads or [
        "flux-r42-bf16",
        "flux-r128-bf16",
        "real-flux-r16-fp16" if REAL_FLUX.exists() else "proj-out-r16-fp16",
    ]
    started = time.perf_counter()
    load_before = os.getloadavg()
    baseline = baseline_anon(args.repeats)
    rows: list[Row] = []
    floors: dict[str, dict] = {}
    sources: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            source = _workload_path(name, args.data_dir)
            sources[name] = {"file": source.name, "bytes": source.stat().st_size}
            print(f"{name}: {source}", file=sys.stderr)
            workload_rows, floors[name] = bench_workload(
                name, source, args.repeats, baseline, Path(scratch), args.device
            )
            rows += workload_rows
    total = time.perf_counter() - started
    results = {
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "baseline": {"imports": BASELINE_IMPORTS, "peak_rss_anon": baseline},
        "repeats": args.repeats,
        "total_seconds": total,
        "sources": sources,
        "floors": floors,
        "rows": [asdict(row) for row in rows],
    }
    results["command"] = " ".join(["python -m benchmarks.run", *sys.argv[1:]])
    gpu_note = "" if args.device == "cuda" else "not measured (no GPU on this machine)"
    table = format_tables(rows, floors, sources, gpu_note) + "\n" + format_footer(results)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "results.json").write_text(json.dumps(results, indent=1))
    (args.results / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
