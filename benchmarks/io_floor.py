"""The I/O floor of a resize: a process that imports torch, reads every tensor of a LoRA and writes a file of the
size the resized LoRA has, doing no linear algebra.

safetensors maps the file into memory, so every tensor's bytes are copied into one reused buffer: that is what
reads every byte, without keeping the copies. Each pair is then cut (or zero-padded) to RANK: the first RANK rows
of A ``[r, in]`` and columns of B ``[out, r]``, so the output has the resized file's keys, shapes, dtypes and
bytes; every other tensor is written unchanged.

Usage (from the repository root): python -m benchmarks.io_floor IN.safetensors OUT.safetensors --rank 4
"""

from __future__ import annotations

import argparse

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# key suffix -> the dimension that holds the rank
RANK_DIMS = {".lora_A.weight": 0, ".lora_down.weight": 0, ".lora_B.weight": 1, ".lora_up.weight": 1}


def at_rank(tensor: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
    """``tensor`` cut to ``rank`` along ``dim``, or padded with zeros up to it; a new contiguous tensor."""
    kept = tensor.narrow(dim, 0, min(rank, tensor.shape[dim]))
    shape = list(tensor.shape)
    shape[dim] = rank - kept.shape[dim]
    return torch.cat([kept, kept.new_zeros(shape)], dim=dim).contiguous()


def floor_copy(source: str, destination: str, rank: int) -> None:
    """Read every tensor of ``source`` and write ``destination`` with every pair at ``rank``."""
    tensors: dict[str, torch.Tensor] = {}
    buffer = torch.empty(0, dtype=torch.uint8)
    with safe_open(source, framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
            tensor = handle.get_tensor(key)
            raw = tensor.reshape(-1).view(torch.uint8)
            if buffer.numel() < raw.numel():
                buffer = torch.empty(raw.numel(), dtype=torch.uint8)
            buffer[: raw.numel()].copy_(raw)
            dim = next((d for suffix, d in RANK_DIMS.items() if key.endswith(suffix)), None)
            tensors[key] = tensor if dim is None else at_rank(tensor, dim, rank)
    save_file(tensors, destination)


def main() -> None:
    parser = argparse.ArgumentParser(description="Read every tensor of a LoRA and write one of the resized size.")
    parser.add_argument("source")
    parser.add_argument("destination")
    parser.add_argument("--rank", type=int, required=True)
    args = parser.parse_args()
    floor_copy(args.source, args.destination, args.rank)


if __name__ == "__main__":
    main()
