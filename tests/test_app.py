"""The Space over loopback HTTP: every public endpoint called through gradio_client, as users' scripts call it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.utils import QueueError
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import lora_ops
from lora_ops import page_text
from tests.fixtures_app import EXAMPLE_LORA, GATED_READER_TOKEN, GATED_REPO, LICENSE, PUBLIC_REPO
from tests.fixtures_lora import CASE_BY_NAME, write_case

ROOT = Path(__file__).resolve().parent.parent
RESIZE_PARAMETERS = ["lora_file", "method", "rank", "niter", "density", "seed", "energy"]
PREVIEW_PARAMETERS = [
    "original_file",
    "resized_file",
    "prompts",
    "seed",
    "steps",
    "width",
    "height",
    "guidance_scale",
]


def _ranks(path: str | Path) -> set[int]:
    """Ranks of every diffusers-layout pair in a file (A is [r, in], B is [out, r])."""
    with safe_open(str(path), "pt") as handle:
        keys = list(handle.keys())
        down = {handle.get_slice(k).get_shape()[0] for k in keys if k.endswith("lora_A.weight")}
        up = {handle.get_slice(k).get_shape()[1] for k in keys if k.endswith("lora_B.weight")}
    assert down == up
    return down


def _leftovers(app_module) -> list[Path]:
    """Files left in the app's per-request folders (outputs awaiting `delete_cache`, or leaks)."""
    return sorted(p for p in (Path(app_module.demo.GRADIO_CACHE) / "lora-resizer").rglob("*") if p.is_file())


def test_public_api_names_and_parameters(app_client):
    endpoints = app_client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/inspect", "/resize", "/preview", "/push"} <= set(endpoints)
    assert [p["parameter_name"] for p in endpoints["/inspect"]["parameters"]] == ["lora_file", "config_file"]
    resize = [p["parameter_name"] for p in endpoints["/resize"]["parameters"]]
    assert resize[: len(RESIZE_PARAMETERS)] == RESIZE_PARAMETERS
    added = ["sv_ratio", "sv_cumulative", "sv_fro", "strength"]  # after the earlier ones: added, nothing renamed
    assert resize[len(RESIZE_PARAMETERS) :] == ["target_size", "dtype", "hub_repo", "hub_file", "config_file", *added]
    defaults = {p["parameter_name"]: p["parameter_default"] for p in endpoints["/resize"]["parameters"]}
    assert [defaults[name] for name in added] == [None, None, None, 1.0]
    preview = [p["parameter_name"] for p in endpoints["/preview"]["parameters"]]
    assert preview == [*PREVIEW_PARAMETERS, "include_base"]
    push = [p["parameter_name"] for p in endpoints["/push"]["parameters"]]
    assert push == ["resized_file", "report", "repo_id", "private", "grid_image", "metrics", "source", "config_file"]
    assert [p["parameter_name"] for p in endpoints["/resize_many"]["parameters"]] == [
        "lora_files",
        "rank",
        "method",
        "dtype",
    ]
    assert [p["parameter_name"] for p in endpoints["/merge"]["parameters"]] == [
        "lora_files",
        "weights",
        "rank",
        "method",
        "dtype",
    ]


def test_helper_events_are_private(app_url):
    """Only the documented endpoints answer API clients: no undocumented or unnamed ones."""
    every = httpx.get(f"{app_url}gradio_api/info", params={"all_endpoints": "true"}).json()
    assert set(every["named_endpoints"]) == {"/inspect", "/resize", "/preview", "/push", "/resize_many", "/merge"}
    assert every["unnamed_endpoints"] == {}


def test_inspect_reports_the_example_lora(app_client):
    report = app_client.predict(handle_file(str(EXAMPLE_LORA)), api_name="/inspect")
    assert report["sha256"] == hashlib.sha256(EXAMPLE_LORA.read_bytes()).hexdigest()
    assert report["layout"] == "diffusers"
    assert report["ranks"] == {"8": 20}
    assert report["bytes"] == EXAMPLE_LORA.stat().st_size
    assert len(report["layers"]) == 20
    assert all(len(layer["singular_values"]) == 8 for layer in report["layers"])


