"""Seed-matched FLUX.1 renders of a LoRA before and after resizing, side by side, with image metrics.

The same prompts and seeds go through the base model with the original LoRA and with the resized one (and,
optionally, with no LoRA); the grid shows them in columns and the metrics say how alike they are.

Wiring in a Space (ZeroGPU)::

    import spaces  # first line of app.py: before torch, diffusers or lora_ops can initialise CUDA

    from lora_ops import LoraError, preview

    try:
        preview.load_base_pipeline()  # at module level: ZeroGPU moves the weights in once, at startup
    except LoraError as error:
        preview_unavailable = str(error)  # show it and disable the preview panel

    result = preview.render_comparison(original_path, resized_path, prompts, seed, steps, width, height, 3.5)

Only `render_on_gpu` runs on the GPU: it is wrapped in `spaces.GPU(duration=gpu_duration)`, and on ZeroGPU
it runs in a forked worker. Its arguments and results are plain picklable values (paths, strings, PIL images),
so a `progress` callback must be picklable too: an object holding a `gr.Progress`, not a lambda. A `LoraError`
met there comes back as a value (`GpuFailure`) and `render_images` raises it again in the caller's process, so
its message survives ZeroGPU. Everything else (checking files, the image cache, metrics, the grid) runs in the
caller's process.
"""

from __future__ import annotations

import spaces  # first: on ZeroGPU it patches torch before anything initialises CUDA

# isort: split

import math
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxPipeline
from huggingface_hub.errors import GatedRepoError, HFValidationError, OfflineModeIsEnabled, RepositoryNotFoundError
from PIL import Image, ImageDraw, ImageFont

# torchmetrics: maintained, tested PSNR/SSIM (Gaussian-window SSIM of Wang et al. 2004) instead of hand-written ones.
from torchmetrics.functional import mean_squared_error
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from . import LoraError, inspect_file
from .sizes import format_size

BASE_MODEL_ENV = "LORA_OPS_BASE_MODEL"
DEFAULT_BASE_MODEL = "black-forest-labs/FLUX.1-dev"

DEFAULT_PROMPTS = (
    "a dolphin, How2Draw",
    "a druid, How2Draw",
)
"""Two of the six example prompts of the glif/how2draw model card, the LoRA the project's seed script resized
(short ones that use the trigger word). Two prompts at 512x512 keep the default preview inside an anonymous
visitor's daily ZeroGPU quota with room to spare (see `DEFAULT_REQUEST`); visitors add prompts knowingly."""

DEFAULT_STEPS = 20
"""FLUX.1-dev is usually run with 28 steps; 20 give finished images for about 30% less GPU time, and both
columns use the same steps, so the comparison stays fair."""
DEFAULT_SIZE = 512
"""FLUX.1-dev renders clean 512x512 images; a quarter of the pixels of 1024x1024 takes under a third of its GPU time
(`estimate_gpu_seconds`), and both columns use the same size, so the comparison stays fair."""
DEFAULT_GUIDANCE = 3.5
DEFAULT_MAX_SEQUENCE_LENGTH = 512

MAX_PROMPTS = 6
MAX_PROMPT_CHARS = 1000
SIDE_MULTIPLE = 16  # FLUX: 8x VAE downsampling, then 2x2 latent patches
MIN_SIDE, MAX_SIDE = 32, 1536
MAX_STEPS = 50
MAX_GUIDANCE = 20.0
MAX_SEED = 2**32 - 1

SECONDS_FIXED = 20.0  # per task: moving weights in, loading the two LoRA files as adapters
SECONDS_PER_IMAGE = 2.0  # per image: both text encoders and the VAE decoder
SECONDS_PER_STEP_MEGAPIXEL = (0.9, 0.1)
"""(linear, quadratic) seconds of one FLUX.1-dev bf16 denoising step per megapixel (2**20 pixels) on half an RTX
Pro 6000: the MLPs grow with the pixel count, attention with its square. Estimated, not measured: replace them with
what `benchmarks/gpu_seconds.py` measures on the hardware."""

