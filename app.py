"""lora-resizer Space: inspect a LoRA, change its rank exactly, preview it and push it to your Hub account.

This file only lays out the Gradio Blocks UI (one function per panel) and wires events to `lora_ops`; every rule
for checking values and for formatting or escaping text lives in `lora_ops` (`form`, `plots`, `page_text`).

Public API (gradio_client): `/inspect`, `/resize`, `/preview`, `/push`. Each is its own event on a hidden trigger
and raises a one-line error to API callers; the page's buttons run private twins of them that show the outcome,
errors included, in a status line right under the button that caused it (toasts would stack and sit far away).
Run locally with `python app.py`.
"""

import spaces  # noqa: F401  (first: on ZeroGPU it patches torch before anything initialises CUDA)

# isort: split

import functools
import inspect
import json
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import gradio as gr
import torch
from gradio import processing_utils, route_utils
from gradio.components.plot import PlotData
from gradio.data_classes import PredictBodyInternal
from gradio.queueing import Queue
from PIL import Image

import lora_ops
from lora_ops import cache_cleaning, form, hub, page_text, plots, preview, sources

APP_DIR = Path(__file__).resolve().parent
EXAMPLE_LORA = APP_DIR / "assets" / "example-flux-lora.safetensors"
HUB_EXAMPLES = ["glif/how2draw", "cocktailpeanut/optimus"]
ON_SPACE = os.environ.get("SYSTEM") == "spaces"  # gradio's own test: real sign-in there, a mock elsewhere
MAX_FILE_BYTES = 1024**3
LAUNCH_OPTIONS = {"max_file_size": MAX_FILE_BYTES, "allowed_paths": [str(EXAMPLE_LORA)]}
QUEUE_SIZE = 32  # events waiting, all kinds together (gradio's own cap); pure-UI events skip the queue
CPU_CONCURRENCY = 2  # resize and compare share the CPU
WAITING_LIMITS = {"cpu": 16, "gpu": 4}
"""Events each concurrency group ("cpu": resize and compare; "gpu": previews) may have waiting. Gradio's `max_size`
counts the waiting events of every kind, so without these a backlog of previews, each holding the GPU for a minute,
would refuse resizes too; together they stay well under `QUEUE_SIZE`."""
OAUTH_SCOPES = {
    "gated-repos": "read the gated Hub repos whose conditions the visitor accepted",
    "write-repos": "read the visitor's private repos and commit the resized LoRA to the visitor's repo",
    "manage-repos": "create that repo",
}
"""Every sign-in scope the app uses and why; the README's front matter (`hf_oauth_scopes`) asks for these, no more."""
CACHE_CLEANING = (1800, 3600)  # every 30 min, delete files older than 1 h
PLOT_FORMAT = "png"
METADATA_ROWS_SHOWN_OPEN = 12  # a longer trainer-metadata table starts collapsed

