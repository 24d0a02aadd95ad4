"""lora_ops.plots: exact-SVD error curves, the energy budget, tables, summaries, figures and output names."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from markdown_it import MarkdownIt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from safetensors.torch import save_file

import lora_ops
from lora_ops import page_text, plots
from lora_ops.cli import main
from lora_ops.layouts import natural_key

# Two layers with known spectra: errors at rank k are sqrt(sum_{i>=k} s_i^2 / sum s_i^2).
LAYERS = [
    {"name": "a", "shape": [8, 6], "singular_values": [3.0, 2.0, 1.0]},
    {"name": "b", "shape": [5, 7], "singular_values": [4.0, 0.0]},
]
BLOCKS = (20, 7, 16, 12)  # stored out of order; natural order is 7, 12, 16, 20
HOSTILE_METADATA = {
    "ss_output_name": '<img src="https://example.com/track.png">',
    "ss_tag`key": "<a href='https://example.com'>click</a> | <b>bold</b>",
    "ss_network_dim": "16",
    "ss_10": "ten",
    "ss_2": "two",
}


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


@pytest.fixture(scope="module")
def block_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-8 fp32 LoRA whose blocks 20, 7, 16, 12 decay at different speeds, with hostile trainer metadata; the
    file name holds Markdown and a backtick."""
    tensors = {}
    for index, block in enumerate(BLOCKS):
        down, up = _factors_with_spectrum(24, 16, [(0.3 + 0.15 * index) ** i for i in range(8)], block)
        tensors[f"transformer.blocks.{block}.proj.lora_A.weight"] = down
        tensors[f"transformer.blocks.{block}.proj.lora_B.weight"] = up
    path = tmp_path_factory.mktemp("blocks") / "*style*`<b>x.safetensors"
    save_file(tensors, path, metadata=HOSTILE_METADATA)
    return path