def test_resize_returns_the_file_and_its_report(app_client, app_module):
    path, report = app_client.predict(
        lora_file=handle_file(str(EXAMPLE_LORA)), method="svd", rank=4, api_name="/resize"
    )
    assert Path(path).name == "example-flux-lora-svd-rank4.safetensors"
    assert _ranks(path) == {4}
    assert report["rank_in"] == {"8": 20} and report["rank_out"] == {"4": 20}
    assert report["bytes_out"] == Path(path).stat().st_size < report["bytes_in"]
    assert report["source"]["sha256"] == hashlib.sha256(EXAMPLE_LORA.read_bytes()).hexdigest()
    assert 0 < report["median_error"] <= report["worst_error"] < 0.1
    leftovers = _leftovers(app_module)
    assert leftovers and all(p.suffix == ".safetensors" and "source" not in p.parts for p in leftovers)
    tracked = set().union(*app_module.demo.temp_file_sets)  # what `delete_cache` deletes when old enough
    assert {str(p) for p in leftovers} <= tracked
    assert app_module.demo.delete_cache == app_module.CACHE_CLEANING


def test_resize_above_the_rank_upsamples_exactly(app_client):
    path, report = app_client.predict(
        lora_file=handle_file(str(EXAMPLE_LORA)), rank=12, dtype="fp32", api_name="/resize"
    )
    assert _ranks(path) == {12}
    assert report["worst_error"] < 1e-6


def test_resize_options_reach_the_core(app_client):
    _, randomized = app_client.predict(
        lora_file=handle_file(str(EXAMPLE_LORA)), method="randomized_svd", rank=3, niter=1, seed=7, api_name="/resize"
    )
    assert randomized["params"] == {"rank": 3, "dtype": "keep", "niter": 1, "oversample": 8, "seed": 7}
    _, sparse = app_client.predict(
        lora_file=handle_file(str(EXAMPLE_LORA)),
        method="sparse_random_projection",
        rank=3,
        density=0.5,
        api_name="/resize",
    )
    assert sparse["params"]["density"] == 0.5
    path, dynamic = app_client.predict(
        lora_file=handle_file(str(EXAMPLE_LORA)), rank=6, energy=0.99, api_name="/resize"
    )
    assert all(layer["rank_out"] <= 6 and layer["energy_retained"] >= 0.99 - 1e-3 for layer in dynamic["layers"])
    assert _ranks(path) == {int(rank) for rank in dynamic["rank_out"]}


@pytest.mark.parametrize(("rule", "value"), [("sv_ratio", 4.0), ("sv_cumulative", 0.8), ("sv_fro", 0.9)])
def test_sd_scripts_rules_and_a_strength_reach_the_core(app_client, tmp_path, rule, value):
    """sd-scripts' rank rules and a baked-in strength, sent to /resize by name, give the ranks, parameters and factors
    that `lora_ops.resize_file` gives with the same options."""
    path, report = app_client.predict(
        lora_file=handle_file(str(EXAMPLE_LORA)), rank=8, strength=0.7, api_name="/resize", **{rule: value}
    )
    options = lora_ops.ResizeOptions(rank=8, strength=0.7, **{rule: value})
    expected = lora_ops.resize_file(EXAMPLE_LORA, tmp_path / "core.safetensors", options)
    assert report["params"] == expected["params"] == {"rank": 8, "dtype": "keep", rule: value, "strength": 0.7}
    assert report["rank_out"] == expected["rank_out"] != {"8": 20}
    ours, core = load_file(path), load_file(tmp_path / "core.safetensors")
    assert ours.keys() == core.keys() and all(torch.equal(ours[key], core[key]) for key in core)


def test_switching_the_ranks_mode_on_the_server_sends_no_values(app_module):
    """The server only shows and hides the budget boxes: their values are set in the browser at the click
    (`RESET_BUDGETS_JS`, checked in the browser tests), so a value typed while the server's answer travels is kept."""
    boxes = ["rank", "energy", "size", *(name for name, _, _ in app_module.SD_SCRIPTS_RULES)]
    for mode in ("rank", *app_module.MODE_FIELDS):
        for box, update in zip(boxes, app_module.show_rank_mode(mode), strict=True):
            assert "value" not in update, (mode, box)
            if box != "rank":
                assert update["visible"] == (box == mode), (mode, box)


