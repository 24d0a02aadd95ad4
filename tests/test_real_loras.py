"""Real LoRA files trained by other people (``../shared/real-loras``, beside the project), checked when present.

Each file is resized down and up; what the output means is computed here from its raw tensors and
compared with the dense optimum of the input's delta.
"""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import lora_ops
from lora_ops.layouts import LAYOUT_BY_NAME
from tests.test_precision import DenseOptimum

REAL_LORAS = Path(__file__).resolve().parents[2] / "shared" / "real-loras"
MORE_REAL_LORAS = REAL_LORAS.with_name("real-loras-more")
# file -> (PEFT config beside it under another name, true scale of every module)
FILES = {
    "flux-aitoolkit-r16-fp16.safetensors": (None, 1.0),
    "sd14-diffusers-attnproc-r4.safetensors": (None, 1.0),
    "sd21-diffusers-attnproc-r4.safetensors": (None, 1.0),
    "sd14-diffusers-oldprocessor-r4.safetensors": (None, 1.0),
    "peft-distilbert-r8-adapter_model.safetensors": ("peft-distilbert-r8-adapter_config.json", 2.0),
    "sd1-cloneofsimo-r4.safetensors": (None, 1.0),
}
pytestmark = pytest.mark.skipif(not REAL_LORAS.is_dir(), reason="../shared/real-loras is not beside this clone")


def _factors(path, report, scale=None):
    """Every module's ``(scale * up, down)`` as float64 matrices, read from the raw tensors (``scale=None``: each
    layer's own, from an :func:`lora_ops.inspect_file` report)."""
    layout = LAYOUT_BY_NAME[report["layout"]]
    with safe_open(str(path), framework="pt") as handle:
        return {
            layer["name"]: (
                (layer["scale"] if scale is None else scale)
                * handle.get_tensor(layer["name"] + layout.up_suffix).double().flatten(1),
                handle.get_tensor(layer["name"] + layout.down_suffix).double().flatten(1),
            )
            for layer in report["layers"]
        }


def _optimum(up, down, rank):
    """Dense best rank-``rank`` approximation of ``up @ down``, by LAPACK's SVD inside the range of ``up``.

    The delta's range lies in ``up``'s column space, so with ``Q`` from a QR of ``up`` the SVD of the small
    ``Q^T D`` is the SVD of ``D``: exact, independent of lora_ops' Gram-matrix route, and fast on 15360-wide layers.
    """
    q, _ = torch.linalg.qr(up)
    u, s, vh = torch.linalg.svd(q.T @ (up @ down), full_matrices=False)
    return q @ ((u[:, :rank] * s[:rank]) @ vh[:rank])


@pytest.mark.parametrize("name", sorted(FILES))
def test_real_file_round_trips(name, tmp_path):
    """Rank 2: the dense optimum (1e-4 for fp32 files); rank 24: the same delta; reported errors are true."""
    config_name, scale = FILES[name]
    source = REAL_LORAS / name
    config = REAL_LORAS / config_name if config_name else None
    inspected = lora_ops.inspect_file(source, config=config)
    factors = _factors(source, inspected, scale)
    truth = {layer: up @ down for layer, (up, down) in factors.items()}
    optimum = {layer: _optimum(up, down, 2) for layer, (up, down) in factors.items()}
    tolerance = 1e-4 if inspected["dtype"] == "fp32" else 5e-3
    for rank, expected in ((2, optimum), (24, truth)):
        (tmp_path / str(rank)).mkdir()
        out = tmp_path / str(rank) / "adapter_model.safetensors"
        report = lora_ops.resize_file(source, out, lora_ops.ResizeOptions(rank=rank), config=config)
        result = _factors(out, report, scale)  # the output keeps the input's scale carrier (here its config)
        for layer in report["layers"]:
            up, down = result[layer["name"]]
            delta = up @ down
            distance = ((delta - expected[layer["name"]]).norm() / expected[layer["name"]].norm()).item()
            assert distance < (1e-6 if rank == 24 and scale == 1 else tolerance), layer["name"]
            actual_error = ((delta - truth[layer["name"]]).norm() / truth[layer["name"]].norm()).item()
            assert layer["rel_error"] == pytest.approx(actual_error, abs=1e-6)


def test_real_flux_file_svd_keeps_what_random_projection_loses(tmp_path):
    source = REAL_LORAS / "flux-aitoolkit-r16-fp16.safetensors"
    svd = lora_ops.resize_file(source, tmp_path / "svd.safetensors", lora_ops.ResizeOptions(rank=4))
    projection = lora_ops.resize_file(
        source, tmp_path / "rp.safetensors", lora_ops.ResizeOptions(rank=4, method="random_projection")
    )
    assert svd["median_error"] < 0.1
    assert projection["median_error"] > 0.5


# files of ../shared/real-loras-more that lora_ops resizes (the others are truncated or refused by design)
MORE_FILES = {"sd21-diffusers-unet-r4-bf16.safetensors": (None, 1.0)}


@pytest.mark.parametrize(
    ("folder", "name"), [(REAL_LORAS, name) for name in sorted(FILES)] + [(MORE_REAL_LORAS, n) for n in MORE_FILES]
)
def test_real_file_fp32_output_is_the_dense_optimum(folder, name, tmp_path):
    """At every rank below the input's, with ``--dtype fp32``: each layer's error within 1e-4 of the dense
    optimum's (LAPACK), whatever the input's dtype (16-bit inputs take float32 products where that suffices)."""
    if not folder.is_dir():
        pytest.skip(f"{folder} is not beside this clone")
    config_name, scale = {**FILES, **MORE_FILES}[name]
    source = folder / name
    config = folder / config_name if config_name else None
    factors = _factors(source, lora_ops.inspect_file(source, config=config), scale)
    optima = {layer: DenseOptimum(up, down) for layer, (up, down) in factors.items()}
    rank_in = max(down.shape[0] for _, down in factors.values())
    for rank in sorted({1, 2, rank_in // 2, rank_in - 1}):
        (tmp_path / str(rank)).mkdir()
        out = tmp_path / str(rank) / "adapter_model.safetensors"
        options = lora_ops.ResizeOptions(rank=rank, dtype="fp32")
        report = lora_ops.resize_file(source, out, options, config=config)
        result = _factors(out, lora_ops.inspect_file(out))
        for layer in report["layers"]:
            optimum = optima[layer["name"]]
            error = optimum.error(*result[layer["name"]])
            assert error - optimum.error(*optimum.factors(rank)) < 1e-4, (layer["name"], rank)
