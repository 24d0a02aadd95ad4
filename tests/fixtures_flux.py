"""Pytest fixtures: a tiny random FLUX.1 pipeline on disk and LoRA files for it (see tests/tiny_flux.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

from tests.tiny_flux import build_tiny_flux, tiny_flux_kohya_lora, tiny_flux_lora

TINY_LORA_RANK = 8


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a tiny random `FluxPipeline` (`FluxPipeline.from_pretrained` loads it offline)."""
    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="session")
def tiny_flux_transformer(tiny_flux_dir: Path) -> FluxTransformer2DModel:
    """The tiny pipeline's transformer, for LoRA shapes. Do not load LoRAs into it: it is shared."""
    return FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")


@pytest.fixture(scope="session")
def tiny_flux_lora_file(
    tiny_flux_transformer: FluxTransformer2DModel, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A rank-8 diffusers-layout LoRA file over every block linear of the tiny transformer (fp32, scale 1)."""
    path = tmp_path_factory.mktemp("tiny-flux-lora") / "tiny-flux-r8.safetensors"
    save_file(tiny_flux_lora(tiny_flux_transformer, rank=TINY_LORA_RANK, seed=1), path)
    return path


@pytest.fixture(scope="session")
def tiny_flux_kohya_lora_file(
    tiny_flux_transformer: FluxTransformer2DModel, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A rank-8 kohya-layout LoRA file (BFL names, fused qkv, `.alpha` 4.0) over the tiny double block."""
    path = tmp_path_factory.mktemp("tiny-flux-kohya") / "tiny-flux-kohya-r8.safetensors"
    save_file(tiny_flux_kohya_lora(tiny_flux_transformer, rank=TINY_LORA_RANK, seed=2, alpha=4.0), path)
    return path


@pytest.fixture
def tiny_flux_base_model(tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point `LORA_OPS_BASE_MODEL` at the tiny pipeline for one test; returns its directory."""
    monkeypatch.setenv("LORA_OPS_BASE_MODEL", str(tiny_flux_dir))
    return tiny_flux_dir