def test_the_budget_line_refuses_a_rule_value_of_zero_as_the_resize_does(app_module):
    report = lora_ops.inspect_file(EXAMPLE_LORA)
    _, budget = app_module.show_plot(report, None, 8, "sv_fro", None, None, None, 0)
    assert budget == page_text.escape_markdown("sv_fro must be in (0, 1]")
    _, budget = app_module.show_plot(report, None, 8, "sv_fro", None, None, None, 0.9)
    assert "sd-scripts' sv_fro 0.9 picks, capped at 8" in budget


@pytest.mark.parametrize("mode", ["energy", "sv_ratio", "sv_cumulative", "sv_fro"])
def test_the_page_passes_on_the_chosen_modes_budget_only_and_never_a_blank_one(app_module, mode):
    """Hidden boxes keep their defaults: the page's resize uses the chosen mode's budget alone, and a blank one in
    its own mode is a one-line error, not a resize at the flat rank."""
    form = {"energy": 0.99, "target_size": "40MB", "sv_ratio": 10.0, "sv_cumulative": 0.9, "sv_fro": 0.9}
    arguments = {"lora_file": str(EXAMPLE_LORA), "rank": 8, **form}
    path, report, _ = app_module.resize_for_page(mode, **arguments)
    shutil.rmtree(Path(path).parent)  # called here, not through gradio: its cache does not know the folder
    assert report["params"] == {"rank": 8, "dtype": "keep", mode: form[mode]}
    with pytest.raises(lora_ops.LoraError, match=f"give a value for {mode.replace('_', ' ')}, or choose another"):
        app_module.resize_for_page(mode, **{**arguments, mode: None})


def _progress(job, unit: str) -> list[tuple[int, int]]:
    """(done, total) of every `gr.Progress` update in `unit` that reached the client, in order."""

    async def updates() -> list:
        return [update.progress_data async for update in job if getattr(update, "progress_data", None)]

    return [(p.index, p.length) for batch in asyncio.run(updates()) for p in batch if p.unit == unit]


def test_resize_progress_reaches_api_clients(app_client):
    job = app_client.submit(lora_file=handle_file(str(EXAMPLE_LORA)), rank=2, api_name="/resize")
    steps = _progress(job, "layers")
    assert steps and {total for _, total in steps} == {20}
    done = [index for index, _ in steps]
    assert done == sorted(done) and done[0] >= 1 and done[-1] <= 20
    assert job.result()[1]["rank_out"] == {"2": 20}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"lora_file": "not-safetensors"}, "safetensors"),
        ({"lora_file": "example", "target_size": "forty"}, "size"),
        ({"lora_file": "example", "rank": 4, "energy": 1.5}, "energy"),
        ({}, "no LoRA given"),
        ({"hub_repo": "not a repo id!", "hub_file": "x.safetensors"}, "not a valid Hub repo id"),
        ({"hub_repo": PUBLIC_REPO}, "pick a .safetensors file"),
    ],
)
def test_bad_input_gets_one_line_and_the_server_stays_healthy(app_client, app_module, tmp_path, arguments, message):
    from gradio_client.exceptions import AppError

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    files = {"not-safetensors": garbage, "example": EXAMPLE_LORA}
    if "lora_file" in arguments:
        arguments = {**arguments, "lora_file": handle_file(str(files[arguments["lora_file"]]))}
    before = _leftovers(app_module)
    with pytest.raises(AppError) as error:
        app_client.predict(**arguments, api_name="/resize")
    text = str(error.value)
    assert message in text and "\n" not in text and "Traceback" not in text
    assert _leftovers(app_module) == before
    assert garbage.read_bytes() == b"this is not a safetensors file at all"
    assert app_client.predict(handle_file(str(EXAMPLE_LORA)), api_name="/inspect")["ranks"] == {"8": 20}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"seed": 1e300}, "seed must be between 0 and"),
        ({"seed": None}, "seed must be a number, got None"),
        ({"rank": None}, "rank must be a number, got None"),
        ({"niter": None}, "niter must be a number, got None"),
        ({"rank": 2.7}, "rank must be a whole number, got 2.7"),
        ({"rank": 3000}, "rank must be between 1 and 2048"),
        ({"energy": "abc"}, "energy must be a number, got 'abc'"),
        ({"method": "randomized_svd", "niter": 1.5}, "niter must be a whole number"),
        ({"sv_ratio": 0.5}, "sv_ratio must be a finite number of at least 1"),
        ({"energy": 0.9, "sv_fro": 0.9}, "give one rank rule at most, not energy, sv_fro"),
        ({"strength": 0}, "strength must be a finite, non-zero number"),
        ({"strength": 1e308}, "strength must be a finite, non-zero number from 1e-06 to 1e+06 in size"),
        ({"sv_fro": 0}, "sv_fro must be in (0, 1]"),
    ],
)
def test_bad_parameters_are_named_in_one_line_before_anything_is_written(
    app_client, app_module, arguments, message, capfd
):
    """Issue 12.5: each wrong value gets its own one-line message, nothing is rounded, nothing is left behind, and
    the server log shows no traceback for it."""
    from gradio_client.exceptions import AppError

    before = _leftovers(app_module)
    with pytest.raises(AppError) as error:
        app_client.predict(lora_file=handle_file(str(EXAMPLE_LORA)), **arguments, api_name="/resize")
    assert message in str(error.value) and "\n" not in str(error.value)
    assert _leftovers(app_module) == before
    assert "Traceback" not in capfd.readouterr().err


