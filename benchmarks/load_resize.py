"""Load test of the Space's `/resize`: requests per second and latency percentiles under concurrent visitors.

Starts `python app.py` itself on 127.0.0.1 (offline, no GPU, gradio's cache in a temporary folder), so the
queue settings are exactly the app's (`QUEUE_SIZE`, `CPU_CONCURRENCY`). `--clients` visitors (one gradio_client
`Client` each) send `/resize` requests back to back on the same small LoRA until `--requests` have been sent
or `--time-cap` seconds have passed; then the app is stopped. Latency is one request's wall time as a visitor
sees it: upload, queue, resize, download. Nothing leaves the machine.

Usage (from the repository root):
    python -m benchmarks.load_resize [--requests 64] [--clients 8] [--rank 4] [--time-cap 300] [--lora FILE]

Prints a table and one JSON line (the numbers the README quotes).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_LORA = ROOT / "assets" / "example-flux-lora.safetensors"
STARTUP_SECONDS = 180


@dataclass(frozen=True)
class LoadResult:
    """What the run measured; latencies in seconds."""

    requests: int
    failed: int
    clients: int
    rank: int
    lora_bytes: int
    wall_seconds: float
    requests_per_second: float
    p50_seconds: float
    p95_seconds: float
    max_seconds: float
    queue_size: int
    concurrency: int
    cpus: int
    load_average: float
    python: str


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_app(port: int, cache: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_TEMP_DIR": str(cache),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    env.pop("LORA_OPS_BASE_MODEL", None)
    return subprocess.Popen(
        [sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _wait_for(url: str, server: subprocess.Popen):
    from gradio_client import Client

    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        try:
            return Client(url, verbose=False)
        except Exception:
            if server.poll() is not None:
                raise SystemExit(f"app.py exited with status {server.returncode} before serving") from None
            if time.monotonic() > deadline:
                raise SystemExit(f"app.py did not serve {url} within {STARTUP_SECONDS} s") from None
            time.sleep(1)


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile (`share` in (0, 1]) of a non-empty list."""
    ordered = sorted(values)
    return ordered[math.ceil(share * len(ordered)) - 1]


def app_settings(names: tuple[str, ...] = ("QUEUE_SIZE", "CPU_CONCURRENCY")) -> dict[str, int]:
    """The app's queue constants, read from app.py's source (importing it would build the whole app)."""
    tree = ast.parse((ROOT / "app.py").read_text(encoding="utf-8"))
    return {
        target.id: ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name) and target.id in names
    }


def run_load(
    url: str, lora: Path, requests: int, clients: int, rank: int, time_cap: float
) -> tuple[list[float], int, float]:
    """Send `requests` /resize calls from `clients` visitors; (latencies of successes, failures, wall seconds)."""
    from gradio_client import Client, handle_file

    lock = threading.Lock()
    sent, latencies, failures = [0], [], [0]
    started = time.perf_counter()

    def visitor() -> None:
        client = Client(url, verbose=False)
        while True:
            with lock:
                if sent[0] >= requests or time.perf_counter() - started > time_cap:
                    return
                sent[0] += 1
            begin = time.perf_counter()
            try:
                client.predict(lora_file=handle_file(str(lora)), rank=rank, api_name="/resize")
            except Exception as error:  # a refusal (queue full) or a failure: counted, the load goes on
                print(f"request failed: {' '.join(str(error).split())[:200]}", file=sys.stderr)
                with lock:
                    failures[0] += 1
                continue
            with lock:
                latencies.append(time.perf_counter() - begin)

    threads = [threading.Thread(target=visitor, name=f"visitor-{i}") for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, failures[0], time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64, help="requests to send in all (default 64)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent visitors (default 8)")
    parser.add_argument("--rank", type=int, default=4, help="rank asked for (default 4)")
    parser.add_argument("--time-cap", type=float, default=300.0, help="stop sending after this many seconds")
    parser.add_argument("--lora", type=Path, default=EXAMPLE_LORA, help="the LoRA to resize (default: the example)")
    args = parser.parse_args(argv)

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    with tempfile.TemporaryDirectory(prefix="load-resize-") as cache:
        port = _free_port()
        url = f"http://127.0.0.1:{port}/"
        server = _start_app(port, Path(cache))
        try:
            _wait_for(url, server)
            latencies, failed, wall = run_load(url, args.lora, args.requests, args.clients, args.rank, args.time_cap)
        finally:
            server.terminate()
            server.wait(timeout=60)
    if not latencies:
        raise SystemExit(f"no request succeeded ({failed} failed)")

    settings = app_settings()
    result = LoadResult(
        requests=len(latencies) + failed,
        failed=failed,
        clients=args.clients,
        rank=args.rank,
        lora_bytes=args.lora.stat().st_size,
        wall_seconds=round(wall, 2),
        requests_per_second=round(len(latencies) / wall, 2),
        p50_seconds=round(statistics.median(latencies), 3),
        p95_seconds=round(percentile(latencies, 0.95), 3),
        max_seconds=round(max(latencies), 3),
        queue_size=settings["QUEUE_SIZE"],
        concurrency=settings["CPU_CONCURRENCY"],
        cpus=os.cpu_count() or 0,
        load_average=round(os.getloadavg()[0], 2),
        python=platform.python_version(),
    )
    print(
        f"{result.requests} /resize requests ({result.failed} failed) from {result.clients} clients in "
        f"{result.wall_seconds} s: {result.requests_per_second} req/s, p50 {result.p50_seconds} s, "
        f"p95 {result.p95_seconds} s, max {result.max_seconds} s "
        f"(queue {result.queue_size}, concurrency {result.concurrency}, {result.cpus} CPUs, "
        f"load average {result.load_average} at the end)"
    )
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
