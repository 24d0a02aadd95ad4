"""Nearly low-rank 16-bit layers: no accuracy lost to float32 products (issue 11, item 7).

A kohya layer with three real directions and a tail of weak ones is where float32 Gram matrices lose: the tail
lies near or below their resolution (about 1e-7 of the largest eigenvalue). Every layer here must meet the dense
optimum, computed independently by LAPACK, within 1e-4 with an fp32 output and within 1.25x the rounded optimum
(the optimum's own factors rounded to the storage dtype) in 16-bit output.
"""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lora_ops
from lora_ops import linalg
from lora_ops.synthetic import _orthonormal, flux_shapes, lora_pair

RANK = 16
ALPHA = 8.0
STRONG = (1.0, 0.6, 0.3)
# module -> (out, in): SDXL attention and FLUX-sized layers (the reported cases); two layers share a shape, so one
# batch holds a nearly low-rank layer and a well-conditioned one
SHAPES = {
    "lora_unet_output_blocks_5_1_transformer_blocks_0_attn1_to_out_0": (640, 640),
    "lora_unet_output_blocks_5_1_transformer_blocks_0_attn1_to_q": (640, 640),
    "lora_unet_double_blocks_0_img_attn_proj": (3072, 3072),
    "lora_unet_double_blocks_0_img_mod_lin": (18432, 3072),
    "lora_unet_output_blocks_5_1_transformer_blocks_0_ff_net_2": (640, 2560),
}
WELL_CONDITIONED = "lora_unet_output_blocks_5_1_transformer_blocks_0_attn1_to_q"