def test_no_public_parameter_goes_through_gradios_own_range_checks(app_module):
    """Issue 12.16: gradio's slider and number bounds print a traceback to the server log and clamp typed values;
    every value of a public endpoint is checked by lora_ops instead (one line, nothing changed)."""
    import gradio as gr

    public = [fn for fn in app_module.demo.fns.values() if fn.api_visibility == "public"]
    assert {fn.api_name for fn in public} >= {"inspect", "resize", "preview", "push"}
    for fn in public:
        for block in fn.inputs:
            assert not isinstance(block, gr.Slider), (fn.api_name, block.label)
            if isinstance(block, gr.Number):
                assert (block.minimum, block.maximum, block.precision) == (None, None, None), (fn.api_name, block.label)


def test_the_cache_keeps_no_empty_folders_or_empty_upload_files(app_client, app_module):
    """Issue 12.17: gradio's cleaner deletes old files only; every upload left a 0-byte temporary and every file an
    empty folder. `clean_cache` removes those once they are as old as gradio's age, and nothing younger."""
    import time as clock

    from gradio.route_utils import delete_files_created_by_app

    app_client.predict(lora_file=handle_file(str(EXAMPLE_LORA)), rank=2, api_name="/resize")
    cache = Path(app_module.demo.GRADIO_CACHE)
    delete_files_created_by_app(app_module.demo, age=None)  # what gradio's timer does to old files
    leftovers = [p for p in cache.rglob("*") if p.is_dir() or p.stat().st_size == 0]
    assert leftovers  # what gradio leaves
    assert app_module.clean_cache() == 0  # too young yet
    old = clock.time() - app_module.CACHE_CLEANING[1] - 60
    for path in leftovers:
        os.utime(path, (old, old))
    young = cache / "in-use"
    young.mkdir()
    assert app_module.clean_cache() >= len(leftovers)
    assert [p for p in cache.rglob("*") if p.is_dir() or p.stat().st_size == 0] == [young]
    young.rmdir()


def _rank4_lora(folder: Path) -> Path:
    """A rank-4 LoRA for the example's model (same modules, another seed)."""
    from safetensors.torch import save_file

    from assets.make_example_lora import HIDDEN, NUM_DOUBLE, NUM_SINGLE
    from lora_ops.synthetic import flux_shapes, make_lora

    path = folder / "rank4.safetensors"
    shapes = flux_shapes(num_double=NUM_DOUBLE, num_single=NUM_SINGLE, hidden=HIDDEN)
    save_file(make_lora(shapes, 4, seed=5), str(path))
    return path


