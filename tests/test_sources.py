"""lora_ops.sources against an unreachable Hub: the loopback fake Hub stopped (connections refused) and a server
that accepts connections but never answers. Each read is a one-line `LoraError` within seconds, not after
huggingface_hub's five retries (1 + 2 + 4 + 8 + 8 s), and writes nothing."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants, hf_api
from huggingface_hub.utils import close_session

from lora_ops import LoraError, page_text, sources

REPO = "alice/offline-lora"
FILES = {"lora.safetensors": b"not read: the Hub is gone", "adapter_config.json": b"{}"}
UNREACHABLE = "could not reach the Hub"


def _reads(directory: Path) -> dict[str, Callable[[], object]]:
    return {
        "list": lambda: sources.list_lora_files(REPO),
        "download": lambda: sources.download_lora(REPO, "lora.safetensors", directory / "plain"),
        "download with a size limit": lambda: sources.download_lora(
            REPO, "lora.safetensors", directory / "limited", max_bytes=10**6
        ),
        "PEFT config": lambda: sources.download_peft_config(REPO, "lora.safetensors", directory / "config"),
    }


def _error_and_seconds(read: Callable[[], object], limit: float) -> tuple[str, float]:
    """The `LoraError` message of `read()` and how long it took; fails if `read` has not ended after `limit` s
    (run on a thread, so a read that would hang fails the test instead of stalling it)."""
    outcome: dict[str, object] = {}

    def run() -> None:
        started = time.perf_counter()
        try:
            outcome["value"] = read()
        except LoraError as exc:
            outcome["error"] = str(exc)
        outcome["seconds"] = time.perf_counter() - started

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(limit)
    assert not worker.is_alive(), f"still waiting for the Hub after {limit} s"
    assert "error" in outcome, f"no error: {outcome.get('value')!r}"
    return str(outcome["error"]), float(outcome["seconds"])


def test_a_stopped_hub_is_reported_at_once_by_every_read(hub_online, tmp_path):
    hub_online.add_repo(REPO, files=FILES)
    assert [f.path for f in sources.list_lora_files(REPO)] == ["lora.safetensors"]  # reachable while it runs
    hub_online.stop()
    close_session()  # its open keep-alive connections would still be served
    for name, read in _reads(tmp_path).items():
        message, seconds = _error_and_seconds(read, limit=20)
        assert UNREACHABLE in message and "\n" not in message, (name, message)
        assert seconds < 5, (name, seconds)
    assert not [path for path in tmp_path.rglob("*") if path.is_file()]


@pytest.fixture
def silent_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """huggingface_hub pointed at a socket that accepts connections (the kernel's backlog) but never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_api.api, "endpoint", url)
    monkeypatch.setattr(sources, "HUB_TIMEOUT", 0.5)
    yield url
    server.close()


def test_a_hub_that_never_answers_is_given_up_after_the_timeout(silent_hub, tmp_path):
    for name, read in _reads(tmp_path).items():
        message, seconds = _error_and_seconds(read, limit=15)
        assert UNREACHABLE in message, (name, message)
        assert seconds < 3, (name, seconds)
    assert sources.repo_license(REPO) is None


def test_file_labels_use_the_pages_size_units():
    assert sources.HubFile("a/lora.safetensors", 451_200_000).label == "a/lora.safetensors · 451.2 MB (430.3 MiB)"
    assert sources.HubFile("lora.safetensors", None).label == "lora.safetensors"
    assert page_text.size(451_200_000) in sources.HubFile("x", 451_200_000).label
