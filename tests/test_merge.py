"""Merging LoRAs (lora_ops.merge): the file holds the weighted sum of the inputs' deltas, exactly at the summed rank,
or its optimal truncation at a given rank, in the inputs' layout; bad sets are refused before anything is written."""

import hashlib
import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lora_ops
from lora_ops.cli import main
from lora_ops.merge_inputs import parse_weighted
from tests.consumer_harness import applied_deltas
from tests.fixtures_lora import CASE_BY_NAME, CASES, LoraFixture, read_deltas, write_case
from tests.tiny_flux import load_tiny_flux, tiny_flux_lora

WEIGHTS = (0.8, -0.5)
# Every layout; the tensors that are not LoRA factors of some cases (PEFT modules_to_save, BFL Control norms) are left
# out of the files merged here: a merge refuses them (tested below).
LAYOUTS = [case.name for case in CASES]
EXACT = 1e-6


def _pair(name: str, folder: Path) -> tuple[LoraFixture, LoraFixture]:
    """The case (without non-LoRA tensors) written twice with other factors; the second file lacks its last module."""
    case = replace(CASE_BY_NAME[name], extra=())
    partial = replace(case, modules=case.modules[:-1], ranks=case.ranks and case.ranks[:-1])
    return write_case(case, folder / "a", seed=0), write_case(partial, folder / "b", seed=1)


def _weighted_sum(name: str, fixtures: tuple[LoraFixture, ...], weights: tuple[float, ...]) -> torch.Tensor:
    return sum(weight * fixture.deltas[name] for fixture, weight in zip(fixtures, weights) if name in fixture.deltas)


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    """``||x - y|| / ||y||``; ``||x||`` when ``y`` is zero."""
    norm = float(y.norm())
    return float((x - y).norm()) / norm if norm > 0 else float(x.norm())


def _optimum(delta: torch.Tensor, rank: int) -> float:
    """The error of the best rank-``rank`` approximation of ``delta`` (dense SVD, Eckart-Young)."""
    s = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))
    return float(s[rank:].norm() / s.norm()) if s.norm() > 0 else 0.0


