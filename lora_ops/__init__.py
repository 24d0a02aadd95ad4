"""lora_ops: change the rank of LoRA checkpoints exactly, in the layout they came in.

>>> import lora_ops
>>> report = lora_ops.inspect_file("lora.safetensors")
>>> report = lora_ops.resize_file("lora.safetensors", "lora-r4.safetensors", lora_ops.ResizeOptions(rank=4))

The names that need torch (``Limits``, ``inspect_file``, ``resize_file``) are imported on first use, so that
``python -m lora_ops`` reads its arguments and starts hashing its input before torch has loaded.
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
    from .resize import inspect_file, resize_file

_LAZY = {"Limits": ".files", "inspect_file": ".resize", "resize_file": ".resize"}


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
    "parse_size",
    "resize_file",
]
