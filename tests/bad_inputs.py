"""A corpus of inputs that must be refused cleanly: each file with a fragment of the message it must get."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file


def _lora(rank: int = 4) -> dict[str, torch.Tensor]:
    return {
        "transformer.blocks.0.to_q.lora_A.weight": torch.randn(rank, 16),
        "transformer.blocks.0.to_q.lora_B.weight": torch.randn(24, rank),
    }


def _raw(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _truncated(path: Path) -> None:
    save_file(_lora(), str(path))
    path.write_bytes(path.read_bytes()[:-100])


def _save(tensors: dict[str, torch.Tensor]):
    return lambda path: save_file(tensors, str(path))


def _nan() -> dict[str, torch.Tensor]:
    tensors = _lora()
    tensors["transformer.blocks.0.to_q.lora_B.weight"][3, 1] = float("nan")
    return tensors


def _inf() -> dict[str, torch.Tensor]:
    tensors = _lora()
    tensors["transformer.blocks.0.to_q.lora_A.weight"][0, 0] = float("inf")
    return tensors


# name -> (file name, writer, fragment of the one-line message)
BAD_INPUTS = {
    "truncated": ("lora.safetensors", _truncated, "truncated"),
    "empty": ("lora.safetensors", lambda p: p.write_bytes(b""), "is empty"),
    "not-safetensors": (
        "lora.safetensors",
        lambda p: p.write_text("just some text, not a LoRA\n" * 20),
        "not a safetensors file (it starts with the text 'just som'",
    ),
    "absurd-header": (
        "lora.safetensors",
        lambda p: p.write_bytes(struct.pack("<Q", 2**62) + b"{}" * 100),
        "header claims 4611686018427387904 bytes",
    ),
    "header-claims-too-much": (
        "lora.safetensors",
        lambda p: p.write_bytes(struct.pack("<Q", 4096) + b"{}" * 100),
        "truncated or not a safetensors file: its header claims 4096 bytes",
    ),
    # JSON escapes can carry a lone surrogate (which no UTF-8 file holds) or control characters into names.
    "surrogate-name": (
        "lora.safetensors",
        lambda p: p.write_bytes(
            _raw({"a\ud800.lora_A.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4))
        ),
        "holds a control character or is not valid UTF-8",
    ),
    "newline-name": (
        "lora.safetensors",
        _save({"t.a\nb.lora_A.weight": torch.randn(4, 16), "t.a\nb.lora_B.weight": torch.randn(24, 4)}),
        "holds a control character or is not valid UTF-8",
    ),
    "escape-sequence-name": (
        "lora.safetensors",
        _save({"t.\x1b]0;pwned\x07.lora_A.weight": torch.randn(4, 16)}),
        "holds a control character",
    ),
    "surrogate-metadata": (
        "lora.safetensors",
        lambda p: p.write_bytes(
            _raw(
                {
                    "__metadata__": {"note": "\ud800"},
                    "a.lora_A.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                },
                bytes(4),
            )
        ),
        "metadata entry 'note' is not valid UTF-8",
    ),
    "kohya-wrong-separator": (
        "lora.safetensors",
        _save(
            {
                "lora_unet_unet_mid_block_attentions_0_proj_in_lora_down.weight": torch.randn(4, 16),
                "lora_unet_unet_mid_block_attentions_0_proj_in_lora_up.weight": torch.randn(16, 4),
            }
        ),
        "join 'lora_down' to the module name with '_' where every layout has '.'",
    ),
    "header-not-json": (
        "lora.safetensors",
        lambda p: p.write_bytes(struct.pack("<Q", 8) + b"\xff\xfenot-js"),
        "not JSON",
    ),
    "shapes-lie": (
        "lora.safetensors",
        lambda p: p.write_bytes(
            _raw({"a.lora_A.weight": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 16]}}, bytes(16))
        ),
        "needs 4000000 bytes",
    ),
    "offsets-past-end": (
        "lora.safetensors",
        lambda p: p.write_bytes(
            _raw({"a.lora_A.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8))
        ),
        "truncated",
    ),
    "pickle-zip": ("lora.safetensors", lambda p: torch.save(_lora(), p), "pickled PyTorch checkpoint"),
    "pickle-suffix": ("lora.pt", lambda p: torch.save(_lora(), p), "pickle-based checkpoint"),
    "nan": ("lora.safetensors", _save(_nan()), "NaN or Inf"),
    "inf": ("lora.safetensors", _save(_inf()), "NaN or Inf"),
    "mismatched-ranks": (
        "lora.safetensors",
        _save({"t.a.lora_A.weight": torch.randn(4, 16), "t.a.lora_B.weight": torch.randn(24, 6)}),
        "mismatched ranks",
    ),
    "orphan": ("lora.safetensors", _save({"t.a.lora_A.weight": torch.randn(4, 16)}), "orphan LoRA factor"),
    "loha": (
        "lora.safetensors",
        _save({"lora_unet_a.hada_w1_a": torch.randn(8, 4), "lora_unet_a.hada_w1_b": torch.randn(4, 8)}),
        "LoHa",
    ),
    "lokr": ("lora.safetensors", _save({"lora_unet_a.lokr_w1": torch.randn(4, 4)}), "LoKr"),
    "dora": (
        "lora.safetensors",
        _save({**_lora(), "transformer.blocks.0.to_q.lora_magnitude_vector": torch.randn(24)}),
        "DoRA",
    ),
    "tucker": ("lora.safetensors", _save({"lora_unet_c.lora_mid.weight": torch.randn(4, 4, 3, 3)}), "lora_mid"),
    "full-model": (
        "model.safetensors",
        _save(
            {
                "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4),
                "first_stage_model.decoder.conv_in.bias": torch.randn(8),
            }
        ),
        "no LoRA factors",
    ),
    "rank-0": (
        "lora.safetensors",
        _save({"t.a.lora_A.weight": torch.zeros(0, 16), "t.a.lora_B.weight": torch.zeros(24, 0)}),
        "rank 0",
    ),
    "integer-factors": (
        "lora.safetensors",
        _save(
            {
                "t.a.lora_A.weight": torch.ones(4, 16, dtype=torch.int32),
                "t.a.lora_B.weight": torch.ones(24, 4, dtype=torch.int32),
            }
        ),
        "expected fp16, bf16 or fp32",
    ),
    "missing": ("absent.safetensors", lambda p: None, "file not found"),
}


def write_bad_input(name: str, folder: Path) -> tuple[Path, str]:
    """Write corpus entry ``name`` into ``folder``; return its path and the message fragment it must get."""
    file_name, writer, fragment = BAD_INPUTS[name]
    path = folder / file_name
    writer(path)
    return path, fragment
