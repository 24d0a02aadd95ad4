"""Limits and hostile input at every entry point: what a file or request may ask for, refused in one line
before any large allocation, and the Space still healthy afterwards.

- The reader's `Limits` (header bytes, tensors, elements per tensor and in total) refuse a file from its header,
  before a byte of tensor data is read (`open_tensors` is watched and must never be called).
- A file whose rank would make the `[r, r]` linear algebra explode is refused before any of it runs.
- The bad-input corpus (`tests/bad_inputs.py`) through `/resize` and `/inspect` of the real app over
  gradio_client: one line, no traceback, no file left behind, the input untouched, the next request served.
- Preview requests over the limits of `lora_ops.preview` are refused before the GPU work starts.
- `/push` refuses, in one line, a report that is not the one `/resize` returned (callers send it themselves).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import pytest
import torch
from gradio_client import Client, handle_file
from safetensors.torch import save_file

import lora_ops
from lora_ops import files, inputs, linalg, preview, resize
from lora_ops.files import DEFAULT_LIMITS, Limits
from tests.bad_inputs import BAD_INPUTS, write_bad_input
from tests.fixtures_app import EXAMPLE_LORA


def _write_header(path: Path, header: dict, data: bytes = b"", declared: int | None = None) -> Path:
    """A safetensors file of `header` and `data`; `declared` overrides the length prefix."""
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if declared is None else declared) + text + data)
    return path


def _entry(shape: list[int]) -> dict:
    """The header entry of an F32 tensor of `shape` at the start of the data."""
    return {"dtype": "F32", "shape": shape, "data_offsets": [0, 4 * math.prod(shape)]}


@pytest.fixture
def data_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every file `resize_file`/`inspect_file` open for tensor data (the reader itself never reads data)."""
    opened: list[str] = []
    real = files.open_tensors

    def watched(path, header):
        opened.append(str(path))
        return real(path, header)

    for module in (inputs, resize):
        monkeypatch.setattr(module, "open_tensors", watched)
    return opened


def _refused(path: Path, tmp_path: Path, limits: Limits = DEFAULT_LIMITS, *, header: bool = True) -> str:
    """The one-line message the library gives `path` (the same from the header reader when `header`, from
    `inspect_file` and from `resize_file`), with nothing written."""
    messages = set()
    calls = [
        lambda: lora_ops.inspect_file(path, limits=limits),
        lambda: lora_ops.resize_file(path, tmp_path / "out.safetensors", lora_ops.ResizeOptions(rank=2), limits=limits),
    ]
    for call in [lambda: files.read_header(path, limits)] * header + calls:
        with pytest.raises(lora_ops.LoraError) as refused:
            call()
        messages.add(str(refused.value))
    (message,) = messages
    assert "\n" not in message and not (tmp_path / "out.safetensors").exists()
    return message


HUGE_CLAIMS = {
    # name: (header, data bytes, length prefix or None, fragment of the message)
    "tensor far larger than the file": (
        {"a.lora_A.weight": _entry([4096, 4096])},
        bytes(64),
        None,
        "ends past the end of the file",
    ),
    "tensor beyond elements_per_tensor": (
        {"a.lora_A.weight": _entry([2**31 + 1])},
        bytes(64),
        None,
        f"has {2**31 + 1} elements; the limit is {DEFAULT_LIMITS.elements_per_tensor}",
    ),
    "shape overflowing int64": ({"a.lora_A.weight": _entry([2**40, 2**40])}, b"", None, "the limit is"),
    "length prefix beyond the file": ({}, b"", 2**63, "header claims 9223372036854775808 bytes"),
}


@pytest.mark.parametrize("name", sorted(HUGE_CLAIMS))
def test_a_header_promising_more_than_the_file_holds_is_refused_before_reading_data(name, tmp_path, data_reads):
    header, data, declared, fragment = HUGE_CLAIMS[name]
    path = _write_header(tmp_path / "claims.safetensors", header, data, declared)
    before = path.read_bytes()
    assert fragment in _refused(path, tmp_path)
    assert data_reads == [] and path.read_bytes() == before


def test_a_header_over_the_default_size_limit_is_refused_unread(tmp_path, data_reads):
    """A sparse file of 64 MiB + 16 bytes whose length prefix claims 64 MiB + 1: refused by the limit, not parsed."""
    path = tmp_path / "big-header.safetensors"
    declared = DEFAULT_LIMITS.header_bytes + 1
    with path.open("wb") as f:
        f.write(struct.pack("<Q", declared) + b"{")
        f.truncate(declared + 16)
    message = _refused(path, tmp_path)
    assert (
        message
        == f"big-header.safetensors: header of {declared} bytes exceeds the limit of {DEFAULT_LIMITS.header_bytes}"
    )
    assert data_reads == []


