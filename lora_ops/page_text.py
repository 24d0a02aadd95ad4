"""Text for the Space's page: escaping what comes from files and the Hub, and the page's status lines.

Gradio renders `gr.Markdown` values as Markdown with inline HTML allowed (`<img src=…>` would make a visitor's
browser fetch a URL of a file author's choosing). So every string that comes from a LoRA file (names, metadata),
from a Hub repo (ids, file names) or from an error message quoting them goes through `escape_markdown` before it
reaches Markdown: it then shows as the same characters, as plain text, on one line.
"""

from __future__ import annotations

import re

from .sizes import format_binary_size, format_size

# Every ASCII punctuation character CommonMark lets a backslash escape (spec 2.4, "Backslash escapes").
_MARKDOWN_PUNCTUATION = re.compile(r"([!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~])")
_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def escape_markdown(text: object) -> str:
    """``text`` as Markdown that renders as exactly these characters, on one line.

    ``<``, ``>`` and ``&`` become HTML entities (so no tag or entity is ever formed), every other Markdown
    punctuation character is backslash-escaped (no emphasis, link, code span or table cell boundary), and line
    breaks become spaces.
    """
    flat = " ".join(str(text).splitlines())
    escaped = _MARKDOWN_PUNCTUATION.sub(lambda match: _HTML.get(match.group(1), "\\" + match.group(1)), flat)
    return escaped


def error_markdown(message: str) -> str:
    """A page status line for a one-line error (`LoraError`'s message, which may quote file and repo names)."""
    return f"**Error:** {escape_markdown(message)}"


def push_markdown(result: dict) -> str:
    """The status line after a push (`lora_ops.hub.PushResult` as a dict): where it landed, with links."""
    visibility = "private" if result["private"] else "public"
    return (
        f"Pushed to [{escape_markdown(result['repo_id'])}](<{result['repo_url']}>) ({visibility}): "
        f"[commit](<{result['commit_url']}>)"
    )


def code_span(text: object) -> str:
    """``text`` (one line) as a CommonMark code span (spec 6.1, "Code spans") that no backtick inside can close.

    The fence is one backtick longer than the longest run of backticks in ``text``; when ``text`` starts or ends
    with a backtick or a space it is padded with one space on each side, which the renderer strips again (text of
    spaces only is kept as it is, an empty one becomes one space).
    Outside tables only: a GFM table splits cells at a ``|`` even inside a code span, so cells use `table_cell`.
    """
    flat = " ".join(str(text).splitlines())
    fence = "`" * (1 + max((len(run) for run in re.findall(r"`+", flat)), default=0))
    if not flat.strip(" "):
        return f"{fence}{flat or ' '}{fence}"  # all spaces: shown as they are
    padded = f" {flat} " if flat[0] in "` " or flat[-1] in "` " else flat
    return f"{fence}{padded}{fence}"


def table_cell(text: object, limit: int | None = None) -> str:
    """``text`` as the content of a Markdown (GFM) table cell: escaped by `escape_markdown` (its ``|`` becomes
    ``\\|``, which both marked, gradio's renderer, and markdown-it read as a pipe inside the cell), and clipped to
    ``limit`` characters with "…" before escaping. No code span: marked splits the cell at the ``|`` of ``\\|`` when
    a backslash from the text stands before it."""
    flat = " ".join(str(text).splitlines())
    if limit is not None and len(flat) > limit:
        flat = flat[: limit - 1] + "…"
    return escape_markdown(flat)


def plot_text(text: object, limit: int = 60) -> str:
    """``text`` for a matplotlib label or title: one line, at most ``limit`` characters (the middle replaced by
    "…"), and ``$`` escaped so that matplotlib's mathtext never parses it (a stray ``$\\foo$`` would make drawing
    fail)."""
    flat = " ".join(str(text).splitlines())
    if len(flat) > limit:
        flat = flat[: (limit - 1) // 2] + "…" + flat[len(flat) - (limit - 1 - (limit - 1) // 2) :]
    return flat.replace("$", r"\$")


def percent(fraction: float) -> str:
    """A share or relative error as the page writes it: ``0.1234`` -> ``"12.34 %"``; ``0`` -> ``"0 %"``; shares
    below 0.005 % -> ``"< 0.01 %"`` (never a misleading "0.00 %")."""
    value = 100 * fraction
    if value == 0:
        return "0 %"
    if abs(value) < 0.005:
        return "< 0.01 %" if value > 0 else "> -0.01 %"
    return f"{value:.2f} %"


def seconds(duration: float) -> str:
    """A duration as the page writes it: ``"< 0.01 s"``, ``"0.04 s"``, ``"12.3 s"``, ``"2 min 5 s"`` (never
    "0.0 s")."""
    if duration < 0.005:
        return "< 0.01 s"
    if duration < 10:
        return f"{duration:.2f} s"
    if duration < 60:
        return f"{duration:.1f} s"
    minutes, rest = divmod(round(duration), 60)
    return f"{minutes} min {rest} s"


def size(nbytes: int) -> str:
    """A file size as the page writes it: decimal units as the rest of the project (the CLI, ``target_size``
    "40MB") with the binary value in brackets, the number gradio's file widget shows (it labels MiB as "MB"):
    ``451_200_000`` -> ``"451.2 MB (430.3 MiB)"``; under 1000 bytes ``"999 B"``."""
    return format_size(nbytes) if nbytes < 1000 else f"{format_size(nbytes)} ({format_binary_size(nbytes)})"