def _deltas(path: str | Path) -> dict[str, torch.Tensor]:
    """`B @ A` of every diffusers-layout module of a file without alphas (scale 1), in float64."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return {
        key.removesuffix(".lora_A.weight"): tensors[key.replace("lora_A", "lora_B")].double() @ tensors[key].double()
        for key in tensors
        if key.endswith(".lora_A.weight")
    }


def test_a_set_of_loras_comes_back_at_one_rank(app_client, app_module, tmp_path):
    """`/resize_many`: rank blank is the set's largest (every file extended exactly); each file keeps its name."""
    smaller = _rank4_lora(tmp_path)
    files = [handle_file(str(EXAMPLE_LORA)), handle_file(str(smaller))]
    paths, result = app_client.predict(lora_files=files, api_name="/resize_many")
    assert sorted(Path(p).name for p in paths) == sorted([EXAMPLE_LORA.name, smaller.name])
    assert result["rank"] == 8 and all(_ranks(p) == {8} for p in paths)
    assert [row["file"] for row in result["summary"]] == [EXAMPLE_LORA.name, smaller.name]
    by_name = {Path(p).name: p for p in paths}
    for source in (EXAMPLE_LORA, smaller):
        original, extended = _deltas(source), _deltas(by_name[source.name])
        assert all(torch.allclose(extended[m], original[m], atol=1e-6) for m in original)
    paths, result = app_client.predict(lora_files=files, rank=2, api_name="/resize_many")
    assert all(_ranks(p) == {2} for p in paths) and all(row["worst_error"] > 0 for row in result["summary"])


def test_a_bad_file_in_a_set_is_named_and_nothing_is_returned(app_client, app_module, tmp_path):
    from gradio_client.exceptions import AppError

    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    before = _leftovers(app_module)
    with pytest.raises(AppError, match="broken.safetensors") as error:
        app_client.predict(
            lora_files=[handle_file(str(EXAMPLE_LORA)), handle_file(str(garbage))], rank=4, api_name="/resize_many"
        )
    assert "\n" not in str(error.value)
    assert _leftovers(app_module) == before


def test_merge_is_the_exact_weighted_sum_or_its_best_approximation(app_client, tmp_path):
    """`/merge`: rank blank keeps the concatenated rank (8 + 4) and the weighted sum exactly; a rank reduces it."""
    smaller = _rank4_lora(tmp_path)
    files = [handle_file(str(EXAMPLE_LORA)), handle_file(str(smaller))]
    merged, report = app_client.predict(lora_files=files, weights="0.8, -0.5", dtype="fp32", api_name="/merge")
    assert _ranks(merged) == {12}
    first, second, result = _deltas(EXAMPLE_LORA), _deltas(smaller), _deltas(merged)
    for module, delta in result.items():
        expected = 0.8 * first[module] - 0.5 * second[module]
        assert torch.allclose(delta, expected, atol=1e-5 * expected.abs().max().item())
    assert [entry["weight"] for entry in report["inputs"]] == [0.8, -0.5]
    reduced, report = app_client.predict(lora_files=files, weights="0.8 -0.5", rank=3, api_name="/merge")
    assert _ranks(reduced) == {3} and 0 < report["worst_error"] < 1
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="1 weights for 2 files"):
        app_client.predict(lora_files=files, weights="0.8", api_name="/merge")


def test_consumer_warnings_reach_the_page_and_api_clients(app_client, app_module, tmp_path):
    fixture = write_case(CASE_BY_NAME["kohya-zero-alpha"], tmp_path)
    (warning,) = app_client.predict(handle_file(str(fixture.path)), api_name="/inspect")["warnings"]
    assert "sd-scripts reads it as alpha = rank" in warning
    _, report = app_client.predict(lora_file=handle_file(str(fixture.path)), rank=2, api_name="/resize")
    assert report["warnings"] == [warning]
    assert warning in app_module.plots.resize_markdown(report)


