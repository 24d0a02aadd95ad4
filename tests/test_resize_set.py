"""A set of LoRA files brought to one rank (`resize A B C -o DIR`, `lora_ops.resize_files`): every layer of every
file at that rank, each in its input's layout, checked against the dense optimum; the set's largest rank by
default; one scale for every module of every output (what a compiled model's hotswap needs besides the rank), as
lora_ops and diffusers read it; all or nothing."""

import hashlib
import json
from collections import Counter
from dataclasses import replace

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lora_ops
from lora_ops.cli import main
from tests.consumer_harness import applied_deltas, assert_reported_error, assert_same_deltas
from tests.fixtures_lora import CASE_BY_NAME, read_deltas, write_case
from tests.tiny_flux import load_tiny_flux, tiny_flux_kohya_lora, tiny_flux_lora

# Three layouts and mixed ranks (8 on a module whose delta has rank 4 at most: out = 4).
SET = (
    replace(CASE_BY_NAME["kohya-flux"], ranks=(4, 6, 2)),
    replace(CASE_BY_NAME["diffusers"], ranks=(3, 3, 3)),
    replace(CASE_BY_NAME["onetrainer-bf16"], ranks=(2, 5, 8)),
)


def _dense_optimum(delta, rank):
    matrix = delta.reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(delta.shape)


def _rel(x, y):
    return ((x - y).norm() / y.norm()).item()


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _listing(folder):
    """Every name in ``folder``, hidden temporaries included."""
    return sorted(path.name for path in folder.iterdir())


@pytest.fixture
def lora_set(tmp_path):
    """The SET written to tmp_path/in, and an empty tmp_path/out."""
    (tmp_path / "out").mkdir()
    return [write_case(case, tmp_path / "in", seed=seed) for seed, case in enumerate(SET)]


def _read_scales(path):
    """The distinct scales lora_ops reads for the modules of the file at ``path``, sorted."""
    return tuple(sorted({layer["scale"] for layer in lora_ops.inspect_file(path)["layers"]}))


def _factor_ranks(path, case):
    with safe_open(str(path), framework="pt") as handle:
        return {handle.get_tensor(name + case.down).shape[0] for name in case.modules}


def test_every_layer_of_every_file_gets_the_rank_and_matches_the_dense_optimum(lora_set, tmp_path):
    out = tmp_path / "out"
    seen = []
    result = lora_ops.resize_files(
        [fixture.path for fixture in lora_set],
        out,
        lora_ops.ResizeOptions(rank=3),
        progress=lambda done, total: seen.append((done, total)),
    )
    assert result["rank"] == 3 and _listing(out) == sorted(fixture.path.name for fixture in lora_set)
    # the diffusers file has no alpha: one scale, 1, for every module (the kohya files' 2/3 and 2 folded into them)
    assert result["scale"] == 1.0
    assert {_read_scales(out / fixture.path.name) for fixture in lora_set} == {(1.0,)}
    for fixture, report, row in zip(lora_set, result["reports"], result["summary"]):
        written = out / fixture.path.name
        assert _factor_ranks(written, fixture.case) == {3}
        assert report["layout"] == row["layout"] and report["rank_out"] == {"3": 3}
        assert row == {"file": fixture.path.name, **{key: report[key] for key in lora_ops.sets.SUMMARY_KEYS}}
        with safe_open(str(written), framework="pt") as after, safe_open(str(fixture.path), framework="pt") as before:
            assert set(after.keys()) == set(before.keys()), "each output keeps its input's layout"
        deltas = read_deltas(written, fixture.case)  # the loaders' reading, not lora_ops'
        tolerance = 1e-5 if fixture.case.dtype == torch.float32 else 2e-2
        for layer in report["layers"]:
            truth = fixture.deltas[layer["name"]]
            assert _rel(deltas[layer["name"]], _dense_optimum(truth, 3)) < tolerance
            assert layer["rel_error"] == pytest.approx(_rel(deltas[layer["name"]], truth), abs=1e-5)
    assert seen[-1] == (9, 9) and [done for done, _ in seen] == list(range(1, 10))


