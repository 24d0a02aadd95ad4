"""Resizing files of every layout: what the output means (read back independently), keys, metadata, policy."""

import hashlib
import json

import pytest
import safetensors.torch
import torch
from peft import LoraConfig
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lora_ops
from lora_ops import digest, resize, synthetic
from lora_ops.writer import PROVENANCE_PREFIX
from tests.fixtures_lora import CASE_BY_NAME, KOHYA_METADATA, read_deltas, write_case


def _optimum(delta, rank):
    matrix = delta.reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(delta.shape)


def _rel(x, y):
    return ((x - y).norm() / y.norm()).item() if y.norm() > 0 else x.norm().item()


def _keys(path):
    with safe_open(str(path), framework="pt") as handle:
        return set(handle.keys()), handle.metadata()


def _tolerance(case):
    """Reduction: distance to the dense optimum; upsampling: change of the delta (storage rounding for 16-bit)."""
    return (1e-4, 1e-6) if case.dtype == torch.float32 else (2e-2, 2e-2)


def test_input_fixture_is_read_as_its_trainer_means(layout_case):
    """The test oracle itself: reading the input file gives the case's true deltas."""
    read = read_deltas(layout_case.path, layout_case.case)
    for name, delta in layout_case.deltas.items():
        assert _rel(read[name], delta) < 1e-12 or delta.norm() == 0


def test_svd_reduction_is_the_dense_optimum(layout_case, tmp_path):
    out = tmp_path / "out" / "r3.safetensors"
    out.parent.mkdir()
    report = lora_ops.resize_file(layout_case.path, out, lora_ops.ResizeOptions(rank=3))
    deltas = read_deltas(out, layout_case.case)
    reduce_tol, _ = _tolerance(layout_case.case)
    for layer in report["layers"]:
        truth = layout_case.deltas[layer["name"]]
        optimum = _optimum(truth, 3)
        assert _rel(deltas[layer["name"]], optimum) < reduce_tol or truth.norm() == 0
        assert layer["rank_out"] == 3
        assert layer["rel_error"] == pytest.approx(_rel(deltas[layer["name"]], truth), abs=1e-6)
        dense_spectrum = torch.linalg.svdvals(truth.reshape(truth.shape[0], -1))
        assert layer["singular_values"] == pytest.approx(
            dense_spectrum[: len(layer["singular_values"])].tolist(), rel=1e-6, abs=1e-9
        )
    assert report["rank_out"] == {"3": len(layout_case.case.modules)}


def test_upsampling_keeps_the_delta(layout_case, tmp_path):
    out = tmp_path / "out" / "r9.safetensors"
    out.parent.mkdir()
    report = lora_ops.resize_file(layout_case.path, out, lora_ops.ResizeOptions(rank=9))
    deltas = read_deltas(out, layout_case.case)
    _, extend_tol = _tolerance(layout_case.case)
    for name, truth in layout_case.deltas.items():
        assert _rel(deltas[name], truth) < extend_tol or truth.norm() == 0 and deltas[name].norm() == 0
    assert report["worst_error"] < extend_tol


def test_keys_and_alpha_policy(layout_case, tmp_path):
    case = layout_case.case
    out = tmp_path / "out" / "r2.safetensors"
    out.parent.mkdir()
    lora_ops.resize_file(layout_case.path, out, lora_ops.ResizeOptions(rank=2))
    keys_in, _ = _keys(layout_case.path)
    keys_out, _ = _keys(out)
    assert keys_out == keys_in, "the output keeps the input's key set: loaders recognise formats by it"
    alpha_keys = {name + case.alpha_suffix for name in case.modules} & keys_in
    with safe_open(str(out), framework="pt") as handle:
        alphas = {handle.get_tensor(key).item() for key in alpha_keys}
    assert len(alphas) == (1 if alpha_keys else 0) and 0 not in alphas


