"""lora_ops: change the rank of LoRA checkpoints exactly, in the layout they came in.

>>> import lora_ops
>>> report = lora_ops.inspect_file("lora.safetensors")
>>> report = lora_ops.resize_file("lora.safetensors", "lora-r4.safetensors", lora_ops.ResizeOptions(rank=4))
>>> result = lora_ops.resize_files(["a.safetensors", "b.safetensors"], "rank8/", lora_ops.ResizeOptions(rank=8))
>>> report = lora_ops.merge_files([("a.safetensors", 0.8), ("b.safetensors", 0.5)], "ab.safetensors", rank=16)

The names that need torch (``Limits``, ``inspect_file``, ``resize_file``, ``resize_files``, ``merge_files``) are
imported on first use, so that ``python -m lora_ops`` reads its arguments and starts hashing its input before torch
has loaded.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from .errors import LoraError
from .options import METHODS, ResizeOptions
from .sizes import parse_size

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .files import Limits
    from .merge import merge_files
    from .resize import inspect_file, resize_file
    from .sets import resize_files

_LAZY = {
    "Limits": ".files",
    "inspect_file": ".resize",
    "resize_file": ".resize",
    "resize_files": ".sets",
    "merge_files": ".merge",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "METHODS",
    "Limits",
    "LoraError",
    "ResizeOptions",
    "__version__",
    "inspect_file",
    "merge_files",
    "parse_size",
    "resize_file",
    "resize_files",
]
