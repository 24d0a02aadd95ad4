"""Streaming, deterministic safetensors writer.

``safetensors.torch.save_file`` needs every tensor in memory at once and writes ``__metadata__`` in a
random order (a Rust ``HashMap``), so two runs give different bytes. This writer lays the file out exactly
as safetensors does (tensors sorted by dtype, widest first, then by name; header padded with spaces to a
multiple of 8) with the metadata keys sorted, and takes tensors one at a time, in any order, writing each
at its offset. Files it writes are read back with ``safetensors`` in the tests.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import BinaryIO

import torch

from .files import TensorInfo

# safetensors' Dtype enum, in its declaration order: the data section is sorted by it, descending.
DTYPE_ORDER = (
    "BOOL",
    "U8",
    "I8",
    "F8_E5M2",
    "F8_E4M3",
    "I16",
    "U16",
    "F16",
    "BF16",
    "I32",
    "U32",
    "F32",
    "F64",
    "I64",
    "U64",
)


def layout(specs: dict[str, TensorInfo]) -> dict[str, tuple[int, int]]:
    """Data offsets ``(begin, end)`` of every tensor, in safetensors' order (dtype descending, then name)."""
    order = {dtype: -index for index, dtype in enumerate(DTYPE_ORDER)}
    offsets, position = {}, 0
    for key in sorted(specs, key=lambda k: (order[specs[k].dtype], k)):
        offsets[key] = (position, position + specs[key].nbytes)
        position += specs[key].nbytes
    return offsets


def header_bytes(specs: dict[str, TensorInfo], metadata: dict[str, str]) -> bytes:
    """The length-prefixed JSON header for ``specs`` and ``metadata``, padded to a multiple of 8 bytes."""
    entries: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    for key, (begin, end) in layout(specs).items():
        entries[key] = {"dtype": specs[key].dtype, "shape": list(specs[key].shape), "data_offsets": [begin, end]}
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class SafetensorsWriter:
    """Write a safetensors file whose tensors arrive one at a time: ``put(key, tensor)`` for every planned key.

    ``finish(update_metadata)`` may rewrite metadata values once all data is on disk (hashes of the data,
    values known only at the end); the new header must have exactly the old one's length.
    """

    def __init__(self, file: BinaryIO, specs: dict[str, TensorInfo], metadata: dict[str, str]) -> None:
        self._file, self._specs, self._metadata = file, specs, metadata
        self._offsets = layout(specs)
        self._header = header_bytes(specs, metadata)
        self._missing = set(specs)
        file.write(self._header)
        file.truncate(len(self._header) + sum(spec.nbytes for spec in specs.values()))

    @property
    def data_start(self) -> int:
        """Byte offset of the data section in the file."""
        return len(self._header)

    def put(self, key: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor (its dtype and shape must match the plan)."""
        if TensorInfo.of(tensor.dtype, tuple(tensor.shape)) != self._specs[key]:
            raise ValueError(f"tensor {key!r} does not match its planned dtype and shape")
        self._file.seek(self.data_start + self._offsets[key][0])
        self._file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._missing.discard(key)

    def finish(self, update_metadata: Callable[[BinaryIO, int], dict[str, str]] | None = None) -> None:
        """Check every tensor was written; let ``update_metadata(file, data_start)`` return changed metadata."""
        if self._missing:
            raise ValueError(f"tensors never written: {sorted(self._missing)[:3]}")
        if update_metadata:
            header = header_bytes(self._specs, {**self._metadata, **update_metadata(self._file, self.data_start)})
            if len(header) != len(self._header):
                raise ValueError("updated metadata changed the header length")
            self._file.seek(0)
            self._file.write(header)