def _keys(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as handle:
        return set(handle.keys())


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


@pytest.mark.parametrize("name", LAYOUTS)
def test_lossless_merge_is_the_weighted_sum(name, tmp_path):
    first, second = _pair(name, tmp_path)
    out = tmp_path / "merged.safetensors"
    report = lora_ops.merge_files([(first.path, WEIGHTS[0]), (second.path, WEIGHTS[1])], out)
    case = first.case
    merged = read_deltas(out, case)
    rows = {row["name"]: row for row in report["layers"]}
    assert set(rows) == set(case.modules)
    assert _keys(out) == _keys(first.path) | _keys(second.path)
    for module, row in rows.items():
        expected = _weighted_sum(module, (first, second), WEIGHTS)
        assert row["ranks_in"] == [_rank(f, module) if module in f.deltas else None for f in (first, second)]
        assert row["rank_out"] == row["rank_in"] == sum(rank for rank in row["ranks_in"] if rank)
        error = _rel(merged[module], expected)
        assert error == pytest.approx(row["rel_error"], abs=EXACT)
        # 32-bit factors hold the sum exactly; 16-bit ones round it, and the report says by how much
        assert error <= (EXACT if case.dtype == torch.float32 else 5e-3)


def _rank(fixture: LoraFixture, module: str) -> int:
    with safe_open(str(fixture.path), framework="pt") as handle:
        return handle.get_slice(module + fixture.case.down).get_shape()[0]


@pytest.mark.parametrize("name", LAYOUTS)
def test_reduced_merge_is_the_optimal_truncation_of_the_sum(name, tmp_path):
    first, second = _pair(name, tmp_path)
    out = tmp_path / "merged-r3.safetensors"
    report = lora_ops.merge_files([(first.path, WEIGHTS[0]), (second.path, WEIGHTS[1])], out, rank=3, dtype="fp32")
    merged = read_deltas(out, first.case)
    assert report["rank_out"] == {"3": len(first.case.modules)}
    for row in report["layers"]:
        expected = _weighted_sum(row["name"], (first, second), WEIGHTS)
        error = _rel(merged[row["name"]], expected)
        assert error == pytest.approx(_optimum(expected, 3), abs=EXACT)
        assert error == pytest.approx(row["rel_error"], abs=EXACT)
        # the sum's spectrum; 16-bit inputs are solved from float32 Gram matrices, which resolve directions down to
        # sqrt(GRAM_RTOL) = 3e-3 of the largest (lora_ops.linalg), 32-bit ones from float64 factors
        s = torch.linalg.svdvals(expected.reshape(expected.shape[0], -1)).tolist()
        reported = row["singular_values"] + [0.0] * (len(s) - len(row["singular_values"]))
        resolution = EXACT if first.case.dtype == torch.float32 else 3e-3
        assert reported == pytest.approx(s, abs=resolution * s[0])


@pytest.mark.parametrize("method", ["randomized_svd", "random_projection"])
def test_other_methods_report_the_error_they_make(tmp_path, method):
    first, second = _pair("kohya-flux", tmp_path)
    out = tmp_path / "merged.safetensors"
    report = lora_ops.merge_files([(first.path, 1.0), (second.path, 1.0)], out, rank=3, method=method, dtype="fp32")
    merged = read_deltas(out, first.case)
    assert report["method"] == method
    for row in report["layers"]:
        expected = _weighted_sum(row["name"], (first, second), (1.0, 1.0))
        assert _rel(merged[row["name"]], expected) == pytest.approx(row["rel_error"], abs=EXACT)


@pytest.mark.parametrize("name", ["kohya-flux", "diffusers-metadata", "peft-config", "minimax-metadata-alpha-bf16"])
def test_first_input_without_a_module_still_gets_it_merged(name, tmp_path):
    """The first input decides how the output carries its scale; a module only a later input has is merged too,
    with its alpha, and a regenerated diffusers config targets it."""
    first, second = _pair(name, tmp_path)
    out = tmp_path / "merged.safetensors"
    report = lora_ops.merge_files([(second.path, WEIGHTS[1]), (first.path, WEIGHTS[0])], out, rank=4, dtype="fp32")
    merged = read_deltas(out, first.case)
    assert _keys(out) == _keys(first.path)
    for row in report["layers"]:
        expected = _weighted_sum(row["name"], (first, second), WEIGHTS)
        assert _rel(merged[row["name"]], expected) == pytest.approx(row["rel_error"], abs=EXACT)
        assert row["rel_error"] == pytest.approx(_optimum(expected, 4), abs=EXACT)
    if "lora_adapter_metadata" in first.case.metadata:
        targets = json.loads(_metadata(out)["lora_adapter_metadata"])["transformer.target_modules"]
        assert set(targets) == {module.removeprefix("transformer.") for module in first.case.modules}
    if first.case.config:
        targets = json.loads((out.parent / "adapter_config.json").read_text())["target_modules"]
        assert set(targets) == {module.removeprefix("base_model.model.") for module in first.case.modules}


def test_alpha_tensors_are_not_written_beside_a_config(tmp_path):
    """diffusers refuses a file with both lora_adapter_metadata and .alpha tensors: a first input with metadata makes
    the output carry every module's scale there, and a later input's alphas are folded, not copied."""
    with_metadata = write_case(CASE_BY_NAME["diffusers-metadata"], tmp_path / "a", seed=0)
    with_alphas = write_case(CASE_BY_NAME["diffusers-alpha-tensors"], tmp_path / "b", seed=1)
    out = tmp_path / "merged.safetensors"
    report = lora_ops.merge_files([(with_metadata.path, 0.5), (with_alphas.path, 1.5)], out)
    assert report["scale_source"] == "lora_adapter_metadata"
    assert _keys(out) == _keys(with_metadata.path)
    merged = read_deltas(out, with_metadata.case)
    for row in report["layers"]:
        expected = _weighted_sum(row["name"], (with_metadata, with_alphas), (0.5, 1.5))
        assert _rel(merged[row["name"]], expected) <= EXACT


def test_provenance_names_every_input_and_progress_counts_modules(tmp_path):
    first, second = _pair("kohya-flux", tmp_path)
    out = tmp_path / "merged.safetensors"
    calls = []
    report = lora_ops.merge_files(
        [(first.path, 0.25), (second.path, 2.0)], out, rank=2, progress=lambda *call: calls.append(call)
    )
    sources = json.loads(_metadata(out)["lora_resizer.sources"])
    digests = [hashlib.sha256(fixture.path.read_bytes()).hexdigest() for fixture in (first, second)]
    assert [(s["file"], s["sha256"], s["weight"]) for s in sources] == [
        (first.path.name, digests[0], 0.25),
        (second.path.name, digests[1], 2.0),
    ]
    assert [entry["sha256"] for entry in report["inputs"]] == digests
    assert report["inputs"][1]["ranks"] == {"6": 2}
    assert calls == [(done, 3) for done in range(1, 4)]
    assert _metadata(out)["ss_network_dim"] == "2"


def _listing(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def _refused(inputs, out: Path, match: str, **options) -> None:
    before = _listing(out.parent)
    with pytest.raises(lora_ops.LoraError, match=match):
        lora_ops.merge_files(inputs, out, **options)
    assert _listing(out.parent) == before, "a refused merge wrote something"


def test_files_of_different_layouts_are_refused(tmp_path):
    kohya = write_case(CASE_BY_NAME["kohya-flux"], tmp_path / "kohya")
    diffusers = write_case(CASE_BY_NAME["diffusers"], tmp_path / "diffusers")
    _refused(
        [(kohya.path, 1.0), (diffusers.path, 1.0)],
        tmp_path / "merged.safetensors",
        r"kohya-flux\.safetensors is in the kohya layout but diffusers\.safetensors in the diffusers layout",
    )


def test_a_module_with_two_shapes_is_refused(tmp_path):
    case = CASE_BY_NAME["kohya-flux"]
    first = write_case(case, tmp_path / "a")
    other = write_case(replace(case, module_shapes=((24, 16, 6), (40, 32, 6), (4, 20, 6))), tmp_path / "b")
    _refused(
        [(first.path, 1.0), (other.path, 1.0)],
        tmp_path / "merged.safetensors",
        r"module 'lora_unet_double_blocks_0_img_mlp_0' has shape \[40, 24\] in .* but \[40, 32\] in",
    )


@pytest.mark.parametrize("name", ["peft-config", "bfl-control"])
def test_files_with_other_tensors_are_refused(tmp_path, name):
    fixture = write_case(CASE_BY_NAME[name], tmp_path / "in")
    _refused([(fixture.path, 1.0)], tmp_path / "merged.safetensors", "tensors that are not LoRA factors")


@pytest.mark.parametrize(
    ("weight", "match"),
    [
        (float("nan"), r"kohya-flux\.safetensors: weight nan is not a finite number"),
        (float("-inf"), "weight -inf is not a finite number"),
        ("heavy", "weight 'heavy' is not a finite number"),
    ],
)
def test_bad_weights_are_refused(tmp_path, weight, match):
    fixture = write_case(CASE_BY_NAME["kohya-flux"], tmp_path / "in")
    _refused([(fixture.path, 1.0), (fixture.path, weight)], tmp_path / "merged.safetensors", match)


def test_no_inputs_are_refused(tmp_path):
    _refused([], tmp_path / "merged.safetensors", "give at least one LoRA file to merge")


def test_output_that_is_an_input_is_refused(tmp_path):
    first, second = _pair("kohya-flux", tmp_path)
    before = second.path.read_bytes()
    with pytest.raises(lora_ops.LoraError, match="the output path is the input file"):
        lora_ops.merge_files([(first.path, 1.0), (second.path, 1.0)], second.path)
    assert second.path.read_bytes() == before


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A.safetensors", ("A.safetensors", 1.0)),
        ("A.safetensors:0.8", ("A.safetensors", 0.8)),
        ("A.safetensors:-1e-1", ("A.safetensors", -0.1)),
        ("run:3/A.safetensors", ("run:3/A.safetensors", 1.0)),
        ("A:v2.safetensors:0.5", ("A:v2.safetensors", 0.5)),
        ("A:2:1", ("A:2", 1.0)),
    ],
)
def test_weights_parse_at_the_last_colon_before_a_number(text, expected):
    path, weight = parse_weighted(text)
    assert (str(path), weight) == expected


