"""Tests of the tiny FLUX fixture and of lora_ops.preview on it (offline, CPU, 2-step 32x32 renders)."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import save_file

import lora_ops
from lora_ops import LoraError, preview
from lora_ops.sizes import format_size
from tests.tiny_flux import load_tiny_flux

PROMPTS = ["How2Draw a cat", "a dolphin, How2Draw"]
SETTINGS = {"seed": 7, "steps": 2, "width": 32, "height": 32, "guidance_scale": 3.5, "max_sequence_length": 64}


def _render(pipe: FluxPipeline, prompt: str = "How2Draw a cat", seed: int = 0) -> np.ndarray:
    """One 32x32 image, 2 steps, as a float array `[32, 32, 3]` in 0..255."""
    image = pipe(
        prompt,
        num_inference_steps=2,
        width=32,
        height=32,
        guidance_scale=3.5,
        max_sequence_length=64,
        generator=torch.Generator().manual_seed(seed),
    ).images[0]
    return np.asarray(image, dtype=np.float64)


def _pixels(images: list) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.float64) for image in images])


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a / 255 - b / 255) ** 2)))


@pytest.fixture(scope="module")
def resized_files(tiny_flux_lora_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The rank-8 fixture LoRA resized by the core: upsampled to rank 16 and cut to rank 2 (exact SVD)."""
    directory = tmp_path_factory.mktemp("resized")
    files = {"up": directory / "tiny-r16.safetensors", "down": directory / "tiny-r2.safetensors"}
    lora_ops.resize_file(tiny_flux_lora_file, files["up"], lora_ops.ResizeOptions(rank=16))
    lora_ops.resize_file(tiny_flux_lora_file, files["down"], lora_ops.ResizeOptions(rank=2))
    return files


