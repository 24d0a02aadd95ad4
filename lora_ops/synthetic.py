"""Synthetic FLUX.1-shaped LoRAs with a trained-like spectrum, for benchmarks, tests and the Space's example.

The linear layers of diffusers' ``FluxTransformer2DModel`` are kept as data: per block type, a table from the
module name to its (out, in) size written as multiples of the hidden size and of the MLP width.  FLUX.1 has 19
double and 38 single blocks, hidden size 3072 and MLP width 4 x 3072: an all-linear LoRA has 494 pairs and
``5,369,856 x rank`` parameters, about 10.7 MB (10^6 bytes) per unit of rank in bf16: rank 42 is 451 MB, rank 4
is 43 MB.

Spectrum law of every generated pair (``i`` = 0 .. rank-1)::

    sigma_i = top * (exp(-i / decay) + floor)

With the defaults (``top=12``, ``decay=1.4``, ``floor=0.005``) the two leading components hold 94% of each
layer's squared Frobenius energy and four hold 99.5%, like the trained FLUX LoRA in the project's reference files
(92% and 99.8%, leading singular value 11 to 16).  The factors are ``B = U diag(sqrt(sigma)) Q`` and
``A = Q^T diag(sqrt(sigma)) V^T`` with random orthonormal ``U``, ``V`` and a random rotation ``Q``, so neither
factor has orthogonal rows or columns, as in a trained file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

import torch
from safetensors.torch import save_file

PREFIX = "transformer."

# A dimension written as (multiple of the hidden size, multiple of the MLP width).
Dim = tuple[int, int]
HIDDEN: Dim = (1, 0)
MLP: Dim = (0, 1)

# module name inside a block -> (out, in)
DOUBLE_BLOCK_LINEARS: dict[str, tuple[Dim, Dim]] = {
    "norm1.linear": ((6, 0), HIDDEN),
    "norm1_context.linear": ((6, 0), HIDDEN),
    "attn.to_q": (HIDDEN, HIDDEN),
    "attn.to_k": (HIDDEN, HIDDEN),
    "attn.to_v": (HIDDEN, HIDDEN),
    "attn.to_out.0": (HIDDEN, HIDDEN),
    "attn.add_q_proj": (HIDDEN, HIDDEN),
    "attn.add_k_proj": (HIDDEN, HIDDEN),
    "attn.add_v_proj": (HIDDEN, HIDDEN),
    "attn.to_add_out": (HIDDEN, HIDDEN),
    "ff.net.0.proj": (MLP, HIDDEN),
    "ff.net.2": (HIDDEN, MLP),
    "ff_context.net.0.proj": (MLP, HIDDEN),
    "ff_context.net.2": (HIDDEN, MLP),
}
SINGLE_BLOCK_LINEARS: dict[str, tuple[Dim, Dim]] = {
    "norm.linear": ((3, 0), HIDDEN),
    "proj_mlp": (MLP, HIDDEN),
    "proj_out": (HIDDEN, (1, 1)),
    "attn.to_q": (HIDDEN, HIDDEN),
    "attn.to_k": (HIDDEN, HIDDEN),
    "attn.to_v": (HIDDEN, HIDDEN),
}
# block list name in diffusers -> its table
BLOCKS: dict[str, dict[str, tuple[Dim, Dim]]] = {
    "transformer_blocks": DOUBLE_BLOCK_LINEARS,
    "single_transformer_blocks": SINGLE_BLOCK_LINEARS,
}

TOP = 12.0
DECAY = 1.4
FLOOR = 0.005


def flux_shapes(
    num_double: int = 19, num_single: int = 38, hidden: int = 3072, mlp_ratio: int = 4
) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear layer in the FLUX transformer blocks, keyed by diffusers module name.

    Names have no ``transformer.`` prefix, e.g. ``single_transformer_blocks.0.proj_out`` -> (3072, 15360).
    The defaults are FLUX.1-dev/schnell: 494 layers.
    """
    widths = (hidden, hidden * mlp_ratio)
    counts = {"transformer_blocks": num_double, "single_transformer_blocks": num_single}

    def size(dim: Dim) -> int:
        return dim[0] * widths[0] + dim[1] * widths[1]

    return {
        f"{blocks}.{index}.{module}": (size(out_dim), size(in_dim))
        for blocks, table in BLOCKS.items()
        for index in range(counts[blocks])
        for module, (out_dim, in_dim) in table.items()
    }