ZEROGPU_DURATION_FACTOR = 1.5
"""ZeroGPU asks its scheduler for (and counts against the visitor's quota) the duration a task requests times the
`duration_factor` of the GPU it runs on (`spaces` package, `zero/configs.json` and `zero.client.get_duration_seconds`):
1.5 on the RTX Pro 6000 that ZeroGPU runs on now. It does not apply to `xlarge` tasks, which a Space gets only when
its weights exceed the GPU's `xlarge_threshold` (45 GB); FLUX.1-dev in bf16 is about 34 GB."""

DAILY_GPU_QUOTAS = (("anonymous visitor", 120), ("free account", 300), ("PRO account", 2400))
"""Seconds of ZeroGPU each kind of visitor gets a day (Hugging Face's ZeroGPU documentation)."""

GPU_SECONDS_LIMIT = dict(DAILY_GPU_QUOTAS)["free account"]
"""The most seconds a preview may ask ZeroGPU for (after `ZEROGPU_DURATION_FACTOR`): a free account's daily quota.
Larger previews are refused before anything is rendered, on any hardware."""

FLUX_FLAVOURS = frozenset(
    {
        "diffusers/PEFT (transformer)",
        "kohya sd-scripts (FLUX)",
        "OneTrainer",
        "ComfyUI / BFL names",
        "diffusers names with lora_down/lora_up",
        "XLabs",
    }
)
"""Flavours (as `inspect_file` names them) that diffusers loads into a text-to-image `FluxPipeline`."""

PSNR_CEILING_DB = 100.0
"""PSNR reported for identical images (their true PSNR is infinite, which JSON cannot hold)."""

ORIGINAL, RESIZED, BASE = "original", "resized", "base"
CACHE_MAX_PIXELS = 48 * 2**20  # about 150 MB of RGB images
MAX_ADAPTERS = 3  # LoRAs kept loaded in the pipeline; the least recently used one is deleted first

CELL_SIDE = 384  # longest side of each image in the grid, pixels
GAP = 8
FONT_SIZE = 16
LINE_HEIGHT = 20
HEADER_HEIGHT = 2 * LINE_HEIGHT + 2 * GAP  # two lines of column label
CAPTION_HEIGHT = 2 * LINE_HEIGHT + GAP  # two lines of prompt under each row
INK, PAPER = (20, 20, 20), (255, 255, 255)

Progress = Callable[[int, int], None]
"""Called with (denoising steps done, steps in the whole task) after every step."""


@dataclass(frozen=True)
class LoraRef:
    """One LoRA file as the GPU worker needs it: where it is and its content hash (the adapter's identity)."""

    path: str
    sha256: str


@dataclass(frozen=True)
class ColumnJob:
    """Images to render for one column: `lora` (None: no LoRA) applied to the prompts at `indices`."""

    name: str
    lora: LoraRef | None
    indices: tuple[int, ...]


@dataclass(frozen=True)
class RenderJob:
    """Everything the GPU function needs; plain values so that it pickles into a ZeroGPU worker."""

    base_model: str
    prompts: tuple[str, ...]
    seed: int
    steps: int
    width: int
    height: int
    guidance_scale: float
    max_sequence_length: int
    columns: tuple[ColumnJob, ...]

    @property
    def image_count(self) -> int:
        return sum(len(column.indices) for column in self.columns)


@dataclass
class PreviewResult:
    """The grid, the single images and labels per column, the metrics, and how many images were rendered or cached."""

    grid: Image.Image
    images: dict[str, list[Image.Image]]
    labels: dict[str, str]
    metrics: dict
    columns: tuple[str, ...]
    rendered: int
    cached: int


def base_model_name() -> str:
    """The base model: `LORA_OPS_BASE_MODEL` (a Hub repo id or a local pipeline directory) or FLUX.1-dev."""
    return os.environ.get(BASE_MODEL_ENV, "").strip() or DEFAULT_BASE_MODEL


