"""Per-layer rank rules: energy and sd-scripts' sv_ratio / sv_cumulative / sv_fro, against their definitions,
against sd-scripts' own code (which keeps one direction more), and end to end against dense spectra."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors import safe_open

import lora_ops
from lora_ops import ranks
from lora_ops.cli import main
from lora_ops.writer import PROVENANCE_PREFIX
from tests.fixtures_lora import CASE_BY_NAME, write_case

# rule -> its definition, evaluated directly with numpy: the smallest k (at least 1) whose kept part meets it
DEFINITIONS = {
    "energy": lambda s, e: _smallest(s, lambda k: np.sum(s[:k] ** 2) / np.sum(s**2) >= e),
    "sv_fro": lambda s, p: _smallest(s, lambda k: np.sqrt(np.sum(s[:k] ** 2) / np.sum(s**2)) >= p),
    "sv_cumulative": lambda s, p: _smallest(s, lambda k: np.sum(s[:k]) / np.sum(s) >= p),
    "sv_ratio": lambda s, x: max(1, int(np.count_nonzero(s >= s[0] / x))),
}
# a value of each rule's parameter, drawn from a generator
PARAMETERS = {
    "energy": lambda g: g.uniform(0.05, 0.999),
    "sv_fro": lambda g: g.uniform(0.05, 0.999),
    "sv_cumulative": lambda g: g.uniform(0.05, 0.999),
    "sv_ratio": lambda g: g.uniform(1.0, 50.0),
}


def _smallest(s: np.ndarray, meets) -> int:
    return next(k for k in range(1, len(s) + 1) if meets(k))


def _spectra(seed: int, count: int = 200):
    """Random descending spectra: lengths 1 to 64, geometric to flat decays, scales 1e-3 to 1e3."""
    generator = np.random.default_rng(seed)
    for _ in range(count):
        length = int(generator.integers(1, 65))
        decay = generator.uniform(0.3, 1.0) ** np.arange(length)
        values = np.sort(decay * generator.uniform(0.5, 1.5, length))[::-1] * 10 ** generator.uniform(-3, 3)
        yield values, generator


@pytest.mark.parametrize("rule", sorted(ranks.RANK_RULES))
def test_each_rule_is_its_definition_on_random_spectra(rule):
    for values, generator in _spectra(seed=len(rule)):
        for _ in range(5):
            parameter = PARAMETERS[rule](generator)
            assert ranks.RANK_RULES[rule](torch.from_numpy(values.copy()), parameter) == DEFINITIONS[rule](
                values, parameter
            ), (rule, parameter, values)


def test_energy_is_sv_fro_squared_on_random_spectra():
    compared = set()
    for values, generator in _spectra(seed=7):
        s = torch.from_numpy(values.copy())
        for energy in generator.uniform(0.01, 1.0, 5):
            rank = ranks.energy_rank(s, energy)
            assert rank == ranks.sv_fro_rank(s, math.sqrt(energy))
            compared.add(rank)
    assert len(compared) > 10, "the spectra must give many different ranks for the comparison to mean anything"


@pytest.mark.parametrize("rule", sorted(ranks.RANK_RULES))
def test_an_all_zero_layer_gets_rank_1(rule):
    assert ranks.RANK_RULES[rule](torch.zeros(0, dtype=torch.float64), 0.5 if rule != "sv_ratio" else 2.0) == 1


@pytest.mark.parametrize("rule", ["energy", "sv_fro", "sv_cumulative"])
def test_a_share_of_1_keeps_every_non_zero_direction(rule):
    # the last value holds less than 1e-12 of the sum, so a relative allowance would have dropped it
    s = torch.tensor([1.0, 0.5, 0.25, 1e-7], dtype=torch.float64)
    assert ranks.RANK_RULES[rule](s, 1.0) == 4
    assert ranks.sv_ratio_rank(s, 1e7) == 4 and ranks.sv_ratio_rank(s, 1e7 * 0.999) == 3


# sd-scripts v0.10.1 (commit ae72efb92babe89ff8e70f057e42db68440e8d61), networks/resize_lora.py lines 59-84 and
# rank_resize, lines 155-182, as they are there (torch; the verbose statistics left out).
MIN_SV = 1e-6


def _kohya_index_sv_cumulative(S, target):
    original_sum = float(torch.sum(S))
    cumulative_sums = torch.cumsum(S, dim=0) / original_sum
    index = int(torch.searchsorted(cumulative_sums, target)) + 1
    index = max(1, min(index, len(S) - 1))
    return index


def _kohya_index_sv_fro(S, target):
    S_squared = S.pow(2)  # noqa: N806 - sd-scripts' names
    S_fro_sq = float(torch.sum(S_squared))  # noqa: N806
    sum_S_squared = torch.cumsum(S_squared, dim=0) / S_fro_sq  # noqa: N806
    index = int(torch.searchsorted(sum_S_squared, target**2)) + 1
    index = max(1, min(index, len(S) - 1))
    return index


def _kohya_index_sv_ratio(S, target):
    max_sv = S[0]
    min_sv = max_sv / target
    index = int(torch.sum(S > min_sv).item())  # noqa: SIM300
    index = max(1, min(index, len(S) - 1))
    return index


KOHYA_INDEX = {
    "sv_ratio": _kohya_index_sv_ratio,
    "sv_cumulative": _kohya_index_sv_cumulative,
    "sv_fro": _kohya_index_sv_fro,
}


def _kohya_new_rank(S, rank, dynamic_method, dynamic_param):
    new_rank = KOHYA_INDEX[dynamic_method](S, dynamic_param) + 1
    if S[0] <= MIN_SV:  # Zero matrix, set dim to 1
        new_rank = 1
    elif new_rank > rank:  # cap max rank at rank
        new_rank = rank
    return new_rank


@pytest.mark.parametrize("rule", sorted(KOHYA_INDEX))
def test_sd_scripts_keeps_one_direction_more_than_asked(rule):
    """Where our rank k meets the rule and k - 1 does not (the definition), sd-scripts keeps k + 1."""
    compared = 0
    for values, generator in _spectra(seed=11):
        if len(values) < 3:
            continue
        s = torch.from_numpy(values.copy())
        parameter = PARAMETERS[rule](generator)
        ours = ranks.RANK_RULES[rule](s, parameter)
        assert ours == DEFINITIONS[rule](values, parameter)
        if ours < len(values):  # sd-scripts' spectrum is the dense one: it always has a direction more to keep
            assert _kohya_new_rank(s.float(), rank=10_000, dynamic_method=rule, dynamic_param=parameter) == ours + 1
            compared += 1
    assert compared > 100


@pytest.mark.parametrize(
    ("rule", "value"), [("energy", 0.9), ("sv_fro", 0.9), ("sv_cumulative", 0.8), ("sv_ratio", 2.5)]
)
def test_rules_choose_each_layers_rank_from_its_dense_spectrum(rule, value, tmp_path):
    """On a file, each layer's new rank is the rule on the dense SVD of its true delta, capped by rank; sd-scripts'
    code on the same dense spectrum keeps one more wherever it can."""
    fixture = write_case(replace(CASE_BY_NAME["kohya-flux"], ranks=(6, 6, 6)), tmp_path / "in")
    for cap in (None, 2):
        out = tmp_path / f"{rule}-{cap}.safetensors"
        report = lora_ops.resize_file(fixture.path, out, lora_ops.ResizeOptions(rank=cap, **{rule: value}))
        for layer in report["layers"]:
            truth = fixture.deltas[layer["name"]]
            dense = torch.linalg.svdvals(truth.reshape(truth.shape[0], -1))
            nonzero = dense[dense > 1e-10 * dense[0]].numpy()
            asked = DEFINITIONS[rule](nonzero, value)
            assert layer["rank_out"] == min(asked, cap or asked)
            if cap is None and rule != "energy" and asked < len(dense):
                assert _kohya_new_rank(dense.float(), 10_000, rule, value) == asked + 1
        with safe_open(str(out), framework="pt") as handle:
            parameters = json.loads(handle.metadata()[PROVENANCE_PREFIX + "parameters"])
        assert parameters == {rule: value, "dtype": "keep", **({"rank": cap} if cap else {})}


def test_p_1_keeps_every_non_zero_direction_of_a_file_and_zero_layers_get_rank_1(tmp_path):
    fixture = write_case(CASE_BY_NAME["diffusers-zero-layer-bf16"], tmp_path / "in")
    report = lora_ops.resize_file(fixture.path, tmp_path / "all.safetensors", lora_ops.ResizeOptions(sv_cumulative=1))
    for layer in report["layers"]:
        truth = fixture.deltas[layer["name"]].reshape(fixture.deltas[layer["name"]].shape[0], -1)
        true_rank = int(torch.linalg.matrix_rank(truth)) if truth.norm() > 0 else 0
        assert layer["rank_out"] == max(1, true_rank)
        assert layer["rel_error"] < 1e-2  # bf16 storage of the new factors
    assert {layer["rank_out"] for layer in report["layers"]} == {1, 4, 6}  # zero, out = 4 < rank, full


def test_the_cli_flags_are_the_options(tmp_path, capsys):
    fixture = write_case(CASE_BY_NAME["kohya-flux"], tmp_path / "in")
    for flag, field, value in (("--sv-ratio", "sv_ratio", 3.0), ("--sv-cumulative", "sv_cumulative", 0.7)):
        by_cli, by_api = tmp_path / f"{field}-cli.safetensors", tmp_path / f"{field}-api.safetensors"
        assert main(["resize", str(fixture.path), "-o", str(by_cli), flag, str(value), "--rank", "4"]) == 0
        lora_ops.resize_file(fixture.path, by_api, lora_ops.ResizeOptions(rank=4, **{field: value}))
        assert by_cli.read_bytes() == by_api.read_bytes()


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"sv_ratio": 0.5}, "sv_ratio must be a finite number of at least 1"),
        ({"sv_ratio": math.inf}, "sv_ratio must be a finite number of at least 1"),
        ({"sv_ratio": math.nan}, "sv_ratio must be a finite number of at least 1"),
        ({"sv_cumulative": 0}, "sv_cumulative must be in (0, 1]"),
        ({"sv_cumulative": 1.5}, "sv_cumulative must be in (0, 1]"),
        ({"sv_fro": math.nan}, "sv_fro must be in (0, 1]"),
        ({"sv_fro": 0.9, "energy": 0.9}, "give one rank rule at most, not energy, sv_fro"),
        ({"sv_ratio": 2, "target_size": 10_000}, "sv_ratio and target size both choose the ranks"),
    ],
)
def test_bad_rules_are_refused_in_one_line(options, fragment):
    with pytest.raises(lora_ops.LoraError) as refused:
        lora_ops.ResizeOptions(rank=4, **options)
    assert fragment in str(refused.value) and "\n" not in str(refused.value)


def test_the_cli_refuses_a_bad_rule_in_one_line(tmp_path, capsys):
    fixture = write_case(CASE_BY_NAME["kohya-flux"], tmp_path / "in")
    out = tmp_path / "out.safetensors"
    assert main(["resize", str(fixture.path), "-o", str(out), "--sv-fro", "1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: sv_fro must be in (0, 1]" and not out.exists()