def test_error_curves_follow_the_discarded_energy():
    curves = plots.svd_error_curves(LAYERS)
    assert curves.ranks.tolist() == [0, 1, 2, 3]
    expected_a = [1.0, math.sqrt(5 / 14), math.sqrt(1 / 14), 0.0]
    np.testing.assert_allclose(curves.per_layer[0], expected_a, atol=1e-12)
    np.testing.assert_allclose(curves.per_layer[1], [1.0, 0.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(curves.whole_file, [1.0, math.sqrt(5 / 30), math.sqrt(1 / 30), 0.0], atol=1e-12)
    np.testing.assert_allclose(curves.worst, expected_a, atol=1e-12)
    assert curves.worst_layer(1) == "a" and curves.worst_layer(3) is None


def test_error_curves_extend_past_the_file_rank_and_treat_zero_layers_as_exact():
    curves = plots.svd_error_curves([*LAYERS, {"name": "zero", "singular_values": [0.0, 0.0]}], max_rank=6)
    assert curves.per_layer.shape == (3, 7)
    assert curves.per_layer[2].tolist() == [0.0] * 7
    assert curves.whole_file[3:].tolist() == [0.0] * 4


def test_smallest_rank_and_the_energy_bound():
    curve = plots.svd_error_curves(LAYERS).worst
    # worst layer: [1, sqrt(5/14) = 0.598, sqrt(1/14) = 0.267, 0]
    assert plots.smallest_rank(curve, 0.6) == 1
    assert plots.smallest_rank(curve, 0.59) == 2
    assert plots.smallest_rank(curve, 0.0) == 3
    assert plots.smallest_rank(np.array([1.0, 0.9, 0.8]), 0.1) is None
    assert plots.energy_error_bound(0.99) == pytest.approx(0.1)
    assert plots.energy_error_bound(1) == 0.0
    for invalid in (0, -0.1, 1.5, float("nan"), "abc", True, None):
        assert plots.energy_error_bound(invalid) is None


def test_budget_markdown_at_a_rank():
    text = plots.budget_markdown({"layers": LAYERS}, 1)
    assert text == (
        "Exact SVD at rank 1: relative error of the worst layer **59.76 %** (`a`), median 29.88 %, whole file 40.82 %."
    )


def test_budget_markdown_with_an_energy_explains_the_bound_and_the_ranks_it_picks():
    # energy 0.9: layer a keeps 9/14 at rank 1, 13/14 at rank 2 -> rank 2; layer b keeps everything at rank 1.
    capped = plots.budget_markdown({"layers": LAYERS}, 1, 0.9)
    assert "√(1−E) = √(1−0.9) = **31.62 %** per layer" in capped
    assert "capped at 1: rank 1 × 2 layers." in capped
    assert "1 layer needs more than rank 1 for that share" in capped and "from rank 2." in capped
    free = plots.budget_markdown({"layers": LAYERS}, 3, 0.9)
    assert "capped at 3: rank 1 × 1 layer, rank 2 × 1 layer." in free and "needs more" not in free


@pytest.mark.parametrize("energy", [1.5, 0, -0.2, float("nan"), "abc"])
def test_budget_markdown_never_raises_for_a_bad_energy(energy):
    shown = "\\'abc\\'" if energy == "abc" else f"{energy:g}"  # typed text is escaped for the page
    assert plots.budget_markdown({"layers": LAYERS}, 2, energy) == (
        f"energy must be between 0 and 1 (share of each layer's squared norm to keep), got {shown}"
    )


def test_budget_markdown_with_an_sd_scripts_rule_names_the_ranks_it_picks():
    # sv_ratio 2: layer a keeps s >= 1.5 (3, 2), layer b s >= 2 (4); sv_cumulative 0.8: a needs 5/6 of 6, b 4/4.
    ratio = plots.budget_markdown({"layers": LAYERS}, 3, sd_scripts_rule=("sv_ratio", 2.0))
    assert ratio.endswith("sd-scripts' sv_ratio 2 picks, capped at 3: rank 1 × 1 layer, rank 2 × 1 layer.")
    capped = plots.budget_markdown({"layers": LAYERS}, 1, sd_scripts_rule=("sv_cumulative", 0.8))
    assert capped.endswith("sd-scripts' sv_cumulative 0.8 picks, capped at 1: rank 1 × 2 layers.")
    refused = plots.budget_markdown({"layers": LAYERS}, 3, sd_scripts_rule=("sv_fro", 1.5))
    assert refused == page_text.escape_markdown("sv_fro must be in (0, 1]")  # a one-line message, as shown in the page


@pytest.mark.parametrize(("rule", "value"), [("sv_ratio", 3.0), ("sv_cumulative", 0.7), ("sv_fro", 0.95)])
def test_sd_scripts_rule_ranks_are_the_ranks_resize_picks(fp32_lora, tmp_path, rule, value):
    inspected = lora_ops.inspect_file(fp32_lora)
    options = lora_ops.ResizeOptions(rank=5, **{rule: value})
    result = lora_ops.resize_file(fp32_lora, tmp_path / "out.safetensors", options)
    assert plots.rule_ranks(inspected, rule, value, 5) == [layer["rank_out"] for layer in result["layers"]]


def test_budget_markdown_never_raises_for_a_bad_rank():
    for rank in (0, 2049, 2.5):
        assert plots.budget_markdown({"layers": LAYERS}, rank).startswith("rank must be a whole number between 1")


def test_energy_ranks_are_the_ranks_resize_picks(fp32_lora, tmp_path):
    inspected = lora_ops.inspect_file(fp32_lora)
    for energy, cap in ((0.9, 6), (0.99, 3), (1.0, 6)):
        options = lora_ops.ResizeOptions(rank=cap, energy=energy)
        result = lora_ops.resize_file(fp32_lora, tmp_path / f"{energy}-{cap}.safetensors", options)
        assert plots.energy_ranks(inspected, energy, cap) == [layer["rank_out"] for layer in result["layers"]]


@pytest.mark.parametrize(
    ("source", "options", "expected"),
    [
        ("style.safetensors", {"rank": 4, "method": "randomized_svd"}, "style-randomized_svd-rank4"),
        (
            "style.safetensors",
            {"rank": 16, "energy": 0.99, "target_size": 40_000_000},
            "style-svd-energy0.99-40MB-rank16",
        ),
        ("foo-r16-fp16-svd-rank4.safetensors", {"rank": 8, "dtype": "bf16"}, "foo-svd-rank8-bf16"),
        ("foo_rank16_bf16.safetensors", {"rank": 8}, "foo-svd-rank8"),
        ("foo-dim32-alpha16.safetensors", {"rank": 8}, "foo-svd-rank8"),
        ("foo-randomized_svd-energy0.9-rank8.safetensors", {"rank": 4}, "foo-svd-rank4"),
        ("foo-sparse_random_projection-45.1MB.safetensors", {"rank": 4}, "foo-svd-rank4"),
        ("foo.FP32.R8.safetensors", {"rank": 4, "dtype": "fp16"}, "foo-svd-rank4-fp16"),
        ("foo-svd-rank4-strength0.5.safetensors", {"rank": 2, "strength": 2.0}, "foo-svd-rank2-strength2"),
        ("foo-sv_ratio4-rank8.safetensors", {"rank": 8, "sv_fro": 0.9}, "foo-svd-sv_fro0.9-rank8"),
        # kept: parts that only look similar, and a stem that is nothing but a stale part
        ("r16.safetensors", {"rank": 4}, "r16-svd-rank4"),
        ("character-v2-r2d2.safetensors", {"rank": 4}, "character-v2-r2d2-svd-rank4"),
        ("super-strength.safetensors", {"rank": 4}, "super-strength-svd-rank4"),
    ],
)
def test_output_names_drop_stale_parts_and_say_what_was_done(source, options, expected):
    assert plots.output_name(source, lora_ops.ResizeOptions(**options)) == expected + ".safetensors"


def test_layers_are_in_natural_order_in_the_report_the_tables_and_the_cli(block_lora, tmp_path, capsys):
    natural = [f"transformer.blocks.{block}.proj" for block in sorted(BLOCKS)]
    inspected = lora_ops.inspect_file(block_lora)
    assert [layer["name"] for layer in inspected["layers"]] == natural
    result = lora_ops.resize_file(block_lora, tmp_path / "out.safetensors", lora_ops.ResizeOptions(rank=2))
    assert [layer["name"] for layer in result["layers"]] == natural
    shuffled = {**result, "layers": result["layers"][::-1]}
    assert plots.layer_table(shuffled)["layer"].tolist() == natural
    assert main(["inspect", str(block_lora)]) in (0, None)
    printed = capsys.readouterr().out
    assert [printed.index(name + " ") for name in natural] == sorted(printed.index(name + " ") for name in natural)
    assert sorted(["text_encoder:10", "text_encoder:2", "blocks.12", "blocks.7"], key=natural_key) == [
        "blocks.7",
        "blocks.12",
        "text_encoder:2",
        "text_encoder:10",
    ]


def test_page_text_from_a_file_is_escaped_everywhere(block_lora, tmp_path):
    inspected = lora_ops.inspect_file(block_lora)
    result = lora_ops.resize_file(block_lora, tmp_path / "out.safetensors", lora_ops.ResizeOptions(rank=2))
    hostile_worst = {**result, "worst_layer": "a`b<img src=x>"}
    markdown = MarkdownIt("commonmark").enable("table")
    pages = [
        plots.inspect_markdown(inspected),
        plots.metadata_markdown(inspected),
        plots.resize_markdown(hostile_worst),
        plots.budget_markdown(inspected, 2, 0.9),
    ]
    for text in pages:
        rendered = markdown.render(text)
        for element in ("<img", "<a ", "<b>", "<em>"):
            assert element not in rendered, (element, rendered)
    assert "<code>a`b&lt;img src=x&gt;</code>" in markdown.render(plots.resize_markdown(hostile_worst))
    assert "<strong>*style*`&lt;b&gt;x.safetensors</strong>" in markdown.render(pages[0])


def test_metadata_is_a_separate_escaped_table_in_natural_key_order(block_lora):
    inspected = lora_ops.inspect_file(block_lora)
    assert "metadata" not in plots.inspect_markdown(inspected) and "ss_" not in plots.inspect_markdown(inspected)
    assert plots.metadata_count(inspected) == len(HOSTILE_METADATA)
    table = plots.metadata_markdown(inspected).splitlines()
    assert table[:2] == ["| trainer metadata | value |", "|---|---|"]
    keys = [row.split(" | ")[0].removeprefix("| ") for row in table[2:]]
    assert keys == ["ss\\_2", "ss\\_10", "ss\\_network\\_dim", "ss\\_output\\_name", "ss\\_tag\\`key"]
    assert "\\| &lt;b&gt;bold" in table[-1]
    assert plots.metadata_markdown({"metadata": {}}) == "" and plots.metadata_count({"metadata": {}}) == 0


def test_reports_render_with_one_set_of_units(fp32_lora, tmp_path):
    inspected = lora_ops.inspect_file(fp32_lora)
    result = lora_ops.resize_file(fp32_lora, tmp_path / "r2.safetensors", lora_ops.ResizeOptions(rank=2))

    summary = plots.inspect_markdown(inspected)
    assert f"**{page_text.escape_markdown(fp32_lora.name)}**" in summary and "rank 6 (3 layers)" in summary
    assert page_text.size(fp32_lora.stat().st_size) in summary
    resized = plots.resize_markdown(result)
    assert "rank 6 → 2" in resized
    assert f"in {page_text.seconds(result['seconds'])}" in resized and " 0.0 s" not in resized
    assert f"**{page_text.percent(result['worst_error'])}**" in resized
    assert plots.ABOVE_100 not in resized

    table = plots.layer_table(result)
    assert list(table.columns) == list(plots.LAYER_TABLE_COLUMNS)
    assert table["rank out"].tolist() == [2, 2, 2]
    assert table["rel. error (%)"].dtype.kind == "f" and table["energy kept (%)"].dtype.kind == "f"
    # the table carries the core's numbers in percent: rank 2 of 2^-i keeps sqrt(sum_{i>=2} 4^-i / sum 4^-i)
    lost = sum(4.0**-i for i in range(2, 6)) / sum(4.0**-i for i in range(6))
    np.testing.assert_allclose(table["rel. error (%)"], 100 * math.sqrt(lost), rtol=1e-4)
    np.testing.assert_allclose(table["energy kept (%)"], 100 * (1 - lost), rtol=1e-4)
    assert table["note"].tolist() == ["", "", ""]


def test_an_error_above_100_percent_is_a_plain_warning():
    layers = [
        {"name": "x", "shape": [4, 4], "rank_in": 4, "rank_out": 2, "rel_error": 1.22, "energy_retained": 1 - 1.22**2},
        {"name": "y", "shape": [4, 4], "rank_in": 4, "rank_out": 2, "rel_error": 0.5, "energy_retained": 0.75},
    ]
    report = {
        "method": "random_projection",
        "rank_in": {"4": 2},
        "rank_out": {"2": 2},
        "bytes_in": 2000,
        "bytes_out": 1000,
        "seconds": 0.001,
        "worst_error": 1.22,
        "median_error": 0.86,
        "worst_layer": "x",
        "layers": layers,
    }
    text = plots.resize_markdown(report)
    assert f"- ⚠️ 1 of 2 layers: {plots.ABOVE_100}" in text
    assert "**122.00 %**" in text and "in < 0.01 s" in text
    table = plots.layer_table(report)
    assert table["note"].tolist() == [plots.ABOVE_100, ""]
    assert table["energy kept (%)"].iloc[0] == pytest.approx(100 * (1 - 1.22**2))


def _drawn(figure):
    FigureCanvasAgg(figure).draw()
    return figure


def _legend_labels(figure) -> list[str]:
    (legend,) = figure.legends
    return [text.get_text() for text in legend.get_texts()]


def test_figure_marks_rank_energy_bound_result_and_worst_layer(fp32_lora, tmp_path):
    inspected = lora_ops.inspect_file(fp32_lora)
    result = lora_ops.resize_file(fp32_lora, tmp_path / "r2.safetensors", lora_ops.ResizeOptions(rank=2))
    figure = _drawn(plots.spectra_figure(inspected, 2, energy=0.91, result=result))
    spectra_axes, error_axes = figure.axes
    labels = _legend_labels(figure)
    worst = plots.svd_error_curves(inspected["layers"]).worst_layer(2)
    assert f"worst layer at the chosen rank: {worst}" in labels
    assert {"whole file", "median layer", "worst of all layers", "chosen rank 2"} <= set(labels)
    assert "keep 91.00 % energy: error ≤ √(1−0.91) = 30.00 %" in labels
    # every layer's error (spectra 2^-i) is sqrt(1/4) = 50 % at rank 1 and sqrt(0.0623) ≈ 25 % at rank 2
    assert "every layer within it: rank 2" in labels
    markers = [collection.get_offsets()[0].tolist() for collection in error_axes.collections[1:]]
    assert [2.0, pytest.approx(result["worst_error"])] in markers
    assert spectra_axes.get_yscale() == "log"
    red = [line for line in spectra_axes.get_lines() if line.get_color() == "tab:red"]
    assert len(red) == 1 and red[0].get_linewidth() > 2


@pytest.mark.parametrize(("small", "rank"), [(True, 1), (True, 3), (False, 4), (False, 12)])
def test_figure_ticks_are_whole_ranks_and_the_legend_covers_no_axes(fp32_lora, small, rank):
    inspected = {"file": "small.safetensors", "layers": LAYERS} if small else lora_ops.inspect_file(fp32_lora)
    figure = _drawn(plots.spectra_figure(inspected, rank, energy=0.99))
    for axes in figure.axes:
        ticks = [tick for tick in axes.get_xticks() if axes.get_xlim()[0] <= tick <= axes.get_xlim()[1]]
        assert ticks and all(float(tick).is_integer() for tick in ticks), ticks
    renderer = figure.canvas.get_renderer()
    legend_box = figure.legends[0].get_window_extent(renderer)
    for axes in figure.axes:
        assert not legend_box.overlaps(axes.get_window_extent(renderer))


@pytest.mark.parametrize("rank", [1, 7, 12, 13, 100, 2048])
def test_figure_takes_any_rank_the_api_accepts(fp32_lora, rank):
    inspected = lora_ops.inspect_file(fp32_lora)  # rank 6: the plot ends at 12
    labels = _legend_labels(_drawn(plots.spectra_figure(inspected, rank, energy=0.99)))
    beyond = " (beyond the plot: every layer exact)" if rank > 12 else ""
    assert f"chosen rank {rank}{beyond}" in labels


@pytest.mark.parametrize("energy", [None, 1.5, 0, float("nan")])
def test_figure_without_a_valid_energy_draws_no_bound(fp32_lora, energy):
    inspected = lora_ops.inspect_file(fp32_lora)
    labels = _legend_labels(plots.spectra_figure(inspected, 2, energy=energy))
    assert not any("energy" in label or "within it" in label for label in labels)


def test_figure_draws_file_text_with_dollars_and_backslashes():
    layers = [
        {"name": r"$\notacommand{$ layer", "singular_values": [3.0, 1.0]},
        {"name": "_private", "singular_values": [2.0, 0.1]},
    ]
    figure = _drawn(plots.spectra_figure({"file": "$x$.safetensors", "layers": layers}, 1))
    assert r"worst layer at the chosen rank: \$\notacommand{\$ layer" in _legend_labels(figure)
    assert figure.get_suptitle() == r"\$x\$.safetensors: 2 layers"


def test_alt_text_describes_the_figure_in_plain_text(fp32_lora, tmp_path):
    inspected = lora_ops.inspect_file(fp32_lora)
    result = lora_ops.resize_file(fp32_lora, tmp_path / "r2.safetensors", lora_ops.ResizeOptions(rank=2))
    text = plots.spectra_alt_text(inspected, 2, 0.91, result)
    curves = plots.svd_error_curves(inspected["layers"])
    assert text.startswith("known-spectra.safetensors, 3 layers. Exact SVD at rank 2:")
    assert f"worst layer {page_text.percent(curves.worst[2])} ({curves.worst_layer(2)})" in text
    assert "bounds its error by 30.00 %, met by every layer from rank 2." in text
    assert f"The svd result has worst layer error {page_text.percent(result['worst_error'])}" in text
    assert text.endswith("Singular spectra and exact-SVD error against rank") and "**" not in text and "`" not in text


def test_compare_methods_runs_every_method_and_keeps_no_file(fp32_lora, tmp_path):
    seen = []
    table = plots.compare_methods(fp32_lora, tmp_path, rank=2, seed=1, progress=lambda done, total: seen.append(done))
    assert list(table.columns) == list(plots.METHOD_TABLE_COLUMNS)
    assert table["method"].tolist() == list(lora_ops.METHODS)
    assert table["rank"].tolist() == [2] * len(lora_ops.METHODS)
    errors = dict(zip(table["method"], table["worst error (%)"]))
    lost = sum(4.0**-i for i in range(2, 6)) / sum(4.0**-i for i in range(6))
    assert errors["svd"] == pytest.approx(100 * math.sqrt(lost), rel=1e-4)
    assert errors["svd"] <= errors["randomized_svd"] + 1e-4
    assert errors["svd"] < errors["random_projection"]
    assert (table["seconds"] > 0).all()
    assert seen == [1, 2, 3, 4]
    assert list(tmp_path.iterdir()) == []


def test_a_method_table_is_kept_only_while_it_is_for_the_chosen_rank():
    table = pd.DataFrame([("svd", 3, 1.0, 0.5, 0.1)], columns=list(plots.METHOD_TABLE_COLUMNS))
    assert plots.methods_at_rank(table, 3) is table
    assert plots.methods_at_rank(table, 3.0) is table
    assert plots.methods_at_rank(table, 5) is None
    assert plots.methods_at_rank(table, "x") is None
    assert plots.methods_at_rank(None, 3) is None