# --- GPU time ---------------------------------------------------------------------------------------------


def image_seconds(
    steps: int,
    width: int,
    height: int,
    per_image: float = SECONDS_PER_IMAGE,
    per_step_megapixel: tuple[float, float] = SECONDS_PER_STEP_MEGAPIXEL,
) -> float:
    """Seconds of GPU one image of `width` x `height` with `steps` steps takes, the per-task part left out
    (`per_image` and `per_step_megapixel` default to the estimate's constants; a benchmark passes measured ones)."""
    megapixels = width * height / 2**20
    linear, quadratic = per_step_megapixel
    return per_image + steps * (linear * megapixels + quadratic * megapixels**2)


def estimate_gpu_seconds(images: int, steps: int, width: int, height: int) -> int:
    """Seconds of GPU a task needs to render `images` images of `width` x `height` with `steps` steps each."""
    return math.ceil(SECONDS_FIXED + images * image_seconds(steps, width, height))


def gpu_duration(job: RenderJob, progress: Progress | None = None) -> int:
    """`spaces.GPU`'s duration callable: it receives `render_on_gpu`'s arguments."""
    return estimate_gpu_seconds(job.image_count, job.steps, job.width, job.height)


@dataclass(frozen=True)
class GpuRequest:
    """The GPU time of a task that renders `images` images: `estimated` seconds (the duration it asks for) and
    `requested`, what ZeroGPU asks its scheduler for and counts against the visitor's daily quota."""

    images: int
    estimated: int

    @property
    def requested(self) -> int:
        """`estimated` times `ZEROGPU_DURATION_FACTOR`, rounded as `spaces.zero.client.schedule` rounds it."""
        return round(self.estimated * ZEROGPU_DURATION_FACTOR)

    @property
    def arithmetic(self) -> str:
        """`70 s (47 s estimated × 1.5 on ZeroGPU)`."""
        return f"{self.requested} s ({self.estimated} s estimated × {ZEROGPU_DURATION_FACTOR:g} on ZeroGPU)"

    def quotas_allowing(self) -> list[str]:
        """The kinds of visitor (`DAILY_GPU_QUOTAS`) whose whole daily quota covers this request."""
        return [who for who, seconds in DAILY_GPU_QUOTAS if self.requested <= seconds]


def gpu_request(images: int, steps: int, width: int, height: int) -> GpuRequest:
    """The GPU time of rendering `images` images (only those not cached count) with these settings."""
    return GpuRequest(images, estimate_gpu_seconds(images, steps, width, height))


DEFAULT_REQUEST = gpu_request(2 * len(DEFAULT_PROMPTS), DEFAULT_STEPS, DEFAULT_SIZE, DEFAULT_SIZE)
"""The default preview's GPU time: the default prompts in the original and resized columns, nothing cached."""


def check_gpu_request(request: GpuRequest) -> None:
    """Refuse, in one line with its arithmetic, a request over `GPU_SECONDS_LIMIT`."""
    if request.requested > GPU_SECONDS_LIMIT:
        raise LoraError(
            f"this preview of {request.images} images needs about {request.arithmetic}, over the "
            f"{GPU_SECONDS_LIMIT} s limit (a free account's daily quota; anonymous visitors get "
            f"{dict(DAILY_GPU_QUOTAS)['anonymous visitor']} s): use fewer prompts or steps, or a smaller size"
        )


def gpu_time_markdown(prompts: int, steps: int, width: int, height: int, include_base: bool) -> str:
    """What a preview with these settings asks ZeroGPU for, before the click, and whose daily quota allows it.

    Counts every image (the cache may spare some: the original and base columns after a first preview).
    """
    request = gpu_request(prompts * (3 if include_base else 2), steps, width, height)
    quotas = ", ".join(f"{who} {seconds} s" for who, seconds in DAILY_GPU_QUOTAS)
    if request.requested > GPU_SECONDS_LIMIT:
        verdict = f"over the {GPU_SECONDS_LIMIT} s limit: use fewer prompts or steps, or a smaller size"
    else:
        verdict = "fits the daily quota of: " + ", ".join(request.quotas_allowing())
    return (
        f"**GPU time: at most {request.arithmetic}** for {request.images} images; {verdict}. "
        f"Daily ZeroGPU quotas: {quotas}. Images already rendered with the same file and settings are not "
        "counted again. Estimates, not measured yet."
    )