METHOD_CHOICES = [
    ("SVD (exact)", "svd"),
    ("Randomized SVD", "randomized_svd"),
    ("Random projection", "random_projection"),
    ("Sparse random projection", "sparse_random_projection"),
]
METHOD_NOTES = """\
- **SVD (exact)**: the best rank-r approximation of every layer's delta, computed from the factors alone.
- **Randomized SVD**: a seeded random range finder refined by `niter` power iterations; near-exact.
- **Random projection**: mixes the rank directions with a seeded Gaussian matrix; fast, but loses most of the delta.
- **Sparse random projection**: the same with a sparse random matrix of the given `density`.

A rank above a layer's current rank extends it exactly: the delta does not change."""
# the method-specific controls each method uses
METHOD_CONTROLS = {
    "svd": (),
    "randomized_svd": ("niter", "seed"),
    "random_projection": ("seed",),
    "sparse_random_projection": ("density", "seed"),
}
RANK_MODES = [
    ("the same rank for every layer", "rank"),
    ("per layer: keep a share of its energy", "energy"),
    ("per layer: fit a file size", "size"),
    ("per layer: sd-scripts sv_ratio", "sv_ratio"),
    ("per layer: sd-scripts sv_cumulative", "sv_cumulative"),
    ("per layer: sd-scripts sv_fro", "sv_fro"),
]
# The value a per-layer rule's box shows when its mode is chosen: energy, then sd-scripts' --dynamic_param rules.
RULE_DEFAULTS = {"energy": 0.99, "sv_ratio": 10.0, "sv_cumulative": 0.9, "sv_fro": 0.9}
# The resize_lora parameter each ranks mode reads (none for "rank"): the page passes only the chosen mode's on.
MODE_FIELDS = {
    "energy": "energy",
    "size": "target_size",
    "sv_ratio": "sv_ratio",
    "sv_cumulative": "sv_cumulative",
    "sv_fro": "sv_fro",
}
# sd-scripts' resize_lora.py --dynamic_method rules (lora_ops.ranks): name, box label, what it keeps per layer.
SD_SCRIPTS_RULES = [
    ("sv_ratio", "sv_ratio (at least 1)", "keeps singular values ≥ the largest / sv_ratio"),
    ("sv_cumulative", "sv_cumulative (0-1]", "the fewest singular values whose sum is this share of all"),
    ("sv_fro", "sv_fro (0-1]", "the fewest whose √(sum of squares) is this share; sv_fro² is the energy"),
]
# Run in the browser when the ranks mode changes, before anything else can happen: the chosen mode's box gets its
# default, every other budget box is blanked, so no value is kept meaning something else. Done there rather than by
# the server, whose answer would overwrite a value typed while it travels. Returns the energy box, the size box and
# the sd-scripts rules' boxes, in that order.
BUDGET_BOXES = ["energy", "size", *(name for name, _, _ in SD_SCRIPTS_RULES)]
RESET_BUDGETS_JS = (
    f"(mode) => {json.dumps(BUDGET_BOXES)}.map((box) =>"
    f" box === 'size' ? '' : box === mode ? {json.dumps(RULE_DEFAULTS)}[box] : null)"
)
DTYPE_CHOICES = [("keep the input's", "keep"), ("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "fp32")]
PROGRESS = gr.Progress()  # gradio gives each request its own tracker in place of this default


def _load_preview_model() -> str | None:
    """Load the preview's base model once, at startup (ZeroGPU moves it to the GPU then); or say why not."""
    if not os.environ.get(preview.BASE_MODEL_ENV) and not torch.cuda.is_available():
        return (
            f"previews need a GPU, or {preview.BASE_MODEL_ENV} set to a local FLUX.1 pipeline directory; "
            "inspect, resize and push work without one"
        )
    try:
        preview.load_base_pipeline()
    except lora_ops.LoraError as exc:
        return str(exc)
    return None


PREVIEW_UNAVAILABLE = _load_preview_model()


def _one_line_errors(function: Callable) -> Callable:
    """`function` for an API endpoint: its `LoraError`s become gradio errors, one line, no traceback in the log."""

    @functools.wraps(function)
    def handler(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except lora_ops.LoraError as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    return handler


def _status_line(function: Callable, outputs: int, cleared: tuple | None = None) -> Callable:
    """`function` for a page event: a status line, then its `outputs` results. The status is empty when it
    worked; a `LoraError` becomes the status (escaped, one line) and the outputs become `cleared` (default:
    left as they were, so an error never loses the visitor's previous result)."""

    @functools.wraps(function)
    def handler(*args, **kwargs):
        try:
            result = function(*args, **kwargs)
        except lora_ops.LoraError as exc:
            return (page_text.error_markdown(str(exc)), *(cleared or (gr.skip(),) * outputs))
        return ("", *(result if outputs > 1 else (result,)))

    return handler


def _request_dir() -> Path:
    """A fresh, unguessable folder inside gradio's cache: files returned from it are cleaned by `delete_cache`."""
    path = Path(demo.GRADIO_CACHE) / "lora-resizer" / uuid.uuid4().hex
    path.mkdir(parents=True)
    return path


def clean_cache() -> int:
    """What gradio's `delete_cache` leaves behind in its cache: empty folders and 0-byte upload temporaries
    older than `CACHE_CLEANING`'s age (see `lora_ops.cache_cleaning`); returns how many were removed."""
    return cache_cleaning.sweep(Path(demo.GRADIO_CACHE), max_age=CACHE_CLEANING[1])


def _token(oauth_token: gr.OAuthToken | None) -> str | None:
    return oauth_token.token if oauth_token is not None else None


def inspect_lora(lora_file: str | None, config_file: str | None = None) -> dict:
    """Describe a LoRA file: layout, ranks, dtype, size, trainer metadata and every layer's singular values.

    `config_file`: the PEFT `adapter_config.json` of a PEFT adapter (its `lora_alpha` sets the scale)."""
    if not lora_file:
        raise lora_ops.LoraError("no LoRA file given: upload a .safetensors file")
    return lora_ops.inspect_file(lora_file, config=config_file or None)


def resize_lora(
    lora_file: str | None = None,
    method: str = "svd",
    rank: float = 4,
    niter: float = 2,
    density: float | None = None,
    seed: float = 0,
    energy: float | None = None,
    target_size: str = "",
    dtype: str = "keep",
    hub_repo: str = "",
    hub_file: str | None = None,
    config_file: str | None = None,
    sv_ratio: float | None = None,
    sv_cumulative: float | None = None,
    sv_fro: float | None = None,
    strength: float | None = 1.0,
    oauth_token: gr.OAuthToken | None = None,
    progress: gr.Progress = PROGRESS,
) -> tuple[str, dict]:
    """Resize a LoRA (an uploaded file, or `hub_file` of Hub repo `hub_repo`) and return the new file and report.

    `rank` is the rank of every layer (reduced above it, extended exactly below it) or, with `energy` (share of
    each layer's squared norm to keep, 0-1) or `target_size` (e.g. "40MB"), the cap of per-layer ranks.
    `density`, `energy` and `target_size` left blank (None, 0 or "") mean the default and off. Whole numbers
    (`rank`, `niter`, `seed`) must be whole: nothing is rounded. `config_file`: the PEFT `adapter_config.json` of
    an uploaded PEFT adapter (a Hub file's is found beside it); the resized adapter's new config is written beside
    the result and named in `report["output"]["config"]`. `sv_ratio`, `sv_cumulative`, `sv_fro`: sd-scripts'
    per-layer rank rules by their `resize_lora.py --dynamic_method` names (at most one rule, `energy` included;
    `rank` caps them); `strength`: the weight you would load the LoRA at, baked into the result (1, None or "":
    none; 0 is refused).
    """
    options = form.resize_options(
        rank=rank,
        method=method,
        niter=niter,
        density=density,
        seed=seed,
        energy=energy,
        target_size=target_size,
        dtype=dtype,
        sv_ratio=sv_ratio,
        sv_cumulative=sv_cumulative,
        sv_fro=sv_fro,
        strength=strength,
    )
    work = _request_dir()
    try:
        source, config = _source_path(lora_file, hub_repo, hub_file, _token(oauth_token), work / "source")
        destination = work / plots.output_name(source.name, options)
        progress(0, desc="reading the LoRA")
        report = lora_ops.resize_file(
            source,
            destination,
            options,
            config=config_file or config,
            progress=lambda done, total: progress((done, total), desc="resizing layers", unit="layers"),
        )
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # no partial output
        raise
    shutil.rmtree(work / "source", ignore_errors=True)
    return str(destination), report


def resize_many(
    lora_files: list[str] | None,
    rank: float | None = None,
    method: str = "svd",
    dtype: str = "keep",
    progress: gr.Progress = PROGRESS,
) -> tuple[list[str], dict]:
    """Bring a set of LoRAs to one rank, so that a compiled model swaps them without recompiling; the new files
    (same names) and the result (`lora_ops.resize_files`: per-file reports and a summary table).

    `rank` blank (None or 0): the set's largest rank, every file extended exactly (lossless). All or nothing: one
    bad file is named and no file is returned."""
    if not lora_files:
        raise lora_ops.LoraError("no LoRA files given: upload two or more .safetensors files")
    options = form.set_options(rank=rank, method=method, dtype=dtype)
    work = _request_dir()
    try:
        result = lora_ops.resize_files(
            [Path(path) for path in lora_files],
            work,
            options,
            progress=lambda done, total: progress((done, total), desc="resizing layers", unit="layers"),
        )
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return [str(work / report["output"]["file"]) for report in result["reports"]], result


def merge_loras(
    lora_files: list[str] | None,
    weights: str = "",
    rank: float | None = None,
    method: str = "svd",
    dtype: str = "keep",
    progress: gr.Progress = PROGRESS,
) -> tuple[str, dict]:
    """Merge LoRAs of one model into one: `sum_i w_i * delta_i`, exactly as the concatenated factors (`rank` blank)
    or reduced to `rank` by the best approximation of the sum; the merged file and its report
    (`lora_ops.merge_files`). `weights`: one number per file, in order, separated by commas or spaces (blank: 1
    each)."""
    if not lora_files:
        raise lora_ops.LoraError("no LoRA files given: upload two or more .safetensors files")
    paths = [Path(path) for path in lora_files]
    options = form.set_options(rank=rank, method=method, dtype=dtype)
    work = _request_dir()
    try:
        report = lora_ops.merge_files(
            list(zip(paths, form.weights(weights, len(paths)))),
            work / plots.merged_name(paths, options),
            rank=options.rank,
            method=options.method,
            dtype=options.dtype,
            progress=lambda done, total: progress((done, total), desc="merging layers", unit="layers"),
        )
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return str(work / report["output"]["file"]), report


def _source_path(
    lora_file: str | None, hub_repo: str, hub_file: str | None, token: str | None, directory: Path
) -> tuple[Path, Path | None]:
    """The uploaded file when there is one, else `hub_file` of `hub_repo` downloaded into `directory` (with the
    PEFT config beside it in the repo, when there is one)."""
    if lora_file:
        return Path(lora_file), None
    if hub_repo and hub_repo.strip():
        if not hub_file or not hub_file.strip():
            raise lora_ops.LoraError(f"pick a .safetensors file of {hub_repo.strip()} (hub_file)")
        path = sources.download_lora(hub_repo, hub_file, directory, token=token, max_bytes=MAX_FILE_BYTES)
        return path, sources.download_peft_config(hub_repo, hub_file, directory, token=token)
    raise lora_ops.LoraError("no LoRA given: upload a .safetensors file or name a Hub repo and file")


class _StepProgress:
    """Denoising steps reported to `gr.Progress`; an object, not a closure, so that ZeroGPU can pickle it."""

    def __init__(self, progress: gr.Progress) -> None:
        self.progress = progress

    def __call__(self, done: int, total: int) -> None:
        self.progress((done, total), desc="rendering", unit="steps")


def preview_lora(
    original_file: str | None,
    resized_file: str | None,
    prompts: str = "\n".join(preview.DEFAULT_PROMPTS),
    seed: float = 0,
    steps: float = preview.DEFAULT_STEPS,
    width: float = preview.DEFAULT_SIZE,
    height: float = preview.DEFAULT_SIZE,
    guidance_scale: float = preview.DEFAULT_GUIDANCE,
    include_base: bool = False,
    progress: gr.Progress = PROGRESS,
) -> tuple[Image.Image, dict]:
    """Render the prompts (one per line) with the original and the resized LoRA, same seeds; the grid and
    its metrics (PSNR, SSIM, share of the LoRA's effect that survived)."""
    if PREVIEW_UNAVAILABLE:
        raise lora_ops.LoraError(f"preview unavailable: {PREVIEW_UNAVAILABLE}")
    if not original_file or not resized_file:
        raise lora_ops.LoraError("the preview needs the original file and a resized one: resize first")
    if not isinstance(prompts, str):
        raise lora_ops.LoraError(f"prompts must be text, one per line, got {prompts!r}")
    result = preview.render_comparison(
        original_file,
        resized_file,
        [line for line in prompts.splitlines() if line.strip()],
        form.whole_number(seed, "seed", 0, form.SEED_LIMIT - 1),
        form.whole_number(steps, "steps"),
        form.whole_number(width, "width"),
        form.whole_number(height, "height"),
        form.number(guidance_scale, "guidance scale"),
        include_base=bool(include_base),
        progress=_StepProgress(progress),
    )
    return result.grid, result.metrics


def push_lora(
    resized_file: str | None,
    report: dict | None,
    repo_id: str = "",
    private: bool = False,
    grid_image: Image.Image | None = None,
    metrics: dict | None = None,
    source: str = "",
    config_file: str | None = None,
    oauth_token: gr.OAuthToken | None = None,
) -> dict:
    """Push the resized file, its report, the preview grid and a model card to the visitor's Hub repo, in one
    commit, with the visitor's token (never the Space's). `repo_id` defaults to `<you>/<source>-rank<R>`.
    `config_file`: the resized PEFT adapter's `adapter_config.json` (what `/resize` wrote), committed beside it."""
    if not resized_file or not report:
        raise lora_ops.LoraError("nothing to push yet: resize a LoRA first")
    # A path sent by an API caller must never be read from this server: the config comes as an uploaded file.
    report = {**hub.check_report(report), "output": {**report["output"], "config": None}}
    if config_file:
        shutil.copyfile(config_file, Path(resized_file).parent / hub.PEFT_CONFIG_NAME)
        report["output"]["config"] = hub.PEFT_CONFIG_NAME
    token, source = _token(oauth_token), (source or "").strip()
    result = hub.push_resized(
        token,
        resized_file,
        report,
        repo_id=(repo_id or "").strip() or None,
        private=bool(private),
        grid_images=[grid_image] if grid_image is not None else [],
        metrics=plots.card_metrics(metrics) if metrics else None,
        source=source or None,
        license=sources.repo_license(source, token) if source else None,
    )
    return asdict(result)


def list_hub_files(hub_repo: str, oauth_token: gr.OAuthToken | None) -> gr.Dropdown:
    """Fill the file picker with the repo's .safetensors files."""
    files = sources.list_lora_files(hub_repo, token=_token(oauth_token))
    return gr.Dropdown(choices=[(f.label, f.path) for f in files], value=files[0].path, interactive=True)


def load_hub_file(hub_repo: str, hub_file: str | None, oauth_token: gr.OAuthToken | None) -> tuple:
    """Download the picked Hub file (and its PEFT config, when the repo has one beside it) and make it the current
    source (and the repo the push cites)."""
    if not hub_file:
        raise lora_ops.LoraError("pick a file first (list the repo's files, then pick one)")
    directory = _request_dir()
    token = _token(oauth_token)
    path = sources.download_lora(hub_repo, hub_file, directory, token=token, max_bytes=MAX_FILE_BYTES)
    config = sources.download_peft_config(hub_repo, hub_file, directory, token=token)
    return str(path), str(config) if config else None, hub_repo.strip()


@functools.wraps(resize_lora)
def resize_for_page(mode: str, *args, **kwargs) -> tuple[str, dict, dict]:
    """`resize_lora` of the form's values for the ranks `mode` chosen (only that mode's budget is passed on, and it
    must not be blank), and the resized PEFT adapter's new `adapter_config.json` (offered beside the LoRA) when it
    wrote one."""
    bound = inspect.signature(resize_lora).bind_partial(*args, **kwargs)
    for field_mode, field in MODE_FIELDS.items():
        value = bound.arguments.get(field)
        if field_mode != mode:
            bound.arguments[field] = "" if field == "target_size" else None
        elif value is None or value == "":
            raise lora_ops.LoraError(f"give a value for {field.replace('_', ' ')}, or choose another way to pick ranks")
    path, report = resize_lora(*bound.args, **bound.kwargs)
    config = Path(path).parent / hub.PEFT_CONFIG_NAME if report["output"]["config"] else None
    return path, report, gr.update(value=str(config) if config else None, visible=config is not None)


# gradio passes the visitor's OAuth token and a progress tracker by their places in the signature it reads: that of
# resize_lora, after the page's mode.
resize_for_page.__signature__ = inspect.signature(resize_lora).replace(
    parameters=[
        inspect.Parameter("mode", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str),
        *inspect.signature(resize_lora).parameters.values(),
    ]
)


def inspect_source(lora_file: str | None, config_file: str | None) -> dict | None:
    """`inspect_lora` for the page: no report (and no error) while no file is chosen."""
    return inspect_lora(lora_file, config_file) if lora_file else None


def load_example() -> tuple[str, None, str]:
    """The example LoRA as the current source: served from `assets/` on every click, so cache cleaning never
    breaks it."""
    return str(EXAMPLE_LORA), None, ""


def show_inspection(report: dict | None) -> tuple:
    """The source's summary, warnings and metadata for a new inspect report (all blank without one), its JSON, and
    the previous result cleared: resize report, file, summary, layer table and method table."""
    report = report or {}
    metadata_rows = plots.metadata_count(report)
    metadata = gr.Accordion(
        label=plots.metadata_title(report),
        open=metadata_rows <= METADATA_ROWS_SHOWN_OPEN,
        visible=metadata_rows > 0,
    )
    shown = (
        (plots.inspect_markdown(report), "\n".join(plots.warning_lines(report)), plots.metadata_markdown(report))
        if report
        else ("", "", "")
    )
    summary, warnings, metadata_table = shown
    return summary, warnings, metadata, metadata_table, report or None, None, None, "", None, None


def show_plot(
    report: dict | None, result: dict | None, rank: object, mode: str, energy: object, *sd_scripts_values: object
) -> tuple:
    """The spectra and error-vs-rank figure with the chosen rank (and energy bound), and what they mean (with the
    ranks an sd-scripts rule picks in its mode; `sd_scripts_values` are its boxes' values, in SD_SCRIPTS_RULES
    order)."""
    if not report:
        return None, ""
    values = dict(zip((name for name, _, _ in SD_SCRIPTS_RULES), sd_scripts_values))
    try:
        chosen = form.whole_number(rank, "rank", 1, lora_ops.options.MAX_RANK)
        rule_value = form.number_or_none(values[mode], mode) if mode in values else None
    except lora_ops.LoraError as exc:
        return gr.skip(), page_text.error_markdown(str(exc))
    sd_scripts_rule = None if rule_value is None else (mode, rule_value)
    bound = energy if mode == "energy" else None
    figure = plots.spectra_figure(report, chosen_rank=chosen, energy=bound, result=result)
    described = DescribedPlot(
        type="matplotlib",
        plot=processing_utils.encode_plot_to_base64(figure, PLOT_FORMAT),
        chart=plots.spectra_alt_text(report, chosen, bound, result),
    )
    return described, plots.budget_markdown(report, chosen, bound, sd_scripts_rule)


class DescribedPlot(PlotData):
    """A rendered figure with its description: gr.Plot's image alt text is "{chart} plot visualising provided
    data", and a matplotlib figure alone has no `chart` (the page read "undefined plot …")."""

    chart: str


def show_result(result: dict | None) -> tuple:
    """The resize's summary, per-layer table and JSON report."""
    if not result:
        return "", None, None
    return plots.resize_markdown(result), plots.layer_table(result), result


def show_method_controls(method: str) -> tuple:
    used = METHOD_CONTROLS[method]
    return tuple(gr.update(visible=name in used) for name in ("niter", "density", "seed"))


def show_rank_mode(mode: str) -> tuple:
    """One budget at a time: the rank box's label, then the budget boxes (:data:`BUDGET_BOXES`), the chosen mode's
    shown and the others hidden. No values: :data:`RESET_BUDGETS_JS` sets those in the browser, at the click."""
    return (
        gr.update(label="rank" if mode == "rank" else "rank (the most any layer gets)"),
        *(gr.update(visible=mode == box) for box in BUDGET_BOXES),
    )


def show_push_result(result: dict | None) -> str:
    return page_text.push_markdown(result) if result else ""


def compare_methods(
    lora_file: str | None,
    rank: float,
    niter: float,
    density: float | None,
    seed: float,
    progress: gr.Progress = PROGRESS,
) -> object:
    """Every method's worst and median error on the current file at the chosen rank."""
    if not lora_file:
        raise lora_ops.LoraError("no LoRA file: upload one or load one from the Hub first")
    options = form.resize_options(
        rank=rank, method="svd", niter=niter, density=density, seed=seed, energy=None, target_size="", dtype="keep"
    )
    work = _request_dir()
    try:
        return plots.compare_methods(
            lora_file,
            work,
            rank=options.rank,
            niter=options.niter,
            density=options.density,
            seed=options.seed,
            progress=lambda done, total: progress((done, total), desc="trying each method", unit="methods"),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _limit_waiting(queue: Queue, limits: dict[str, int]) -> None:
    """Refuse a new event as "queue full" when its concurrency group already has `limits[group]` events waiting.

    Wraps the queue's `push` (gradio has one `max_size` for all events), so an API client gets gradio's usual
    queue-full answer and the page its usual toast, for that kind of event only.
    """
    push = queue.push

    async def push_within_limits(body: PredictBodyInternal, request: object, username: str | None) -> tuple:
        group = route_utils.get_fn(queue.blocks, None, body).concurrency_id if body.fn_index is not None else None
        waiting = queue.event_queue_per_concurrency_id.get(group)
        if group in limits and waiting is not None and len(waiting.queue) >= limits[group]:
            return False, f"{limits[group]} {group} events are already waiting: try again in a minute", "queue_full"
        return await push(body=body, request=request, username=username)

    queue.push = push_within_limits


def show_gpu_time(prompts: str, steps: float, width: float, height: float, include_base: bool) -> str:
    """The GPU seconds the preview will ask for with these settings, shown before the click."""
    count = sum(1 for line in (prompts or "").splitlines() if line.strip())
    try:
        return preview.gpu_time_markdown(
            count,
            form.whole_number(steps, "steps"),
            form.whole_number(width, "width"),
            form.whole_number(height, "height"),
            bool(include_base),
        )
    except lora_ops.LoraError as exc:
        return page_text.error_markdown(str(exc))


def _shown_text(elem_id: str) -> gr.Markdown:
    """A Markdown block for text that quotes files, Hub repos or errors (escaped by `lora_ops.page_text`), with
    gradio's LaTeX rendering off: an escaped `$$…$$` would still be typeset."""
    return gr.Markdown(elem_id=elem_id, latex_delimiters=[])


@dataclass
class SourcePanel:
    lora_file: gr.File
    config_file: gr.File
    example_button: gr.Button
    hub_repo: gr.Textbox
    list_button: gr.Button
    hub_file: gr.Dropdown
    load_button: gr.Button
    hub_status: gr.Markdown
    status: gr.Markdown
    summary: gr.Markdown
    warnings: gr.Markdown
    metadata: gr.Accordion
    metadata_table: gr.Markdown


def source_panel() -> SourcePanel:
    """1. Source: an upload (with its PEFT config), the example, or a Hub file; then what the file is."""
    gr.Markdown("## 1. Source")
    with gr.Tab("Upload"):
        lora_file = gr.File(label="LoRA (.safetensors)", file_types=[".safetensors"], elem_id="lora-file")
        config_file = gr.File(
            label="adapter_config.json (PEFT adapters only: it holds lora_alpha, the scale)",
            file_types=[".json"],
            elem_id="config-file",
        )
        example_button = gr.Button(
            "Try the example: a small synthetic FLUX.1 LoRA (rank 8)", size="sm", elem_id="example-button"
        )
    with gr.Tab("From the Hub"):
        hub_repo = gr.Textbox("", label="Hub repo id", placeholder="owner/name")
        gr.Examples([[repo] for repo in HUB_EXAMPLES], inputs=[hub_repo], label="Public LoRA repos", **PAGE)
        list_button = gr.Button("List its .safetensors files")
        hub_file = gr.Dropdown(label="file", choices=[], allow_custom_value=True)
        load_button = gr.Button("Load this file", variant="primary")
        hub_status = _shown_text("hub-status")
        gr.Markdown("Private or gated repos: sign in (section 5) first.")
    status = _shown_text("source-status")
    summary = _shown_text("inspect-summary")
    warnings = _shown_text("source-warnings")
    with gr.Accordion("trainer metadata", open=False, visible=False, elem_id="metadata") as metadata:
        metadata_table = _shown_text("metadata-table")
    return SourcePanel(
        lora_file,
        config_file,
        example_button,
        hub_repo,
        list_button,
        hub_file,
        load_button,
        hub_status,
        status,
        summary,
        warnings,
        metadata,
        metadata_table,
    )


@dataclass
class ResizePanel:
    method: gr.Radio
    rank: gr.Number
    mode: gr.Radio
    energy: gr.Number
    target_size: gr.Textbox
    rules: dict[str, gr.Number]
    niter: gr.Number
    density: gr.Number
    seed: gr.Number
    dtype: gr.Radio
    strength: gr.Number
    button: gr.Button
    status: gr.Markdown
    resized_file: gr.File
    config_out: gr.File
    summary: gr.Markdown
    compare_button: gr.Button
    compare_status: gr.Markdown
    methods_table: gr.Dataframe


def resize_panel() -> ResizePanel:
    """2. Resize: method, rank and one per-layer budget; the outcome (file, sizes, errors, progress) right under
    the button."""
    gr.Markdown("## 2. Resize")
    method = gr.Radio(METHOD_CHOICES, value="svd", label="method")
    with gr.Accordion("What the methods do", open=False):
        gr.Markdown(METHOD_NOTES)
    with gr.Row():
        rank = gr.Number(
            4,
            label="rank",
            info=f"1-{lora_ops.options.MAX_RANK}; above a layer's rank: exact upsampling",
            step=1,
            elem_id="rank",
        )
        mode = gr.Radio(RANK_MODES, value="rank", label="ranks", elem_id="rank-mode")
    with gr.Row():
        energy = gr.Number(
            None,
            label="energy to keep (0-1]",
            info="share of each layer's squared norm; error ≤ √(1 − energy)",
            visible=False,
            elem_id="energy",
        )
        target_size = gr.Textbox("", label="target size", placeholder="e.g. 40MB", visible=False, elem_id="size")
        rules = {
            name: gr.Number(None, label=label, info=info, visible=False, elem_id=name.replace("_", "-"))
            for name, label, info in SD_SCRIPTS_RULES
        }
        niter = gr.Number(2, label="niter (power iterations, 0-50)", step=1, visible=False)
        density = gr.Number(None, label="density", info="share of non-zero entries; blank: 1/√rank", visible=False)
        seed = gr.Number(0, label="seed", step=1, visible=False)
    with gr.Row():
        dtype = gr.Radio(DTYPE_CHOICES, value="keep", label="output dtype")
        strength = gr.Number(
            1,
            label="strength baked in",
            info="the weight you would load it at: the result at 1 is the input at this weight",
            elem_id="strength",
        )
    button = gr.Button("Resize", variant="primary", elem_id="resize-button")
    status = _shown_text("resize-status")
    with gr.Row():
        resized_file = gr.File(label="resized LoRA", interactive=False, elem_id="resized-file")
        config_out = gr.File(
            label="its adapter_config.json (keep it beside the LoRA)", interactive=False, visible=False
        )
    summary = _shown_text("result-summary")
    compare_button = gr.Button("Compare the methods on this file at this rank", size="sm")
    compare_status = _shown_text("compare-status")
    methods_table = gr.Dataframe(
        headers=list(plots.METHOD_TABLE_COLUMNS), label="every method", interactive=False, elem_id="methods-table"
    )
    return ResizePanel(
        method,
        rank,
        mode,
        energy,
        target_size,
        rules,
        niter,
        density,
        seed,
        dtype,
        strength,
        button,
        status,
        resized_file,
        config_out,
        summary,
        compare_button,
        compare_status,
        methods_table,
    )


@dataclass
class LayersPanel:
    budget: gr.Markdown
    plot: gr.Plot
    table: gr.Dataframe
    inspect_json: gr.JSON
    resize_json: gr.JSON


def layers_panel() -> LayersPanel:
    """3. Every layer: spectra and exact-SVD error against rank, the per-layer errors of the result, the reports."""
    gr.Markdown("## 3. Every layer")
    budget = _shown_text("budget-summary")
    plot = gr.Plot(
        label="singular spectra and exact-SVD error vs rank",
        show_label=False,
        format=PLOT_FORMAT,
        elem_id="spectra-plot",
    )
    table = gr.Dataframe(
        headers=list(plots.LAYER_TABLE_COLUMNS),
        label="per-layer error of the result (click a header to sort)",
        interactive=False,
        elem_id="layers-table",
    )
    with gr.Accordion("Reports (JSON)", open=False, elem_id="reports"):
        inspect_json = gr.JSON(label="inspect report")
        resize_json = gr.JSON(label="resize report")
    return LayersPanel(budget, plot, table, inspect_json, resize_json)


@dataclass
class PreviewPanel:
    prompts: gr.Textbox
    seed: gr.Number
    steps: gr.Number
    width: gr.Number
    height: gr.Number
    guidance_scale: gr.Number
    include_base: gr.Checkbox
    gpu_time: gr.Markdown
    button: gr.Button
    status: gr.Markdown
    grid: gr.Image
    metrics: gr.JSON


def preview_panel() -> PreviewPanel:
    """4. Preview: the original and the resized LoRA rendered with the same seeds, on ZeroGPU."""
    gr.Markdown("## 4. Preview: original vs resized, same seeds")
    if PREVIEW_UNAVAILABLE:
        gr.Markdown(f"**Preview unavailable:** {page_text.escape_markdown(PREVIEW_UNAVAILABLE)}.")
    with gr.Row():
        with gr.Column(scale=1):
            prompts = gr.Textbox(
                "\n".join(preview.DEFAULT_PROMPTS),
                lines=preview.MAX_PROMPTS,
                label=f"prompts, one per line (at most {preview.MAX_PROMPTS}; each adds GPU time)",
            )
            with gr.Row():
                seed = gr.Number(0, step=1, label="seed (image i uses seed + i)")
                steps = gr.Number(preview.DEFAULT_STEPS, step=1, label=f"steps (1-{preview.MAX_STEPS})")
            with gr.Row():
                side = f"{preview.MIN_SIDE}-{preview.MAX_SIDE}, a multiple of {preview.SIDE_MULTIPLE}"
                width = gr.Number(preview.DEFAULT_SIZE, step=preview.SIDE_MULTIPLE, label=f"width ({side})")
                height = gr.Number(preview.DEFAULT_SIZE, step=preview.SIDE_MULTIPLE, label=f"height ({side})")
            with gr.Row():
                guidance_scale = gr.Number(
                    preview.DEFAULT_GUIDANCE, step=0.5, label=f"guidance scale (0-{preview.MAX_GUIDANCE:g})"
                )
                include_base = gr.Checkbox(False, label="add a base model column (no LoRA)")
            gpu_time = gr.Markdown(
                show_gpu_time(prompts.value, steps.value, width.value, height.value, include_base.value),
                elem_id="gpu-time",
            )
            button = gr.Button("Render preview", variant="primary", interactive=not PREVIEW_UNAVAILABLE)
            status = _shown_text("preview-status")
        with gr.Column(scale=2):
            grid = gr.Image(label="original | resized", type="pil", format="png", interactive=False)
            metrics = gr.JSON(label="image metrics")
    return PreviewPanel(
        prompts, seed, steps, width, height, guidance_scale, include_base, gpu_time, button, status, grid, metrics
    )


@dataclass
class PushPanel:
    repo_id: gr.Textbox
    source_repo: gr.Textbox
    private: gr.Checkbox
    button: gr.Button
    status: gr.Markdown
    result: gr.JSON


def push_panel() -> PushPanel:
    """5. Push: the resized LoRA, its report, the grid and a model card to the visitor's own Hub repo."""
    gr.Markdown("## 5. Push to your Hub account")
    if ON_SPACE:
        gr.LoginButton()
    else:
        gr.Markdown(
            "Sign-in works on the Hugging Face Space. Running locally, push from Python with "
            '`gradio_client.Client(url, oauth_token="hf_...")` and the `/push` endpoint.'
        )
    with gr.Row():
        repo_id = gr.Textbox("", label="repo", placeholder="default: <you>/<source>-rank<R>")
        source_repo = gr.Textbox("", label="source, cited in the card", placeholder="default: the file name")
        private = gr.Checkbox(False, label="private repo")
        button = gr.Button("Push", variant="primary")
    status = _shown_text("push-status")
    result = gr.JSON(visible=False, label="push result")
    return PushPanel(repo_id, source_repo, private, button, status, result)


@dataclass
class SetPanel:
    files: gr.File
    rank: gr.Number
    method: gr.Dropdown
    dtype: gr.Radio
    button: gr.Button
    status: gr.Markdown
    outputs: gr.File
    summary: gr.Dataframe
    report: gr.JSON


@dataclass
class MergePanel:
    files: gr.File
    weights: gr.Textbox
    rank: gr.Number
    method: gr.Dropdown
    dtype: gr.Radio
    button: gr.Button
    status: gr.Markdown
    output: gr.File
    summary: gr.Markdown
    report: gr.JSON


def several_panel() -> tuple[SetPanel, MergePanel]:
    """6. Several LoRAs: a set brought to one rank (compile once, swap freely), or merged into one LoRA."""
    gr.Markdown(
        "## 6. Several LoRAs\nA compiled model swaps LoRAs without recompiling only when they share one rank: bring "
        "a set to one rank, or merge LoRAs of one model into one, exactly."
    )
    with gr.Tab("One rank for a set"):
        with gr.Row():
            set_files = gr.File(
                label="LoRAs (.safetensors, of any layouts)",
                file_count="multiple",
                file_types=[".safetensors"],
                elem_id="set-files",
            )
            with gr.Column():
                set_rank = gr.Number(None, label="rank", info="blank: the set's largest (lossless)", step=1)
                set_method = gr.Dropdown(METHOD_CHOICES, value="svd", label="method")
                set_dtype = gr.Radio(DTYPE_CHOICES, value="keep", label="output dtype")
                set_button = gr.Button("Bring them to one rank", variant="primary", elem_id="set-button")
        set_status = _shown_text("set-status")
        set_outputs = gr.File(label="the set at one rank", file_count="multiple", interactive=False)
        set_summary = gr.Dataframe(
            headers=list(plots.SET_TABLE_COLUMNS), label="every file", interactive=False, elem_id="set-table"
        )
        set_report = gr.JSON(label="set report", visible=False)
    with gr.Tab("Merge"):
        with gr.Row():
            merge_files = gr.File(
                label="LoRAs of one model, in one layout",
                file_count="multiple",
                file_types=[".safetensors"],
                elem_id="merge-files",
            )
            with gr.Column():
                merge_weights = gr.Textbox(
                    "", label="weights, one per file in upload order", placeholder="e.g. 0.8, 0.5; blank: 1 each"
                )
                merge_rank = gr.Number(None, label="rank", info="blank: the sum of the ranks (lossless)", step=1)
                merge_method = gr.Dropdown(METHOD_CHOICES, value="svd", label="method")
                merge_dtype = gr.Radio(DTYPE_CHOICES, value="keep", label="output dtype")
                merge_button = gr.Button("Merge", variant="primary", elem_id="merge-button")
        merge_status = _shown_text("merge-status")
        merge_output = gr.File(label="merged LoRA", interactive=False, elem_id="merged-file")
        merge_summary = _shown_text("merge-summary")
        merge_report = gr.JSON(label="merge report", visible=False)
    return (
        SetPanel(
            set_files, set_rank, set_method, set_dtype, set_button, set_status, set_outputs, set_summary, set_report
        ),
        MergePanel(
            merge_files,
            merge_weights,
            merge_rank,
            merge_method,
            merge_dtype,
            merge_button,
            merge_status,
            merge_output,
            merge_summary,
            merge_report,
        ),
    )


PAGE = {"api_visibility": "private"}  # page-only events: no API endpoint
INSTANT = {**PAGE, "queue": False}  # page-only events that only format: never queued behind work
CPU_WORK = {"concurrency_limit": CPU_CONCURRENCY, "concurrency_id": "cpu"}
GPU_WORK = {"concurrency_limit": 1, "concurrency_id": "gpu"}


def _endpoint(name: str, function: Callable, inputs: list, outputs: list, **options) -> None:
    """Public API endpoint `/name` on a hidden trigger: `function`'s errors reach the caller as one line."""
    gr.Button(visible=False).click(_one_line_errors(function), inputs, outputs, api_name=name, **options)


def build_app() -> gr.Blocks:
    """The Blocks app, queued but not launched."""
    with gr.Blocks(title="LoRA resizer", delete_cache=CACHE_CLEANING) as app:
        gr.Markdown(
            "# LoRA resizer\nChange the rank of a LoRA for FLUX.1, SDXL or SD 1.5, exactly: inspect its spectrum, "
            "pick a rank, see what each layer loses, preview it and push it to your Hub account."
        )
        inspected = gr.State(None)  # the inspect report: a State, so that no widget mounting can fire its change
        result = gr.State(None)  # the resize report
        with gr.Row():
            with gr.Column(scale=1):
                source = source_panel()
            with gr.Column(scale=2):
                resize = resize_panel()
        layers = layers_panel()
        shown = preview_panel()
        push = push_panel()
        several = several_panel()
        _wire(source, resize, layers, shown, push, inspected, result)
        _wire_several(*several)
    for function in app.fns.values():
        if function.name == "_check_login_status":  # the LoginButton's own page-load event
            function.api_visibility = "undocumented"
    app.queue(max_size=QUEUE_SIZE, default_concurrency_limit=CPU_CONCURRENCY)
    _limit_waiting(app._queue, WAITING_LIMITS)
    return app


def _wire(
    source: SourcePanel,
    resize: ResizePanel,
    layers: LayersPanel,
    shown: PreviewPanel,
    push: PushPanel,
    inspected: gr.State,
    result: gr.State,
) -> None:
    """Every event: the public endpoints, then the page's own."""
    resize_inputs = [
        source.lora_file,
        resize.method,
        resize.rank,
        resize.niter,
        resize.density,
        resize.seed,
        resize.energy,
        resize.target_size,
        resize.dtype,
        source.hub_repo,
        source.hub_file,
        source.config_file,
        *resize.rules.values(),
        resize.strength,
    ]
    preview_inputs = [
        source.lora_file,
        resize.resized_file,
        shown.prompts,
        shown.seed,
        shown.steps,
        shown.width,
        shown.height,
        shown.guidance_scale,
        shown.include_base,
    ]
    push_inputs = [
        resize.resized_file,
        layers.resize_json,
        push.repo_id,
        push.private,
        shown.grid,
        shown.metrics,
        push.source_repo,
        resize.config_out,
    ]
    _endpoint("inspect", inspect_lora, [source.lora_file, source.config_file], layers.inspect_json)
    _endpoint("resize", resize_lora, resize_inputs, [resize.resized_file, layers.resize_json], **CPU_WORK)
    _endpoint("preview", preview_lora, preview_inputs, [shown.grid, shown.metrics], **GPU_WORK)
    _endpoint("push", push_lora, push_inputs, push.result, concurrency_limit=CPU_CONCURRENCY)

    # A new source (upload, example, Hub file, PEFT config) -> its inspect report -> summary, warnings, metadata,
    # plot; the previous result is cleared. Triggered by the file's own change, so a failed Hub load changes nothing.
    plot_inputs = [inspected, result, resize.rank, resize.mode, resize.energy, *resize.rules.values()]
    inspection_outputs = [
        source.summary,
        source.warnings,
        source.metadata,
        source.metadata_table,
        layers.inspect_json,
        result,
        resize.resized_file,
        resize.summary,
        layers.table,
        resize.methods_table,
    ]
    gr.on(
        [source.lora_file.change, source.config_file.upload, source.config_file.clear],
        _status_line(inspect_source, 1, cleared=(None,)),
        [source.lora_file, source.config_file],
        [source.status, inspected],
        **PAGE,
    ).then(show_inspection, inspected, inspection_outputs, **INSTANT).then(
        show_plot, plot_inputs, [layers.plot, layers.budget], **INSTANT
    )
    source.lora_file.upload(lambda: "", None, push.source_repo, **INSTANT)
    source.example_button.click(load_example, None, [source.lora_file, source.config_file, push.source_repo], **PAGE)
    source.list_button.click(
        _status_line(list_hub_files, 1), [source.hub_repo], [source.hub_status, source.hub_file], **PAGE
    )
    source.load_button.click(
        _status_line(load_hub_file, 3),
        [source.hub_repo, source.hub_file],
        [source.hub_status, source.lora_file, source.config_file, push.source_repo],
        **PAGE,
    )

    # The chosen rank and budget redraw the plot; the method table's numbers belong to the rank they were made at.
    gr.on(
        [resize.rank.change, resize.mode.change, resize.energy.change, *(box.change for box in resize.rules.values())],
        show_plot,
        plot_inputs,
        [layers.plot, layers.budget],
        trigger_mode="always_last",
        **INSTANT,
    )
    resize.rank.change(plots.methods_at_rank, [resize.methods_table, resize.rank], resize.methods_table, **INSTANT)
    budget_boxes = [resize.energy, resize.target_size, *resize.rules.values()]
    resize.mode.change(None, resize.mode, budget_boxes, js=RESET_BUDGETS_JS, **INSTANT)
    resize.mode.change(show_rank_mode, resize.mode, [resize.rank, *budget_boxes], **INSTANT)
    resize.method.change(show_method_controls, resize.method, [resize.niter, resize.density, resize.seed], **INSTANT)

    resize.button.click(
        _status_line(resize_for_page, 3),
        [resize.mode, *resize_inputs],
        [resize.status, resize.resized_file, result, resize.config_out],
        **PAGE,
        **CPU_WORK,
    ).then(show_result, result, [resize.summary, layers.table, layers.resize_json], **INSTANT).then(
        show_plot, plot_inputs, [layers.plot, layers.budget], **INSTANT
    )
    resize.compare_button.click(
        _status_line(compare_methods, 1),
        [source.lora_file, resize.rank, resize.niter, resize.density, resize.seed],
        [resize.compare_status, resize.methods_table],
        **PAGE,
        **CPU_WORK,
    )

    gr.on(
        [shown.prompts.change, shown.steps.change, shown.width.change, shown.height.change, shown.include_base.change],
        show_gpu_time,
        [shown.prompts, shown.steps, shown.width, shown.height, shown.include_base],
        shown.gpu_time,
        trigger_mode="always_last",
        **INSTANT,
    )
    shown.button.click(
        _status_line(preview_lora, 2), preview_inputs, [shown.status, shown.grid, shown.metrics], **PAGE, **GPU_WORK
    )
    push.button.click(
        _status_line(push_lora, 1),
        push_inputs,
        [push.status, push.result],
        **PAGE,
        concurrency_limit=CPU_CONCURRENCY,
    ).then(show_push_result, push.result, push.status, **INSTANT)


def _wire_several(sets: SetPanel, merge: MergePanel) -> None:
    """The events of "6. Several LoRAs": the `/resize_many` and `/merge` endpoints and their page twins."""
    set_inputs = [sets.files, sets.rank, sets.method, sets.dtype]
    merge_inputs = [merge.files, merge.weights, merge.rank, merge.method, merge.dtype]
    _endpoint("resize_many", resize_many, set_inputs, [sets.outputs, sets.report], **CPU_WORK)
    _endpoint("merge", merge_loras, merge_inputs, [merge.output, merge.report], **CPU_WORK)
    sets.button.click(
        _status_line(resize_many, 2), set_inputs, [sets.status, sets.outputs, sets.report], **PAGE, **CPU_WORK
    ).then(show_set_result, sets.report, sets.summary, **INSTANT)
    merge.button.click(
        _status_line(merge_loras, 2), merge_inputs, [merge.status, merge.output, merge.report], **PAGE, **CPU_WORK
    ).then(show_merge_result, merge.report, merge.summary, **INSTANT)


def show_set_result(result: dict | None) -> object:
    return plots.set_table(result) if result else None


def show_merge_result(report: dict | None) -> str:
    return plots.merge_markdown(report) if report else ""


def _clean_cache_forever() -> None:
    """`clean_cache` on `CACHE_CLEANING`'s schedule, beside gradio's own `delete_cache` timer."""
    while not _cleaning_stopped.wait(CACHE_CLEANING[0]):
        clean_cache()


_cleaning_stopped = threading.Event()
demo = build_app()

if __name__ == "__main__":
    # Resizes run side by side (CPU_CONCURRENCY) on a Space's few vCPUs and each layer's work is small:
    # one BLAS thread per request beats threads fighting over the cores.
    torch.set_num_threads(1)
    threading.Thread(target=_clean_cache_forever, name="cache-cleaning", daemon=True).start()
    demo.launch(**LAUNCH_OPTIONS)