def test_passthrough_tensors_are_byte_identical(tmp_path):
    fixture = write_case(CASE_BY_NAME["bfl-control"], tmp_path / "in")
    out = tmp_path / "r2.safetensors"
    lora_ops.resize_file(fixture.path, out, lora_ops.ResizeOptions(rank=2))
    with safe_open(str(fixture.path), framework="pt") as before, safe_open(str(out), framework="pt") as after:
        for key in fixture.case.extra:
            a, b = before.get_tensor(key), after.get_tensor(key)
            assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_diffusers_metadata_is_regenerated_for_per_layer_ranks(tmp_path):
    fixture = write_case(CASE_BY_NAME["diffusers-metadata"], tmp_path / "in")
    out = tmp_path / "e.safetensors"
    report = lora_ops.resize_file(fixture.path, out, lora_ops.ResizeOptions(energy=0.95, rank=5))
    ranks = {layer["name"]: layer["rank_out"] for layer in report["layers"]}
    assert len(set(ranks.values())) > 1, "the energy rule should give different ranks here"
    _, metadata = _keys(out)
    fields = json.loads(metadata["lora_adapter_metadata"])
    config = LoraConfig(**{k.removeprefix("transformer."): v for k, v in fields.items()})
    assert not config.use_rslora
    for name, rank in ranks.items():  # the metadata keeps each module's scale (3/6, and 8/4 for ff.net.2)
        module = name.removeprefix("transformer.")
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern, module), config.lora_alpha)
        assert config.rank_pattern.get(get_pattern_key(config.rank_pattern, module), config.r) == rank
        assert alpha / rank == (2.0 if module.endswith("ff.net.2") else 0.5)
    deltas = read_deltas(out, fixture.case)  # asserts every rank in the metadata matches the factors
    for layer in report["layers"]:
        assert _rel(deltas[layer["name"]], fixture.deltas[layer["name"]]) == pytest.approx(layer["rel_error"], abs=1e-6)


def test_peft_config_is_written_beside_the_output(tmp_path):
    fixture = write_case(CASE_BY_NAME["peft-config"], tmp_path / "in")
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "adapter_model.safetensors"
    report = lora_ops.resize_file(fixture.path, out, lora_ops.ResizeOptions(rank=2))
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert written["r"] == 2 and written["target_modules"] == ["q_lin", "v_lin", "ff"]
    # scale 12/6 kept as alpha 4 at rank 2; q_lin's 3/6 as 1
    assert written["lora_alpha"] == 4 and written["alpha_pattern"] == {"^enc.layer.0.q_lin": 1}
    assert report["scale_source"] == "PEFT adapter_config.json"
    with pytest.raises(lora_ops.LoraError, match="adapter_config.json"):
        lora_ops.resize_file(fixture.path, tmp_path / "in" / "other.safetensors", lora_ops.ResizeOptions(rank=2))


def test_kohya_metadata_and_hashes_are_recomputed(tmp_path):
    fixture = write_case(CASE_BY_NAME["kohya-flux"], tmp_path / "in")
    out = tmp_path / "r2.safetensors"
    lora_ops.resize_file(fixture.path, out, lora_ops.ResizeOptions(rank=2))
    _, metadata = _keys(out)
    assert metadata["ss_network_dim"] == "2"
    assert float(metadata["ss_network_alpha"]) == pytest.approx(4.0 / 6 * 2, rel=1e-6)
    assert "rank resized by lora-resizer" in metadata["ss_training_comment"] and metadata[
        "ss_training_comment"
    ].endswith("trained")
    data = out.read_bytes()
    header_bytes = int.from_bytes(data[:8], "little")
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[8 + header_bytes :]).hexdigest()


def test_cloneofsimo_rank_metadata_is_updated(tmp_path):
    fixture = write_case(CASE_BY_NAME["cloneofsimo-fp16"], tmp_path / "in")
    out = tmp_path / "r2.safetensors"
    lora_ops.resize_file(fixture.path, out, lora_ops.ResizeOptions(rank=2))
    _, metadata = _keys(out)
    assert {metadata[f"{name}:rank"] for name in fixture.case.modules} == {"2"}
    assert metadata["unet"] == '["CrossAttention"]'


def test_provenance_and_determinism(tmp_path):
    fixture = write_case(CASE_BY_NAME["diffusers"], tmp_path / "in")
    outputs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.safetensors"
        lora_ops.resize_file(fixture.path, out, lora_ops.ResizeOptions(rank=2, method="random_projection", seed=5))
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    _, metadata = _keys(tmp_path / "a.safetensors")
    assert metadata[PROVENANCE_PREFIX + "source_sha256"] == hashlib.sha256(fixture.path.read_bytes()).hexdigest()
    assert metadata[PROVENANCE_PREFIX + "method"] == "random_projection"
    assert json.loads(metadata[PROVENANCE_PREFIX + "parameters"]) == {"rank": 2, "seed": 5, "dtype": "keep"}
    assert json.loads(metadata[PROVENANCE_PREFIX + "source_ranks"]) == {"6": 3}
    other_seed = tmp_path / "c.safetensors"
    lora_ops.resize_file(fixture.path, other_seed, lora_ops.ResizeOptions(rank=2, method="random_projection", seed=6))
    assert other_seed.read_bytes() != outputs[0]