@pytest.mark.parametrize(("text", "match"), [("A.safetensors:nan", "not a finite"), (":0.5", "names no file")])
def test_bad_weighted_names_are_refused(text, match):
    with pytest.raises(lora_ops.LoraError, match=match):
        parse_weighted(text)


def test_command_line_merges_files_with_colons_in_their_names(tmp_path, capsys):
    first, second = _pair("kohya-flux", tmp_path)
    colon = second.path.with_name("b:v2.safetensors")
    second.path.rename(colon)
    out, report_path = tmp_path / "merged.safetensors", tmp_path / "report.json"
    code = main(["merge", f"{first.path}:0.8", str(colon), "-o", str(out), "--rank", "3", "--report", str(report_path)])
    assert code == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith(f"wrote {out} ")
    report = json.loads(report_path.read_text())
    assert [(entry["file"], entry["weight"]) for entry in report["inputs"]] == [
        (first.path.name, 0.8),
        ("b:v2.safetensors", 1.0),
    ]
    merged = read_deltas(out, first.case)
    for row in report["layers"]:
        expected = _weighted_sum(row["name"], (first, second), (0.8, 1.0))
        assert _rel(merged[row["name"]], expected) == pytest.approx(row["rel_error"], abs=EXACT)


def test_command_line_refuses_a_bad_weight_in_one_line(tmp_path, capsys):
    first, _ = _pair("kohya-flux", tmp_path)
    out = tmp_path / "merged.safetensors"
    assert main(["merge", f"{first.path}:inf", "-o", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "weight inf is not a finite number" in error
    assert error.count("\n") == 1 and not out.exists()


RENDER = {"prompt": "How2Draw a lighthouse", "num_inference_steps": 2, "width": 32, "height": 32, "guidance_scale": 3.5}


def _render(pipe) -> np.ndarray:
    image = pipe(**RENDER, generator=torch.Generator().manual_seed(0)).images[0]
    return np.asarray(image, dtype=np.int16)


def test_merged_file_applies_the_weighted_sum_in_diffusers(
    tiny_flux_dir, tiny_flux_transformer, tiny_flux_lora_file, tmp_path
):
    """diffusers' real load_lora_weights applies the merged file as the weighted sum, and renders it as its own
    weighted combination of the two adapters does. The first input (rank 4, half the modules, scale 2 in
    ``lora_adapter_metadata``) gives the output its scale carrier, whose target_modules must then name every module."""
    second = tiny_flux_lora(tiny_flux_transformer, rank=4, seed=7)
    modules = sorted({key.removeprefix("transformer.").split(".lora_")[0] for key in second})[::2]
    partial = tmp_path / "partial.safetensors"
    fields = {"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.target_modules": modules}
    save_file(
        {key: value for key, value in second.items() if key.removeprefix("transformer.").split(".lora_")[0] in modules},
        str(partial),
        metadata={"format": "pt", "lora_adapter_metadata": json.dumps(fields)},
    )
    inputs = [(partial, 0.5), (tiny_flux_lora_file, 0.8)]
    lossless, reduced = tmp_path / "merged.safetensors", tmp_path / "merged-r6.safetensors"
    lora_ops.merge_files(inputs, lossless)
    report = lora_ops.merge_files(inputs, reduced, rank=6)
    assert set(load_file(str(lossless))) == set(load_file(str(tiny_flux_lora_file)))
    pipe = load_tiny_flux(tiny_flux_dir)
    pipe.set_progress_bar_config(disable=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for adapter, path in (
            ("full", tiny_flux_lora_file),
            ("partial", partial),
            ("merged", lossless),
            ("r6", reduced),
        ):
            pipe.load_lora_weights(str(path), adapter_name=adapter)
    # PEFT targets the modules of the state dict and warns when the config's target_modules disagree with them
    assert not [str(w.message) for w in caught if "inconsistency was discovered" in str(w.message)]
    full, half, merged, at_six = (
        applied_deltas({"transformer": pipe.transformer}, adapter) for adapter in ("full", "partial", "merged", "r6")
    )
    assert len(half) == len(modules) < len(full)
    expected = {name: 0.8 * delta + 0.5 * half.get(name, torch.zeros_like(delta)) for name, delta in full.items()}
    assert set(merged) == set(at_six) == set(expected)
    errors = {row["name"]: row["rel_error"] for row in report["layers"]}
    for name, delta in expected.items():
        assert _rel(merged[name], delta) <= EXACT
        assert _rel(at_six[name], delta) == pytest.approx(errors[name], abs=EXACT)
    pipe.set_adapters(["full", "partial"], adapter_weights=[0.8, 0.5])
    combined = _render(pipe)
    pipe.set_adapters("merged")
    assert np.abs(_render(pipe) - combined).max() <= 1
    pipe.disable_lora()
    assert np.abs(_render(pipe) - combined).mean() > 5, "the LoRAs must visibly change the image for this to mean much"
