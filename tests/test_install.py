"""The installable package (pyproject.toml): its console command, its version and its declared dependencies.

`.ci/run` builds the wheel, installs it into a fresh virtual environment and runs the installed `lora-resizer` from
outside the checkout; these tests check what the wheel promises from the source tree, fast and offline:
the console script calls the CLI, the version has one source, every third-party import in `lora_ops` is declared,
the CLI and the Python API run with the core dependencies alone, and the pins agree with requirements.txt.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterable
from functools import cache
from importlib import import_module
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import lora_ops

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
SELF = canonicalize_name(PROJECT["name"])
EXAMPLE = ROOT / "assets" / "example-flux-lora.safetensors"


def _requirements(lines: Iterable[str]) -> dict[str, Requirement]:
    """Requirement strings by canonical distribution name; the project's own extras (``lora-resizer[hub]``) left out."""
    requirements = (Requirement(line) for line in lines)
    return {canonicalize_name(req.name): req for req in requirements if canonicalize_name(req.name) != SELF}


CORE = _requirements(PROJECT["dependencies"])
EXTRAS = {extra: _requirements(lines) for extra, lines in PROJECT["optional-dependencies"].items()}


@cache
def _providers() -> dict[str, set[str]]:
    """Top-level module name -> the canonical names of the installed distributions that provide it."""
    return {name: {canonicalize_name(dist) for dist in dists} for name, dists in packages_distributions().items()}


def _third_party_imports(path: Path) -> set[str]:
    """Top-level names of the absolute imports in a source file (module level and inside functions), less the
    standard library and lora_ops itself."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"lora_ops"}


def test_console_script_is_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert PROJECT["scripts"] == {"lora-resizer": "lora_ops.cli:main"}
    module, _, name = PROJECT["scripts"]["lora-resizer"].partition(":")
    entry = getattr(import_module(module), name)
    with pytest.raises(SystemExit) as stopped:
        entry(["--version"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out == f"lora-resizer {lora_ops.__version__}\n"


def test_version_has_one_source() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" in PROJECT["dynamic"] and "version" not in PROJECT
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lora_ops.__version__"}


def test_only_lora_ops_is_packaged() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert setuptools["packages"] == ["lora_ops"]
    assert not [path for path in (ROOT / "lora_ops").iterdir() if path.is_dir() and path.name != "__pycache__"]


def test_every_third_party_import_is_declared() -> None:
    declared = set(CORE).union(*EXTRAS.values())
    undeclared = {
        f"{path.name}: {name}"
        for path in sorted((ROOT / "lora_ops").glob("*.py"))
        for name in _third_party_imports(path)
        if not _providers().get(name, set()) & declared
    }
    assert not undeclared


# Runs each argument list through lora_ops.cli.main with every module of the extras made unimportable.
CORE_ONLY = """
import importlib.abc, json, sys

BLOCKED = set(json.loads(sys.argv[1]))


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{name} is not a core dependency", name=name)


sys.meta_path.insert(0, Block())
from lora_ops.cli import main

for argv in json.loads(sys.argv[2]):
    status = main(argv)
    if status:
        sys.exit(f"{argv[0]} exited with {status}")
print(json.dumps(sorted({name.partition(".")[0] for name in sys.modules} & BLOCKED)))
"""


def test_cli_and_api_need_only_the_core_dependencies(tmp_path: Path) -> None:
    extras_only = set().union(*EXTRAS.values()) - set(CORE)
    blocked = sorted(name for name, dists in _providers().items() if dists & extras_only)
    assert {"huggingface_hub", "diffusers", "matplotlib", "PIL"} <= set(blocked)
    runs = [
        ["inspect", str(EXAMPLE)],
        ["resize", str(EXAMPLE), "--rank", "4", "-o", str(tmp_path / "r4.safetensors")],
        ["resize", str(EXAMPLE), str(tmp_path / "r4.safetensors"), "--rank", "6", "-o", str(tmp_path / "set")],
        ["merge", f"{EXAMPLE}:0.5", str(tmp_path / "r4.safetensors"), "-o", str(tmp_path / "merged.safetensors")],
    ]
    (tmp_path / "set").mkdir()
    done = subprocess.run(
        [sys.executable, "-c", CORE_ONLY, json.dumps(blocked), json.dumps(runs)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []
    assert sorted(path.name for path in (tmp_path / "set").iterdir()) == [EXAMPLE.name, "r4.safetensors"]
    assert (tmp_path / "merged.safetensors").is_file()


def test_pins_agree_with_the_space_requirements() -> None:
    space = _requirements(
        line.split("#")[0].strip()
        for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
        if line.split("#")[0].strip()
    )
    for requirements in (CORE, *EXTRAS.values()):
        for name, requirement in requirements.items():
            if name in space:
                assert requirement.specifier == space[name].specifier, name
