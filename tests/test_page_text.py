"""lora_ops.page_text: escaping of file and Hub text for the page, and the page's units (no browser).

Escaping is checked on the produced text and by rendering it with markdown-it-py (CommonMark with GFM tables):
nothing from a file may become an element (`<img>`, `<a>`, `<b>`, emphasis, a second code span, a table cell
boundary), and the rendered text must be the file's text, character for character.
"""

from __future__ import annotations

import html
import inspect
import re

import pytest
from markdown_it import MarkdownIt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lora_ops import page_text
from lora_ops.sizes import format_binary_size

MARKDOWN = MarkdownIt("commonmark").enable("table")

# Strings a LoRA file's author controls (metadata keys and values, layer names, file names).
HOSTILE = [
    '<img src="https://example.com/track.png">',
    '<a href="https://example.com">click</a>',
    "<b>bold</b> <script>alert(1)</script>",
    "*emphasis* and __strong__ and ~~gone~~",
    "[link](https://example.com) ![image](https://example.com/x.png) <https://example.com>",
    "back`tick and ``double`` and ```triple",
    "`starts and ends with a backtick`",
    "pipe | in | cell \\| escaped pipe \\\\| double",
    "# heading\n- list\n1. item\n> quote",
    "&lt;img&gt; &amp; entity",
    "trailing backslash \\",
    "$x$ and $$y$$ and \\(z\\)",
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "text_encoder:10",
    "",
    " ",
    "ünïcödé ✓ 中文",
]
ELEMENTS = re.compile(r"<(?!/?(p|code|table|thead|tbody|tr|th|td)\b)[a-zA-Z]")


def _text(rendered: str) -> str:
    """The text a browser shows for rendered HTML: tags dropped, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", rendered)).strip("\n")


def _flat(text: str) -> str:
    return " ".join(text.splitlines())


@pytest.mark.parametrize("text", HOSTILE)
def test_escaped_text_renders_as_exactly_its_characters_and_no_element(text):
    rendered = MARKDOWN.render(f"before {page_text.escape_markdown(text)} after")
    assert not ELEMENTS.search(rendered), rendered
    assert rendered.count("<p>") == 1 and "<code>" not in rendered
    assert _text(rendered) == f"before {_flat(text)} after"


@pytest.mark.parametrize("text", HOSTILE)
def test_a_code_span_holds_the_whole_text_whatever_backticks_it_has(text):
    span = page_text.code_span(text)
    rendered = MARKDOWN.render(f"worst layer {span} here")
    assert not ELEMENTS.search(rendered), rendered
    (code,) = re.findall(r"<code>(.*?)</code>", rendered)
    assert html.unescape(code) == (_flat(text) or " ")
    assert _text(rendered) == f"worst layer {html.unescape(code)} here"


def test_code_span_fences_are_longer_than_any_backtick_run():
    assert page_text.code_span("plain") == "`plain`"
    assert page_text.code_span("a`b") == "``a`b``"
    assert page_text.code_span("a``b```c") == "````a``b```c````"
    assert page_text.code_span("`edge`") == "`` `edge` ``"


def test_table_cells_keep_rows_and_columns_whatever_the_text():
    rows = [(key, value) for key, value in zip(HOSTILE, reversed(HOSTILE))]
    table = "\n".join(
        ["| key | value |", "|---|---|"]
        + [f"| {page_text.table_cell(k)} | {page_text.table_cell(v)} |" for k, v in rows]
    )
    rendered = MARKDOWN.render(table)
    assert not ELEMENTS.search(rendered), rendered
    body = re.findall(r"<tr>\n(.*?)</tr>", rendered, re.DOTALL)[1:]
    assert len(body) == len(rows)
    for row, (key, value) in zip(body, rows):
        cells = [_text(cell) for cell in re.findall(r"<td>(.*?)</td>", row, re.DOTALL)]
        assert cells == [_flat(key).strip(), _flat(value).strip()]


def test_table_cells_are_clipped_before_escaping():
    assert page_text.table_cell("x" * 200, limit=10) == "x" * 9 + "…"
    assert page_text.table_cell("a|b", limit=10) == "a\\|b"


def test_plot_text_never_starts_mathtext_and_stays_short():
    label = page_text.plot_text(r"$\undefinedcommand{$ layer", limit=60)
    assert label == r"\$\undefinedcommand{\$ layer"
    figure = Figure()
    figure.subplots().set_title(label)
    FigureCanvasAgg(figure).draw()  # raises for mathtext it cannot parse
    long = page_text.plot_text("a" * 30 + "MIDDLE" + "z" * 30, limit=21)
    assert long == "a" * 10 + "…" + "z" * 10


@pytest.mark.parametrize(
    ("fraction", "shown"),
    [
        (0.1234, "12.34 %"),
        (1.0, "100.00 %"),
        (1.2195, "121.95 %"),
        (0.0, "0 %"),
        (3e-8, "< 0.01 %"),
        (-1.5, "-150.00 %"),
    ],
)
def test_percent(fraction, shown):
    assert page_text.percent(fraction) == shown


@pytest.mark.parametrize(
    ("duration", "shown"),
    [
        (0.0, "< 0.01 s"),
        (0.004, "< 0.01 s"),
        (0.04, "0.04 s"),
        (2.345, "2.35 s"),
        (12.34, "12.3 s"),
        (125.2, "2 min 5 s"),
    ],
)
def test_seconds_never_reads_zero(duration, shown):
    assert page_text.seconds(duration) == shown


@pytest.mark.parametrize(
    ("nbytes", "shown"),
    [
        (999, "999 B"),
        (1000, "1.0 kB (1000 B)"),
        (45_112_000, "45.1 MB (43.0 MiB)"),
        (451_200_000, "451.2 MB (430.3 MiB)"),
        (2_000_000_000, "2.0 GB (1.9 GiB)"),
    ],
)
def test_sizes_show_the_decimal_value_and_the_file_widgets_binary_one(nbytes, shown):
    assert page_text.size(nbytes) == shown


def test_binary_sizes_follow_gradios_file_widget():
    """@gradio/file's prettyBytes: divide by 1024 while above 1024, one decimal (its "MB" label is MiB)."""
    assert format_binary_size(451_200_000) == "430.3 MiB"
    assert format_binary_size(1024) == "1024 B"
    assert format_binary_size(1025) == "1.0 KiB"
    assert format_binary_size(3 * 1024**4) == "3.0 TiB"


def test_gradio_dataframe_shows_cells_as_plain_text_by_default():
    """Layer names go into the page's tables raw (`plots.layer_table`): that is safe only while gradio's Dataframe
    renders its default datatype "str" as text (its cell component sets a text node), not as Markdown/HTML."""
    import gradio as gr

    assert inspect.signature(gr.Dataframe).parameters["datatype"].default == "str"
