"""Time a whole process and sample its anonymous memory.

Own memory of a process = peak ``RssAnon`` (resident anonymous memory: heap and tensors, not the mapped input
file, not shared libraries) read from ``/proc/PID/status`` every ``SAMPLE_SECONDS``, minus the peak of a
process that only imports what the benchmarked processes import (``BASELINE_IMPORTS``).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SAMPLE_SECONDS = 0.005
BASELINE_IMPORTS = "import torch, safetensors.torch, lora_ops.cli, lora_ops.synthetic"


@dataclass(frozen=True)
class Run:
    """One process: wall seconds from start to exit, CPU seconds (user + system, all threads) and peak resident
    anonymous memory in bytes."""

    seconds: float
    peak_anon: int
    cpu_seconds: float


def _rss_anon(pid: int) -> int | None:
    """``RssAnon`` of ``pid`` in bytes, or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def run_process(command: list[str], cwd: Path | None = None) -> Run:
    """Run ``command`` to completion (in ``cwd``, else here), its output to a temporary file; raise with that output
    if it fails.

    The page cache's dirty data is flushed first (``os.sync``, untimed): the kernel writes a file back after its
    writer has exited, so a run would otherwise share the disk with the write-back of the run before it."""
    os.sync()
    with tempfile.TemporaryFile(mode="w+") as output:
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, stdout=output, stderr=subprocess.STDOUT)
        peak = 0
        while process.poll() is None:
            peak = max(peak, _rss_anon(process.pid) or 0)
            time.sleep(SAMPLE_SECONDS)
        seconds = time.perf_counter() - started
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if process.returncode:
            output.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}): {output.read()[-2000:]}")
    cpu_seconds = sum(getattr(children_after, f) - getattr(children_before, f) for f in ("ru_utime", "ru_stime"))
    return Run(seconds, peak, cpu_seconds)


def python_module(module: str, *args: str) -> list[str]:
    """The command line running ``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def baseline_anon(repeats: int) -> int:
    """Median peak ``RssAnon`` in bytes of a process that only imports ``BASELINE_IMPORTS``."""
    runs = [run_process([sys.executable, "-c", BASELINE_IMPORTS]) for _ in range(repeats)]
    return int(statistics.median(run.peak_anon for run in runs))


def emit_json(report: object, path: Path | None) -> None:
    """A sampling script's report as indented JSON: written to ``path`` (its ``--json``), else printed."""
    text = json.dumps(report, indent=1)
    if path:
        path.write_text(text)
    else:
        print(text)