@pytest.fixture
def pipeline_calls(tiny_flux_base_model: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """An empty image cache, and the prompt of every real FluxPipeline call made during the test."""
    preview.CACHE.clear()
    calls: list[str] = []
    real_call = FluxPipeline.__call__

    def counted_call(self: FluxPipeline, prompt: str, **kwargs: object) -> object:
        calls.append(prompt)
        return real_call(self, prompt, **kwargs)

    monkeypatch.setattr(FluxPipeline, "__call__", counted_call)
    return calls


# --- the fixture itself ---------------------------------------------------------------------------------


def test_tiny_flux_loads_offline_and_renders_deterministically(tiny_flux_dir: Path) -> None:
    pipe = load_tiny_flux(tiny_flux_dir)
    pipe.set_progress_bar_config(disable=True)
    first, again, other_seed = _render(pipe), _render(pipe), _render(pipe, seed=1)
    assert first.shape == (32, 32, 3)
    assert np.array_equal(first, again)
    assert np.abs(first - other_seed).mean() > 5


@pytest.mark.parametrize("lora_fixture", ["tiny_flux_lora_file", "tiny_flux_kohya_lora_file"])
def test_lora_file_loads_by_path_and_changes_the_image(
    tiny_flux_dir: Path, lora_fixture: str, request: pytest.FixtureRequest
) -> None:
    pipe = load_tiny_flux(tiny_flux_dir)
    pipe.set_progress_bar_config(disable=True)
    base = _render(pipe)
    pipe.load_lora_weights(str(request.getfixturevalue(lora_fixture)), adapter_name="tiny")
    with_lora = _render(pipe)
    pipe.disable_lora()
    assert np.abs(with_lora - base).mean() > 10
    assert np.array_equal(_render(pipe), base)


# --- preview --------------------------------------------------------------------------------------------


def test_grid_has_one_row_per_prompt_labelled_columns_and_the_single_images(
    pipeline_calls: list[str], tiny_flux_lora_file: Path, resized_files: dict[str, Path]
) -> None:
    result = preview.render_comparison(
        tiny_flux_lora_file, resized_files["down"], PROMPTS, **SETTINGS, include_base=True
    )

    columns, rows, cell = 3, len(PROMPTS), preview.CELL_SIDE
    assert result.columns == ("original", "resized", "base")
    assert result.grid.size == (
        columns * cell + (columns + 1) * preview.GAP,
        preview.HEADER_HEIGHT + rows * (cell + preview.CAPTION_HEIGHT),
    )
    assert result.labels == {
        "original": f"original · rank 8 · {format_size(tiny_flux_lora_file.stat().st_size)}",
        "resized": f"resized (svd) · rank 2 · {format_size(resized_files['down'].stat().st_size)}",
        "base": "base (no LoRA)",
    }
    grid = np.asarray(result.grid)
    for column, name in enumerate(result.columns):
        x = preview.GAP + column * (cell + preview.GAP)
        assert (grid[: preview.HEADER_HEIGHT, x : x + cell] < 128).any(), f"no label drawn above {name}"
        for row, image in enumerate(result.images[name]):
            y = preview.HEADER_HEIGHT + row * (cell + preview.CAPTION_HEIGHT)
            assert image.size == (32, 32)
            assert np.array_equal(grid[y : y + cell : cell // 32, x : x + cell : cell // 32], np.asarray(image))
            caption = grid[y + cell : y + cell + preview.CAPTION_HEIGHT]
            assert (caption < 128).any(), f"no prompt drawn under row {row}"
    assert len(pipeline_calls) == columns * rows
    json.dumps(result.metrics)


def test_identical_seeds_give_identical_original_columns_and_image_i_uses_seed_plus_i(
    pipeline_calls: list[str], tiny_flux_lora_file: Path, resized_files: dict[str, Path]
) -> None:
    first = preview.render_comparison(tiny_flux_lora_file, resized_files["down"], PROMPTS, **SETTINGS)
    preview.CACHE.clear()
    second_prompt_alone = preview.render_comparison(
        tiny_flux_lora_file, resized_files["up"], PROMPTS[1:], **{**SETTINGS, "seed": SETTINGS["seed"] + 1}
    )

    assert pipeline_calls == PROMPTS * 2 + PROMPTS[1:] * 2  # nothing came from the cache
    assert np.array_equal(_pixels(first.images["original"][1:]), _pixels(second_prompt_alone.images["original"]))
    assert not np.array_equal(_pixels(first.images["original"][:1]), _pixels(first.images["original"][1:]))


def test_upsampled_lora_matches_the_original_at_40_db_or_more(
    pipeline_calls: list[str], tiny_flux_lora_file: Path, resized_files: dict[str, Path]
) -> None:
    result = preview.render_comparison(tiny_flux_lora_file, resized_files["up"], PROMPTS, **SETTINGS)

    assert result.metrics["overall"]["psnr_db"] >= 40
    assert all(entry["psnr_db"] >= 40 for entry in result.metrics["prompts"])
    assert result.metrics["overall"]["ssim"] > 0.99
    assert _rmse(_pixels(result.images["original"]), _pixels(result.images["resized"])) < 0.01
    assert [entry["prompt"] for entry in result.metrics["prompts"]] == PROMPTS


def test_rank_reduced_lora_differs_but_stays_closer_to_the_original_than_the_base_model(
    pipeline_calls: list[str], tiny_flux_lora_file: Path, resized_files: dict[str, Path]
) -> None:
    result = preview.render_comparison(
        tiny_flux_lora_file, resized_files["down"], PROMPTS, **SETTINGS, include_base=True
    )

    original, resized, base = (_pixels(result.images[name]) for name in ("original", "resized", "base"))
    assert not np.array_equal(original, resized)
    assert _rmse(original, resized) < _rmse(original, base)
    overall = result.metrics["overall"]
    assert 0 < overall["effect_survived"] < 1
    assert overall["effect_survived"] == pytest.approx(1 - _rmse(original, resized) / _rmse(original, base), abs=1e-4)
    assert overall["psnr_db"] < 40
    assert overall["ssim"] < 1


def test_a_second_rank_renders_only_the_resized_column(
    pipeline_calls: list[str], tiny_flux_lora_file: Path, resized_files: dict[str, Path]
) -> None:
    first = preview.render_comparison(tiny_flux_lora_file, resized_files["down"], PROMPTS, **SETTINGS)
    assert len(pipeline_calls) == 2 * len(PROMPTS)
    assert (first.rendered, first.cached) == (2 * len(PROMPTS), 0)

    second = preview.render_comparison(tiny_flux_lora_file, resized_files["up"], PROMPTS, **SETTINGS)
    assert len(pipeline_calls) == 3 * len(PROMPTS)
    assert (second.rendered, second.cached) == (len(PROMPTS), len(PROMPTS))
    assert np.array_equal(_pixels(first.images["original"]), _pixels(second.images["original"]))

    other_steps = preview.render_comparison(
        tiny_flux_lora_file, resized_files["up"], PROMPTS[:1], **{**SETTINGS, "steps": 3}
    )
    assert len(pipeline_calls) == 3 * len(PROMPTS) + 2  # other settings are another key: both columns again
    assert other_steps.cached == 0


def test_image_cache_drops_the_least_recently_used_images_beyond_its_bound() -> None:
    from PIL import Image

    cache = preview.ImageCache(max_pixels=3 * 32 * 32)
    for key in "abc":
        cache.put((key,), Image.new("RGB", (32, 32)))
    assert cache.get(("a",)) is not None  # now the most recently used
    cache.put(("d",), Image.new("RGB", (32, 32)))
    assert cache.get(("b",)) is None
    assert all(cache.get((key,)) is not None for key in "acd")


def test_progress_is_reported_after_every_denoising_step(
    pipeline_calls: list[str], tiny_flux_lora_file: Path, resized_files: dict[str, Path]
) -> None:
    reports: list[tuple[int, int]] = []
    preview.render_comparison(
        tiny_flux_lora_file,
        resized_files["down"],
        PROMPTS[:1],
        **SETTINGS,
        progress=lambda done, total: reports.append((done, total)),
    )
    total = 2 * SETTINGS["steps"]
    assert reports == [(done, total) for done in range(1, total + 1)]


def test_kohya_layout_files_preview_too(
    pipeline_calls: list[str], tiny_flux_kohya_lora_file: Path, tmp_path: Path
) -> None:
    upsampled = tmp_path / "kohya-r12.safetensors"
    lora_ops.resize_file(tiny_flux_kohya_lora_file, upsampled, lora_ops.ResizeOptions(rank=12))
    result = preview.render_comparison(tiny_flux_kohya_lora_file, upsampled, PROMPTS[:1], **SETTINGS, include_base=True)

    assert result.metrics["overall"]["psnr_db"] >= 40
    assert result.metrics["overall"]["effect_survived"] > 0.95


# --- GPU time -------------------------------------------------------------------------------------------


def test_the_gpu_function_takes_and_returns_picklable_values(
    pipeline_calls: list[str], tiny_flux_lora_file: Path, tiny_flux_base_model: Path
) -> None:
    lora = preview.LoraRef(str(tiny_flux_lora_file), lora_ops.inspect_file(tiny_flux_lora_file)["sha256"])
    job = preview.RenderJob(
        str(tiny_flux_base_model), tuple(PROMPTS), 0, 2, 32, 32, 3.5, 64, (preview.ColumnJob("original", lora, (1,)),)
    )
    images = pickle.loads(pickle.dumps(preview.render_images(pickle.loads(pickle.dumps(job)))))
    assert list(images) == ["original"]
    assert list(images["original"]) == [1]
    assert images["original"][1].size == (32, 32)
    assert pipeline_calls == PROMPTS[1:]


def test_gpu_estimate_grows_with_images_steps_and_size() -> None:
    estimate = preview.estimate_gpu_seconds
    assert estimate(8, 20, 1024, 1024) > estimate(8, 10, 1024, 1024)
    assert estimate(8, 20, 1024, 1024) > estimate(8, 20, 512, 512)
    assert estimate(8, 20, 1024, 1024) > estimate(8, 20, 1024, 512)
    assert estimate(8, 20, 1024, 1024) > estimate(4, 20, 1024, 1024)
    assert estimate(1, 1, 32, 32) > 0


def test_the_default_preview_fits_an_anonymous_quota_with_margin() -> None:
    """Requested seconds (estimate x ZeroGPU's factor) of the default preview: at most 3/4 of an anonymous
    visitor's daily quota; with the base column, or a second rank (original column cached), within it."""
    anonymous = dict(preview.DAILY_GPU_QUOTAS)["anonymous visitor"]
    steps, side, prompts = preview.DEFAULT_STEPS, preview.DEFAULT_SIZE, len(preview.DEFAULT_PROMPTS)
    assert preview.gpu_request(2 * prompts, steps, side, side) == preview.DEFAULT_REQUEST
    assert preview.DEFAULT_REQUEST.requested <= 0.75 * anonymous
    assert preview.gpu_request(3 * prompts, steps, side, side).requested <= anonymous
    assert preview.gpu_request(prompts, steps, side, side).requested <= anonymous
    assert preview.DEFAULT_REQUEST.quotas_allowing() == [who for who, _ in preview.DAILY_GPU_QUOTAS]


def test_requested_seconds_apply_zerogpus_factor() -> None:
    for images, steps, side in ((4, 20, 512), (8, 20, 1024), (1, 1, 32)):
        request = preview.gpu_request(images, steps, side, side)
        assert request.estimated == preview.estimate_gpu_seconds(images, steps, side, side)
        assert abs(request.requested - request.estimated * preview.ZEROGPU_DURATION_FACTOR) <= 0.5
    old_default = preview.gpu_request(8, 20, 1024, 1024)  # 4 prompts x 2 columns at 1024x1024
    assert old_default.quotas_allowing() == ["free account", "PRO account"]


def test_the_page_shows_the_requested_seconds_before_the_click() -> None:
    request = preview.gpu_request(9, 28, 768, 768)  # 3 prompts x 3 columns
    text = preview.gpu_time_markdown(3, 28, 768, 768, include_base=True)
    assert f"{request.requested} s ({request.estimated} s estimated × {preview.ZEROGPU_DURATION_FACTOR:g}" in text
    assert "fits the daily quota of: " + ", ".join(request.quotas_allowing()) in text
    over = preview.gpu_time_markdown(preview.MAX_PROMPTS, preview.MAX_STEPS, 1536, 1536, include_base=True)
    assert f"over the {preview.GPU_SECONDS_LIMIT} s limit" in over
    assert "\n" not in text and "\n" not in over


def test_gpu_duration_counts_only_the_images_the_job_renders() -> None:
    def job(*counts: int) -> preview.RenderJob:
        columns = tuple(preview.ColumnJob(f"c{i}", None, tuple(range(n))) for i, n in enumerate(counts))
        return preview.RenderJob("model", ("p",) * 4, 0, 20, 1024, 1024, 3.5, 512, columns)

    assert preview.gpu_duration(job(4, 4)) == preview.estimate_gpu_seconds(8, 20, 1024, 1024)
    assert preview.gpu_duration(job(0, 4)) == preview.estimate_gpu_seconds(4, 20, 1024, 1024)


def test_previews_over_the_gpu_limit_are_refused_before_rendering(
    pipeline_calls: list[str], tiny_flux_lora_file: Path, resized_files: dict[str, Path]
) -> None:
    request = preview.gpu_request(18, 50, 1536, 1536)
    with pytest.raises(LoraError) as refused:
        preview.render_comparison(
            tiny_flux_lora_file, resized_files["down"], ["a"] * 6, 0, 50, 1536, 1536, 3.5, include_base=True
        )
    assert str(refused.value).startswith(
        f"this preview of 18 images needs about {request.requested} s ({request.estimated} s estimated × 1.5 on "
        f"ZeroGPU), over the {preview.GPU_SECONDS_LIMIT} s limit"
    )
    assert "\n" not in str(refused.value)
    assert pipeline_calls == []


def test_a_lora_error_on_the_gpu_comes_back_as_a_value(tiny_flux_lora_file: Path, tmp_path: Path) -> None:
    """The GPU function returns its LoraErrors (ZeroGPU would keep only their class name); `render_images` raises."""
    lora = preview.LoraRef(str(tiny_flux_lora_file), lora_ops.inspect_file(tiny_flux_lora_file)["sha256"])
    columns = (preview.ColumnJob("original", lora, (0,)),)
    job = preview.RenderJob(str(tmp_path / "missing"), tuple(PROMPTS), 0, 1, 32, 32, 3.5, 16, columns)
    outcome = preview.render_on_gpu(job)
    assert isinstance(outcome, preview.GpuFailure)
    assert pickle.loads(pickle.dumps(outcome)) == outcome
    with pytest.raises(LoraError) as raised:
        preview.render_images(job)
    assert str(raised.value) == outcome.message
    assert f"base model {tmp_path / 'missing'}" in outcome.message


# --- clear errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompts", "settings", "message"),
    [
        ([], {}, "give at least one prompt"),
        (["a", "  "], {}, "prompt 2 is empty"),
        (["a"] * 7, {}, "at most 6 prompts"),
        (PROMPTS, {"width": 40}, "multiples of 16"),
        (PROMPTS, {"height": 1600}, "between 32 and 1536"),
        (PROMPTS, {"steps": 0}, "steps must be between 1 and 50"),
        (PROMPTS, {"seed": -1}, "seed must be between"),
        (PROMPTS, {"guidance_scale": 50.0}, "guidance scale"),
    ],
)
def test_bad_settings_are_refused_in_one_line(
    pipeline_calls: list[str],
    tiny_flux_lora_file: Path,
    resized_files: dict[str, Path],
    prompts: list[str],
    settings: dict,
    message: str,
) -> None:
    with pytest.raises(LoraError, match=message) as error:
        preview.render_comparison(tiny_flux_lora_file, resized_files["down"], prompts, **{**SETTINGS, **settings})
    assert "\n" not in str(error.value)
    assert pipeline_calls == []


def test_files_the_core_refuses_are_refused(
    pipeline_calls: list[str], tiny_flux_lora_file: Path, tmp_path: Path
) -> None:
    not_safetensors = tmp_path / "notes.safetensors"
    not_safetensors.write_bytes(b"this is not a LoRA")
    with pytest.raises(LoraError, match="notes.safetensors"):
        preview.render_comparison(tiny_flux_lora_file, not_safetensors, PROMPTS, **SETTINGS)
    assert pipeline_calls == []


def test_non_flux_loras_are_refused(pipeline_calls: list[str], tiny_flux_lora_file: Path, tmp_path: Path) -> None:
    sd_lora = tmp_path / "sd15.safetensors"
    module = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file(
        {
            f"{module}.lora_down.weight": torch.randn(4, 320),
            f"{module}.lora_up.weight": torch.randn(320, 4),
            f"{module}.alpha": torch.tensor(4.0),
        },
        sd_lora,
    )
    with pytest.raises(
        LoraError, match="sd15.safetensors is a kohya .* file for SD 1.x/2.x; the preview renders FLUX.1 LoRAs only"
    ):
        preview.render_comparison(tiny_flux_lora_file, sd_lora, PROMPTS, **SETTINGS)
    assert pipeline_calls == []


def test_a_base_model_missing_offline_is_explained(
    tiny_flux_lora_file: Path, resized_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    preview.CACHE.clear()
    monkeypatch.setenv("LORA_OPS_BASE_MODEL", "lora-ops-tests/no-such-model")
    with pytest.raises(LoraError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE=1") as error:
        preview.render_comparison(tiny_flux_lora_file, resized_files["down"], PROMPTS, **SETTINGS)
    assert "LORA_OPS_BASE_MODEL" in str(error.value)
    assert "\n" not in str(error.value)


def test_the_gpu_seconds_benchmark_runs_on_a_flux_pipeline(
    tiny_flux_dir: Path, tiny_flux_lora_file: Path, tmp_path: Path
) -> None:
    """`benchmarks/gpu_seconds.py` on the tiny pipeline (CPU): every image timed step by step, constants fitted."""
    from benchmarks import gpu_seconds

    output = tmp_path / "gpu-seconds.json"
    lines: list[str] = []
    arguments = ["--model", str(tiny_flux_dir), "--lora", str(tiny_flux_lora_file), "--prompts", *PROMPTS]
    result = gpu_seconds.measure(str(tiny_flux_dir), tuple(PROMPTS), [32, 48], 2, tiny_flux_lora_file, lines.append)
    written = gpu_seconds.main([*arguments, "--sizes", "32", "48", "--steps", "2", "--json", str(output)])

    assert json.loads(output.read_text()) == json.loads(json.dumps(written))
    for measured in (result, written):
        assert [(i["width"], i["steps"], len(i["step_seconds"])) for i in measured["images"]] == [
            (side, 2, 2) for side in (32, 48) for _ in PROMPTS
        ]
        assert all(i["seconds"] > sum(i["step_seconds"]) > 0 for i in measured["images"])
        assert measured["lora_load_seconds"] > 0
        fit = measured["fit"]
        image = preview.image_seconds(
            preview.DEFAULT_STEPS,
            preview.DEFAULT_SIZE,
            preview.DEFAULT_SIZE,
            fit["seconds_per_image"],
            tuple(fit["seconds_per_step_megapixel"]),
        )
        expected = math.ceil(preview.SECONDS_FIXED + preview.DEFAULT_REQUEST.images * image)
        assert measured["default_preview_estimated_seconds"] == expected
    assert len(lines) == 2 * len(PROMPTS) + 1 and lines[-1].startswith("fitted: SECONDS_PER_IMAGE = ")
