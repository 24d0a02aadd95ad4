"""Writing a resized file in its input's layout: the alpha policy, regenerated metadata, atomic replace.

The rule: **a resized file carries its scale the way its input did**, because loaders recognise formats by
the keys that exist (diffusers' Qwen-Image and Z-Image loaders add the ``transformer.`` prefix to unprefixed
``lora_A``/``lora_B`` files only when they have ``.alpha`` keys). Only the rank dimension and the values change:

- ``.alpha`` tensors: every module that had one gets one, all of one value (:func:`output_alpha`) in a dtype that
  holds it exactly (:func:`alpha_dtype`); what that alpha does not give a module is folded into its factors.
- a plain ``alpha`` metadata entry: rewritten with that value.
- ``lora_adapter_metadata`` or a PEFT ``adapter_config.json``: regenerated with the new ranks and alphas
  (``lora_alpha``, ``alpha_pattern``) that keep every module's scale; the factors are not scaled.
- nothing: the scale is folded into the factors.

Other metadata that describes the ranks is regenerated (never left stale), and provenance is added under
``lora_resizer.*``.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from .atomic import atomic_path
from .files import TensorInfo
from .layouts import LoraFile
from .safetensors_writer import SafetensorsWriter, header_bytes
from .scales import DIFFUSERS_METADATA_KEY, FROM_METADATA_ALPHA, METADATA_ALPHA_KEY, PEFT_PREFIX, split_component

PROVENANCE_PREFIX = "lora_resizer."
KOHYA_PREFIX = "ss_"
# sd-scripts' hashes and the length of their hex digests (placeholders of that length until the data is written)
KOHYA_HASH_KEYS = {"sshs_model_hash": 64, "sshs_legacy_hash": 8}
LEGACY_HASH_OFFSET, LEGACY_HASH_BYTES = 0x100000, 0x10000


@dataclass(frozen=True)
class Provenance:
    """What produced a file: tool version, method and its parameters, the source and its ranks."""

    version: str
    method: str
    parameters: dict
    source_file: str
    source_sha256: str
    source_ranks: dict[str, int]


def output_alpha(scales: list[float], ranks: list[int]) -> float:
    """The one alpha an output that carries alphas writes: the most common non-zero ``scale * new_rank``.

    The loader computes ``alpha / rank``; with this alpha the most common modules need no folding at all,
    so their factors can stay bit-identical (upsampling) and the scale stays what the user had. One value
    for every module, because diffusers applies per-module alphas of SD files to the wrong modules
    (``get_peft_kwargs``' ``alpha_pattern``). Never 0: sd-scripts reads ``alpha = 0`` as ``alpha = rank``.
    """
    products = Counter(s * k for s, k in zip(scales, ranks) if s * k != 0)
    return products.most_common(1)[0][0] if products else float(ranks[0])


def alpha_dtype(alpha: float, preferred: torch.dtype) -> torch.dtype:
    """The dtype an alpha tensor is written in: the input's (``preferred``) when it holds ``alpha`` exactly, else
    float32 when that does, else float64. So ``alpha / rank`` gives the loader the exact scale: an alpha of 7.3
    stored as bf16 (7.3125) at rank 16, upsampled to rank 24, needs 10.96875, which bf16 cannot hold."""
    return next(
        dtype for dtype in (preferred, torch.float32, torch.float64) if torch.tensor(alpha, dtype=dtype).item() == alpha
    )


def number_text(value: float) -> str:
    """A number as metadata text that reads back exactly: ``"2"``, ``"10.96875"``."""
    return str(int(value)) if value.is_integer() else repr(value)


def rank_histogram(ranks: list[int]) -> dict[str, int]:
    """``{"rank": number of modules}``, ranks ascending."""
    return {str(k): n for k, n in sorted(Counter(ranks).items())}


def lora_config_fields(names: list[str], ranks: list[int], scales: list[float]) -> dict:
    """The LoraConfig fields that give modules ``names`` their ``ranks`` and ``scales``: ``r`` and ``lora_alpha`` the
    most common rank and alpha (``scale * rank``), ``rank_pattern`` / ``alpha_pattern`` (``^name``: PEFT matches a
    pattern as ``(.*\\.)?(pattern)$``) for the other modules, ``use_rslora`` false. The factors keep their scale out."""
    alphas = [_json_number(scale * rank) for scale, rank in zip(scales, ranks)]
    rank = Counter(ranks).most_common(1)[0][0]
    alpha = Counter(alphas).most_common(1)[0][0]
    return {
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {f"^{name}": k for name, k in zip(names, ranks) if k != rank},
        "alpha_pattern": {f"^{name}": a for name, a in zip(names, alphas) if a != alpha},
        "use_rslora": False,
    }


def _json_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _regenerate_diffusers(metadata: dict[str, str], lora: LoraFile, ranks: list[int], scales: list[float]) -> None:
    """Rewrite ``lora_adapter_metadata`` so that every rank and alpha in it describes the new factors with the
    ``scales`` the input had (:func:`lora_config_fields`, per component it describes)."""
    if DIFFUSERS_METADATA_KEY not in metadata:
        return
    fields = json.loads(metadata[DIFFUSERS_METADATA_KEY])
    by_component: dict[str, list[tuple[str, int, float]]] = {}
    for module, rank, scale in zip(lora.modules, ranks, scales):
        component, name = split_component(module.name)
        by_component.setdefault(component, []).append((name, rank, scale))
    for component, modules in by_component.items():
        if not any(key.startswith(component + ".") for key in fields):
            continue
        names, component_ranks, component_scales = map(list, zip(*modules))
        config = lora_config_fields(names, component_ranks, component_scales)
        fields.update({f"{component}.{key}": value for key, value in config.items()})
    metadata[DIFFUSERS_METADATA_KEY] = json.dumps(fields, indent=2, sort_keys=True)


def peft_config_for_output(config: dict, lora: LoraFile, ranks: list[int], scales: list[float]) -> dict:
    """A PEFT ``adapter_config.json`` for the resized factors: the new ranks, and alphas that keep ``scales``."""
    names = [m.name.removeprefix(PEFT_PREFIX) for m in lora.modules]
    return {**config, **lora_config_fields(names, ranks, scales)}


def _update_kohya(metadata: dict[str, str], ranks: list[int], alpha: float | None, provenance: Provenance) -> None:
    if not any(key.startswith(KOHYA_PREFIX) for key in metadata):
        return
    uniform = len(set(ranks)) == 1
    if "ss_network_dim" in metadata:
        metadata["ss_network_dim"] = str(ranks[0]) if uniform else "Dynamic"
    if "ss_network_alpha" in metadata:
        metadata["ss_network_alpha"] = str(alpha) if uniform and alpha is not None else "Dynamic"
    note = (
        f"rank resized by lora-resizer {provenance.version} ({provenance.method}):"
        f" {json.dumps(provenance.source_ranks)} -> {json.dumps(rank_histogram(ranks))}"
    )
    previous = metadata.get("ss_training_comment")
    metadata["ss_training_comment"] = f"{note}; {previous}" if previous else note


def _update_cloneofsimo(metadata: dict[str, str], lora: LoraFile, ranks: list[int]) -> None:
    for module, rank in zip(lora.modules, ranks):
        if f"{module.name}:rank" in metadata:
            metadata[f"{module.name}:rank"] = str(rank)


def build_metadata(
    lora: LoraFile,
    ranks: list[int],
    scales: list[float],
    alpha: float | None,
    scale_source: str,
    provenance: Provenance,
) -> dict[str, str]:
    """The output's ``__metadata__``: the input's, with rank- and scale-describing entries regenerated (``alpha``,
    the output's alpha, where ``scale_source`` says the input kept its scale in the metadata) and provenance."""
    metadata = {k: v for k, v in lora.header.metadata.items() if not k.startswith(PROVENANCE_PREFIX)}
    if scale_source == FROM_METADATA_ALPHA and alpha is not None:
        metadata[METADATA_ALPHA_KEY] = number_text(alpha)
    _regenerate_diffusers(metadata, lora, ranks, scales)
    _update_kohya(metadata, ranks, alpha, provenance)
    _update_cloneofsimo(metadata, lora, ranks)
    metadata.update({key: "0" * length for key, length in KOHYA_HASH_KEYS.items() if key in metadata})
    metadata.update(
        {
            PROVENANCE_PREFIX + "version": provenance.version,
            PROVENANCE_PREFIX + "method": provenance.method,
            PROVENANCE_PREFIX + "parameters": json.dumps(provenance.parameters, sort_keys=True),
            PROVENANCE_PREFIX + "source_file": provenance.source_file,
            PROVENANCE_PREFIX + "source_sha256": provenance.source_sha256,
            PROVENANCE_PREFIX + "source_ranks": json.dumps(provenance.source_ranks),
        }
    )
    return metadata


def kohya_hashes(
    file: BinaryIO, data_start: int, specs: dict[str, TensorInfo], metadata: dict[str, str]
) -> dict[str, str]:
    """sd-scripts' ``sshs_model_hash`` and ``sshs_legacy_hash`` of the data written to ``file``.

    sd-scripts hashes a file holding the same tensors and only the ``ss_*`` metadata: the model hash is
    the sha256 of the bytes after its header (the same data as ours), the legacy hash the first 8 hex
    digits of the sha256 of the 64 KiB at offset 1 MiB of that file (``library/train_util.py``).
    """
    file.seek(data_start)
    digest = hashlib.sha256()
    while chunk := file.read(8 * 1024**2):
        digest.update(chunk)
    kohya_header = header_bytes(specs, {k: v for k, v in metadata.items() if k.startswith(KOHYA_PREFIX)})
    window = kohya_header[LEGACY_HASH_OFFSET : LEGACY_HASH_OFFSET + LEGACY_HASH_BYTES]
    file.seek(data_start + max(0, LEGACY_HASH_OFFSET - len(kohya_header)))
    window += file.read(LEGACY_HASH_BYTES - len(window))
    return {"sshs_model_hash": digest.hexdigest(), "sshs_legacy_hash": hashlib.sha256(window).hexdigest()[:8]}


@contextmanager
def lora_output(
    destination: Path, specs: dict[str, TensorInfo], metadata: dict[str, str], late: Callable[[], dict[str, str]]
) -> Iterator[SafetensorsWriter]:
    """Write a LoRA file atomically, tensor by tensor, with ``put``.

    ``metadata`` holds placeholders of final length for values known only at the end: ``late()`` gives
    them once every tensor is written; kohya hashes are recomputed when the metadata has them.
    """

    def final_values(file: BinaryIO, data_start: int) -> dict[str, str]:
        values = {**metadata, **late()}
        if any(key in values for key in KOHYA_HASH_KEYS):
            values.update(kohya_hashes(file, data_start, specs, values))
        return values

    with atomic_path(destination) as temporary, temporary.open("r+b") as file:
        writer = SafetensorsWriter(file, specs, metadata)
        yield writer
        writer.finish(final_values)
