"""Values from the Space's form and API (`lora_ops.form`): checked, never rounded or clamped."""

from __future__ import annotations

import math

import pytest

from lora_ops import LoraError, form

GOOD = {
    "rank": 4,
    "method": "svd",
    "niter": 2,
    "density": None,
    "seed": 0,
    "energy": None,
    "target_size": "",
    "dtype": "keep",
}


def test_good_values_become_the_options_unchanged():
    options = form.resize_options(**{**GOOD, "rank": 12.0, "seed": 7, "energy": 0.99, "target_size": "40MB"})
    assert (options.rank, options.seed, options.energy, options.target_size) == (12, 7, 0.99, 40_000_000)
    assert isinstance(options.rank, int)


@pytest.mark.parametrize("blank", [None, "", 0, 0.0])
def test_blank_optional_values_mean_off(blank):
    options = form.resize_options(**{**GOOD, "density": blank, "energy": blank})
    assert options.density is None and options.energy is None


@pytest.mark.parametrize("blank", [None, ""])
def test_a_blank_sd_scripts_rule_is_off(blank):
    options = form.resize_options(**GOOD, sv_ratio=blank, sv_cumulative=blank, sv_fro=blank)
    assert options.rank_rule is None


@pytest.mark.parametrize(
    ("rule", "value"), [("sv_ratio", 4), ("sv_cumulative", 0.9), ("sv_fro", 0.95), ("energy", 0.99)]
)
def test_sd_scripts_rules_and_strength_reach_the_options(rule, value):
    options = form.resize_options(**{**GOOD, rule: value}, strength=0.7)
    assert options.rank_rule == (rule, value) and options.rank == 4 and options.strength == 0.7


@pytest.mark.parametrize("blank", [None, ""])
def test_a_blank_strength_bakes_nothing_in(blank):
    assert form.resize_options(**GOOD, strength=blank).strength == 1.0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("rank", 2.7, "rank must be a whole number, got 2.7"),
        ("rank", None, "rank must be a number, got None"),
        ("rank", "4", "rank must be a number, got '4'"),
        ("rank", True, "rank must be a number, got True"),
        ("rank", math.inf, "rank must be a finite number"),
        ("rank", math.nan, "rank must be a finite number"),
        ("rank", 0, "rank must be between 1 and 2048"),
        ("rank", 1e300, "rank must be between 1 and 2048"),
        ("seed", 1e300, "seed must be between 0 and 9223372036854775807"),
        ("seed", -1, "seed must be between 0 and"),
        ("niter", None, "niter must be a number, got None"),
        ("energy", "abc", "energy must be a number, got 'abc'"),
        ("energy", 1.5, "energy must be in (0, 1]"),
        ("density", False, "density must be a number, got False"),
        ("target_size", 40, "target size must be text such as 40MB, got 40"),
        ("target_size", "forty", "cannot read size 'forty'"),
        ("method", None, "method must be text, got None"),
        ("dtype", 16, "dtype must be text, got 16"),
        ("sv_ratio", 0.5, "sv_ratio must be a finite number of at least 1"),
        ("sv_cumulative", 1.5, "sv_cumulative must be in (0, 1]"),
        ("sv_fro", "0.9", "sv_fro must be a number, got '0.9'"),
        ("strength", 0, "strength must be a finite, non-zero number"),
        ("strength", 1e160, "from 1e-06 to 1e+06 in size (negative flips the delta), not 1e+160"),
        ("strength", -1e-100, "from 1e-06 to 1e+06 in size"),
        ("sv_fro", 0, "sv_fro must be in (0, 1]"),
        ("sv_ratio", 0.0, "sv_ratio must be a finite number of at least 1"),
        ("strength", "abc", "strength must be a number, got 'abc'"),
        ("strength", math.inf, "strength must be a finite number"),
    ],
)
def test_each_wrong_value_is_named_in_one_line(field, value, message):
    with pytest.raises(LoraError) as error:
        form.resize_options(**{**GOOD, field: value})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_whole_numbers_keep_their_bounds_and_their_value():
    assert form.whole_number(512.0, "steps", 1, 512) == 512
    with pytest.raises(LoraError, match="steps must be between 1 and 50, got 51"):
        form.whole_number(51, "steps", 1, 50)
