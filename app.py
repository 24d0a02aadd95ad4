"""lora-resizer Space: inspect a LoRA, change its rank exactly, preview it and push it to your Hub account.

This file only lays out the Gradio Blocks UI and wires events to `lora_ops`. Public API (gradio_client):
`/inspect`, `/resize`, `/preview`, `/push`; every other event is private. Run locally with `python app.py`.
"""

import spaces  # noqa: F401  (first: on ZeroGPU it patches torch before anything initialises CUDA)

# isort: split

import functools
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import gradio as gr
import torch
from gradio import route_utils
from gradio.data_classes import PredictBodyInternal
from gradio.queueing import Queue
from PIL import Image

import lora_ops
from lora_ops import hub, plots, preview, sources

APP_DIR = Path(__file__).resolve().parent
EXAMPLE_LORA = APP_DIR / "assets" / "example-flux-lora.safetensors"
HUB_EXAMPLES = ["glif/how2draw", "cocktailpeanut/optimus"]
ON_SPACE = os.environ.get("SYSTEM") == "spaces"  # gradio's own test: real sign-in there, a mock elsewhere
MAX_FILE_BYTES = 1024**3
LAUNCH_OPTIONS = {"max_file_size": MAX_FILE_BYTES}
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
    """Show the `LoraError`s of an event handler as gradio errors: one line, no traceback."""

    @functools.wraps(function)
    def handler(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except lora_ops.LoraError as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    return handler


def _request_dir() -> Path:
    """A fresh, unguessable folder inside gradio's cache: files returned from it are cleaned by `delete_cache`."""
    path = Path(demo.GRADIO_CACHE) / "lora-resizer" / uuid.uuid4().hex
    path.mkdir(parents=True)
    return path


def _token(oauth_token: gr.OAuthToken | None) -> str | None:
    return oauth_token.token if oauth_token is not None else None


@_one_line_errors
def inspect_lora(lora_file: str | None) -> dict:
    """Describe a LoRA file: layout, ranks, dtype, size, trainer metadata and every layer's singular values."""
    if not lora_file:
        raise lora_ops.LoraError("no LoRA file given: upload a .safetensors file")
    return lora_ops.inspect_file(lora_file)


@_one_line_errors
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
    oauth_token: gr.OAuthToken | None = None,
    progress: gr.Progress = PROGRESS,
) -> tuple[str, dict]:
    """Resize a LoRA (an uploaded file, or `hub_file` of Hub repo `hub_repo`) and return the new file and report.

    `rank` is the rank of every layer (reduced above it, extended exactly below it) or, with `energy` (share of
    each layer's squared norm to keep, 0-1) or `target_size` (e.g. "40MB"), the cap of per-layer ranks.
    `density`, `energy` and `target_size` left blank (None, 0 or "") mean the default and off.
    """
    work = _request_dir()
    try:
        options = lora_ops.ResizeOptions(
            rank=int(rank),
            method=method,
            niter=int(niter),
            density=density or None,  # the UI sends 0 for a blank number
            seed=int(seed),
            energy=energy or None,
            target_size=lora_ops.parse_size(target_size) if target_size and target_size.strip() else None,
            dtype=dtype,
        )
        source = _source_path(lora_file, hub_repo, hub_file, _token(oauth_token), work / "source")
        destination = work / plots.output_name(source.name, options)
        progress(0, desc="reading the LoRA")
        report = lora_ops.resize_file(
            source,
            destination,
            options,
            progress=lambda done, total: progress((done, total), desc="resizing layers", unit="layers"),
        )
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # no partial output
        raise
    shutil.rmtree(work / "source", ignore_errors=True)
    return str(destination), report


def _source_path(
    lora_file: str | None, hub_repo: str, hub_file: str | None, token: str | None, directory: Path
) -> Path:
    """The uploaded file when there is one, else `hub_file` of `hub_repo` downloaded into `directory`."""
    if lora_file:
        return Path(lora_file)
    if hub_repo and hub_repo.strip():
        if not hub_file or not hub_file.strip():
            raise lora_ops.LoraError(f"pick a .safetensors file of {hub_repo.strip()} (hub_file)")
        return sources.download_lora(hub_repo, hub_file, directory, token=token, max_bytes=MAX_FILE_BYTES)
    raise lora_ops.LoraError("no LoRA given: upload a .safetensors file or name a Hub repo and file")


class _StepProgress:
    """Denoising steps reported to `gr.Progress`; an object, not a closure, so that ZeroGPU can pickle it."""

    def __init__(self, progress: gr.Progress) -> None:
        self.progress = progress

    def __call__(self, done: int, total: int) -> None:
        self.progress((done, total), desc="rendering", unit="steps")


