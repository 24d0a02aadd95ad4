"""lora_ops: change the rank of LoRA checkpoints exactly, in the layout they came in.

>>> import lora_ops
>>> report = lora_ops.inspect_file("lora.safetensors")
>>> report = lora_ops.resize_file("lora.safetensors", "lora-r4.safetensors", lora_ops.ResizeOptions(rank=4))
"""

from .errors import LoraError
from .files import Limits
from .resize import METHODS, ResizeOptions, __version__, inspect_file, resize_file
from .sizes import parse_size

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