def test_more_tensors_than_the_default_limit_are_refused(tmp_path, data_reads):
    count = DEFAULT_LIMITS.tensors + 1
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(count)}
    path = _write_header(tmp_path / "many.safetensors", header)
    assert _refused(path, tmp_path) == f"many.safetensors has {count} tensors; the limit is {DEFAULT_LIMITS.tensors}"
    assert data_reads == []


LOW = Limits(header_bytes=4096, tensors=3, elements_per_tensor=100, elements_total=150)


@pytest.mark.parametrize(
    ("tensors", "fragment"),
    [
        ({"a.lora_A.weight": torch.zeros(4, 16), "a.lora_B.weight": torch.zeros(24, 4)}, "the limit is 150"),
        ({"a.lora_A.weight": torch.zeros(4, 30), "a.lora_B.weight": torch.zeros(2, 4)}, "the limit is 100"),
        ({f"m{i}.lora_A.weight": torch.zeros(1, 1) for i in range(4)}, "4 tensors; the limit is 3"),
        ({"a.lora_A.weight": torch.zeros(1, 1)}, "exceeds the limit of 4096"),
    ],
    ids=["elements-total", "elements-per-tensor", "tensors", "header-bytes"],
)
def test_each_limit_refuses_a_real_file_before_its_data(tensors, fragment, tmp_path, data_reads):
    path = tmp_path / "lora.safetensors"
    metadata = {"padding": "x" * 5000} if fragment.startswith("exceeds") else None
    save_file(tensors, str(path), metadata=metadata)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    assert fragment in _refused(path, tmp_path, LOW)
    assert data_reads == [] and hashlib.sha256(path.read_bytes()).hexdigest() == before
    files.read_header(path)  # within the default limits the same file is read


@pytest.fixture
def no_linear_algebra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any module's decomposition starts."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the linear algebra ran before the rank was checked")

    monkeypatch.setattr(linalg.Factors, "of", forbidden)


@pytest.mark.parametrize(
    ("shape", "modules"),
    [((4096, 1, 1), 1), ((1024, 1, 1), 16)],
    ids=["one-rank-4096-module", "sixteen-rank-1024-modules"],
)
def test_a_tiny_file_with_huge_ranks_is_refused_before_the_linear_algebra(shape, modules, tmp_path, no_linear_algebra):
    """Rank r costs `[r, r]` eigen problems (O(r^3)) whatever the matrix sides: 4096 x (1 + 1) floats (a 33 kB
    file) would take minutes and 2 x 128 MiB of Gram matrices. Refused from the header."""
    rank, out, inp = shape
    tensors = {}
    for i in range(modules):
        tensors[f"transformer.m{i}.lora_A.weight"] = torch.randn(rank, inp)
        tensors[f"transformer.m{i}.lora_B.weight"] = torch.randn(out, rank)
    path = tmp_path / "huge-rank.safetensors"
    save_file(tensors, str(path))
    assert path.stat().st_size < 300_000
    message = _refused(path, tmp_path, header=False)
    assert "rank" in message and "limit" in message


# --- through the app ----------------------------------------------------------------------------------------

# The corpus over HTTP: a missing file cannot be uploaded; every other entry is sent as a file.
APP_BAD_INPUTS = sorted(name for name in BAD_INPUTS if name != "missing")


def _app_files(app_module) -> set[Path]:
    """Every file in the app's request folders: what its handlers wrote (outputs, or leaks)."""
    root = Path(app_module.demo.GRADIO_CACHE) / "lora-resizer"
    return {path for path in root.rglob("*") if path.is_file()} if root.exists() else set()


@pytest.mark.parametrize("name", APP_BAD_INPUTS)
def test_bad_input_through_the_app_gets_one_line_and_the_server_stays_healthy(name, app_client, app_module, tmp_path):
    from gradio_client.exceptions import AppError

    path, fragment = write_bad_input(name, tmp_path)
    before = path.read_bytes()
    written = _app_files(app_module)
    for call in (
        lambda: app_client.predict(handle_file(str(path)), api_name="/inspect"),
        lambda: app_client.predict(lora_file=handle_file(str(path)), rank=2, api_name="/resize"),
    ):
        with pytest.raises(AppError) as refused:
            call()
        message = str(refused.value)
        assert "\n" not in message and "Traceback" not in message and 'File "' not in message
        assert fragment in message or (name == "pickle-suffix" and "Invalid file type" in message), message
    assert _app_files(app_module) == written
    assert path.read_bytes() == before
    report = app_client.predict(handle_file(str(EXAMPLE_LORA)), api_name="/inspect")
    assert report["sha256"] == hashlib.sha256(EXAMPLE_LORA.read_bytes()).hexdigest()