# --- the pipeline holder --------------------------------------------------------------------------------


LOAD_FAILURES = (  # (exception type anywhere in the error's chain, message); the first match wins
    (
        GatedRepoError,
        "base model {model} is gated: accept its licence on huggingface.co and set HF_TOKEN to a token with access",
    ),
    (RepositoryNotFoundError, "base model {model} is not on the Hugging Face Hub (if it is private, set HF_TOKEN)"),
    (
        OfflineModeIsEnabled,
        "base model {model} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it; "
        f"set {BASE_MODEL_ENV} to a local pipeline directory",
    ),
    (ConnectionError, "base model {model} cannot be downloaded: the Hugging Face Hub is not reachable"),
    (HFValidationError, f"base model {{model}} is neither a local directory nor a Hub repo id (set {BASE_MODEL_ENV})"),
)


def _load_failure(model: str, error: BaseException) -> LoraError:
    """A one-line LoraError for a failed `from_pretrained`, read from the whole exception chain."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    for kind, message in LOAD_FAILURES:
        if any(isinstance(link, kind) for link in chain):
            return LoraError(message.format(model=model))
    first_line = str(chain[0]).strip().splitlines()[0] if str(chain[0]).strip() else type(chain[0]).__name__
    return LoraError(f"cannot load base model {model}: {first_line}")


class PipelineHolder:
    """The base pipeline, loaded once per process, and the LoRAs loaded into it as named adapters.

    bf16 on CUDA, fp32 on CPU. Adapters are named after their file's sha256, so switching between the
    original and any number of resized files never reloads the base model or a file already loaded.
    `lock` serialises every use: adapters are pipeline-wide state.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._model: str | None = None
        self._pipe: FluxPipeline | None = None
        self._adapters: OrderedDict[str, str] = OrderedDict()  # sha256 -> adapter name, least recent first

    def pipeline(self, model: str) -> FluxPipeline:
        """The pipeline for `model`, loading it (and dropping another one) on first use."""
        with self.lock:
            if self._model != model:
                self._pipe, self._model = None, None
                self._adapters.clear()
                self._pipe, self._model = _load_pipeline(model), model
            return self._pipe

    def activate(self, pipe: FluxPipeline, lora: LoraRef | None) -> None:
        """Make `lora` the only active adapter (loading it from its file path if needed), or disable LoRAs."""
        with self.lock:
            if lora is None:
                if self._adapters:
                    pipe.disable_lora()
                return
            if lora.sha256 not in self._adapters:
                self._load_adapter(pipe, lora)
            self._adapters.move_to_end(lora.sha256)
            pipe.enable_lora()
            pipe.set_adapters(self._adapters[lora.sha256])

    def _load_adapter(self, pipe: FluxPipeline, lora: LoraRef) -> None:
        if len(self._adapters) >= MAX_ADAPTERS:
            _, oldest = self._adapters.popitem(last=False)
            pipe.delete_adapters(oldest)
        name = f"lora_{lora.sha256[:16]}"
        try:
            with warnings.catch_warnings():  # several adapters side by side is the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                pipe.load_lora_weights(lora.path, adapter_name=name)
        except (ValueError, KeyError, RuntimeError, OSError) as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise LoraError(f"diffusers could not load {Path(lora.path).name} into {self._model}: {message}") from None
        self._adapters[lora.sha256] = name


def _load_pipeline(model: str) -> FluxPipeline:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    try:
        pipe = FluxPipeline.from_pretrained(model, dtype=dtype).to(device)
    except torch.OutOfMemoryError:
        raise LoraError(f"out of memory loading base model {model} on {device}") from None
    except (OSError, ValueError) as error:
        raise _load_failure(model, error) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


