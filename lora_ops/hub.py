"""Publish a resized LoRA to the visitor's own Hub repo: one commit of weights, report, grids and card.

The token is the visitor's (OAuth or a write token); it is sent to the Hub and nowhere else: errors are
mapped to our own one-line messages so request details never reach the user, and the card, the report
and the commit message never contain it.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from PIL import Image, UnidentifiedImageError

from . import __version__
from .errors import LoraError
from .sizes import format_size
from .sources import hub_errors

DEFAULT_BASE_MODEL = "black-forest-labs/FLUX.1-dev"
REPORT_NAME = "resize-report.json"
PEFT_CONFIG_NAME = "adapter_config.json"
IMAGES_DIR = "images"
MAX_REPO_NAME = 96

# (substring of the lowercased base model id, family tag); first match wins.
BASE_FAMILY_TAGS = (("flux", "flux"), ("xl", "sdxl"), ("stable-diffusion", "stable-diffusion"))

ImageSource = Image.Image | str | os.PathLike
GridImage = ImageSource | tuple[ImageSource, str | None]

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A LoRA for [{{ base_model }}](https://huggingface.co/{{ base_model }}), resized from {{ ranks_in }} to
{{ ranks_out }} with `{{ method }}` by lora-resizer (`lora_ops` {{ version }}).
{% if images %}
<Gallery />
{% endif %}
## Provenance

| | |
|---|---|
{% for name, value in provenance %}| {{ name }} | {{ value }} |
{% endfor %}
The full per-layer report is in [`{{ report_name }}`]({{ report_name }}).
{% if metrics %}
## Preview metrics

| metric | value |
|---|---|
{% for name, value in metrics %}| {{ name }} | {{ value }} |
{% endfor %}{% endif %}
## Use with diffusers

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{{ base_model }}", torch_dtype=torch.bfloat16).to("cuda")
pipe.load_lora_weights("{{ repo_id }}", weight_name="{{ weights_name }}")
image = pipe({{ prompt }}).images[0]
```
"""


@dataclass(frozen=True)
class PushResult:
    """Where the push landed: repo and commit URLs, and the paths committed (sorted)."""

    repo_id: str
    repo_url: str
    commit_url: str
    files: tuple[str, ...]


# What a push reads from `resize_file`'s report, and the JSON types it must have.
REPORT_FIELDS = {
    "method": str,
    "source": Mapping,
    "output": Mapping,
    "rank_in": Mapping,
    "rank_out": Mapping,
    "bytes_in": int,
    "bytes_out": int,
    "median_error": (int, float),
    "worst_error": (int, float),
    "params": Mapping,
}


def _report_problem(report: object) -> str | None:
    if not isinstance(report, Mapping):
        return "it is not a JSON object"
    for key, kind in REPORT_FIELDS.items():
        if not isinstance(report.get(key, {} if key == "params" else None), kind):
            return f"{key!r} is missing or of the wrong type"
    if not all(isinstance(report["source"].get(key), str) for key in ("file", "sha256")):
        return "'source' lacks its file name or sha256"
    if not all(report[key] and all(str(rank).isdigit() for rank in report[key]) for key in ("rank_in", "rank_out")):
        return "'rank_in' and 'rank_out' must map ranks to module counts"
    return None


def check_report(report: object) -> Mapping:
    """`report` when it has everything a push reads from `resize_file`'s report; else a one-line LoraError
    (an API caller sends the report itself, so it may be anything)."""
    problem = _report_problem(report)
    if problem:
        raise LoraError(f"the report is not one /resize returned: {problem}")
    return report


