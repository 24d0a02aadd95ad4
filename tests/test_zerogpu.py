"""The preview through the `spaces` package's own ZeroGPU code: duration arithmetic and the worker's result path.

`spaces.GPU` returns the function unchanged off ZeroGPU, so these tests build the real ZeroGPU wrapper
(`spaces.zero.wrappers.regular_function_wrapper`) around the preview's GPU function. Only the GPU allocation is
stubbed: the device API's `schedule` and `release` (HTTP calls to ZeroGPU's scheduler) answer at once and the
worker skips its CUDA initialisation. The forked worker, its queues, the pickling of arguments and results and
the way the parent turns a worker's result or exception into what the visitor sees are `spaces`' own.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import sys
from collections.abc import Iterator
from datetime import timedelta
from importlib.resources import files
from pathlib import Path
from types import ModuleType

import gradio as gr
import pytest
from spaces.zero import client as zero_client
from spaces.zero import config as zero_config
from spaces.zero.api import ScheduleResponse

from lora_ops import LoraError, preview


def _import_wrappers() -> ModuleType:
    """`spaces.zero.wrappers`, importable without a CUDA build of torch: its `spaces.zero.torch` (ZeroGPU's CUDA
    patches, which read CUDA-only attributes of torch when imported) is left out; the wrapper calls it only in the
    worker's CUDA initialisation, which the `zerogpu` fixture stubs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "spaces.zero.torch", ModuleType("spaces.zero.torch"))
        patch.delitem(sys.modules, "spaces.zero.wrappers", raising=False)
        return importlib.import_module("spaces.zero.wrappers")


wrappers = _import_wrappers()

PROMPTS = ("How2Draw a cat",)
SETTINGS = {"seed": 0, "steps": 1, "width": 32, "height": 32, "guidance_scale": 3.5, "max_sequence_length": 16}


def _zerogpu_configs() -> list[dict]:
    return json.loads(files("spaces.zero").joinpath(zero_config.CONFIGS_FILENAME).read_text())


@pytest.fixture
def zerogpu_gpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`spaces`' config reads the GPU model of ZeroGPU's current hardware (the largest `duration_factor`)."""
    current = max(_zerogpu_configs(), key=lambda config: config["duration_factor"])
    zero_config.get_config.cache_clear()
    monkeypatch.setattr(zero_config, "_read_gpu_information", lambda: f"Model: \t {current['model']}\n")
    yield
    zero_config.get_config.cache_clear()


@pytest.fixture
def zerogpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[timedelta | None]]:
    """ZeroGPU with the allocation stubbed; yields the durations the wrapper asked the scheduler for."""
    scheduled: list[timedelta | None] = []

    def schedule(task_id: int, request=None, duration=None, gpu_size=None, **kwargs) -> ScheduleResponse:
        scheduled.append(duration)
        return ScheduleResponse(idle=False, nvidiaIndex=0, nvidiaUUID="GPU-test", allowToken="allow-token")

    monkeypatch.setattr(zero_client, "schedule", schedule)
    monkeypatch.setattr(zero_client, "release", lambda allow_token, **kwargs: None)
    monkeypatch.setattr(wrappers, "worker_init", lambda **kwargs: None)  # CUDA init and weight transfer
    before = set(multiprocessing.active_children())
    yield scheduled
    for worker in set(multiprocessing.active_children()) - before:
        worker.terminate()
        worker.join(timeout=10)


def _on_zerogpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route the preview's GPU function through `spaces`' ZeroGPU wrapper, as `spaces.GPU` does on ZeroGPU."""
    wrapped = wrappers.regular_function_wrapper(preview.render_on_gpu, preview.gpu_duration, None)
    monkeypatch.setattr(preview, "render_on_gpu", wrapped)


def test_the_duration_factor_is_spaces_own(zerogpu_gpu: None) -> None:
    """What the preview says it requests is what `spaces`' client asks ZeroGPU's scheduler for."""
    assert max(config["duration_factor"] for config in _zerogpu_configs()) == preview.ZEROGPU_DURATION_FACTOR
    for images, steps, side in ((4, 20, 512), (6, 20, 512), (1, 1, 32), (8, 20, 1024), (5, 28, 768)):
        request = preview.gpu_request(images, steps, side, side)
        scheduled = zero_client.get_duration_seconds(timedelta(seconds=request.estimated), None)
        assert request.requested == round(scheduled)  # `schedule` sends round(duration_seconds)


def test_a_lora_error_reaches_the_visitor_whole_through_zerogpu(
    zerogpu: list, tiny_flux_lora_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A LoraError met inside the GPU function reads the same on ZeroGPU as locally."""
    preview.CACHE.clear()
    monkeypatch.setenv(preview.BASE_MODEL_ENV, str(tmp_path / "no-such-pipeline"))

    with pytest.raises(LoraError) as local:
        preview.render_comparison(tiny_flux_lora_file, tiny_flux_lora_file, PROMPTS, **SETTINGS)
    _on_zerogpu(monkeypatch)
    with pytest.raises(LoraError) as on_zerogpu:
        preview.render_comparison(tiny_flux_lora_file, tiny_flux_lora_file, PROMPTS, **SETTINGS)

    assert str(on_zerogpu.value) == str(local.value)
    assert f"base model {tmp_path / 'no-such-pipeline'}" in str(local.value)
    job_images, steps, side = 2 * len(PROMPTS), SETTINGS["steps"], SETTINGS["width"]
    assert zerogpu == [timedelta(seconds=preview.estimate_gpu_seconds(job_images, steps, side, side))]


def test_zerogpu_hides_the_message_of_a_raised_lora_error(zerogpu: list) -> None:
    """Why the GPU function returns its errors: raised, a LoraError reaches the visitor as its class name."""

    def raises(job: preview.RenderJob) -> None:
        raise LoraError("out of GPU memory rendering 1536x1536: use a smaller size or fewer prompts")

    job = preview.RenderJob("model", PROMPTS, 0, 1, 32, 32, 3.5, 16, ())
    with pytest.raises(gr.Error) as shown:
        wrappers.regular_function_wrapper(raises, preview.gpu_duration, None)(job)
    assert (shown.value.title, shown.value.message) == ("ZeroGPU worker error", "LoraError")
