"""Interleaved rounds of the merge benchmark's processes, to compare checkouts of lora_ops on a machine whose speed
drifts from minute to minute (a shared 2-core machine's does, by more than most changes gain).

Per round: the I/O floor of :mod:`benchmarks.merge` (``python -m benchmarks.merge --floor``), then, from each
checkout given, ``python -m lora_ops merge A:0.8 B:0.5 -o OUT --rank 32`` on that benchmark's two inputs, run in the
checkout's folder so that its own ``lora_ops`` is imported. Prints, per process, the median wall-clock seconds, the
ratio of that to the floor's median and the median CPU seconds (all threads), then every round's seconds.

Usage (from the repository root): python -m benchmarks.merge_rounds [--rounds 6] [CHECKOUT ...] (default: this one)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from benchmarks.make_synthetic_flux import DATA_DIR
from benchmarks.measure import Run, python_module, run_process
from benchmarks.merge import RANK, WEIGHTS, benchmark_inputs

FLOOR = "I/O floor"


def rounds(checkouts: list[Path], count: int, scratch: Path) -> dict[str, list[Run]]:
    """``count`` rounds of the floor and each checkout's merge, as runs by label (the floor, then each checkout)."""
    inputs = [path.resolve() for path in benchmark_inputs(DATA_DIR)]
    output = scratch / "merged.safetensors"
    merge = python_module("lora_ops", "merge", *(f"{p}:{w}" for p, w in zip(inputs, WEIGHTS)), "-o", str(output))
    floor = python_module("benchmarks.merge", "--floor", *map(str, inputs), str(output), "--rank", str(RANK))
    runs: dict[str, list[Run]] = {FLOOR: [], **{str(checkout): [] for checkout in checkouts}}
    for _ in range(count):
        runs[FLOOR].append(run_process(floor))
        output.unlink()
        for checkout in checkouts:
            runs[str(checkout)].append(run_process([*merge, "--rank", str(RANK)], cwd=checkout))
            output.unlink()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description="Interleaved rounds of the merge's I/O floor and merges.")
    parser.add_argument("checkouts", nargs="*", type=Path, default=[Path.cwd()], help="folders holding lora_ops/")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        runs = rounds([checkout.resolve() for checkout in args.checkouts], args.rounds, Path(scratch))
    floor = statistics.median(run.seconds for run in runs[FLOOR])
    for label, measured in runs.items():
        seconds = statistics.median(run.seconds for run in measured)
        cpu = statistics.median(run.cpu_seconds for run in measured)
        every = ", ".join(f"{run.seconds:.2f}" for run in measured)
        print(f"{label}: {seconds:.2f} s, {seconds / floor:.2f}x the floor, {cpu:.1f} CPU s ({every})")


if __name__ == "__main__":
    main()