def test_inspect_refuses_a_file_that_is_not_a_lora(app_client, tmp_path):
    from gradio_client.exceptions import AppError

    pickled = tmp_path / "model.safetensors"
    pickled.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    with pytest.raises(AppError) as error:
        app_client.predict(handle_file(str(pickled)), api_name="/inspect")
    assert "\n" not in str(error.value) and str(error.value)


def test_resize_from_a_public_hub_repo_is_anonymous(app_client, app_module, lora_file_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_space_owner_0123456789")
    path, report = app_client.predict(
        hub_repo=PUBLIC_REPO, hub_file="nested/lora-copy.safetensors", rank=4, api_name="/resize"
    )
    assert _ranks(path) == {4}
    assert report["source"]["file"] == "lora-copy.safetensors"
    assert lora_file_hub.requests and {r.token for r in lora_file_hub.requests} == {None}  # not the Space owner's
    assert not any("source" in p.parts for p in _leftovers(app_module))


def test_resize_from_a_gated_repo_uses_the_visitors_token(app_url, lora_file_hub):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="gated"):
        Client(app_url, verbose=False).predict(
            hub_repo=GATED_REPO, hub_file="lora.safetensors", rank=4, api_name="/resize"
        )
    visitor = Client(app_url, verbose=False, oauth_token=GATED_READER_TOKEN)
    path, _ = visitor.predict(hub_repo=GATED_REPO, hub_file="lora.safetensors", rank=4, api_name="/resize")
    assert _ranks(path) == {4}
    assert GATED_READER_TOKEN in lora_file_hub.tokens_seen()


def test_hub_listing_finds_safetensors_files(lora_file_hub, tmp_path):
    from lora_ops import LoraError, sources

    files = sources.list_lora_files(PUBLIC_REPO)
    assert [f.path for f in files] == ["lora.safetensors", "nested/lora-copy.safetensors"]
    assert files[0].size == EXAMPLE_LORA.stat().st_size
    with pytest.raises(LoraError, match="no Hub model repo nobody/missing"):
        sources.list_lora_files("nobody/missing")
    with pytest.raises(LoraError, match="over this app's 1.0 kB limit"):
        sources.download_lora(PUBLIC_REPO, "lora.safetensors", tmp_path, max_bytes=1000)
    with pytest.raises(LoraError, match="has no file absent.safetensors"):
        sources.download_lora(PUBLIC_REPO, "absent.safetensors", tmp_path, max_bytes=10**6)
    path = sources.download_lora(PUBLIC_REPO, "nested/lora-copy.safetensors", tmp_path / "get", max_bytes=10**6)
    assert path.read_bytes() == EXAMPLE_LORA.read_bytes()
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()] == [
        Path("get/nested/lora-copy.safetensors")
    ]


def test_a_hub_download_reads_one_commit_for_the_size_check_and_the_bytes(lora_file_hub, tmp_path):
    """The commit `main` points to is resolved once; the size check and the download both name it."""
    from lora_ops import sources

    sources.download_lora(PUBLIC_REPO, "lora.safetensors", tmp_path, max_bytes=10**6)
    commit = lora_file_hub.repos[PUBLIC_REPO].head
    reads = [r for r in lora_file_hub.requests if r.route in {"paths_info", "resolve"}]
    assert {r.route for r in reads} == {"paths_info", "resolve"}
    assert all(f"/{commit}" in r.path and "/main" not in r.path for r in reads), [r.path for r in reads]
    assert [r.route for r in lora_file_hub.requests].count("repo_info") == 1