def test_without_a_rank_the_set_gets_its_largest_rank_losslessly(lora_set, tmp_path):
    out = tmp_path / "out"
    result = lora_ops.resize_files([fixture.path for fixture in lora_set], out)
    assert result["rank"] == 8
    for fixture, report in zip(lora_set, result["reports"]):
        assert _factor_ranks(out / fixture.path.name, fixture.case) == {8}
        tolerance = 1e-6 if fixture.case.dtype == torch.float32 else 2e-2
        for name, delta in read_deltas(out / fixture.path.name, fixture.case).items():
            assert _rel(delta, fixture.deltas[name]) < tolerance
        assert report["worst_error"] < tolerance


def test_options_without_a_rank_keep_their_other_choices(lora_set, tmp_path):
    out = tmp_path / "out"
    result = lora_ops.resize_files([f.path for f in lora_set], out, lora_ops.ResizeOptions(dtype="fp16"))
    assert result["rank"] == 8
    for fixture in lora_set:
        tensors = load_file(str(out / fixture.path.name))
        assert {tensor.dtype for key, tensor in tensors.items() if not key.endswith(".alpha")} == {torch.float16}


def test_rank_rules_apply_per_file_as_for_one_file(lora_set, tmp_path):
    options = lora_ops.ResizeOptions(sv_fro=0.95)
    result = lora_ops.resize_files([fixture.path for fixture in lora_set], tmp_path / "out", options)
    assert result["rank"] is None and result["scale"] is None  # per-layer ranks: each file keeps its own scales
    for fixture, report in zip(lora_set, result["reports"]):
        alone = lora_ops.resize_file(fixture.path, tmp_path / "alone.safetensors", options)
        assert [layer["rank_out"] for layer in report["layers"]] == [layer["rank_out"] for layer in alone["layers"]]
        assert (tmp_path / "out" / fixture.path.name).read_bytes() == (tmp_path / "alone.safetensors").read_bytes()
    assert len({rank for report in result["reports"] for rank in report["rank_out"]}) > 1


def test_a_file_that_fails_late_leaves_nothing_written(lora_set, tmp_path):
    """The last file holds a NaN, found only while its factors are read: the outputs already done are removed,
    a file of the same name already in the folder stays as it was, and the inputs are untouched."""
    bad = tmp_path / "in" / "zz-nan.safetensors"
    tensors = load_file(str(lora_set[0].path))
    tensors[next(key for key in tensors if key.endswith("lora_up.weight"))][0, 0] = float("nan")
    save_file(tensors, str(bad))
    sources = [fixture.path for fixture in lora_set] + [bad]
    out = tmp_path / "out"
    (out / lora_set[1].path.name).write_bytes(b"an older output")
    before = {path: _digest(path) for path in sources}
    seen = []
    with pytest.raises(lora_ops.LoraError) as refused:
        lora_ops.resize_files(sources, out, lora_ops.ResizeOptions(rank=3), progress=lambda done, _: seen.append(done))
    assert max(seen) == 9, "the three good files were written before the bad one failed"
    message = str(refused.value)
    assert message.startswith("zz-nan.safetensors: ") and "NaN" in message and "\n" not in message
    assert _listing(out) == [lora_set[1].path.name] and (out / lora_set[1].path.name).read_bytes() == b"an older output"
    assert {path: _digest(path) for path in sources} == before


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(b"", "is empty"), (b"\x80\x04pickle", "pickled PyTorch checkpoint"), (b"{not json", "not a safetensors file")],
)
def test_a_bad_file_is_named_before_anything_is_written(content, fragment, lora_set, tmp_path):
    bad = tmp_path / "in" / "broken.safetensors"
    bad.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(lora_ops.LoraError) as refused:
        lora_ops.resize_files([lora_set[0].path, bad, lora_set[1].path], out, lora_ops.ResizeOptions(rank=3))
    assert "broken.safetensors" in str(refused.value) and fragment in str(refused.value)
    assert _listing(out) == []