def spectrum(rank: int, *, top: float = TOP, decay: float = DECAY, floor: float = FLOOR) -> torch.Tensor:
    """Singular values ``top * (exp(-i / decay) + floor)`` for i in 0..rank-1: float64 ``[rank]``, descending."""
    index = torch.arange(rank, dtype=torch.float64)
    return top * (torch.exp(-index / decay) + floor)


def _orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A random matrix with orthonormal columns: float64 ``[rows, cols]`` (``cols <= rows``)."""
    gaussian = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    return torch.linalg.qr(gaussian).Q


def lora_pair(
    out_features: int,
    in_features: int,
    rank: int,
    generator: torch.Generator,
    *,
    top: float = TOP,
    decay: float = DECAY,
    floor: float = FLOOR,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's factors ``(A [rank, in], B [out, rank])``, float64, with ``B @ A`` of the documented spectrum.

    ``rank`` must not exceed ``min(out_features, in_features)``.
    """
    if rank > min(out_features, in_features):
        raise ValueError(f"rank {rank} exceeds the layer's smaller dimension ({out_features}x{in_features})")
    root = spectrum(rank, top=top, decay=decay, floor=floor).sqrt()
    left = _orthonormal(out_features, rank, generator)
    right = _orthonormal(in_features, rank, generator)
    rotation = _orthonormal(rank, rank, generator)
    up = (left * root) @ rotation
    down = rotation.T @ (right * root).T
    return down, up


def iter_lora(
    shapes: Mapping[str, tuple[int, int]],
    rank: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    decay: float = DECAY,
    floor: float = FLOOR,
    top: float = TOP,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield diffusers-layout tensors layer by layer, ``transformer.<m>.lora_A.weight`` ``[rank, in]`` then
    ``transformer.<m>.lora_B.weight`` ``[out, rank]``, in ``dtype``; only one layer is in float64 at a time.

    The same ``shapes`` (same order), ``rank`` and ``seed`` give identical tensors.
    """
    generator = torch.Generator().manual_seed(seed)
    for module, (out_features, in_features) in shapes.items():
        down, up = lora_pair(out_features, in_features, rank, generator, top=top, decay=decay, floor=floor)
        yield f"{PREFIX}{module}.lora_A.weight", down.to(dtype).contiguous()
        yield f"{PREFIX}{module}.lora_B.weight", up.to(dtype).contiguous()


def make_lora(
    shapes: Mapping[str, tuple[int, int]],
    rank: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    decay: float = DECAY,
    floor: float = FLOOR,
    top: float = TOP,
) -> dict[str, torch.Tensor]:
    """A whole synthetic LoRA as a state dict (see ``iter_lora`` for keys, shapes and the spectrum law).

    Every pair has scale 1 (no ``.alpha``, no adapter metadata): the delta of module m is ``B @ A``.
    """
    return dict(iter_lora(shapes, rank, dtype=dtype, seed=seed, decay=decay, floor=floor, top=top))


def lora_bytes(shapes: Mapping[str, tuple[int, int]], rank: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of tensor data in a LoRA of ``rank`` over ``shapes`` (the file adds a header of a few tens of kB)."""
    element = torch.empty((), dtype=dtype).element_size()
    return sum(rank * (out_features + in_features) for out_features, in_features in shapes.values()) * element


def save_lora(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` as safetensors at ``path`` with string ``metadata``.

    safetensors (0.8) writes metadata keys in a random order: give at most one key for byte-identical files.
    """
    save_file(dict(tensors), os.fspath(path), metadata=dict(metadata) if metadata else None)


def energy_fraction(rank: int, kept: int, **law: float) -> float:
    """Share of squared Frobenius energy held by the leading ``kept`` of ``rank`` singular values of the law."""
    energy = spectrum(rank, **law).square()
    return float(energy[:kept].sum() / energy.sum())


__all__ = [
    "BLOCKS",
    "DECAY",
    "DOUBLE_BLOCK_LINEARS",
    "FLOOR",
    "PREFIX",
    "SINGLE_BLOCK_LINEARS",
    "TOP",
    "energy_fraction",
    "flux_shapes",
    "iter_lora",
    "lora_bytes",
    "lora_pair",
    "make_lora",
    "save_lora",
    "spectrum",
]