@pytest.mark.parametrize("method", lora_ops.METHODS)
def test_the_output_does_not_depend_on_the_number_of_threads(method, tmp_path, monkeypatch):
    """Batches run on worker threads in any order; the file and report are the same as on one thread."""
    shapes = synthetic.flux_shapes(num_double=1, num_single=2, hidden=64)
    path = tmp_path / "flux.safetensors"
    synthetic.save_lora(synthetic.make_lora(shapes, 8, dtype=torch.bfloat16, seed=0), path)
    results = []
    for threads in (1, 3):
        monkeypatch.setattr(resize, "workers", lambda device, threads=threads: threads)
        out = tmp_path / f"{threads}.safetensors"
        report = lora_ops.resize_file(path, out, lora_ops.ResizeOptions(rank=5, method=method, seed=3))
        results.append((out.read_bytes(), [(layer["name"], layer["rel_error"]) for layer in report["layers"]]))
    assert results[0] == results[1]


def test_16_bit_factors_too_large_for_float32_products_are_resized_in_float64(tmp_path):
    """bf16 holds values up to 3e38, whose squares overflow a float32 Gram matrix: that batch falls back to float64."""
    generator = torch.Generator().manual_seed(0)
    down = (torch.randn(6, 40, generator=generator, dtype=torch.float64) * 1e25).bfloat16()
    up = (torch.randn(30, 6, generator=generator, dtype=torch.float64) * 1e-25).bfloat16()
    path = tmp_path / "huge.safetensors"
    save_file({"m.lora_A.weight": down, "m.lora_B.weight": up}, str(path))
    out = tmp_path / "r3.safetensors"
    report = lora_ops.resize_file(path, out, lora_ops.ResizeOptions(rank=3))
    truth = up.double() @ down.double()
    with safe_open(str(out), framework="pt") as handle:
        written = handle.get_tensor("m.lora_B.weight").double() @ handle.get_tensor("m.lora_A.weight").double()
    assert _rel(written, _optimum(truth, 3)) < 2e-2
    assert report["layers"][0]["rel_error"] == pytest.approx(_rel(written, truth), abs=1e-6)


def test_an_input_hashed_ahead_is_hashed_again_once_it_changed(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"first")
    digest.hash_ahead(path)
    assert digest.file_sha256(path) == hashlib.sha256(b"first").hexdigest()
    digest.hash_ahead(path)
    path.write_bytes(b"second, longer")
    assert digest.file_sha256(path) == hashlib.sha256(b"second, longer").hexdigest()


@pytest.mark.parametrize("method", lora_ops.METHODS)
def test_every_method_reports_its_true_error(method, tmp_path):
    fixture = write_case(CASE_BY_NAME["diffusers"], tmp_path / "in")
    out = tmp_path / "m.safetensors"
    report = lora_ops.resize_file(fixture.path, out, lora_ops.ResizeOptions(rank=2, method=method, niter=1))
    deltas = read_deltas(out, fixture.case)
    for layer in report["layers"]:
        truth = fixture.deltas[layer["name"]]
        assert layer["rel_error"] == pytest.approx(_rel(deltas[layer["name"]], truth), abs=1e-6)
        assert layer["energy_retained"] == pytest.approx(1 - layer["rel_error"] ** 2)
        assert layer["rel_error"] >= _rel(_optimum(truth, 2), truth) - 1e-9


def test_energy_rule_keeps_the_asked_share(tmp_path):
    fixture = write_case(CASE_BY_NAME["diffusers"], tmp_path / "in")
    out = tmp_path / "e.safetensors"
    report = lora_ops.resize_file(fixture.path, out, lora_ops.ResizeOptions(energy=0.95))
    for layer in report["layers"]:
        squares = torch.tensor(layer["singular_values"]) ** 2
        kept = squares.cumsum(0) / squares.sum()
        assert kept[layer["rank_out"] - 1] >= 0.95 - 1e-12
        assert layer["rank_out"] == 1 or kept[layer["rank_out"] - 2] < 0.95
        assert layer["energy_retained"] >= 0.95 - 1e-9


def test_target_size_is_met_with_one_threshold(tmp_path):
    shapes = synthetic.flux_shapes(num_double=1, num_single=1, hidden=64)
    path = tmp_path / "flux.safetensors"
    synthetic.save_lora(synthetic.make_lora(shapes, 16, dtype=torch.float16, seed=0), path)
    target = path.stat().st_size // 3
    out = tmp_path / "t.safetensors"
    report = lora_ops.resize_file(path, out, lora_ops.ResizeOptions(target_size=target, rank=12))
    assert 0.8 * target <= out.stat().st_size <= target
    ranks = [layer["rank_out"] for layer in report["layers"]]
    assert len(set(ranks)) > 1 and max(ranks) <= 12
    kept = [s for layer in report["layers"] for s in layer["singular_values"][: layer["rank_out"]]]
    dropped = [
        s
        for layer in report["layers"]
        if layer["rank_out"] > 1
        for s in layer["singular_values"][layer["rank_out"] : 12]
    ]
    assert min(kept) >= max(dropped)
    with pytest.raises(lora_ops.LoraError, match="target size is too small"):
        lora_ops.resize_file(path, tmp_path / "tiny.safetensors", lora_ops.ResizeOptions(target_size=100))
    assert not (tmp_path / "tiny.safetensors").exists()