@_one_line_errors
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
    result = preview.render_comparison(
        original_file,
        resized_file,
        [line for line in (prompts or "").splitlines() if line.strip()],
        int(seed),
        int(steps),
        int(width),
        int(height),
        float(guidance_scale),
        include_base=include_base,
        progress=_StepProgress(progress),
    )
    return result.grid, result.metrics


@_one_line_errors
def push_lora(
    resized_file: str | None,
    report: dict | None,
    repo_id: str = "",
    private: bool = False,
    grid_image: Image.Image | None = None,
    metrics: dict | None = None,
    source: str = "",
    oauth_token: gr.OAuthToken | None = None,
) -> dict:
    """Push the resized file, its report, the preview grid and a model card to the visitor's Hub repo, in one
    commit, with the visitor's token (never the Space's). `repo_id` defaults to `<you>/<source>-rank<R>`."""
    if not resized_file or not report:
        raise lora_ops.LoraError("nothing to push yet: resize a LoRA first")
    # The Space writes no PEFT config, and a path sent by an API caller must never be read from this server.
    report = {**hub.check_report(report), "output": {**report["output"], "config": None}}
    token, source = _token(oauth_token), source.strip()
    result = hub.push_resized(
        token,
        resized_file,
        report,
        repo_id=repo_id.strip() or None,
        private=private,
        grid_images=[grid_image] if grid_image is not None else [],
        metrics=plots.card_metrics(metrics) if metrics else None,
        source=source or None,
        license=sources.repo_license(source, token) if source else None,
    )
    return asdict(result)


@_one_line_errors
def list_hub_files(hub_repo: str, oauth_token: gr.OAuthToken | None) -> gr.Dropdown:
    """Fill the file picker with the repo's .safetensors files."""
    files = sources.list_lora_files(hub_repo, token=_token(oauth_token))
    return gr.Dropdown(choices=[(f.label, f.path) for f in files], value=files[0].path, interactive=True)


@_one_line_errors
def load_hub_file(hub_repo: str, hub_file: str | None, oauth_token: gr.OAuthToken | None) -> tuple[str, str]:
    """Download the picked Hub file and make it the current source (and the repo the push cites)."""
    if not hub_file:
        raise lora_ops.LoraError("pick a file first (list the repo's files)")
    path = sources.download_lora(
        hub_repo, hub_file, _request_dir(), token=_token(oauth_token), max_bytes=MAX_FILE_BYTES
    )
    return str(path), hub_repo.strip()


def show_inspection(report: dict | None, rank: float) -> tuple:
    """Summary and rank slider range for a new inspect report; the previous result is cleared."""
    if not report:
        return "", gr.Slider(), None, None, "", None
    maximum = plots.rank_slider_maximum(report)
    slider = gr.Slider(maximum=maximum, value=min(int(rank), maximum))
    return plots.inspect_markdown(report), slider, None, None, "", None


@_one_line_errors
def show_plot(
    report: dict | None, result: dict | None, rank: float, budget_kind: str, budget_value: float | None
) -> tuple:
    """The spectra and error-vs-rank figure, with the budget summary."""
    if not report:
        return None, ""
    max_error = plots.error_budget(budget_value if budget_value is not None else 0.0, budget_kind)
    figure = plots.spectra_figure(report, chosen_rank=int(rank), max_error=max_error, result=result)
    return figure, plots.budget_markdown(report, int(rank), max_error)


def show_result(result: dict) -> tuple:
    return plots.resize_markdown(result), plots.layer_table(result)


def show_method_controls(method: str) -> tuple:
    used = METHOD_CONTROLS[method]
    return tuple(gr.update(visible=name in used) for name in ("niter", "density", "seed"))


def show_push_result(result: dict) -> str:
    visibility = "private" if result["private"] else "public"
    return f"Pushed to [{result['repo_id']}]({result['repo_url']}) ({visibility}): [commit]({result['commit_url']})"


