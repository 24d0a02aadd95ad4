"""The project's own promises: the README's commands are what CI runs, and the Space front matter matches the code."""

import re
from pathlib import Path

import gradio
from huggingface_hub import metadata_load

ROOT = Path(__file__).resolve().parent.parent


def _bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    test_command = next(block for block in _bash_blocks(readme) if "pytest" in block)
    install, _, run = test_command.partition(" && ")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = [line.strip() for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == run
    assert f"python -m {install}" in commands or install in commands


def test_space_front_matter_matches_the_code():
    metadata = metadata_load(ROOT / "README.md")
    assert metadata["sdk"] == "gradio" and metadata["sdk_version"] == gradio.__version__
    assert (ROOT / metadata["app_file"]).is_file()
    assert metadata["hf_oauth"] is True and {"write-repos", "manage-repos"} <= set(metadata["hf_oauth_scopes"])
    assert metadata["python_version"] in {"3.10", "3.12"}
    requirements = (ROOT / "requirements.txt").read_text(encoding="utf-8")
    assert f"gradio[oauth]=={gradio.__version__}" in requirements
