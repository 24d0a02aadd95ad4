"""Many visitors at once: concurrent `/resize` calls give the bytes sequential calls give, each request works in
its own unguessable folder inside gradio's cache, and no request can reach files it was not given.

Runs against the real app on 127.0.0.1 (`tests.fixtures_app`), one gradio_client `Client` per visitor.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file

import lora_ops
from lora_ops import plots
from tests.fixtures_app import EXAMPLE_LORA, PUBLIC_REPO
from tests.fixtures_lora import CASE_BY_NAME, write_case

# (layout case, /resize arguments): eight different files, every method, up- and downsampling, per-layer ranks
REQUESTS = (
    ("diffusers", {"method": "svd", "rank": 2}),
    ("kohya-flux", {"method": "randomized_svd", "rank": 3, "niter": 1, "seed": 5}),
    ("kohya-locon-fp16", {"method": "random_projection", "rank": 4, "seed": 1}),
    ("onetrainer-bf16", {"method": "sparse_random_projection", "rank": 3, "density": 0.5, "seed": 2}),
    ("xlabs", {"method": "svd", "rank": 9}),
    ("cloneofsimo-fp16", {"method": "svd", "rank": 6, "energy": 0.9}),
    ("diffusers-metadata", {"method": "svd", "rank": 2, "dtype": "bf16"}),
    ("comfyui", {"method": "randomized_svd", "rank": 2, "seed": 3}),
)
REQUEST_DIR = re.compile(r"[0-9a-f]{32}")


def _request_dirs(app_module) -> set[Path]:
    """The per-request folders the app has made so far."""
    root = Path(app_module.demo.GRADIO_CACHE) / "lora-resizer"
    return {path for path in root.iterdir() if path.is_dir()} if root.exists() else set()


def _resize(url: str, path: Path, arguments: dict) -> tuple[bytes, dict]:
    """One visitor's `/resize` call: the output's bytes and the report (its timing left out)."""
    output, report = Client(url, verbose=False).predict(
        lora_file=handle_file(str(path)), **arguments, api_name="/resize"
    )
    return Path(output).read_bytes(), {key: value for key, value in report.items() if key != "seconds"}


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("concurrent-loras")
    return [write_case(CASE_BY_NAME[name], folder, seed=index).path for index, (name, _) in enumerate(REQUESTS)]


def test_concurrent_resizes_equal_sequential_ones_byte_for_byte(app_url, app_module, lora_files, tmp_path):
    dirs_before = _request_dirs(app_module)
    with ThreadPoolExecutor(max_workers=len(REQUESTS)) as pool:
        concurrent = list(pool.map(lambda job: _resize(app_url, *job), zip(lora_files, [a for _, a in REQUESTS])))
    sequential = [_resize(app_url, path, arguments) for path, (_, arguments) in zip(lora_files, REQUESTS)]

    for path, (_, arguments), (parallel_bytes, parallel_report), (serial_bytes, serial_report) in zip(
        lora_files, REQUESTS, concurrent, sequential
    ):
        assert parallel_bytes == serial_bytes, path.name
        assert parallel_report == serial_report
        options = lora_ops.ResizeOptions(**arguments)
        library = tmp_path / plots.output_name(path.name, options)
        lora_ops.resize_file(path, library, options)
        assert library.read_bytes() == serial_bytes, f"{path.name}: the app's output differs from the library's"
    assert len({hashlib.sha256(data).digest() for data, _ in concurrent}) == len(REQUESTS)

    new_dirs = _request_dirs(app_module) - dirs_before
    assert len(new_dirs) == 2 * len(REQUESTS)  # one fresh folder per request
    for folder in new_dirs:
        assert REQUEST_DIR.fullmatch(folder.name) and uuid.UUID(folder.name).version == 4
        (output,) = folder.iterdir()  # the output alone: no source copy, no temporary file
        assert output.suffix == ".safetensors" and not output.name.startswith(".")


def test_every_file_the_app_keeps_is_registered_for_cache_cleaning(app_client, app_module):
    """gradio's `delete_cache` timer deletes exactly the files in `temp_file_sets` that are older than its age:
    every file the app leaves in its request folders must be among them, or it would stay forever."""
    app_client.predict(lora_file=handle_file(str(EXAMPLE_LORA)), rank=3, api_name="/resize")
    root = Path(app_module.demo.GRADIO_CACHE) / "lora-resizer"
    kept = {str(path.resolve()) for path in root.rglob("*") if path.is_file()}
    registered = {str(Path(path).resolve()) for files in app_module.demo.temp_file_sets for path in files}
    assert kept and kept <= registered
    assert app_module.demo.delete_cache == app_module.CACHE_CLEANING


def _file_route(url: str, path: str) -> httpx.Response:
    return httpx.get(f"{url}gradio_api/file={path}", timeout=30)


def test_outputs_are_served_only_by_their_own_unguessable_path(app_url, app_client, app_module):
    app_client.predict(lora_file=handle_file(str(EXAMPLE_LORA)), rank=2, api_name="/resize")
    output = max(
        (p for p in (Path(app_module.demo.GRADIO_CACHE) / "lora-resizer").rglob("*.safetensors")),
        key=lambda p: p.stat().st_mtime,
    )
    assert _file_route(app_url, str(output)).content == output.read_bytes()
    neighbour = output.parent.with_name(uuid.uuid4().hex) / output.name
    refused = [
        str(neighbour),  # the same name in another request's folder
        str(output.parent),  # a folder listing
        str(output.parent.parent),
        f"{app_module.demo.GRADIO_CACHE}/../../../etc/passwd",
        "/etc/passwd",
        str(Path(app_module.__file__).resolve()),  # the app's own source
        "../app.py",
    ]
    for path in refused:
        response = _file_route(app_url, path)
        assert response.status_code in (403, 404), (path, response.status_code)


def _raw_call(url: str, endpoint: str, data: list) -> str:
    """Call an endpoint over plain HTTP, as a hostile client would, and return the event stream's text."""
    event = httpx.post(f"{url}gradio_api/call/{endpoint}", json={"data": data}, timeout=30).json()["event_id"]
    return httpx.get(f"{url}gradio_api/call/{endpoint}/{event}", timeout=120).text


