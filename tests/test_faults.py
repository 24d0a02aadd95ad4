"""The CLI under faults: no path overwrites what the user did not name, signals and changed inputs leave nothing
behind, and every refusal is one line with status 2 (real subprocesses against real files)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_ops import synthetic
from lora_ops.atomic import remove_stale_temporaries
from tests.fixtures_lora import CASE_BY_NAME, write_case

ROOT = Path(__file__).resolve().parent.parent
TEMPORARIES = ".lora-resizer-*.part"


def _cli(*args: object, **kwargs) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lora_ops", *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False, **kwargs)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_refused(result: subprocess.CompletedProcess, fragment: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


@pytest.fixture
def kohya(tmp_path: Path) -> Path:
    return write_case(CASE_BY_NAME["kohya-flux"], tmp_path / "in").path


@pytest.fixture(scope="module")
def big_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FLUX-shaped LoRA big enough (about 50 MB) that a resize is still running when the test acts on it."""
    path = tmp_path_factory.mktemp("big") / "big.safetensors"
    shapes = synthetic.flux_shapes(num_double=2, num_single=4, hidden=1024)
    synthetic.save_lora(synthetic.make_lora(shapes, 64), path)
    return path


def test_a_report_path_that_is_the_input_or_the_output_is_refused(kohya, tmp_path):
    before = _digest(kohya)
    out = tmp_path / "out.safetensors"
    link = tmp_path / "link.safetensors"
    link.symlink_to(kohya)
    hard = tmp_path / "hard.json"
    os.link(kohya, hard)
    for report, what in ((kohya, "input"), (link, "input"), (hard, "input"), (out, "output")):
        _assert_refused(_cli("resize", kohya, "-o", out, "--rank", "2", "--report", report), f"is the {what} file")
    assert _digest(kohya) == before and not out.exists()


def test_a_report_that_cannot_be_written_is_refused_before_the_output_is_written(kohya, tmp_path):
    out = tmp_path / "out.safetensors"
    _assert_refused(_cli("resize", kohya, "-o", out, "--rank", "2", "--report", tmp_path / "nodir" / "r.json"), "nodir")
    _assert_refused(_cli("resize", kohya, "-o", out, "--rank", "2", "--report", tmp_path), "is a folder")
    assert not out.exists() and not list(tmp_path.glob(TEMPORARIES))


def test_the_report_is_written_whole(kohya, tmp_path):
    out, report = tmp_path / "out.safetensors", tmp_path / "report.json"
    assert _cli("resize", kohya, "-o", out, "--rank", "2", "--report", report).returncode == 0
    assert json.loads(report.read_text())["rank_out"] == {"2": 3}
    assert not list(tmp_path.glob(TEMPORARIES))


def test_another_adapters_config_in_the_output_folder_is_not_replaced(tmp_path):
    fixture = write_case(CASE_BY_NAME["peft-config"], tmp_path / "in")
    folder = tmp_path / "other-adapter"
    folder.mkdir()
    theirs = folder / "adapter_config.json"
    theirs.write_text(json.dumps({"peft_type": "LORA", "r": 32, "lora_alpha": 32}))
    before = theirs.read_text()
    result = _cli("resize", fixture.path, "-o", folder / "adapter_model.safetensors", "--rank", "2")
    _assert_refused(result, "already holds another adapter's adapter_config.json")
    assert theirs.read_text() == before and not (folder / "adapter_model.safetensors").exists()
    ours = tmp_path / "ours"
    ours.mkdir()
    for _ in range(2):  # the same resize again into its own folder finds its own, identical config: fine
        assert _cli("resize", fixture.path, "-o", ours / "adapter_model.safetensors", "--rank", "2").returncode == 0