HOLDER = PipelineHolder()


def load_base_pipeline() -> FluxPipeline:
    """Load the base model now (at a Space's startup); raises LoraError with the reason when it cannot."""
    return HOLDER.pipeline(base_model_name())


# --- rendering on the GPU -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuFailure:
    """A `LoraError` raised on the GPU, returned as a value. ZeroGPU shows any exception of its worker that is
    not a `gr.Error` as "ZeroGPU worker error" with the exception's class name for message (`spaces.zero.wrappers`),
    so the GPU function returns the one-line message and the caller raises it again in the app's process."""

    message: str


@spaces.GPU(duration=gpu_duration)
def render_on_gpu(job: RenderJob, progress: Progress | None = None) -> dict[str, dict[int, Image.Image]] | GpuFailure:
    """The GPU function: `render_images`' images, or a `GpuFailure` carrying the `LoraError` it met."""
    try:
        return _render_job(job, progress)
    except LoraError as error:
        return GpuFailure(str(error))


def render_images(job: RenderJob, progress: Progress | None = None) -> dict[str, dict[int, Image.Image]]:
    """Render the job's images on the GPU: {column name: {prompt index: image}}. Image i uses the seed
    `job.seed + i`. Raises the `LoraError` met on the GPU, with its message, here and on ZeroGPU alike."""
    outcome = render_on_gpu(job, progress)
    if isinstance(outcome, GpuFailure):
        raise LoraError(outcome.message)
    return outcome


def _render_job(job: RenderJob, progress: Progress | None) -> dict[str, dict[int, Image.Image]]:
    total = job.image_count * job.steps
    done = 0

    def count_step(pipe: FluxPipeline, step: int, timestep: torch.Tensor, tensors: dict) -> dict:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)
        return tensors

    images: dict[str, dict[int, Image.Image]] = {}
    with HOLDER.lock:
        pipe = HOLDER.pipeline(job.base_model)
        for column in job.columns:
            HOLDER.activate(pipe, column.lora)
            images[column.name] = {index: render_one(pipe, job, index, count_step) for index in column.indices}
    return images


def render_one(pipe: FluxPipeline, job: RenderJob, index: int, on_step: Callable) -> Image.Image:
    """Image `index` of `job` (prompt `job.prompts[index]`, seed `job.seed + index`), exactly as a preview renders
    it; `on_step` is diffusers' `callback_on_step_end`. The generator lives on the CPU so that a seed gives the same
    noise on every device."""
    try:
        return pipe(
            job.prompts[index],
            num_inference_steps=job.steps,
            width=job.width,
            height=job.height,
            guidance_scale=job.guidance_scale,
            max_sequence_length=job.max_sequence_length,
            generator=torch.Generator("cpu").manual_seed(job.seed + index),
            callback_on_step_end=on_step,
        ).images[0]
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise LoraError(
            f"out of GPU memory rendering {job.width}x{job.height}: use a smaller size or fewer prompts"
        ) from None


# --- the cache of rendered images ------------------------------------------------------------------------


class ImageCache:
    """Rendered images keyed by what determines them, least recently used dropped beyond `max_pixels`.

    Key: (LoRA file sha256, or "" for no LoRA; prompt; seed; steps; width; height; guidance; max sequence
    length; base model). Keyed by content, not by column: a file rendered once as the original is reused
    whatever it is compared with, so trying a second rank renders only the resized column.
    """

    def __init__(self, max_pixels: int = CACHE_MAX_PIXELS) -> None:
        self.max_pixels = max_pixels
        self._images: OrderedDict[tuple, Image.Image] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> Image.Image | None:
        with self._lock:
            image = self._images.get(key)
            if image is not None:
                self._images.move_to_end(key)
            return image

    def put(self, key: tuple, image: Image.Image) -> None:
        with self._lock:
            self._images[key] = image
            self._images.move_to_end(key)
            while sum(im.width * im.height for im in self._images.values()) > self.max_pixels:
                self._images.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._images.clear()