def push_resized(
    token: str | None,
    resized_file: str | os.PathLike,
    report: Mapping,
    *,
    repo_id: str | None = None,
    private: bool = False,
    grid_images: Sequence[GridImage] = (),
    metrics: Mapping[str, float | str] | None = None,
    source: str | None = None,
    base_model: str = DEFAULT_BASE_MODEL,
    license: str | None = None,
) -> PushResult:
    """Create (or reuse) the visitor's repo and push one commit: weights, report JSON, grid PNGs, README.md.

    `report` is the dict `resize_file` returned (a PEFT config it wrote beside `resized_file` is pushed too). `repo_id` (empty or
    None) defaults to `<username>/<source-name>-rank<R>`; a bare name goes under the visitor's namespace. `grid_images` are
    PIL images or image paths, optionally paired with a caption (the prompt), as a gallery gives them.
    `source` is the source repo id or file name (default: the report's source file). `private` applies when
    the repo is created; an existing repo keeps its visibility. `license` is a Hub license id, when the
    source's is known. Raises `LoraError` with a one-line message; either one commit is made or none.
    """
    if not token:
        raise LoraError("not signed in: sign in with your Hugging Face account to push")
    check_report(report)
    resized_file = Path(resized_file)
    if not resized_file.is_file():
        raise LoraError(f"resized file not found: {resized_file.name}")
    _check_repo_id(base_model, what="base model id")
    repo_id = (repo_id or "").strip()
    if repo_id:
        _check_repo_id(repo_id, what="repo name")
    # Only the PEFT config the core writes beside the resized file, whatever name a caller puts in the report.
    wrote_config = report.get("output", {}).get("config") == PEFT_CONFIG_NAME
    config = resized_file.parent / PEFT_CONFIG_NAME if wrote_config else None
    if config and not config.is_file():
        raise LoraError(f"the PEFT config written beside the resized file is missing: {config.name}")
    source = source or report["source"]["file"]
    name = _source_name(source)
    ranks = _rank_label(report["rank_out"])
    weights_name = f"{name}-{report['method']}-rank{ranks}.safetensors"
    images = [(f"{IMAGES_DIR}/grid-{i}.png", *_png_and_caption(item)) for i, item in enumerate(grid_images, 1)]

    api = HfApi(token=token)
    with hub_errors("check your account", write=True):
        account = api.whoami()
    if account.get("auth", {}).get("accessToken", {}).get("role") == "read":
        raise LoraError("your token is read-only: pushing needs a token with write access")
    repo_id = _full_repo_id(repo_id or _default_repo_name(name, ranks), account["name"])
    _check_namespace(api, repo_id, account)

    card = model_card(
        report,
        repo_id=repo_id,
        weights_name=weights_name,
        source=source,
        base_model=base_model,
        license=license,
        captions=[(path, caption) for path, _, caption in images],
        metrics=metrics,
    )
    operations = [
        CommitOperationAdd(weights_name, str(resized_file)),
        *([CommitOperationAdd(PEFT_CONFIG_NAME, str(config))] if config else []),
        CommitOperationAdd(
            REPORT_NAME, json.dumps({**report, "output": {**report["output"], "file": weights_name}}, indent=2).encode()
        ),
        *(CommitOperationAdd(path, png) for path, png, _ in images),
        CommitOperationAdd("README.md", str(card).encode()),
    ]
    with hub_errors(f"create {repo_id}", repo_id, write=True):
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    with hub_errors(f"upload to {repo_id}", repo_id, write=True):
        commit = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=f"Upload {weights_name} (rank {_rank_label(report['rank_in'])} -> {ranks})",
            commit_description=f"Resized with lora-resizer, method {report['method']}.",
        )
    return PushResult(
        repo_id=repo_id,
        repo_url=str(repo_url),
        commit_url=commit.commit_url,
        files=tuple(sorted(op.path_in_repo for op in operations)),
    )


def model_card(
    report: Mapping,
    *,
    repo_id: str,
    weights_name: str,
    source: str,
    base_model: str = DEFAULT_BASE_MODEL,
    license: str | None = None,
    captions: Sequence[tuple[str, str | None]] = (),
    metrics: Mapping[str, float | str] | None = None,
) -> ModelCard:
    """The README.md of the pushed repo: YAML metadata, gallery widget, provenance table, diffusers snippet.

    `captions` pairs each grid image's path in the repo with its prompt (or None).
    """
    family = next((tag for key, tag in BASE_FAMILY_TAGS if key in base_model.lower()), None)
    data = ModelCardData(
        base_model=base_model,
        library_name="diffusers",
        license=license,
        tags=["lora", "text-to-image", *([family] if family else []), "lora-resize"],
        widget=[{"text": caption or "", "output": {"url": path}} for path, caption in captions],
    )
    prompts = [caption for _, caption in captions if caption]
    return ModelCard.from_template(
        data,
        template_str=CARD_TEMPLATE,
        title=_cell(repo_id.split("/")[1]),
        repo_id=repo_id,
        base_model=base_model,
        weights_name=weights_name,
        report_name=REPORT_NAME,
        method=report["method"],
        ranks_in=_ranks_text(report["rank_in"]),
        ranks_out=_ranks_text(report["rank_out"]),
        version=__version__,
        images=captions,
        provenance=_provenance(report, source),
        metrics=[(_cell(name), _cell(_number(value))) for name, value in (metrics or {}).items()],
        prompt=json.dumps(prompts[0] if prompts else "a photo").replace("`", "\\u0060"),
    )


