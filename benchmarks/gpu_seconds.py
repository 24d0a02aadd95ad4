"""Measure the GPU seconds of a preview, image by image, so that `lora_ops.preview`'s estimate can be replaced.

Run on any CUDA machine that can load a FLUX.1 pipeline (bf16, as the Space does):

    python -m benchmarks.gpu_seconds --model black-forest-labs/FLUX.1-dev --lora some-flux-lora.safetensors \\
        --sizes 512 768 1024 --steps 20 --json gpu-seconds.json

Each image is rendered exactly as a preview renders it (`preview.render_one`, same seeds and settings) after one
warm-up image per size. For every size it reports the seconds of one image split into denoising steps and the rest
(text encoders before the first step, VAE decoder after the last), and the seconds of loading a LoRA file as an
adapter. Then it fits the estimate's constants to the measurements (`SECONDS_PER_IMAGE`, and the per-step
`SECONDS_PER_STEP_MEGAPIXEL` = (linear, quadratic) by least squares over the sizes) and prints, next to each
measured image, what `preview.estimate_gpu_seconds` predicts. ZeroGPU's own costs (moving the weights in, the
`SECONDS_FIXED` part) happen only on ZeroGPU and are not measured here.

Without a GPU it runs on the CPU, which is how the tests check it on their tiny random FLUX pipeline.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import lora_ops
from lora_ops import preview


@dataclass(frozen=True)
class ImageTiming:
    """One image: total seconds, seconds of each denoising step, and the rest (text encoders and VAE decoder)."""

    width: int
    height: int
    steps: int
    seconds: float
    step_seconds: tuple[float, ...]

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 2**20

    @property
    def other_seconds(self) -> float:
        """Everything but the denoising steps: prompt encoding before the first step, VAE decoding after the last."""
        return self.seconds - sum(self.step_seconds)


@dataclass(frozen=True)
class Fit:
    """The estimate's constants fitted to the measurements (see `lora_ops.preview`)."""

    seconds_per_image: float
    seconds_per_step_megapixel: tuple[float, float]


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _StepClock:
    """diffusers' `callback_on_step_end`: the time at the end of every denoising step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, pipe: object, step: int, timestep: torch.Tensor, tensors: dict) -> dict:
        _synchronize()
        self.times.append(time.perf_counter())
        return tensors


def time_image(pipe: object, job: preview.RenderJob, index: int) -> ImageTiming:
    """Render image `index` of `job` as a preview does and time it; the first step's share is its own duration
    less the median step (the prompt encoding runs before it)."""
    clock = _StepClock()
    _synchronize()
    start = time.perf_counter()
    preview.render_one(pipe, job, index, clock)
    _synchronize()
    end = time.perf_counter()
    later_steps = [after - before for before, after in zip(clock.times, clock.times[1:], strict=False)]
    typical = statistics.median(later_steps) if later_steps else clock.times[0] - start
    return ImageTiming(job.width, job.height, job.steps, end - start, (typical, *later_steps))


def time_lora_load(holder: preview.PipelineHolder, pipe: object, lora_path: Path) -> float:
    """Seconds to load a LoRA file into the pipeline as a named adapter and make it the active one."""
    report = lora_ops.inspect_file(lora_path)
    _synchronize()
    start = time.perf_counter()
    holder.activate(pipe, preview.LoraRef(str(lora_path.resolve()), report["sha256"]))
    _synchronize()
    return time.perf_counter() - start


def fit(timings: list[ImageTiming]) -> Fit:
    """Least-squares constants: seconds per step = a * megapixels + b * megapixels**2 (b = 0 with one size)."""
    megapixels = np.array([t.megapixels for t in timings])
    per_step = np.array([statistics.median(t.step_seconds) for t in timings])
    if len(set(megapixels.tolist())) > 1:
        (linear, quadratic), *_ = np.linalg.lstsq(np.stack([megapixels, megapixels**2], axis=1), per_step, rcond=None)
    else:
        linear, quadratic = float(per_step.mean() / megapixels.mean()), 0.0
    return Fit(float(statistics.median(t.other_seconds for t in timings)), (float(linear), float(quadratic)))


def measure(
    model: str,
    prompts: tuple[str, ...],
    sizes: list[int],
    steps: int,
    lora: Path | None = None,
    report: Callable[[str], None] = print,
) -> dict:
    """Load `model` as the preview does, time every prompt at every size, fit the constants; a JSON-ready dict."""
    holder = preview.PipelineHolder()
    start = time.perf_counter()
    pipe = holder.pipeline(model)
    load_seconds = time.perf_counter() - start
    lora_seconds = time_lora_load(holder, pipe, lora) if lora is not None else None
    timings = []
    for side in sizes:
        job = preview.RenderJob(
            model, prompts, 0, steps, side, side, preview.DEFAULT_GUIDANCE, preview.DEFAULT_MAX_SEQUENCE_LENGTH, ()
        )
        time_image(pipe, job, 0)  # warm-up: kernels, caches and allocator settle at this size
        for index in range(len(prompts)):
            timing = time_image(pipe, job, index)
            timings.append(timing)
            report(
                f"{side}x{side}, {steps} steps: {timing.seconds:.2f} s "
                f"({statistics.median(timing.step_seconds):.3f} s/step, {timing.other_seconds:.2f} s other); "
                f"estimated: {preview.image_seconds(steps, side, side):.2f} s"
            )
    fitted = fit(timings)
    default_image = preview.image_seconds(
        preview.DEFAULT_STEPS,
        preview.DEFAULT_SIZE,
        preview.DEFAULT_SIZE,
        fitted.seconds_per_image,
        fitted.seconds_per_step_megapixel,
    )
    default_seconds = preview.SECONDS_FIXED + preview.DEFAULT_REQUEST.images * default_image
    report(
        f"fitted: SECONDS_PER_IMAGE = {fitted.seconds_per_image:.2f}, SECONDS_PER_STEP_MEGAPIXEL = "
        f"({fitted.seconds_per_step_megapixel[0]:.3f}, {fitted.seconds_per_step_megapixel[1]:.3f}); the default "
        f"preview would ask for {math.ceil(default_seconds)} s (× {preview.ZEROGPU_DURATION_FACTOR:g} on ZeroGPU)"
    )
    return {
        "model": model,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "pipeline_load_seconds": load_seconds,
        "lora_load_seconds": lora_seconds,
        "images": [{**asdict(t), "other_seconds": t.other_seconds} for t in timings],
        "fit": asdict(fitted),
        "default_preview_estimated_seconds": math.ceil(default_seconds),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=preview.base_model_name(), help="Hub repo id or local FluxPipeline dir")
    parser.add_argument("--lora", type=Path, help="a FLUX.1 LoRA file, to time loading it as an adapter")
    parser.add_argument("--prompts", nargs="+", default=list(preview.DEFAULT_PROMPTS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 768, 1024], help="square sides, pixels")
    parser.add_argument("--steps", type=int, default=preview.DEFAULT_STEPS)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    result = measure(args.model, tuple(args.prompts), args.sizes, args.steps, args.lora)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