def test_hub_license_is_carried_over_where_known(lora_file_hub):
    from lora_ops import sources

    assert sources.repo_license(PUBLIC_REPO) == LICENSE
    assert sources.repo_license(GATED_REPO) is None
    assert sources.repo_license(GATED_REPO, token=GATED_READER_TOKEN) == LICENSE
    assert sources.repo_license("nobody/missing") is None
    assert sources.repo_license("local-file.safetensors") is None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_python_app_py_serves_offline(tmp_path):
    """The README's `python app.py`, offline and without a GPU: /inspect answers, /preview says why it cannot."""
    from gradio_client.exceptions import AppError

    port = _free_port()
    env = {
        **os.environ,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_TEMP_DIR": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    env.pop("LORA_OPS_BASE_MODEL", None)
    server = subprocess.Popen(
        [sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 120
        while True:
            try:
                client = Client(url, verbose=False)
                break
            except Exception:
                assert server.poll() is None, server.stdout.read()
                assert time.monotonic() < deadline, "app.py did not start within 120 s"
                time.sleep(1)
        assert client.predict(handle_file(str(EXAMPLE_LORA)), api_name="/inspect")["modules"] == 20
        with pytest.raises(AppError, match="preview unavailable: previews need a GPU, or LORA_OPS_BASE_MODEL"):
            client.predict(handle_file(str(EXAMPLE_LORA)), handle_file(str(EXAMPLE_LORA)), api_name="/preview")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_preview_renders_the_grid_and_metrics(app_client, tiny_flux_base_model):
    resized, _ = app_client.predict(lora_file=handle_file(str(EXAMPLE_LORA)), rank=2, api_name="/resize")
    job = app_client.submit(
        original_file=handle_file(str(EXAMPLE_LORA)),
        resized_file=handle_file(resized),
        prompts="How2Draw a cat\n\nHow2Draw a dog",
        seed=3,
        steps=2,
        width=32,
        height=32,
        guidance_scale=3.5,
        api_name="/preview",
    )
    denoising = _progress(job, "steps")
    grid_path, metrics = job.result()
    assert denoising and denoising[-1][0] <= denoising[-1][1] <= 2 * 2 * 2  # images x steps, cached ones skipped
    with Image.open(grid_path) as grid:
        assert grid.format == "PNG" and grid.width > grid.height / 2 * 1.5  # two columns, two rows
    assert [entry["prompt"] for entry in metrics["prompts"]] == ["How2Draw a cat", "How2Draw a dog"]
    assert [entry["seed"] for entry in metrics["prompts"]] == [3, 4]
    assert 0 < metrics["overall"]["ssim"] <= 1 and metrics["overall"]["psnr_db"] > 0
    assert (metrics["steps"], metrics["width"], metrics["height"]) == (2, 32, 32)


def test_preview_bad_settings_get_one_line(app_client, tiny_flux_base_model):
    from gradio_client.exceptions import AppError

    for arguments, message in (({"prompts": "  \n "}, "at least one prompt"), ({"width": 40}, "multiples of 16")):
        with pytest.raises(AppError, match=message) as error:
            app_client.predict(
                original_file=handle_file(str(EXAMPLE_LORA)),
                resized_file=handle_file(str(EXAMPLE_LORA)),
                **{"prompts": "a cat", "steps": 1, "width": 32, "height": 32, **arguments},
                api_name="/preview",
            )
        assert "\n" not in str(error.value)


def test_push_commits_once_with_the_visitors_token(app_url, hub_online):
    from tests.fixtures_hub import SPACE_OWNER_TOKEN, VISITOR, VISITOR_TOKEN

    visitor = Client(app_url, verbose=False, oauth_token=VISITOR_TOKEN)
    resized, report = visitor.predict(lora_file=handle_file(str(EXAMPLE_LORA)), rank=4, api_name="/resize")
    result = visitor.predict(
        resized_file=handle_file(resized),
        report=report,
        private=True,
        source="someone/how2draw-style",
        api_name="/push",
    )
    assert result["repo_id"] == f"{VISITOR}/how2draw-style-rank4"
    (commit,) = hub_online.commits
    assert commit.token == VISITOR_TOKEN and SPACE_OWNER_TOKEN not in hub_online.tokens_seen()
    assert hub_online.repos[result["repo_id"]].private
    weights = [name for name in commit.files if name.endswith(".safetensors")]
    assert len(weights) == 1 and commit.files[weights[0]] == Path(resized).read_bytes()
    assert "someone/how2draw-style" in commit.files["README.md"].decode()


def test_push_without_sign_in_is_refused(app_url, hub_online):
    from gradio_client.exceptions import AppError

    anonymous = Client(app_url, verbose=False)
    resized, report = anonymous.predict(lora_file=handle_file(str(EXAMPLE_LORA)), rank=4, api_name="/resize")
    with pytest.raises(AppError, match="not signed in"):
        anonymous.predict(resized_file=handle_file(resized), report=report, api_name="/push")
    assert hub_online.commits == []


def test_page_only_events_skip_the_queue(app_module):
    """Sliders, plots and summaries never wait behind (or count against) queued resizes and previews."""
    by_name: dict[str, set[bool]] = {}
    for function in app_module.demo.fns.values():
        by_name.setdefault(function.name, set()).add(function.queue)
    page_only = ["show_inspection", "show_plot", "show_result", "show_method_controls", "show_push_result"]
    assert {name: by_name[name] for name in [*page_only, "show_gpu_time"]} == dict.fromkeys(
        [*page_only, "show_gpu_time"], {False}
    )
    work = ["inspect_lora", "resize_lora", "compare_methods", "preview_lora", "push_lora", "load_hub_file"]
    assert {name: by_name[name] for name in work} == dict.fromkeys(work, {True})


def test_the_page_shows_the_previews_gpu_seconds_before_the_click(app_module):
    from lora_ops import preview

    shown = next(block for block in app_module.demo.blocks.values() if block.elem_id == "gpu-time")
    default = preview.DEFAULT_REQUEST
    assert f"at most {default.requested} s ({default.estimated} s estimated × 1.5" in shown.value
    grown = app_module.show_gpu_time("a cat\n\na dog\na fox", 28, 768, 1024, True)
    request = preview.gpu_request(9, 28, 768, 1024)
    assert f"at most {request.requested} s ({request.estimated} s estimated" in grown


def test_each_kind_of_work_has_its_own_waiting_line(app_module):
    groups = {function.name: function.concurrency_id for function in app_module.demo.fns.values()}
    assert groups["resize_lora"] == groups["compare_methods"] == "cpu" and groups["preview_lora"] == "gpu"
    assert set(app_module.WAITING_LIMITS) == {"cpu", "gpu"}
    assert sum(app_module.WAITING_LIMITS.values()) < app_module.QUEUE_SIZE  # no kind alone fills gradio's queue


def _gpu_waiting(app_module) -> int:
    waiting = app_module.demo._queue.event_queue_per_concurrency_id.get("gpu")
    return 0 if waiting is None else len(waiting.queue)


def test_a_resize_runs_while_previews_wait(app_url, app_module, tiny_flux_base_model, monkeypatch):
    """Previews hold the GPU and fill their own waiting line; one more is refused, and a resize still runs."""
    from lora_ops import preview

    rendering, release = threading.Event(), threading.Event()

    def slow_render(job, progress=None):  # a preview holding the GPU until the test lets it go
        rendering.set()
        release.wait(timeout=120)
        return {c.name: {i: Image.new("RGB", (job.width, job.height)) for i in c.indices} for c in job.columns}

    monkeypatch.setattr(preview, "render_images", slow_render)
    client = Client(app_url, verbose=False)

    def request() -> dict:
        return {
            "original_file": handle_file(str(EXAMPLE_LORA)),
            "resized_file": handle_file(str(EXAMPLE_LORA)),
            "prompts": f"a cat {uuid.uuid4().hex}",  # never cached, and a grid (an output file) of its own
            "steps": 1,
            "width": 32,
            "height": 32,
        }

    limit = app_module.WAITING_LIMITS["gpu"]
    jobs = []
    try:
        jobs.append(client.submit(**request(), api_name="/preview"))
        assert rendering.wait(timeout=60)
        jobs += [client.submit(**request(), api_name="/preview") for _ in range(limit)]
        deadline = time.monotonic() + 60
        while _gpu_waiting(app_module) < limit and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gpu_waiting(app_module) == limit
        with pytest.raises(QueueError):
            Client(app_url, verbose=False).predict(**request(), api_name="/preview")
        resized, report = client.predict(handle_file(str(EXAMPLE_LORA)), "svd", 2, api_name="/resize")
        assert _ranks(resized) == {2} and report["bytes_out"] == Path(resized).stat().st_size
        assert _gpu_waiting(app_module) == limit  # the previews were still waiting
    finally:
        release.set()
    for job in jobs:
        grid, metrics = job.result(timeout=120)
        assert metrics["width"] == 32