CACHE = ImageCache()


def _cache_key(lora: LoraRef | None, job: RenderJob, index: int) -> tuple:
    return (
        lora.sha256 if lora else "",
        job.prompts[index],
        job.seed + index,
        job.steps,
        job.width,
        job.height,
        job.guidance_scale,
        job.max_sequence_length,
        job.base_model,
    )


# --- checking the request -------------------------------------------------------------------------------


def _check_request(
    prompts: Sequence[str], seed: int, steps: int, width: int, height: int, guidance_scale: float, max_tokens: int
) -> tuple[str, ...]:
    """The stripped prompts, or a LoraError naming the first value out of bounds."""
    if isinstance(prompts, str):
        prompts = [prompts]
    cleaned = tuple(str(prompt).strip() for prompt in prompts)
    checks = (
        (len(cleaned) >= 1, "give at least one prompt"),
        (len(cleaned) <= MAX_PROMPTS, f"at most {MAX_PROMPTS} prompts per preview (got {len(cleaned)})"),
        (all(cleaned), f"prompt {next((i + 1 for i, p in enumerate(cleaned) if not p), 0)} is empty"),
        (
            all(len(p) <= MAX_PROMPT_CHARS for p in cleaned),
            f"prompts are limited to {MAX_PROMPT_CHARS} characters",
        ),
        (0 <= seed <= MAX_SEED, f"seed must be between 0 and {MAX_SEED} (got {seed})"),
        (1 <= steps <= MAX_STEPS, f"steps must be between 1 and {MAX_STEPS} (got {steps})"),
        (
            width % SIDE_MULTIPLE == 0 and height % SIDE_MULTIPLE == 0,
            f"width and height must be multiples of {SIDE_MULTIPLE} (got {width}x{height})",
        ),
        (
            min(width, height) >= MIN_SIDE and max(width, height) <= MAX_SIDE,
            f"width and height must be between {MIN_SIDE} and {MAX_SIDE} pixels (got {width}x{height})",
        ),
        (0 <= guidance_scale <= MAX_GUIDANCE, f"guidance scale must be between 0 and {MAX_GUIDANCE:g}"),
        (
            1 <= max_tokens <= DEFAULT_MAX_SEQUENCE_LENGTH,
            f"max_sequence_length must be between 1 and {DEFAULT_MAX_SEQUENCE_LENGTH} (got {max_tokens})",
        ),
    )
    for ok, message in checks:
        if not ok:
            raise LoraError(message)
    return cleaned


def _checked_lora(path: str | Path) -> tuple[LoraRef, dict]:
    """The file as the core reads it (refusing what it refuses), refused too if it is not a FLUX.1 LoRA."""
    report = inspect_file(path)
    if report["family"] != "FLUX.1" or report["flavour"] not in FLUX_FLAVOURS:
        raise LoraError(
            f"{report['file']} is a {report['flavour']} file for {report['family']}; the preview renders FLUX.1 LoRAs only"
        )
    return LoraRef(str(Path(path).resolve()), report["sha256"]), report


def _label(column: str, report: dict | None) -> str:
    """`original · rank 16 · 43.0 MB`; the resized column names the method written in the file's metadata."""
    if report is None:
        return "base (no LoRA)"
    ranks = sorted(int(rank) for rank in report["ranks"])
    rank = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    method = report["metadata"].get("lora_resizer.method")
    name = f"{column} ({method})" if column == RESIZED and method else column
    return f"{name} · {rank} · {format_size(report['bytes'])}"


# --- the entry point ------------------------------------------------------------------------------------


