"""lora_ops.plots: exact-SVD error curves, budgets, tables and figures computed from reports."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import lora_ops
from lora_ops import plots

# Two layers with known spectra: errors at rank k are sqrt(sum_{i>=k} s_i^2 / sum s_i^2).
LAYERS = [
    {"name": "a", "shape": [8, 6], "singular_values": [3.0, 2.0, 1.0]},
    {"name": "b", "shape": [5, 7], "singular_values": [4.0, 0.0]},
]


def _factors_with_spectrum(out_features: int, in_features: int, values: list[float], seed: int):
    """(A [r, in], B [out, r]) in fp32 whose product has exactly the singular values `values`."""
    generator = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(out_features, len(values), generator=generator)).Q
    right = torch.linalg.qr(torch.randn(in_features, len(values), generator=generator)).Q
    root = torch.tensor(values).sqrt()
    return (right * root).T.contiguous(), (left * root).contiguous()


@pytest.fixture(scope="module")
def fp32_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small fp32 diffusers-layout LoRA (rank 6, 3 layers) with known decaying spectra."""
    tensors = {}
    for index, (out_features, in_features) in enumerate([(48, 32), (32, 32), (64, 48)]):
        down, up = _factors_with_spectrum(out_features, in_features, [2.0**-i * (index + 1) for i in range(6)], index)
        tensors[f"transformer.blocks.{index}.proj.lora_A.weight"] = down
        tensors[f"transformer.blocks.{index}.proj.lora_B.weight"] = up
    path = tmp_path_factory.mktemp("plots") / "known-spectra.safetensors"
    save_file(tensors, path)
    return path


def test_error_curves_follow_the_discarded_energy():
    curves = plots.svd_error_curves(LAYERS)
    assert curves.ranks.tolist() == [0, 1, 2, 3]
    expected_a = [1.0, math.sqrt(5 / 14), math.sqrt(1 / 14), 0.0]
    np.testing.assert_allclose(curves.per_layer[0], expected_a, atol=1e-12)
    np.testing.assert_allclose(curves.per_layer[1], [1.0, 0.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(curves.whole_file, [1.0, math.sqrt(5 / 30), math.sqrt(1 / 30), 0.0], atol=1e-12)
    np.testing.assert_allclose(curves.worst, expected_a, atol=1e-12)


def test_error_curves_extend_past_the_file_rank_and_treat_zero_layers_as_exact():
    curves = plots.svd_error_curves([*LAYERS, {"name": "zero", "singular_values": [0.0, 0.0]}], max_rank=6)
    assert curves.per_layer.shape == (3, 7)
    assert curves.per_layer[2].tolist() == [0.0] * 7
    assert curves.whole_file[3:].tolist() == [0.0] * 4


def test_smallest_rank_and_budgets():
    curve = plots.svd_error_curves(LAYERS).worst
    # worst layer: [1, sqrt(5/14) = 0.598, sqrt(1/14) = 0.267, 0]
    assert plots.smallest_rank(curve, 0.6) == 1
    assert plots.smallest_rank(curve, 0.59) == 2
    assert plots.smallest_rank(curve, 0.0) == 3
    assert plots.smallest_rank(np.array([1.0, 0.9, 0.8]), 0.1) is None
    assert plots.error_budget(0.05, "error") == 0.05
    assert plots.error_budget(0.99, "energy") == pytest.approx(math.sqrt(0.01))
    with pytest.raises(lora_ops.LoraError, match="between 0 and 1"):
        plots.error_budget(1.5, "energy")
    with pytest.raises(lora_ops.LoraError, match="budget kind"):
        plots.error_budget(0.1, "size")


def test_budget_markdown_names_the_smallest_ranks():
    report = {"layers": LAYERS}
    text = plots.budget_markdown(report, 1, 0.2)
    assert "worst layer 59.76%" in text
    assert "**3**" in text and "whole file: 2" in text


def test_rank_slider_maximum():
    assert plots.rank_slider_maximum({"ranks": {"16": 3}, "layers": [{"shape": [3072, 3072]}]}) == 64
    assert plots.rank_slider_maximum({"ranks": {"128": 3}, "layers": [{"shape": [3072, 3072]}]}) == 256
    assert plots.rank_slider_maximum({"ranks": {"8": 20}, "layers": [{"shape": [32, 96]}]}) == 32


def test_output_name_says_method_and_ranks():
    options = lora_ops.ResizeOptions(rank=4, method="randomized_svd")
    assert plots.output_name("style.safetensors", options) == "style-randomized_svd-rank4.safetensors"
    dynamic = lora_ops.ResizeOptions(rank=16, energy=0.99, target_size=40_000_000)
    assert plots.output_name("style.safetensors", dynamic) == "style-svd-energy0.99-40MB-rank16.safetensors"


def test_reports_render_as_markdown_tables_and_figures(fp32_lora, tmp_path):
    inspected = lora_ops.inspect_file(fp32_lora)
    result = lora_ops.resize_file(fp32_lora, tmp_path / "r2.safetensors", lora_ops.ResizeOptions(rank=2))

    summary = plots.inspect_markdown(inspected)
    assert "known-spectra.safetensors" in summary and "rank 6 (3 layers)" in summary
    assert "rank 6 → 2" in plots.resize_markdown(result)

    table = plots.layer_table(result)
    assert list(table.columns) == list(plots.LAYER_TABLE_COLUMNS)
    assert table["rank out"].tolist() == [2, 2, 2]
    assert table["rel. error"].dtype.kind == "f"
    # the table carries the core's numbers: rank 2 of 2^-i keeps sqrt(sum_{i>=2} 4^-i / sum 4^-i)
    lost = sum(4.0**-i for i in range(2, 6)) / sum(4.0**-i for i in range(6))
    np.testing.assert_allclose(table["rel. error"], math.sqrt(lost), rtol=1e-4)

    figure = plots.spectra_figure(inspected, chosen_rank=2, max_error=0.3, result=result)
    spectra_axes, error_axes = figure.axes
    labels = [line.get_label() for line in error_axes.get_lines()]
    assert {"whole file", "worst layer", "chosen rank 2", "budget 30.0%"} <= set(labels)
    assert "smallest rank meeting it: 2" in labels
    markers = [collection.get_offsets()[0].tolist() for collection in error_axes.collections[1:]]
    assert [2.0, pytest.approx(result["worst_error"])] in markers
    assert spectra_axes.get_yscale() == "log"


def test_compare_methods_runs_every_method_and_keeps_no_file(fp32_lora, tmp_path):
    seen = []
    table = plots.compare_methods(fp32_lora, tmp_path, rank=2, seed=1, progress=lambda done, total: seen.append(done))
    assert table["method"].tolist() == list(lora_ops.METHODS)
    errors = dict(zip(table["method"], table["worst error"]))
    assert errors["svd"] <= errors["randomized_svd"] + 1e-6
    assert errors["svd"] < errors["random_projection"]
    assert seen == [1, 2, 3, 4]
    assert list(tmp_path.iterdir()) == []
