"""What a real consumer applies: the deltas a loaded LoRA adds to a model, and the checks of the loader matrix.

A resized file is right when the consumer that loads it (diffusers' ``load_lora_weights``, PEFT's
``PeftModel.from_pretrained``) applies what the report says: the same patched modules as the input, the same
delta for an exact rank increase, and for a reduction the error the report states. Deltas are read from the
loaded PEFT layers (``get_delta_weight``, scaling included), never recomputed from the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from torch import nn


@dataclass(frozen=True)
class Cell:
    """One cell of the loader matrix: a model family, a layout its users publish, and the consumer that loads it.

    ``limit``: ``None`` when the cell is tested for equality; otherwise why the consumer cannot read this
    layout at all (a limit of the consumer, not of lora_ops), documented in the README's loader matrix.
    """

    family: str
    layout: str
    consumer: str
    limit: str | None = None


def applied_deltas(components: dict[str, nn.Module], adapter: str) -> dict[str, torch.Tensor]:
    """``"<component>.<module>" -> delta`` (float64, the weight's shape) of every layer ``adapter`` patches.

    ``components`` maps a name (``"transformer"``, ``"unet"``, ``"text_encoder"``, ...) to a model holding
    PEFT LoRA layers; the delta is PEFT's own ``get_delta_weight``, which includes the layer's scaling.
    """
    deltas = {}
    for component, model in components.items():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and (adapter in module.lora_A or adapter in module.lora_embedding_A):
                deltas[f"{component}.{name}"] = module.get_delta_weight(adapter).detach().double()
    return deltas


def _total(deltas: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(d.norm() ** 2) for d in deltas.values()))


def assert_same_deltas(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], rtol: float) -> None:
    """The same modules are patched, and each one's delta agrees within ``rtol`` of its norm."""
    assert before, "the input patched no module: the cell tests nothing"
    assert set(after) == set(before), f"patched modules differ: {sorted(set(after) ^ set(before))[:5]}"
    for name, delta in before.items():
        difference = float((after[name] - delta).norm())
        assert difference <= rtol * float(delta.norm()), f"{name}: relative change {difference / delta.norm():.3g}"


def reported_total_error(report: dict) -> float:
    """The whole file's relative error ``sqrt(sum ||D_i - D'_i||^2) / sqrt(sum ||D_i||^2)`` from a resize report.

    Each layer gives ``rel_error`` and the input delta's singular values, so ``||D_i||^2 = sum s^2``.
    """
    norms = [sum(s * s for s in layer["singular_values"]) for layer in report["layers"]]
    squared = sum(layer["rel_error"] ** 2 * norm for layer, norm in zip(report["layers"], norms))
    return math.sqrt(squared / sum(norms)) if sum(norms) else 0.0


def assert_reported_error(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], report: dict, atol: float = 1e-4
) -> None:
    """The same modules are patched, and the error the consumer applies, over the whole file, is the reported one.

    Whole-file totals, because a consumer may split one file module into several (a fused qkv into q, k, v).
    """
    assert before, "the input patched no module: the cell tests nothing"
    assert set(after) == set(before), f"patched modules differ: {sorted(set(after) ^ set(before))[:5]}"
    difference = math.sqrt(sum(float((after[n] - before[n]).norm() ** 2) for n in before))
    applied = difference / _total(before)
    assert applied > 0, "a reduction that changes nothing tests nothing"
    assert abs(applied - reported_total_error(report)) <= atol, (applied, reported_total_error(report))


def loaded_ranks(components: dict[str, nn.Module], adapter: str) -> dict[str, int]:
    """``"<component>.<module>" -> rank`` of every layer ``adapter`` was loaded into (names as in :func:`applied_deltas`)."""
    return {
        f"{component}.{name}": module.r[adapter]
        for component, model in components.items()
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter in module.r
    }