def test_output_dtype_option(tmp_path):
    fixture = write_case(CASE_BY_NAME["diffusers"], tmp_path / "in")
    out = tmp_path / "h.safetensors"
    lora_ops.resize_file(fixture.path, out, lora_ops.ResizeOptions(rank=2, dtype="bf16"))
    with safe_open(str(out), framework="pt") as handle:
        assert {handle.get_tensor(key).dtype for key in handle.keys()} == {torch.bfloat16}  # noqa: SIM118


def test_progress_is_reported_per_layer(tmp_path):
    fixture = write_case(CASE_BY_NAME["diffusers"], tmp_path / "in")
    calls = []
    lora_ops.resize_file(
        fixture.path,
        tmp_path / "p.safetensors",
        lora_ops.ResizeOptions(rank=2),
        progress=lambda d, t: calls.append((d, t)),
    )
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_inspect_reports_layout_ranks_and_spectra(layout_case):
    report = lora_ops.inspect_file(layout_case.path)
    assert report["modules"] == len(layout_case.case.modules)
    assert json.loads(json.dumps(report)) == report
    for layer in report["layers"]:
        truth = layout_case.deltas[layer["name"]]
        assert layer["shape"] == list(truth.shape)
        spectrum = torch.linalg.svdvals(truth.reshape(truth.shape[0], -1))
        count = len(layer["singular_values"])
        assert layer["singular_values"] == pytest.approx(spectrum[:count].tolist(), rel=1e-6, abs=1e-9)
        assert spectrum[count:].sum() < 1e-6 * max(spectrum.sum(), 1e-30) + 1e-12


def test_kohya_legacy_hash_matches_sd_scripts(tmp_path):
    """sd-scripts: save the tensors with only ss_* metadata, sha256 of the 64 KiB at 1 MiB (the file must be larger)."""
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for index in range(3):
        name = f"lora_unet_double_blocks_{index}_img_attn_proj"
        tensors[f"{name}.lora_down.weight"] = torch.randn(64, 1024, generator=generator)
        tensors[f"{name}.lora_up.weight"] = torch.randn(1024, 64, generator=generator)
        tensors[f"{name}.alpha"] = torch.tensor(32.0)
    source = tmp_path / "kohya.safetensors"
    save_file(tensors, str(source), metadata={**KOHYA_METADATA, "ss_network_dim": "64", "modelspec.title": "x"})
    out = tmp_path / "r48.safetensors"
    lora_ops.resize_file(source, out, lora_ops.ResizeOptions(rank=48))
    written, metadata = load_file(str(out)), _keys(out)[1]
    reference = safetensors.torch.save(written, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    assert len(reference) > 0x110000
    assert metadata["sshs_legacy_hash"] == hashlib.sha256(reference[0x100000:0x110000]).hexdigest()[:8]
    header_bytes = int.from_bytes(reference[:8], "little")
    assert metadata["sshs_model_hash"] == hashlib.sha256(reference[8 + header_bytes :]).hexdigest()


def test_reports_list_layers_in_natural_order_while_the_file_is_read_front_to_back(tmp_path):
    """Modules are read in the file's (name-sorted) order, so reads go front to back; reports, and so the page and
    the CLI, list them naturally: block 2 before block 10."""
    from lora_ops.files import read_header
    from lora_ops.layouts import parse_lora

    shapes = {f"blocks.{i}.proj": (8, 8) for i in (1, 2, 10)}  # written as transformer.<name>
    source = tmp_path / "blocks.safetensors"
    synthetic.save_lora(synthetic.make_lora(shapes, 2), source)
    read_order = [m.name for m in parse_lora(source, read_header(source)).modules]
    assert read_order == [f"transformer.{name}" for name in sorted(shapes)]  # 1, 10, 2
    natural = ["transformer.blocks.1.proj", "transformer.blocks.2.proj", "transformer.blocks.10.proj"]
    assert [layer["name"] for layer in lora_ops.inspect_file(source)["layers"]] == natural
    report = lora_ops.resize_file(source, tmp_path / "out.safetensors", lora_ops.ResizeOptions(rank=1))
    assert [layer["name"] for layer in report["layers"]] == natural
