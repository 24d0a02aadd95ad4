"""Pytest fixtures for the Space: the real app served on 127.0.0.1, gradio_client clients, and a loopback Hub
that serves LoRA files to download (the push side is `tests.fixtures_hub`).

- `app_module` (session): `app.py` imported with `GRADIO_TEMP_DIR` in a temp dir (so the test can look at the
  files the app leaves behind: `app_module.demo.GRADIO_CACHE`), with `LORA_OPS_BASE_MODEL` pointing at the tiny
  FLUX pipeline of `tests.fixtures_flux` while it imports (the app loads the preview's base model then).
- `app_url` (session): the app launched in this process with `prevent_thread_lock=True` and the same launch
  options as `python app.py`; closed at the end of the session.
- `app_client`: a fresh `gradio_client.Client` on it.
- `lora_file_hub`: a loopback Hub holding `PUBLIC_REPO` and the gated `GATED_REPO` (readable with
  `GATED_READER_TOKEN`), each with the example LoRA; huggingface_hub in this process is pointed at it for the
  test. It records the bearer token of every request (`tokens`).
"""

from __future__ import annotations

import hashlib
import json
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from huggingface_hub import constants

EXAMPLE_LORA = Path(__file__).resolve().parent.parent / "assets" / "example-flux-lora.safetensors"
PUBLIC_REPO = "alice/tiny-flux-lora"
GATED_REPO = "bob/gated-lora"
GATED_READER_TOKEN = "hf_test_gated_reader_0123456789"
COMMIT = "c0ffee" * 6 + "c0ff"
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


@dataclass
class LoraFileHub:
    """Repos of files served the way the Hub serves them to `model_info` (card license `LICENSE`),
    `list_repo_tree`, `get_paths_info` and `hf_hub_download`; `gated` repos answer 401 GatedRepo unless the
    request carries `reader_token`."""

    repos: dict[str, dict[str, bytes]]
    gated: set[str]
    reader_token: str
    tokens: list[str | None] = field(default_factory=list)
    url: str = ""

    def entry(self, path: str, data: bytes) -> dict:
        return {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}

    def answer(self, path: str, token: str | None, body: bytes) -> tuple[int, dict, bytes]:
        """(status, headers, body) for one request (a HEAD request is sent the headers only)."""
        self.tokens.append(token)
        parts = urllib.parse.unquote(path.split("?")[0]).strip("/").split("/")
        api = parts[0] == "api"
        repo_id = "/".join(parts[2:4] if api else parts[0:2])
        if repo_id not in self.repos:
            return _error(HTTPStatus.NOT_FOUND, "RepoNotFound", "Repository not found")
        if repo_id in self.gated and token != self.reader_token:
            return _error(HTTPStatus.UNAUTHORIZED, "GatedRepo", "Access to this repo is restricted")
        files = self.repos[repo_id]
        if api and len(parts) == 4:
            return _json({"id": repo_id, "sha": COMMIT, "cardData": {"license": LICENSE}})
        if api and parts[4] == "tree":
            return _json([self.entry(name, data) for name, data in sorted(files.items())])
        if api and parts[4] == "paths-info":
            asked = urllib.parse.parse_qs(body.decode()).get("paths", [])
            return _json([self.entry(name, files[name]) for name in asked if name in files])
        name = "/".join(parts[4:])
        if parts[2] != "resolve" or name not in files:
            return _error(HTTPStatus.NOT_FOUND, "EntryNotFound", "Entry not found")
        data = files[name]
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        return HTTPStatus.OK, headers, data


def _json(value: object) -> tuple[int, dict, bytes]:
    return HTTPStatus.OK, {"Content-Type": "application/json"}, json.dumps(value).encode()


def _error(status: int, code: str, message: str) -> tuple[int, dict, bytes]:
    return status, {"X-Error-Code": code, "X-Error-Message": message}, json.dumps({"error": message}).encode()


def _handler(hub: LoraFileHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args) -> None:
            """Quiet: the record is `hub.tokens`."""

        def do_GET(self) -> None:
            self._serve()

        def do_HEAD(self) -> None:
            self._serve()

        def do_POST(self) -> None:
            self._serve()

        def _serve(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            authorization = self.headers.get("Authorization", "")
            token = authorization.removeprefix("Bearer ") if authorization.startswith("Bearer ") else None
            status, headers, data = hub.answer(self.path, token, body)
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

    return Handler


@pytest.fixture
def lora_file_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[LoraFileHub]:
    """A loopback Hub serving `PUBLIC_REPO` and the gated `GATED_REPO` (each: the example LoRA as
    `lora.safetensors` and `nested/lora-copy.safetensors`, plus a README.md), for one test."""
    lora = EXAMPLE_LORA.read_bytes()
    files = {"README.md": b"# a LoRA\n", "lora.safetensors": lora, "nested/lora-copy.safetensors": lora}
    hub = LoraFileHub(
        repos={PUBLIC_REPO: files, GATED_REPO: files}, gated={GATED_REPO}, reader_token=GATED_READER_TOKEN
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, name="lora-file-hub", daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield hub
    server.shutdown()
    server.server_close()