def _provenance(report: Mapping, source: str) -> list[tuple[str, str]]:
    """Rows of the card's provenance table, already escaped for a Markdown cell."""
    if _is_repo_id(source):
        source_cell = f"[{source}](https://huggingface.co/{source}), file `{_cell(report['source']['file'])}`"
    else:
        source_cell = f"`{_cell(source)}`"
    params = ", ".join(f"{k}={v}" for k, v in report.get("params", {}).items() if v is not None)
    return [
        ("Source", source_cell),
        ("Source sha256", f"`{report['source']['sha256']}`"),
        ("Layout", _cell(report.get("flavour") or report.get("layout", ""))),
        ("Method", f"`{report['method']}`" + (f" ({_cell(params)})" if params else "")),
        ("Ranks before", _ranks_text(report["rank_in"])),
        ("Ranks after", _ranks_text(report["rank_out"])),
        ("Size", f"{format_size(report['bytes_in'])} -> {format_size(report['bytes_out'])}"),
        (
            "Relative error",
            f"median {report['median_error']:.2%}, worst {report['worst_error']:.2%}"
            f" (`{_cell(str(report['worst_layer']))}`)",
        ),
    ]


def _png_and_caption(item: GridImage) -> tuple[bytes, str | None]:
    """PNG bytes of a grid image (PIL image or path) and its caption."""
    image, caption = item if isinstance(item, tuple) else (item, None)
    buffer = io.BytesIO()
    if isinstance(image, Image.Image):
        image.save(buffer, format="PNG")
        return buffer.getvalue(), caption
    try:
        with Image.open(image) as opened:
            opened.save(buffer, format="PNG")
    except (OSError, UnidentifiedImageError) as err:
        raise LoraError(f"grid image {Path(image).name} is not a readable image") from err
    return buffer.getvalue(), caption


def _check_repo_id(repo_id: str, *, what: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise LoraError(
            f"invalid {what} {repo_id!r}: use 'name' or 'user/name' with letters, digits, '-', '_', '.'"
            " (no '--' or '..', at most 96 characters)"
        ) from err


def _is_repo_id(text: str) -> bool:
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return "/" in text and not text.endswith(".safetensors")


def _source_name(source: str) -> str:
    """A repo-name-safe name for the source: its repo name, or its file stem."""
    stem = source.split("/")[-1] if _is_repo_id(source) else Path(source).stem
    return re.sub(r"[-.]{2,}", "-", re.sub(r"[^A-Za-z0-9_.-]+", "-", stem)).strip("-.") or "lora"


def _default_repo_name(name: str, ranks: str) -> str:
    """`<name>-rank<R>`, the name cut so the whole fits the Hub's 96 characters."""
    suffix = f"-rank{ranks}"
    return name[: MAX_REPO_NAME - len(suffix)].rstrip("-.") + suffix


def _full_repo_id(repo_id: str, username: str) -> str:
    full = repo_id if "/" in repo_id else f"{username}/{repo_id}"
    _check_repo_id(full, what="repo name")
    return full


def _check_namespace(api: HfApi, repo_id: str, account: Mapping) -> None:
    """Refuse, before creating anything, a repo under a namespace that is not the visitor's or their org's."""
    namespace = repo_id.split("/")[0]
    mine = {account["name"], *(org["name"] for org in account.get("orgs", []))}
    if namespace in mine:
        return
    with hub_errors(f"look up {repo_id}", repo_id, write=True):
        exists = api.repo_exists(repo_id)
    if exists:
        raise LoraError(f"repo {repo_id} exists and belongs to {namespace}: choose a name under {account['name']}/")
    raise LoraError(f"you cannot create repos under {namespace}: choose a name under {account['name']}/")


def _rank_label(ranks: Mapping[str, int]) -> str:
    """'4' for one rank, '2-16' for a range of ranks (keys of a report's rank histogram)."""
    values = sorted(int(r) for r in ranks)
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


def _ranks_text(ranks: Mapping[str, int]) -> str:
    """'rank 16 (494 modules)' or 'ranks 4-16 (12 at 4, 482 at 16)' from a rank histogram."""
    counts = sorted((int(r), n) for r, n in ranks.items())
    if len(counts) == 1:
        return f"rank {counts[0][0]} ({counts[0][1]} modules)"
    detail = ", ".join(f"{n} at {r}" for r, n in counts)
    return f"ranks {_rank_label(ranks)} ({detail})"


def _number(value: float | str) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell or code span: no pipes, backticks or line breaks."""
    return re.sub(r"[|`\r\n]+", " ", str(text)).strip()