def test_set_level_mistakes_are_refused(lora_set, tmp_path):
    out = tmp_path / "out"
    twin = tmp_path / "elsewhere" / lora_set[0].path.name
    twin.parent.mkdir()
    twin.write_bytes(lora_set[0].path.read_bytes())
    cases = [
        (([lora_set[0].path, twin], out), "two inputs are named kohya-flux.safetensors"),
        (([lora_set[0].path, lora_set[1].path], tmp_path / "in"), "holds the input kohya-flux.safetensors"),
        (([lora_set[0].path], tmp_path / "nowhere"), "does not exist (it is not created; make it first)"),
        (([lora_set[0].path], lora_set[1].path), "is a file, not a folder"),
        (([], out), "give at least one LoRA file"),
    ]
    for (sources, folder), fragment in cases:
        with pytest.raises(lora_ops.LoraError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            lora_ops.resize_files(sources, folder, lora_ops.ResizeOptions(rank=3))
    assert _listing(out) == []


def test_two_peft_adapters_would_share_one_config_and_are_refused(tmp_path):
    first = write_case(CASE_BY_NAME["peft-config"], tmp_path / "a")
    second = write_case(CASE_BY_NAME["peft-config"], tmp_path / "b", seed=1)
    renamed = second.path.rename(second.path.with_name("other.safetensors"))
    (tmp_path / "out").mkdir()
    with pytest.raises(lora_ops.LoraError, match="both have a PEFT adapter_config.json"):
        lora_ops.resize_files([first.path, renamed], tmp_path / "out", lora_ops.ResizeOptions(rank=3))
    result = lora_ops.resize_files([first.path], tmp_path / "out", lora_ops.ResizeOptions(rank=3))
    assert result["reports"][0]["output"]["config"] == "adapter_config.json"
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 3
    read_deltas(tmp_path / "out" / first.path.name, first.case)  # checks the config's ranks against the factors


def test_the_cli_writes_the_set_and_prints_a_report_per_file_and_a_summary(lora_set, tmp_path, capsys):
    out = tmp_path / "out"
    report_path = tmp_path / "set.json"
    argv = ["resize", *(str(f.path) for f in lora_set), "--rank", "5", "-o", str(out), "--report", str(report_path)]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in printed[:3]] == [f"wrote {out / f.path.name}" for f in lora_set]
    assert " ".join(printed[3].split()) == "file layout ranks in -> out worst error median error bytes in -> out"
    assert [line.split()[:5] for line in printed[4:]] == [
        [f.path.name, layout, ranks, "->", "5"]
        for f, layout, ranks in zip(lora_set, ("kohya", "diffusers", "kohya"), ("2,4,6", "3", "2,5,8"))
    ]
    saved = json.loads(report_path.read_text())
    assert [row["file"] for row in saved["summary"]] == [f.path.name for f in lora_set] and saved["rank"] == 5
    for fixture in lora_set:
        assert _factor_ranks(out / fixture.path.name, fixture.case) == {5}