def _start_resize(source: Path, out: Path) -> subprocess.Popen:
    """Start a resize and return once it writes its temporary file (it is then mid-run)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "lora_ops", "resize", str(source), "-o", str(out), "--rank", "60"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not list(out.parent.glob(TEMPORARIES)):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.002)
    return process


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_stop_with_one_line_and_no_temporary_file(big_lora, tmp_path, signum, status):
    before = _digest(big_lora)
    out = tmp_path / "out.safetensors"
    process = _start_resize(big_lora, out)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == status, stderr
    assert stderr.strip() == f"error: stopped by {signal.Signals(signum).name}; nothing was written"
    assert not out.exists() and not list(tmp_path.glob(TEMPORARIES)) and _digest(big_lora) == before


def test_a_later_run_removes_what_a_killed_run_left(big_lora, tmp_path):
    out = tmp_path / "out.safetensors"
    process = _start_resize(big_lora, out)
    process.kill()
    process.communicate(timeout=60)
    (stale,) = tmp_path.glob(TEMPORARIES)
    alive = tmp_path / f".lora-resizer-{stale.name.split('-')[2]}-{os.getpid()}-0123abcd.part"
    alive.write_bytes(b"another run of this machine, still going")
    foreign = tmp_path / ".lora-resizer-ffffffff-1-0123abcd.part"
    foreign.write_bytes(b"a run on another machine sharing this folder")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert alive.exists() and foreign.exists()


def test_an_input_replaced_during_the_run_is_noticed(big_lora, tmp_path):
    source = tmp_path / "source.safetensors"
    source.write_bytes(big_lora.read_bytes())
    replacement = write_case(CASE_BY_NAME["kohya-flux"], tmp_path / "other").path
    out = tmp_path / "out.safetensors"
    process = _start_resize(source, out)
    os.replace(replacement, source)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2 and stderr.strip() == (
        "error: source.safetensors changed while it was being resized; nothing was written"
    )
    assert not out.exists() and not list(tmp_path.glob(TEMPORARIES))


def test_an_input_truncated_during_the_run_fails_with_one_line(big_lora, tmp_path):
    """A memory-mapped input that shrinks kills its reader with SIGBUS; lora_ops reads with pread instead."""
    source = tmp_path / "source.safetensors"
    source.write_bytes(big_lora.read_bytes())
    out = tmp_path / "out.safetensors"
    process = _start_resize(source, out)
    os.truncate(source, source.stat().st_size // 2)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2 and stderr.strip() in (
        "error: source.safetensors was truncated while it was being read",
        "error: source.safetensors changed while it was being resized; nothing was written",
    )
    assert not out.exists() and not list(tmp_path.glob(TEMPORARIES))


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda tmp: tmp, "is a folder, not a LoRA file"),
        (lambda tmp: (os.mkfifo(tmp / "f.safetensors"), tmp / "f.safetensors")[1], "is a pipe (FIFO), not a LoRA file"),
        (lambda tmp: Path("/dev/zero"), "/dev/zero is a character device, not a LoRA file"),
        (lambda tmp: (tmp / "z.safetensors").symlink_to("/dev/null") or tmp / "z.safetensors", "character device"),
    ],
)
def test_inputs_that_are_not_files_are_named(make, fragment, tmp_path):
    path = make(tmp_path)
    _assert_refused(_cli("inspect", path), fragment)
    _assert_refused(_cli("resize", path, "-o", tmp_path / "out.safetensors", "--rank", "2"), fragment)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [("[1, 2]", "holds a JSON array"), ("null", "holds null"), ('"r=8"', "holds a JSON string")],
)
def test_a_config_that_is_not_a_json_object_is_refused(content, fragment, tmp_path):
    fixture = write_case(CASE_BY_NAME["peft-config"], tmp_path / "in")
    (tmp_path / "in" / "adapter_config.json").write_text(content)
    _assert_refused(_cli("inspect", fixture.path), f"adapter_config.json is not a PEFT LoRA config (it {fragment}")


def test_output_paths_that_are_folders_or_under_a_file_are_named(kohya, tmp_path):
    folder = tmp_path / "out.safetensors"
    folder.mkdir()
    _assert_refused(_cli("resize", kohya, "-o", folder, "--rank", "2"), "is a folder; give a file name")
    _assert_refused(
        _cli("resize", kohya, "-o", kohya / "x.safetensors", "--rank", "2"), "kohya-flux.safetensors is a file, not"
    )
    _assert_refused(_cli("resize", kohya, "-o", tmp_path / "no" / "x.safetensors", "--rank", "2"), "make it first")


def test_the_longest_legal_output_name_is_written(kohya, tmp_path):
    out = tmp_path / ("n" * (255 - len(".safetensors")) + ".safetensors")
    assert _cli("resize", kohya, "-o", out, "--rank", "2").returncode == 0 and out.is_file()


def test_help_says_what_resize_needs():
    text = " ".join(_cli("resize", "--help").stdout.split())
    assert "Give at least one of --rank, --energy, --target-size" in text
    assert "its folder must exist" in text
