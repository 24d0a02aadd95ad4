"""Pytest fixtures for the Space: the real app served on 127.0.0.1, gradio_client clients, and LoRA files to
download from the loopback Hub of `tests.fixtures_hub`.

- `app_module` (session): `app.py` imported with `GRADIO_TEMP_DIR` in a temp dir (so the test can look at the
  files the app leaves behind: `app_module.demo.GRADIO_CACHE`), with `LORA_OPS_BASE_MODEL` pointing at the tiny
  FLUX pipeline of `tests.fixtures_flux` while it imports (the app loads the preview's base model then).
- `app_url` (session): the app launched in this process with `prevent_thread_lock=True` and the same launch
  options as `python app.py`; closed at the end of the session.
- `app_client`: a fresh `gradio_client.Client` on it.
- `lora_file_hub`: `hub_online` (the loopback `tests.fake_hub.FakeHub`, huggingface_hub in this process pointed
  at it for the test) also holding `PUBLIC_REPO` and the gated `GATED_REPO` (readable by `GATED_READER` with
  `GATED_READER_TOKEN`), each with the example LoRA and card license `LICENSE`. Its `requests` record the
  bearer token of every request (None when there was none).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_hub import FakeHub

EXAMPLE_LORA = Path(__file__).resolve().parent.parent / "assets" / "example-flux-lora.safetensors"
PUBLIC_REPO = "alice/tiny-flux-lora"
GATED_REPO = "bob/gated-lora"
GATED_READER = "carol"
GATED_READER_TOKEN = "hf_test_gated_reader_0123456789"
LICENSE = "apache-2.0"


@pytest.fixture(scope="session")
def app_module(tmp_path_factory: pytest.TempPathFactory, tiny_flux_dir: Path):
    """The `app` module, its Blocks built with gradio's cache in a temp dir and the tiny FLUX base model loaded
    (tests of `/preview` also request `tiny_flux_base_model`: the preview reads the variable per call)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio-cache")))
        with pytest.MonkeyPatch.context() as import_only:
            import_only.setenv("LORA_OPS_BASE_MODEL", str(tiny_flux_dir))
            import app
        yield app


@pytest.fixture(scope="session")
def app_url(app_module) -> Iterator[str]:
    """URL of the running app (loopback only)."""
    _, url, _ = app_module.demo.launch(
        server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, **app_module.LAUNCH_OPTIONS
    )
    yield url
    app_module.demo.close()


@pytest.fixture
def app_client(app_url: str):
    from gradio_client import Client

    return Client(app_url, verbose=False)


@pytest.fixture
def lora_file_hub(hub_online: FakeHub) -> FakeHub:
    """The loopback Hub, for one test, also serving `PUBLIC_REPO` and the gated `GATED_REPO` (each: the example
    LoRA as `lora.safetensors` and `nested/lora-copy.safetensors`, plus a README.md)."""
    lora = EXAMPLE_LORA.read_bytes()
    files = {"README.md": b"# a LoRA\n", "lora.safetensors": lora, "nested/lora-copy.safetensors": lora}
    hub_online.add_user(GATED_READER, GATED_READER_TOKEN, role="read")
    hub_online.add_repo(PUBLIC_REPO, files=files, license=LICENSE)
    hub_online.add_repo(GATED_REPO, files=files, license=LICENSE, gated=True, accepted=[GATED_READER])
    return hub_online
