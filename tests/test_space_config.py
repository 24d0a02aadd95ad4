"""What a real Hugging Face Space needs from this repo, read from the files the Hub reads: the README's front
matter (sign-in scopes, startup), the requirements files (torch), `.gitattributes` (binary files) and the imports
of the code that runs there (every third-party module declared)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

from huggingface_hub import metadata_load
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from lora_ops import preview

ROOT = Path(__file__).resolve().parent.parent
ZEROGPU_TORCH = {"2.8.0", "2.9.1", "2.10.0", "2.11.0"}
"""The torch releases ZeroGPU lists as supported (Hugging Face's ZeroGPU documentation)."""
DEFAULT_STARTUP_MINUTES = 30
"""A Space's startup timeout when the front matter sets none (Spaces configuration reference)."""
RUNTIME_CODE = [*sorted((ROOT / "lora_ops").glob("*.py")), ROOT / "app.py"]


def _front_matter() -> dict:
    return metadata_load(ROOT / "README.md")


def _requirements(name: str) -> list[Requirement]:
    """The requirement lines of a requirements file (not its comments or `-r` includes)."""
    lines = (ROOT / name).read_text(encoding="utf-8").splitlines()
    return [Requirement(line) for line in (line.split("#")[0].strip() for line in lines) if line and line[0] != "-"]


def _minutes(duration: str) -> float:
    """A Spaces duration such as "1h" or "45m" in minutes."""
    number, unit = re.fullmatch(r"(\d+)([smh])", duration).groups()
    return int(number) * {"s": 1 / 60, "m": 1, "h": 60}[unit]


def _app_constant(name: str) -> object:
    """A literal constant of app.py, read from its source (importing app.py builds the whole app)."""
    tree = ast.parse((ROOT / "app.py").read_text(encoding="utf-8"))
    value = next(
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == name for target in node.targets)
    )
    return ast.literal_eval(value)


def test_sign_in_asks_for_the_scopes_the_app_uses_and_no_more():
    scopes = _front_matter()["hf_oauth_scopes"]
    assert sorted(scopes) == sorted(_app_constant("OAUTH_SCOPES"))
    assert "gated-repos" in scopes  # the README promises that a signed-in visitor reads gated repos


def test_startup_leaves_time_to_download_the_base_model():
    metadata = _front_matter()
    assert _minutes(metadata["startup_duration_timeout"]) > DEFAULT_STARTUP_MINUTES
    assert preview.DEFAULT_BASE_MODEL not in " ".join(metadata.get("preload_from_hub", []))  # gated: not preloaded


def test_the_space_runs_a_zerogpu_torch_and_ci_keeps_its_cpu_build():
    (space_torch,) = _requirements("pre-requirements.txt")  # Spaces install it before requirements.txt
    assert space_torch.name == "torch"
    (pinned,) = (spec.version for spec in space_torch.specifier if spec.operator == "==")
    assert pinned in ZEROGPU_TORCH
    (runtime_torch,) = (r for r in _requirements("requirements.txt") if r.name == "torch")
    ci_torch = re.search(r"pip install -q torch==(\S+)", (ROOT / ".ci" / "run").read_text(encoding="utf-8"))[1]
    assert runtime_torch.specifier.contains(pinned)  # keeps the Space's torch
    assert runtime_torch.specifier.contains(ci_torch)  # keeps CI's CPU build: no CUDA download in CI
    assert not any(r.name == "torch" for r in _requirements("requirements-dev.txt"))


def test_every_binary_file_goes_through_lfs():
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    binary = []
    for name in filter(None, listed.split("\0")):
        path = ROOT / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            binary.append(name)
            continue
        if b"\0" in data:
            binary.append(name)
    assert "assets/example-flux-lora.safetensors" in binary and "assets/screenshot.png" in binary
    attributes = subprocess.run(
        ["git", "check-attr", "filter", "--", *binary], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert attributes == [f"{name}: filter: lfs" for name in binary]


def test_every_third_party_import_is_declared():
    """The code the Space runs imports only distributions requirements.txt names (none arrives by accident)."""
    imported = set()
    for path in RUNTIME_CODE:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"lora_ops"}
    assert "httpx2" not in third_party  # huggingface_hub's own error types instead
    distributions = importlib.metadata.packages_distributions()
    declared = {canonicalize_name(r.name) for r in _requirements("requirements.txt")}
    undeclared = {
        module
        for module in third_party
        if not declared & {canonicalize_name(d) for d in distributions.get(module, [module])}
    }
    assert undeclared == set()


def test_the_readme_gives_the_default_previews_requested_seconds():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    request = preview.DEFAULT_REQUEST
    assert f"estimates {request.estimated} s, so it requests **{request.requested} s**" in readme
    assert f"| {request.images} | {request.estimated} s | **{request.requested} s** |" in readme