def test_the_app_launches_with_its_upload_limit(app_url, app_module):
    """The served config carries the upload limit (the browser refuses bigger files, and so does the upload route)."""
    import httpx

    config = httpx.get(f"{app_url}config", timeout=30).json()
    assert config["max_file_size"] == app_module.MAX_FILE_BYTES == app_module.LAUNCH_OPTIONS["max_file_size"]


PREVIEW_OVER_LIMITS = [
    ({"prompts": "\n".join(f"a cat {i}" for i in range(preview.MAX_PROMPTS + 1))}, "at most 6 prompts"),
    ({"prompts": "a" * (preview.MAX_PROMPT_CHARS + 1)}, f"limited to {preview.MAX_PROMPT_CHARS} characters"),
    # the preview's own bounds (lora_ops.preview), checked before the GPU is asked for
    (
        {"steps": preview.MAX_STEPS + 1},
        f"steps must be between 1 and {preview.MAX_STEPS} (got {preview.MAX_STEPS + 1})",
    ),
    (
        {"width": preview.MAX_SIDE + 16},
        f"width and height must be between {preview.MIN_SIDE} and {preview.MAX_SIDE} pixels",
    ),
    ({"guidance_scale": preview.MAX_GUIDANCE + 1}, f"guidance scale must be between 0 and {preview.MAX_GUIDANCE:g}"),
    ({"seed": preview.MAX_SEED + 1}, "seed must be between"),
    (
        {
            "prompts": "\n".join(f"a cat {i}" for i in range(preview.MAX_PROMPTS)),
            "steps": preview.MAX_STEPS,
            "width": preview.MAX_SIDE,
            "height": preview.MAX_SIDE,
            "include_base": True,
        },
        f"over the {preview.GPU_SECONDS_LIMIT} s limit",
    ),
]


@pytest.mark.parametrize(("arguments", "fragment"), PREVIEW_OVER_LIMITS, ids=lambda value: str(value)[:24])
def test_a_preview_over_the_limits_is_refused_before_the_gpu(arguments, fragment, app_url, monkeypatch):
    from gradio_client.exceptions import AppError

    def forbidden(*args, **kwargs):
        raise AssertionError("rendering started")

    monkeypatch.setattr(preview, "render_images", forbidden)
    request = {"prompts": "a cat", "steps": 1, "width": 32, "height": 32, **arguments}
    with pytest.raises(AppError) as refused:
        Client(app_url, verbose=False).predict(
            original_file=handle_file(str(EXAMPLE_LORA)),
            resized_file=handle_file(str(EXAMPLE_LORA)),
            **request,
            api_name="/preview",
        )
    message = str(refused.value)
    assert fragment in message and "\n" not in message and "rendering started" not in message


@pytest.mark.parametrize(
    "report",
    [[1, 2], "a report", {"method": "svd"}, {"output": 5, "source": {"file": "x.safetensors"}}],
    ids=["list", "text", "missing-fields", "wrong-types"],
)
def test_push_refuses_a_report_that_is_not_a_resize_report(report, app_url, hub_online):
    """`/push` takes the report from the caller: anything but the dict `/resize` returned gets one line."""
    from gradio_client.exceptions import AppError

    from tests.fixtures_hub import VISITOR_TOKEN

    visitor = Client(app_url, verbose=False, oauth_token=VISITOR_TOKEN)
    with pytest.raises(AppError) as refused:
        visitor.predict(resized_file=handle_file(str(EXAMPLE_LORA)), report=report, api_name="/push")
    message = str(refused.value)
    assert "report" in message and "\n" not in message and "verbose error reporting" not in message
    assert hub_online.commits == []


def test_a_file_that_changes_after_its_header_was_read_is_refused(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"m.lora_A.weight": torch.zeros(2, 4), "m.lora_B.weight": torch.zeros(3, 2)}, str(path))
    header = files.read_header(path)
    with path.open("ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(lora_ops.LoraError, match="changed while it was being read"):
        files.open_tensors(path, header)