def test_the_cli_names_the_bad_file_in_one_line(lora_set, tmp_path, capsys):
    bad = tmp_path / "in" / "broken.safetensors"
    bad.write_bytes(b"")
    out = tmp_path / "out"
    assert main(["resize", str(lora_set[0].path), str(bad), "--rank", "3", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: broken.safetensors is empty" and _listing(out) == []
    assert main(["resize", str(lora_set[0].path), str(lora_set[1].path), "-o", str(out), "--config", "x.json"]) == 2
    assert "--config gives the adapter_config.json of one input" in capsys.readouterr().err


def test_one_input_keeps_the_single_file_behaviour(lora_set, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["resize", str(lora_set[0].path), "-o", str(out)]) == 2
    assert "give a rank" in capsys.readouterr().err
    assert main(["resize", str(lora_set[0].path), "-o", str(out), "--rank", "3"]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err
    assert _listing(out) == []


def _differs_by(after, before):
    """``||after - before|| / ||before||``, 0 for two zero deltas."""
    norm = before.norm()
    return ((after - before).norm() / norm).item() if norm > 0 else after.norm().item()


def _carries_a_scale(case):
    """The case's file holds its scale somewhere (alpha tensors, a config, a metadata alpha), per its definition."""
    return (
        case.alpha is not None or case.config is not None or bool({"alpha", "lora_adapter_metadata"} & {*case.metadata})
    )


def test_each_layout_writes_one_scale_for_every_module_and_keeps_every_delta(layout_case, tmp_path):
    """A set of one file of each layout at rank 8 (at or above every input rank: an exact extension): every module
    reads one scale, the input's most common one (1 without a carrier or on a tie); the other modules' scales are
    folded into their factors, so every delta is the input's (fp32 to 1e-6, 16-bit factors within the reported
    error), and a module whose scale is the common one keeps its factors bit for bit."""
    case, out = layout_case.case, tmp_path / "out"
    out.mkdir()
    result = lora_ops.resize_files([layout_case.path], out, lora_ops.ResizeOptions(rank=8))
    own = {layer["name"]: layer["scale"] for layer in lora_ops.inspect_file(layout_case.path)["layers"]}
    counts = Counter(scale for scale in own.values() if scale != 0).most_common(2)
    tie = len(counts) == 2 and counts[0][1] == counts[1][1]
    expected = counts[0][0] if _carries_a_scale(case) and counts and not tie else 1.0
    written = out / layout_case.path.name
    assert result["scale"] == expected and _read_scales(written) == (expected,)
    (report,) = result["reports"]
    errors = {layer["name"]: layer["rel_error"] for layer in report["layers"]}
    before, after = load_file(str(layout_case.path)), load_file(str(written))
    for name, delta in read_deltas(written, case).items():
        error = _differs_by(delta, layout_case.deltas[name])
        if case.dtype == torch.float32:
            assert error < 1e-6, name
        else:
            assert error == pytest.approx(errors[name], abs=1e-6), name
        if own[name] == expected:
            rank = before[name + case.down].shape[0]
            assert torch.equal(after[name + case.down][:rank], before[name + case.down]), name
            assert torch.equal(after[name + case.up][:, :rank], before[name + case.up]), name


def _alpha_case(name, alpha):
    """The diffusers `.alpha` case (rank 6) under another name, with ``alpha``: scale ``alpha / 6``."""
    return replace(CASE_BY_NAME["diffusers-alpha-tensors"], name=name, alpha=alpha)


@pytest.mark.parametrize(
    ("cases", "expected"),
    [
        ((_alpha_case("half-a", 3.0), _alpha_case("half-b", 3.0), _alpha_case("one", 6.0)), 0.5),
        ((_alpha_case("half-a", 3.0), _alpha_case("one", 6.0)), 1.0),  # a tie
        ((_alpha_case("half-a", 3.0), _alpha_case("half-b", 3.0), CASE_BY_NAME["diffusers"]), 1.0),  # no alpha
        # scale 0.5 everywhere, but diffusers folds a kohya FLUX file's alpha into its factors (PEFT scaling 1)
        ((_alpha_case("half-a", 3.0), replace(CASE_BY_NAME["kohya-flux"], alpha=3.0)), 1.0),
    ],
    ids=["most-common", "tie", "a-file-without-alpha", "two-flavours"],
)
def test_the_common_scale_is_the_most_common_one_else_1(cases, expected, tmp_path):
    fixtures = [write_case(case, tmp_path / "in", seed=seed) for seed, case in enumerate(cases)]
    out = tmp_path / "out"
    out.mkdir()
    result = lora_ops.resize_files([fixture.path for fixture in fixtures], out, lora_ops.ResizeOptions(rank=8))
    assert result["scale"] == expected
    for fixture in fixtures:
        assert _read_scales(out / fixture.path.name) == (expected,)
        for name, delta in read_deltas(out / fixture.path.name, fixture.case).items():
            assert _differs_by(delta, fixture.deltas[name]) < 1e-6


@pytest.fixture(scope="module")
def flux_scale_set(tiny_flux_transformer, tmp_path_factory):
    """Three LoRAs for the tiny FLUX transformer, each carrying its scale another way: a diffusers file without
    alpha (scale 1, rank 8), a diffusers file with `.alpha` 8 at rank 4 (scale 2) and a kohya file with alpha 4 at
    rank 6 (scale 2/3)."""
    folder = tmp_path_factory.mktemp("flux-scales")
    with_alpha = tiny_flux_lora(tiny_flux_transformer, rank=4, seed=22)
    for key in [key for key in with_alpha if key.endswith(".lora_A.weight")]:
        with_alpha[key.replace(".lora_A.weight", ".alpha")] = torch.tensor(8.0)
    files = {
        "plain-r8": tiny_flux_lora(tiny_flux_transformer, rank=8, seed=21),
        "alpha-scale2-r4": with_alpha,
        "kohya-alpha4-r6": tiny_flux_kohya_lora(tiny_flux_transformer, rank=6, seed=23, alpha=4.0),
    }
    for name, tensors in files.items():
        save_file(tensors, str(folder / f"{name}.safetensors"))
    return [folder / f"{name}.safetensors" for name in files]


def _scalings(pipe, adapter):
    """The distinct ``scaling[adapter]`` of the PEFT layers ``adapter`` was loaded into, what a compiled graph
    guards on (a float, or a 0-d tensor where diffusers passed the file's alpha tensors on as ``lora_alpha``)."""
    layers = [m for m in pipe.transformer.modules() if isinstance(m, LoraLayer) and adapter in m.scaling]
    return {float(layer.scaling[adapter]) for layer in layers}


@pytest.mark.parametrize("dtype", ["keep", "bf16"])
def test_three_scales_become_one_as_lora_ops_and_diffusers_read_them(dtype, flux_scale_set, tiny_flux_dir, tmp_path):
    """Resized together to rank 8, the three files read scale 1 in every module, in lora_ops and in diffusers
    (PEFT's ``scaling``), and diffusers applies each input's own delta: to 1e-6 in fp32, within the reported error
    in bf16. The `.alpha` file's scale 2 went into B (exactly: a power of two)."""
    result = lora_ops.resize_files(flux_scale_set, tmp_path, lora_ops.ResizeOptions(rank=8, dtype=dtype))
    outputs = [tmp_path / path.name for path in flux_scale_set]
    assert result["scale"] == 1.0
    assert [_read_scales(path) for path in flux_scale_set] == [(1.0,), (2.0,), (4 / 6,)]
    assert [_read_scales(path) for path in outputs] == [(1.0,)] * 3
    pipe = load_tiny_flux(tiny_flux_dir)
    for index, (source, output) in enumerate(zip(flux_scale_set, outputs)):
        pipe.load_lora_weights(str(source), adapter_name=f"in{index}")
        pipe.load_lora_weights(str(output), adapter_name=f"out{index}")
    assert _scalings(pipe, "in1") == {2.0}, "the input's own scale, which a compiled model guards on"
    assert [_scalings(pipe, f"out{index}") for index in range(3)] == [{1.0}] * 3
    components = {"transformer": pipe.transformer}
    for index, report in enumerate(result["reports"]):
        before, after = applied_deltas(components, f"in{index}"), applied_deltas(components, f"out{index}")
        if dtype == "keep":
            assert_same_deltas(before, after, rtol=1e-6)
        else:
            assert_reported_error(before, after, report)
    if dtype == "keep":
        source, output = load_file(str(flux_scale_set[1])), load_file(str(outputs[1]))
        for key in [key for key in source if key.endswith(".lora_B.weight")]:
            assert torch.equal(output[key][:, :4], 2 * source[key]) and not output[key][:, 4:].any()
        assert {float(value) for key, value in output.items() if key.endswith(".alpha")} == {8.0}