@_one_line_errors
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
    work = _request_dir()
    try:
        return plots.compare_methods(
            lora_file,
            work,
            rank=int(rank),
            niter=int(niter),
            density=density or None,  # the UI sends 0 for a blank number
            seed=int(seed),
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
    return preview.gpu_time_markdown(count, int(steps), int(width), int(height), include_base)


def build_app() -> gr.Blocks:
    """The Blocks app, queued but not launched."""
    with gr.Blocks(title="LoRA resizer", delete_cache=CACHE_CLEANING) as app:
        gr.Markdown(
            "# LoRA resizer\nChange the rank of a LoRA for FLUX.1, SDXL or SD 1.5, exactly: inspect its spectrum, "
            "pick a rank, see what each layer loses, preview it and push it to your Hub account."
        )
        inspect_report = gr.JSON(label="inspect report", render=False)
        with gr.Row():
            with gr.Column(scale=1):
                gr.Markdown("## 1. Source")
                with gr.Tab("Upload"):
                    lora_file = gr.File(label="LoRA (.safetensors)", file_types=[".safetensors"], elem_id="lora-file")
                    if EXAMPLE_LORA.is_file():
                        example = gr.Examples(
                            [[str(EXAMPLE_LORA)]],
                            inputs=[lora_file],
                            label="Example: a small synthetic FLUX.1 LoRA made by this project (rank 8)",
                            api_visibility="private",
                        )
                        example.load_input_event.then(inspect_lora, lora_file, inspect_report, api_visibility="private")
                with gr.Tab("From the Hub"):
                    hub_repo = gr.Textbox("", label="Hub repo id", placeholder="owner/name")
                    gr.Examples(
                        [[repo] for repo in HUB_EXAMPLES],
                        inputs=[hub_repo],
                        label="Public LoRA repos",
                        api_visibility="private",
                    )
                    list_button = gr.Button("List its .safetensors files")
                    hub_file = gr.Dropdown(label="file", choices=[], allow_custom_value=True)
                    load_button = gr.Button("Load this file", variant="primary")
                    gr.Markdown("Private or gated repos: sign in (section 5) first.")
            with gr.Column(scale=2):
                gr.Markdown("## 2. Resize")
                method = gr.Radio(METHOD_CHOICES, value="svd", label="method")
                gr.Markdown(METHOD_NOTES)
                with gr.Row():
                    rank = gr.Slider(
                        1,
                        plots.RANK_SLIDER_CAP,
                        value=4,
                        step=1,
                        label="rank",
                        info="above the current rank: exact upsampling",
                    )
                    niter = gr.Slider(0, 10, value=2, step=1, label="niter (power iterations)", visible=False)
                    density = gr.Number(
                        None, label="density", info="share of non-zero entries; 0 or blank: 1/√rank", visible=False
                    )
                    seed = gr.Number(0, precision=0, label="seed", visible=False)
                with gr.Accordion("Per-layer ranks and output dtype", open=False):
                    energy = gr.Number(
                        None, label="energy", info="keep this share of each layer's energy (0-1]; 0 or blank: off"
                    )
                    target_size = gr.Textbox("", label="target size", placeholder="e.g. 40MB; blank: off")
                    dtype = gr.Radio(DTYPE_CHOICES, value="keep", label="output dtype")
                with gr.Row():
                    resize_button = gr.Button("Resize", variant="primary", elem_id="resize-button")
                    compare_button = gr.Button("Compare the methods on this file")
                methods_table = gr.Dataframe(
                    headers=list(plots.METHOD_TABLE_COLUMNS), label="every method at this rank", interactive=False
                )
        gr.Markdown("## 3. Inspect and result")
        inspect_summary = gr.Markdown(elem_id="inspect-summary")
        with gr.Row():
            budget_kind = gr.Radio(["error", "energy"], value="error", label="budget", scale=1)
            budget_value = gr.Number(0.05, minimum=0, maximum=1, label="budget value (0-1)", scale=1)
            budget_summary = gr.Markdown()
        plot = gr.Plot(label="singular spectra and exact-SVD error vs rank", show_label=False, elem_id="spectra-plot")
        with gr.Row():
            resized_file = gr.File(label="resized LoRA", interactive=False, elem_id="resized-file")
            result_summary = gr.Markdown(elem_id="result-summary")
        layers_table = gr.Dataframe(
            headers=list(plots.LAYER_TABLE_COLUMNS),
            label="per-layer error (click a header to sort)",
            interactive=False,
            elem_id="layers-table",
        )
        with gr.Accordion("Reports (JSON)", open=False):
            inspect_report.render()
            resize_report = gr.JSON(label="resize report")

        gr.Markdown("## 4. Preview: original vs resized, same seeds")
        if PREVIEW_UNAVAILABLE:
            gr.Markdown(f"**Preview unavailable:** {PREVIEW_UNAVAILABLE}.")
        with gr.Row():
            with gr.Column(scale=1):
                prompts = gr.Textbox(
                    "\n".join(preview.DEFAULT_PROMPTS),
                    lines=preview.MAX_PROMPTS,
                    label=f"prompts, one per line (at most {preview.MAX_PROMPTS}; each adds GPU time)",
                )
                with gr.Row():
                    preview_seed = gr.Number(0, precision=0, label="seed (image i uses seed + i)")
                    steps = gr.Slider(1, preview.MAX_STEPS, value=preview.DEFAULT_STEPS, step=1, label="steps")
                with gr.Row():
                    side = {"minimum": preview.MIN_SIDE, "maximum": preview.MAX_SIDE, "step": preview.SIDE_MULTIPLE}
                    width = gr.Slider(**side, value=preview.DEFAULT_SIZE, label="width")
                    height = gr.Slider(**side, value=preview.DEFAULT_SIZE, label="height")
                with gr.Row():
                    guidance_scale = gr.Slider(
                        0, preview.MAX_GUIDANCE, value=preview.DEFAULT_GUIDANCE, step=0.5, label="guidance scale"
                    )
                    include_base = gr.Checkbox(False, label="add a base model column (no LoRA)")
                gpu_time = gr.Markdown(
                    show_gpu_time(prompts.value, steps.value, width.value, height.value, include_base.value),
                    elem_id="gpu-time",
                )
                preview_button = gr.Button("Render preview", variant="primary", interactive=not PREVIEW_UNAVAILABLE)
            with gr.Column(scale=2):
                grid = gr.Image(label="original | resized", type="pil", format="png", interactive=False)
                metrics = gr.JSON(label="image metrics")

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
            push_button = gr.Button("Push", variant="primary")
        push_result = gr.JSON(visible=False, label="push result")
        push_link = gr.Markdown()

        # Source -> inspect report -> summary and plot.
        lora_file.upload(inspect_lora, lora_file, inspect_report, api_name="inspect")
        lora_file.upload(lambda: "", None, source_repo, api_visibility="private", queue=False)
        lora_file.clear(lambda: None, None, inspect_report, api_visibility="private", queue=False)
        list_button.click(list_hub_files, hub_repo, hub_file, api_visibility="private")
        load_button.click(
            load_hub_file, [hub_repo, hub_file], [lora_file, source_repo], api_visibility="private"
        ).success(inspect_lora, lora_file, inspect_report, api_visibility="private")
        plot_inputs = [inspect_report, resize_report, rank, budget_kind, budget_value]
        inspect_report.change(
            show_inspection,
            [inspect_report, rank],
            [inspect_summary, rank, resize_report, resized_file, result_summary, layers_table],
            api_visibility="private",
            queue=False,
        ).then(show_plot, plot_inputs, [plot, budget_summary], api_visibility="private", queue=False)
        gr.on(
            [rank.release, budget_kind.change, budget_value.change],
            show_plot,
            plot_inputs,
            [plot, budget_summary],
            api_visibility="private",
            trigger_mode="always_last",
            queue=False,
        )
        method.change(show_method_controls, method, [niter, density, seed], api_visibility="private", queue=False)
        gr.on(
            [prompts.change, steps.change, width.change, height.change, include_base.change],
            show_gpu_time,
            [prompts, steps, width, height, include_base],
            gpu_time,
            api_visibility="private",
            trigger_mode="always_last",
            queue=False,
        )

        # Resize, compare, preview, push.
        resize_button.click(
            resize_lora,
            [lora_file, method, rank, niter, density, seed, energy, target_size, dtype, hub_repo, hub_file],
            [resized_file, resize_report],
            api_name="resize",
            concurrency_limit=CPU_CONCURRENCY,
            concurrency_id="cpu",
        ).success(
            show_result, resize_report, [result_summary, layers_table], api_visibility="private", queue=False
        ).then(show_plot, plot_inputs, [plot, budget_summary], api_visibility="private", queue=False)
        compare_button.click(
            compare_methods,
            [lora_file, rank, niter, density, seed],
            methods_table,
            api_visibility="private",
            concurrency_limit=CPU_CONCURRENCY,
            concurrency_id="cpu",
        )
        preview_button.click(
            preview_lora,
            [lora_file, resized_file, prompts, preview_seed, steps, width, height, guidance_scale, include_base],
            [grid, metrics],
            api_name="preview",
            concurrency_limit=1,
            concurrency_id="gpu",
        )
        push_button.click(
            push_lora,
            [resized_file, resize_report, repo_id, private, grid, metrics, source_repo],
            push_result,
            api_name="push",
            concurrency_limit=CPU_CONCURRENCY,
        ).success(show_push_result, push_result, push_link, api_visibility="private", queue=False)
    for function in app.fns.values():
        if function.name == "_check_login_status":  # the LoginButton's own page-load event
            function.api_visibility = "undocumented"
    app.queue(max_size=QUEUE_SIZE, default_concurrency_limit=CPU_CONCURRENCY)
    _limit_waiting(app._queue, WAITING_LIMITS)
    return app


demo = build_app()

if __name__ == "__main__":
    # Resizes run side by side (CPU_CONCURRENCY) on a Space's few vCPUs and each layer's work is small:
    # one BLAS thread per request beats threads fighting over the cores.
    torch.set_num_threads(1)
    demo.launch(**LAUNCH_OPTIONS)