def nearly_low_rank(
    out_features: int, in_features: int, weak: tuple[float, float], split: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 ``(down [RANK, in], up [out, RANK])`` of a delta with singular values ``STRONG`` and then the
    ``RANK - len(STRONG)`` weak ones, log-spaced from ``10**weak[0]`` to ``10**weak[1]``.

    ``split``: ``"up"`` puts the spectrum in up and gives down orthogonal rows of norm 0.5, as a kohya LoRA
    trained from a random down and a zero up; ``"balanced"`` puts its square root on each side."""
    weak_values = torch.logspace(*weak, RANK - len(STRONG), dtype=torch.float64)
    spectrum = torch.cat([torch.tensor(STRONG, dtype=torch.float64), weak_values])
    left, right = _orthonormal(out_features, RANK, generator), _orthonormal(in_features, RANK, generator)
    rotation = _orthonormal(RANK, RANK, generator)
    if split == "up":
        return 0.5 * rotation.T @ right.T, 2 * (left * spectrum) @ rotation
    root = spectrum.sqrt()
    return rotation.T @ (right * root).T, (left * root) @ rotation


def _write(path, weak: tuple[float, float], split: str, dtype: torch.dtype, seed: int) -> None:
    """A kohya file of ``SHAPES`` with ``.alpha`` ``ALPHA``: the layers are ``nearly_low_rank`` but one."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_features, in_features) in SHAPES.items():
        if name == WELL_CONDITIONED:
            down, up = lora_pair(out_features, in_features, RANK, generator)
        else:
            down, up = nearly_low_rank(out_features, in_features, weak, split, generator)
        tensors[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
        tensors[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(ALPHA, dtype=dtype)
    save_file(tensors, str(path))


def _deltas(path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every module's ``(alpha / rank * up, down)`` as float64 matrices, read from the raw tensors."""
    with safe_open(str(path), framework="pt") as handle:
        keys = handle.keys()
        names = {key.rsplit(".lora_down", 1)[0] for key in keys if ".lora_down" in key}
        factors = {}
        for name in names:
            down = handle.get_tensor(f"{name}.lora_down.weight").double().flatten(1)
            up = handle.get_tensor(f"{name}.lora_up.weight").double().flatten(1)
            scale = handle.get_tensor(f"{name}.alpha").item() / down.shape[0]
            factors[name] = (scale * up, down)
    return factors


class DenseOptimum:
    """The delta ``up @ down`` and its SVD by LAPACK, inside the range of ``up`` (the delta's range lies there, so
    this is the delta's SVD): independent of lora_ops' Gram-matrix route."""

    def __init__(self, up: torch.Tensor, down: torch.Tensor):
        self.up, self.down = up, down
        q, _ = torch.linalg.qr(up)
        u, self.s, self.vh = torch.linalg.svd((q.T @ up) @ down, full_matrices=False)
        self.u = q @ u

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The optimum at ``rank`` as balanced factors ``(U sqrt(S), sqrt(S) V^T)``."""
        root = self.s[:rank].sqrt()
        return self.u[:, :rank] * root, root[:, None] * self.vh[:rank]

    def error(self, up: torch.Tensor, down: torch.Tensor) -> float:
        """Relative Frobenius error of ``up @ down``: ``||L R|| / ||delta||`` for ``L = [up, -self.up]`` and
        ``R = [down; self.down]``, as ``trace(L^T L R R^T)`` (float64 resolves it to ~1e-8 relative here)."""
        left, right = torch.cat([up, -self.up], dim=1), torch.cat([down, self.down])
        squared = ((left.T @ left) * (right @ right.T)).sum()
        return (squared.clamp(min=0).sqrt() / self.s.norm()).item()


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def dtype(request):
    return request.param


@pytest.mark.parametrize("split", ["up", "balanced"])
@pytest.mark.parametrize("weak", [(-2.0, -3.0), (-3.0, -5.0)], ids=["tail-1e-2", "tail-1e-3"])
def test_nearly_low_rank_layers_meet_the_dense_optimum(tmp_path, dtype, weak, split):
    source = tmp_path / "in.safetensors"
    _write(source, weak, split, dtype, seed=len(split) + int(-weak[1]))
    optima = {name: DenseOptimum(*factors) for name, factors in _deltas(source).items()}
    for rank in (4, 8):
        for output in ("fp32", "keep"):
            target = tmp_path / f"{rank}-{output}.safetensors"
            report = lora_ops.resize_file(source, target, lora_ops.ResizeOptions(rank=rank, dtype=output))
            results = _deltas(target)
            for layer in report["layers"]:
                optimum = optima[layer["name"]]
                best_up, best_down = optimum.factors(rank)
                error = optimum.error(*results[layer["name"]])
                assert layer["rel_error"] == pytest.approx(error, abs=1e-6)
                if output == "fp32":
                    assert error - optimum.error(best_up, best_down) < 1e-4, (layer["name"], rank)
                else:
                    rounded = optimum.error(best_up.to(dtype).double(), best_down.to(dtype).double())
                    assert error < 1.25 * rounded, (layer["name"], rank)


def test_inspect_reports_the_spectrum_of_a_nearly_low_rank_layer(tmp_path, dtype):
    """Every singular value above 1e-5 of the largest, within 1e-4 relative of LAPACK's (the float32 route
    drops or blurs the tail below about 3e-3)."""
    source = tmp_path / "in.safetensors"
    _write(source, (-3.0, -5.0), "up", dtype, seed=3)
    inputs = _deltas(source)
    for layer in lora_ops.inspect_file(source)["layers"]:
        up, down = inputs[layer["name"]]
        dense = torch.linalg.svdvals(torch.linalg.qr(up).R @ down)
        dense = dense[dense > 1e-5 * dense[0]]
        reported = torch.tensor(layer["singular_values"], dtype=torch.float64)
        assert torch.allclose(reported[: len(dense)], dense, rtol=1e-4), layer["name"]


def _batch(pairs: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> linalg.Factors:
    """Factors as ``resize`` builds them for 16-bit storage: the stored values in float32."""
    downs = torch.stack([down.to(dtype).float() for down, _ in pairs])
    ups = torch.stack([up.to(dtype).float() for _, up in pairs])
    return linalg.Factors.of(downs, ups, 1.0)


def test_float32_suffices_flags_the_nearly_low_rank_reductions(dtype):
    generator = torch.Generator().manual_seed(0)
    pairs = [nearly_low_rank(640, 640, (-3.0, -5.0), split, generator) for split in ("up", "balanced")]
    factors = _batch([*pairs, lora_pair(640, 640, RANK, generator)], dtype)
    thin = linalg.FactorSVD.of(factors)
    assert linalg.float32_suffices(factors, thin, 4).tolist() == [False, False, True]
    # keeping 2, the optimum leaves 30 % (the third strong direction): the balanced layer's noise is absorbed, but
    # the up-split layer's up has 13 directions below float32's GRAM_RTOL, whose hidden energy could still count
    assert linalg.float32_suffices(factors, thin, 2).tolist() == [False, True, True]
    assert linalg.float32_suffices(factors, thin, 0).all()  # kept as they are


def test_float32_suffices_on_the_synthetic_flux_law(dtype):
    """The benchmark's FLUX law (rank 42, tail at 0.5 % of the top) keeps float32 at every benchmarked rank; its
    full spectrum (inspect) reaches below the resolution, so inspect solves it in float64."""
    generator = torch.Generator().manual_seed(0)
    for out_features, in_features in sorted(set(flux_shapes(num_double=1, num_single=1).values())):
        factors = _batch([lora_pair(out_features, in_features, 42, generator)], dtype)
        thin = linalg.FactorSVD.of(factors)
        for rank in (4, 16, 32):
            assert linalg.float32_suffices(factors, thin, rank).all(), (out_features, in_features, rank)
        assert not linalg.float32_suffices(factors, thin, 42).any()


def test_float32_suffices_for_a_zero_delta():
    factors = linalg.Factors.of(torch.zeros(1, 4, 30), torch.zeros(1, 20, 4), 1.0)
    assert linalg.float32_suffices(factors, linalg.FactorSVD.of(factors), 2).all()