def render_comparison(
    original: str | Path,
    resized: str | Path,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    width: int = DEFAULT_SIZE,
    height: int = DEFAULT_SIZE,
    guidance_scale: float = DEFAULT_GUIDANCE,
    *,
    include_base: bool = False,
    labels: Mapping[str, str] | None = None,
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    progress: Progress | None = None,
) -> PreviewResult:
    """Render `prompts` with the original and the resized LoRA (and the bare base model if `include_base`).

    Image i of every column uses the seed `seed + i`. Images already rendered with the same file, prompt,
    seed and settings come from the cache. `labels` overrides column labels by column name ("original",
    "resized", "base"). Raises LoraError with a one-line reason for bad files or settings.
    """
    cleaned = _check_request(prompts, seed, steps, width, height, guidance_scale, max_sequence_length)
    original_ref, original_report = _checked_lora(original)
    resized_ref, resized_report = _checked_lora(resized)
    loras = {ORIGINAL: original_ref, RESIZED: resized_ref, BASE: None}
    reports = {ORIGINAL: original_report, RESIZED: resized_report, BASE: None}
    columns = (ORIGINAL, RESIZED, BASE) if include_base else (ORIGINAL, RESIZED)

    plan = RenderJob(base_model_name(), cleaned, seed, steps, width, height, guidance_scale, max_sequence_length, ())
    images = {name: {i: CACHE.get(_cache_key(loras[name], plan, i)) for i in range(len(cleaned))} for name in columns}
    missing = tuple(
        ColumnJob(name, loras[name], tuple(i for i, image in images[name].items() if image is None)) for name in columns
    )
    job = replace(plan, columns=tuple(column for column in missing if column.indices))
    check_gpu_request(GpuRequest(job.image_count, gpu_duration(job)))
    if job.image_count:
        for name, rendered in render_images(job, progress).items():
            for index, image in rendered.items():
                CACHE.put(_cache_key(loras[name], job, index), image)
                images[name][index] = image

    singles = {name: [images[name][i] for i in range(len(cleaned))] for name in columns}
    column_labels = {name: (labels or {}).get(name) or _label(name, reports[name]) for name in columns}
    metrics = comparison_metrics(singles[ORIGINAL], singles[RESIZED], singles.get(BASE))
    metrics.update(
        base_model=plan.base_model,
        seed=seed,
        steps=steps,
        width=width,
        height=height,
        guidance_scale=guidance_scale,
        max_sequence_length=max_sequence_length,
        labels=column_labels,
    )
    for index, entry in enumerate(metrics["prompts"]):
        entry.update(prompt=cleaned[index], seed=seed + index)
    grid = comparison_grid(singles, column_labels, cleaned, seed)
    return PreviewResult(
        grid=grid,
        images=singles,
        labels=column_labels,
        metrics=metrics,
        columns=columns,
        rendered=job.image_count,
        cached=len(cleaned) * len(columns) - job.image_count,
    )


# --- metrics ---------------------------------------------------------------------------------------------


def _as_batch(images: Sequence[Image.Image]) -> torch.Tensor:
    """RGB images -> float tensor `[n, 3, height, width]` in [0, 1]."""
    pixels = np.stack([np.asarray(image.convert("RGB")) for image in images])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255


def _psnr(preds: torch.Tensor, target: torch.Tensor) -> float:
    return min(float(peak_signal_noise_ratio(preds, target, data_range=1.0)), PSNR_CEILING_DB)


def _rmse(preds: torch.Tensor, target: torch.Tensor) -> float:
    return float(mean_squared_error(preds.flatten(), target.flatten(), squared=False))


def _effect_survived(original: torch.Tensor, resized: torch.Tensor, base: torch.Tensor | None) -> float | None:
    """1 - d(original, resized) / d(original, base), d = RMSE of RGB values in [0, 1]; None without an effect."""
    if base is None:
        return None
    effect = _rmse(original, base)
    return None if effect == 0 else 1 - _rmse(original, resized) / effect


