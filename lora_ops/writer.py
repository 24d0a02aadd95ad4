"""Writing a resized file in its input's layout: the alpha policy, regenerated metadata, atomic replace.

The rule: **a resized file carries its scale the way its input did**, because loaders recognise formats by
the keys that exist (diffusers' Qwen-Image and Z-Image loaders add the ``transformer.`` prefix to unprefixed
``lora_A``/``lora_B`` files only when they have ``.alpha`` keys). Only the rank dimension and the values change:

- ``.alpha`` tensors: every module that had one gets one, all of one value (:func:`output_alpha`) in a dtype that
  holds it exactly (:func:`alpha_dtype`); what that alpha does not give a module is folded into its factors.
- a plain ``alpha`` metadata entry: rewritten with that value.
- ``lora_adapter_metadata`` or a PEFT ``adapter_config.json``: regenerated with the new ranks and
  ``lora_alpha = r``, the scale folded into the factors.
- nothing: the scale is folded into the factors.

Other metadata that describes the ranks is regenerated (never left stale), and provenance is added under
``lora_resizer.*``.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

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


def _regenerate_diffusers(metadata: dict[str, str], lora: LoraFile, ranks: list[int]) -> None:
    """Rewrite ``lora_adapter_metadata`` so every rank and alpha in it matches the new factors (scale 1)."""
    if DIFFUSERS_METADATA_KEY not in metadata:
        return
    fields = json.loads(metadata[DIFFUSERS_METADATA_KEY])
    by_component: dict[str, dict[str, int]] = {}
    for module, rank in zip(lora.modules, ranks):
        component, name = split_component(module.name)
        by_component.setdefault(component, {})[name] = rank
    for component, module_ranks in by_component.items():
        if not any(key.startswith(component + ".") for key in fields):
            continue
        common = Counter(module_ranks.values()).most_common(1)[0][0]
        pattern = {f"^{name}": rank for name, rank in module_ranks.items() if rank != common}
        fields.update(
            {
                f"{component}.r": common,
                f"{component}.lora_alpha": common,
                f"{component}.rank_pattern": pattern,
                f"{component}.alpha_pattern": dict(pattern),
                f"{component}.use_rslora": False,
            }
        )
    metadata[DIFFUSERS_METADATA_KEY] = json.dumps(fields, indent=2, sort_keys=True)


def peft_config_for_output(config: dict, lora: LoraFile, ranks: list[int]) -> dict:
    """A PEFT ``adapter_config.json`` for the resized factors: new ranks, alpha = rank (scale folded)."""
    names = [m.name.removeprefix(PEFT_PREFIX) for m in lora.modules]
    common = Counter(ranks).most_common(1)[0][0]
    pattern = {f"^{name}": rank for name, rank in zip(names, ranks) if rank != common}
    return {
        **config,
        "r": common,
        "lora_alpha": common,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
    }


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
    lora: LoraFile, ranks: list[int], alpha: float | None, scale_source: str, provenance: Provenance
) -> dict[str, str]:
    """The output's ``__metadata__``: the input's, with rank- and scale-describing entries regenerated (``alpha``,
    the output's alpha, where ``scale_source`` says the input kept its scale in the metadata) and provenance."""
    metadata = {k: v for k, v in lora.header.metadata.items() if not k.startswith(PROVENANCE_PREFIX)}
    if scale_source == FROM_METADATA_ALPHA and alpha is not None:
        metadata[METADATA_ALPHA_KEY] = number_text(alpha)
    _regenerate_diffusers(metadata, lora, ranks)
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


def _reserve_temporary(destination: Path) -> Path:
    """A new, empty, hidden file beside ``destination`` (mode 0o666 less the umask, like any file the user writes)."""
    temporary = destination.parent / f".{destination.name}.{secrets.token_hex(8)}.part"
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return temporary


@contextmanager
def atomic_path(destination: Path) -> Iterator[Path]:
    """Yield a temporary path to write; it replaces ``destination`` on success and is removed on any failure."""
    temporary = _reserve_temporary(destination)
    try:
        yield temporary
        os.replace(temporary, destination)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


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


def write_json(destination: Path, payload: dict) -> None:
    """Write a JSON file atomically (sorted keys, indented)."""
    with atomic_path(destination) as temporary:
        temporary.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
