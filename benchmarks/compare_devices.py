"""The same resizes computed on the CPU and on CUDA: per method, the largest difference of the reported layer errors.

Usage (from the repository root, on a machine with a GPU): python -m benchmarks.compare_devices FILE.safetensors
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.measure import python_module, run_process

# (label, arguments) of each resize compared
RESIZES = (
    ("exact SVD, rank 4", ("--rank", "4")),
    ("randomized SVD, rank 4", ("--rank", "4", "--method", "randomized_svd")),
    ("Gaussian random projection, rank 4", ("--rank", "4", "--method", "random_projection")),
    ("sparse random projection, rank 4", ("--rank", "4", "--method", "sparse_random_projection")),
    ("orthogonal upsampling, rank 64", ("--rank", "64")),
)


def main() -> None:
    parser = argparse.ArgumentParser(description="Compare CPU and CUDA resizes of one LoRA file.")
    parser.add_argument("file")
    args = parser.parse_args()
    print("| resize | seconds, cpu | seconds, cuda | largest difference of a layer's error |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        for label, arguments in RESIZES:
            errors, seconds = {}, {}
            for device in ("cpu", "cuda"):
                report = Path(folder) / f"{device}.json"
                output = str(Path(folder) / f"{device}.safetensors")
                command = python_module(
                    "lora_ops",
                    "resize",
                    args.file,
                    "-o",
                    output,
                    *arguments,
                    "--device",
                    device,
                    "--report",
                    str(report),
                )
                seconds[device] = run_process(command).seconds
                errors[device] = [layer["rel_error"] for layer in json.loads(report.read_text())["layers"]]
            difference = max(abs(a - b) for a, b in zip(errors["cpu"], errors["cuda"]))
            print(f"| {label} | {seconds['cpu']:.2f} | {seconds['cuda']:.2f} | {difference:.2g} |")


if __name__ == "__main__":
    main()