def comparison_metrics(
    original: Sequence[Image.Image], resized: Sequence[Image.Image], base: Sequence[Image.Image] | None = None
) -> dict:
    """PSNR (dB) and SSIM between original and resized images, and the share of the LoRA's effect that survived.

    Per prompt and overall (overall PSNR and effect pool all pixels; overall SSIM is the mean over prompts).
    The effect share needs the base images; it is 1 when the resized images equal the originals, 0 when they
    are as far from them as the bare base model, and negative when farther. JSON-serialisable.
    """
    originals, resizeds = _as_batch(original), _as_batch(resized)
    bases = _as_batch(base) if base is not None else None
    ssims = structural_similarity_index_measure(resizeds, originals, data_range=1.0, reduction="none")
    per_prompt = [
        {
            "psnr_db": _psnr(resizeds[i : i + 1], originals[i : i + 1]),
            "ssim": float(ssims[i]),
            "effect_survived": _effect_survived(
                originals[i : i + 1], resizeds[i : i + 1], None if bases is None else bases[i : i + 1]
            ),
        }
        for i in range(len(originals))
    ]
    return {
        "overall": {
            "psnr_db": _psnr(resizeds, originals),
            "ssim": float(ssims.mean()),
            "effect_survived": _effect_survived(originals, resizeds, bases),
        },
        "prompts": per_prompt,
        "distance": "RMSE of RGB values in [0, 1]",
    }


# --- the grid --------------------------------------------------------------------------------------------


def _wrapped(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int, lines: int) -> str:
    """`text` broken into at most `lines` lines of at most `width` pixels, the last one cut with an ellipsis."""
    out: list[str] = []
    words = text.split()
    while words and len(out) < lines:
        line = words.pop(0)
        while words and draw.textlength(f"{line} {words[0]}", font=font) <= width:
            line = f"{line} {words.pop(0)}"
        out.append(line)
    if words or (out and draw.textlength(out[-1], font=font) > width):
        last = out[-1]
        while last and draw.textlength(last + "…", font=font) > width:
            last = last[:-1]
        out[-1] = last + "…"
    return "\n".join(out)


def _cell_size(image: Image.Image) -> tuple[int, int]:
    """The image's size in the grid: longest side CELL_SIDE, aspect kept."""
    scale = CELL_SIDE / max(image.size)
    return round(image.width * scale), round(image.height * scale)


def comparison_grid(
    images: Mapping[str, Sequence[Image.Image]], labels: Mapping[str, str], prompts: Sequence[str], seed: int
) -> Image.Image:
    """One row per prompt, one column per entry of `images` (in order), labels on top, each prompt under its row.

    Size: `columns * cell_w + (columns + 1) * GAP` by `HEADER_HEIGHT + rows * (cell_h + CAPTION_HEIGHT)`,
    where the cell is the image scaled to a longest side of CELL_SIDE (nearest-neighbour when enlarging).
    """
    names = list(images)
    cell_w, cell_h = _cell_size(images[names[0]][0])
    grid = Image.new(
        "RGB",
        (len(names) * cell_w + (len(names) + 1) * GAP, HEADER_HEIGHT + len(prompts) * (cell_h + CAPTION_HEIGHT)),
        PAPER,
    )
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=FONT_SIZE)
    for column, name in enumerate(names):
        x = GAP + column * (cell_w + GAP)
        draw.multiline_text(
            (x, GAP),
            _wrapped(draw, labels[name], font, cell_w, 2),
            fill=INK,
            font=font,
            spacing=LINE_HEIGHT - FONT_SIZE,
        )
        for row, image in enumerate(images[name]):
            y = HEADER_HEIGHT + row * (cell_h + CAPTION_HEIGHT)
            resample = Image.Resampling.NEAREST if cell_w >= image.width else Image.Resampling.LANCZOS
            grid.paste(image.convert("RGB").resize((cell_w, cell_h), resample), (x, y))
    text_width = grid.width - 2 * GAP
    for row, prompt in enumerate(prompts):
        y = HEADER_HEIGHT + row * (cell_h + CAPTION_HEIGHT) + cell_h + GAP // 2
        caption = _wrapped(draw, f"{prompt}  (seed {seed + row})", font, text_width, 2)
        draw.multiline_text((GAP, y), caption, fill=INK, font=font, spacing=LINE_HEIGHT - FONT_SIZE)
    return grid
