"""Bad input gets one clear line, no traceback, no output file, and the input untouched (API and CLI)."""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

import lora_ops
from lora_ops import synthetic
from lora_ops.cli import main
from tests.bad_inputs import BAD_INPUTS, write_bad_input
from tests.fixtures_lora import CASE_BY_NAME, write_case

ROOT = Path(__file__).resolve().parent.parent


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


@pytest.fixture(params=sorted(BAD_INPUTS))
def bad_input(request, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    path, fragment = write_bad_input(request.param, folder)
    return path, fragment


def test_api_refuses_with_one_line(bad_input, tmp_path):
    path, fragment = bad_input
    before = _digest(path)
    out = tmp_path / "out.safetensors"
    with pytest.raises(lora_ops.LoraError) as refused:
        lora_ops.resize_file(path, out, lora_ops.ResizeOptions(rank=2))
    message = str(refused.value)
    assert fragment in message and "\n" not in message
    assert not out.exists() and list(tmp_path.glob("*.part")) == [] and list(tmp_path.glob(".*")) == []
    assert _digest(path) == before
    with pytest.raises(lora_ops.LoraError, match=fragment.replace("(", r"\(")):
        lora_ops.inspect_file(path)


def test_cli_refuses_with_one_line_and_status_2(bad_input, tmp_path, capsys):
    path, fragment = bad_input
    before = _digest(path)
    out = tmp_path / "out.safetensors"
    assert main(["resize", str(path), "-o", str(out), "--rank", "2"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines[-1].startswith("error: ") and fragment in lines[-1]
    assert "Traceback" not in captured.err and not out.exists() and _digest(path) == before


def test_cli_process_prints_no_traceback(tmp_path):
    path, fragment = write_bad_input("pickle-zip", tmp_path)
    out = tmp_path / "out.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "lora_ops", "resize", str(path), "-o", str(out), "--rank", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and fragment in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["resize", "IN", "-o", "OUT"], "give a rank"),
        (["resize", "IN", "-o", "OUT", "--rank", "0"], "rank must be between"),
        (["resize", "IN", "-o", "OUT", "--rank", "2", "--method", "magic"], "invalid choice"),
        (["resize", "IN", "-o", "OUT", "--energy", "1.5"], "energy must be in"),
        (["resize", "IN", "-o", "OUT", "--target-size", "lots"], "cannot read size"),
        (["resize", "IN", "-o", "OUT", "--rank", "2", "--density", "0"], "density must be between 1e-06 and 1"),
        (["resize", "IN", "-o", "OUT", "--rank", "2", "--density", "1e-300"], "a smaller density makes them overflow"),
        (["resize", "IN", "-o", "IN", "--rank", "2"], "is the input file"),
        (["resize", "IN", "-o", "OUT.pt", "--rank", "2"], "must be a .safetensors file"),
        (["resize", "IN", "-o", "NOWHERE/x.safetensors", "--rank", "2"], "folder does not exist"),
    ],
)
def test_cli_refuses_bad_arguments(argv, fragment, tmp_path, capsys):
    fixture = write_case(CASE_BY_NAME["kohya-flux"], tmp_path / "in")
    names = {"IN": str(fixture.path), "OUT": str(tmp_path / "out.safetensors"), "OUT.pt": str(tmp_path / "o.pt")}
    argv = [names.get(a, a.replace("NOWHERE", str(tmp_path / "nowhere"))) for a in argv]
    before = _digest(fixture.path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and fragment in err and len(err.splitlines()) == 1
    assert _digest(fixture.path) == before and not (tmp_path / "out.safetensors").exists()


def test_cli_stops_quietly_when_its_reader_goes_away(tmp_path):
    """`python -m lora_ops inspect FILE --json | head`: no error line, no traceback."""
    path = tmp_path / "wide.safetensors"
    synthetic.save_lora(synthetic.make_lora(synthetic.flux_shapes(num_double=4, num_single=8, hidden=64), 32), path)
    process = subprocess.Popen(
        [sys.executable, "-m", "lora_ops", "inspect", str(path), "--json"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout.read(100).startswith(b"{")
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait() == 1 and stderr == b""