def test_a_client_cannot_make_the_app_read_a_server_path(app_url, app_module):
    """File inputs must have been uploaded: a path to a server file (outside gradio's cache) is refused, as the LoRA
    and as its PEFT config."""
    uploaded = httpx.post(
        f"{app_url}gradio_api/upload",
        files={"files": ("../../escape.safetensors", EXAMPLE_LORA.read_bytes())},
        timeout=30,
    ).json()[0]
    cache = Path(app_module.demo.GRADIO_CACHE).resolve()
    assert Path(uploaded).resolve().is_relative_to(cache) and Path(uploaded).name == "escape.safetensors"
    lora = {"path": uploaded, "meta": {"_type": "gradio.FileData"}}
    assert "event: complete" in _raw_call(app_url, "inspect", [lora, None])
    outside = [
        str(EXAMPLE_LORA),  # a real LoRA on the server, readable by the app itself
        f"{app_module.demo.GRADIO_CACHE}/../{EXAMPLE_LORA.name}",
        str(Path(app_module.__file__).resolve()),
    ]
    for path in outside:
        file_data = {"path": path, "meta": {"_type": "gradio.FileData"}}
        inspected = _raw_call(app_url, "inspect", [file_data, None])
        resized = _raw_call(app_url, "resize", [file_data, "svd", 2, 2, None, 0, None, "", "keep", "", None, None])
        as_config = _raw_call(app_url, "inspect", [lora, file_data])
        for stream in (inspected, resized, as_config):
            assert stream.startswith("event: error") and "sha256" not in stream and "rank_out" not in stream


@pytest.mark.parametrize(
    ("hub_repo", "hub_file", "fragment"),
    [
        (PUBLIC_REPO, "../../../hub-escape.safetensors", "give a path inside the repo"),
        (PUBLIC_REPO, "nested/../../hub-escape.safetensors", "give a path inside the repo"),
        (PUBLIC_REPO, "/etc/hub-escape.safetensors", "give a path inside the repo"),
        (PUBLIC_REPO, "nested\\..\\..\\hub-escape.safetensors", "give a path inside the repo"),
        (PUBLIC_REPO, "../../../etc/passwd", "give a path inside the repo"),
        (PUBLIC_REPO, "passwd", "pick a .safetensors file"),
        ("../../etc", "lora.safetensors", "not a valid Hub repo id"),
        ("alice/../tiny-flux-lora", "lora.safetensors", "not a valid Hub repo id"),
        (f"{PUBLIC_REPO}/../..", "lora.safetensors", "not a valid Hub repo id"),
    ],
)
def test_hub_names_cannot_escape_the_request_folder(
    hub_repo, hub_file, fragment, app_client, app_module, lora_file_hub
):
    from gradio_client.exceptions import AppError

    cache_root = Path(app_module.demo.GRADIO_CACHE).parent
    before = {path for path in cache_root.rglob("*")}
    with pytest.raises(AppError) as refused:
        app_client.predict(hub_repo=hub_repo, hub_file=hub_file, rank=2, api_name="/resize")
    message = str(refused.value)
    assert fragment in message and "\n" not in message
    assert not [path for path in cache_root.rglob("*") if path not in before and path.is_file()]
    assert not list(cache_root.rglob("hub-escape.safetensors"))
