"""An input LoRA file, opened and understood: its layout, each module's scale and what carries it (an alpha, a
config, or the factors), its alpha tensors as stored; and the limits on the work it asks for, checked from its
header before any tensor data is read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .consumers import ScaleReading, consumer_warnings
from .errors import LoraError
from .files import Limits, open_tensors, read_header
from .layouts import LoraFile, LoraModule, parse_lora
from .scales import (
    FROM_DIFFUSERS_METADATA,
    FROM_METADATA_ALPHA,
    FROM_PEFT_CONFIG,
    diffusers_metadata,
    load_peft_config,
    module_scales,
    split_component,
)


@dataclass(frozen=True)
class Source:
    """An input file, opened and understood: layout, per-module scales, the alpha tensors as stored.

    ``carriers``: per module, what holds its scale, in the input and so in the output (:func:`scale_carriers`).
    ``alpha_tensors``: the stored alpha tensor of each module that has one, by module name.
    """

    lora: LoraFile
    scales: list[float]
    scale_source: str
    peft_config: dict | None
    peft_config_path: Path | None
    carriers: list[str]
    alpha_tensors: dict[str, Tensor]

    @property
    def alphas(self) -> dict[str, float]:
        """The alpha values, by module name."""
        return alpha_values(self.alpha_tensors)

    @property
    def alpha_dtype(self) -> torch.dtype:
        """The dtype the input stores its alphas in (float32 when it has none)."""
        return next(iter(self.alpha_tensors.values())).dtype if self.alpha_tensors else torch.float32

    def warnings(self) -> list[str]:
        """A line for each known consumer that reads this input differently from its format's owner."""
        return consumer_warnings(ScaleReading(self.lora, self.scales, self.scale_source, self.alphas))


def alpha_values(alpha_tensors: dict[str, Tensor]) -> dict[str, float]:
    """Each alpha tensor's one value (any 1-element shape, float or integer), by module name."""
    return {name: float(alpha.reshape(-1)[0]) for name, alpha in alpha_tensors.items()}


def check_limits(lora: LoraFile, limits: Limits, rank_out: int) -> None:
    """Refuse, from the header, linear algebra beyond the limits: a module's rank, the total ``sum(rank^3)`` of
    the ``[r, r]`` eigen and singular value problems, and one module's float64 working memory
    ``8 x (max(r, rank_out) x (out + in) + 2 r^2)`` bytes (factors, new factors, Gram matrices)."""
    name = lora.path.name
    worst = max(lora.modules, key=lambda m: m.rank)
    if worst.rank > limits.rank:
        raise LoraError(f"{name}: module {worst.name!r} has rank {worst.rank}; the limit is {limits.rank}")
    cubes = sum(m.rank**3 for m in lora.modules)
    if cubes > limits.rank_cubes:
        raise LoraError(
            f"{name}: its {len(lora.modules)} modules' ranks need too much work (sum of rank^3 {cubes:.3g},"
            f" the limit is {limits.rank_cubes:.3g})"
        )
    for m in lora.modules:
        working = 8 * (max(m.rank, rank_out) * (m.out_features + m.in_features) + 2 * m.rank**2)
        if working > limits.module_bytes:
            raise LoraError(
                f"{name}: module {m.name!r} needs {working / 2**30:.1f} GiB of float64 working memory;"
                f" the limit is {limits.module_bytes / 2**30:.1f} GiB"
            )


def open_source(path: str | Path, config: str | Path | None, limits: Limits, rank_out: int = 0) -> Source:
    """Open the LoRA at ``path``: its header read and checked against ``limits`` (also for new ranks up to
    ``rank_out``, :func:`check_limits`), its layout, its alpha tensors (the only tensor data read here), its PEFT
    ``config`` (found beside ``path`` when ``None``) and each module's scale as its loaders read it
    (:func:`lora_ops.scales.module_scales`). Raises :class:`LoraError`."""
    lora = parse_lora(path, read_header(path, limits))
    check_limits(lora, limits, rank_out)
    handle = open_tensors(lora.path, lora.header)
    alpha_tensors = {m.name: handle.get_tensor(m.alpha_key) for m in lora.modules if m.alpha_key}
    peft_config, peft_config_path = load_peft_config(lora, config)
    scales, scale_source = module_scales(lora, alpha_values(alpha_tensors), peft_config)
    carriers = scale_carriers(lora, scale_source)
    return Source(lora, scales, scale_source, peft_config, peft_config_path, carriers, alpha_tensors)


# What holds a module's scale: an alpha (its `.alpha` tensor, or the metadata's `alpha` entry: the output writes one
# alpha value, the rest folded into the factors), a config (`lora_adapter_metadata`, `adapter_config.json`:
# regenerated with the module's scale, the factors unscaled), or nothing (the factors hold it).
BY_ALPHA, BY_CONFIG, BY_FACTORS = "alpha", "config", "factors"


def scale_carriers(lora: LoraFile, scale_source: str) -> list[str]:
    """Per module, what holds its scale (``BY_ALPHA``, ``BY_CONFIG`` or ``BY_FACTORS``). Under
    ``lora_adapter_metadata``, the modules of the components it describes are ``BY_CONFIG``; the others keep their
    alpha tensors."""
    if scale_source == FROM_METADATA_ALPHA:
        return [BY_ALPHA] * len(lora.modules)
    if scale_source == FROM_PEFT_CONFIG:
        return [BY_CONFIG] * len(lora.modules)
    described: set[str] = set()
    if scale_source == FROM_DIFFUSERS_METADATA:
        described = {key.partition(".")[0] for key in diffusers_metadata(lora) or {}}

    def carrier(module: LoraModule) -> str:
        if split_component(module.name)[0] in described:
            return BY_CONFIG
        return BY_ALPHA if module.alpha_key is not None else BY_FACTORS

    return [carrier(module) for module in lora.modules]


def file_identity(path: Path) -> tuple[int, int, int, int]:
    """What changes when a file is replaced or rewritten: device, inode, size, modification time (ns)."""
    status = path.stat()
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns
