"""The rank-changing math against dense references (the [m, n] delta is formed here, never in lora_ops)."""

import math

import pytest
import torch

from lora_ops import linalg

# (m, n, r): square, wide, tall, and ranks above min(m, n)
SHAPES = [(64, 48, 8), (12, 200, 10), (300, 20, 16), (5, 40, 8), (40, 3, 6)]


def _factors(m, n, r, seed=0):
    generator = torch.Generator().manual_seed(seed)
    decay = torch.tensor([0.8**i for i in range(r)], dtype=torch.float64)
    down = torch.randn(r, n, generator=generator, dtype=torch.float64) * decay[:, None]
    return down, torch.randn(m, r, generator=generator, dtype=torch.float64)


def _optimum(delta, rank):
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def _rel(x, y):
    return ((x - y).norm() / y.norm()).item()


@pytest.mark.parametrize(("m", "n", "r"), SHAPES)
def test_factor_svd_matches_dense_svd(m, n, r):
    down, up = _factors(m, n, r)
    result = linalg.factor_svd(down, up, 0.75)
    dense = torch.linalg.svdvals(0.75 * up @ down)[: min(m, n, r)]
    assert torch.allclose(result.s, dense, rtol=1e-9, atol=1e-12 * dense[0])
    assert result.norm == pytest.approx((0.75 * up @ down).norm().item(), rel=1e-12)


@pytest.mark.parametrize(("m", "n", "r"), SHAPES)
@pytest.mark.parametrize("rank", [1, 3])
def test_svd_is_the_dense_optimum(m, n, r, rank):
    down, up = _factors(m, n, r)
    new_down, new_up = linalg.svd(down, up, 1.5, rank)
    optimum = _optimum(1.5 * up @ down, rank)
    assert new_down.shape == (rank, n) and new_up.shape == (m, rank)
    assert _rel(new_up @ new_down, optimum) < 1e-10


def test_svd_factors_are_balanced():
    down, up = _factors(64, 48, 8)
    new_down, new_up = linalg.svd(down, up, 1.0, 4)
    assert torch.allclose(new_down.norm(dim=1), new_up.norm(dim=0), rtol=1e-9)


@pytest.mark.parametrize(("m", "n", "r"), SHAPES)
def test_relative_error_matches_dense(m, n, r):
    down, up = _factors(m, n, r)
    generator = torch.Generator().manual_seed(1)
    new_down, new_up = linalg.random_projection(down, up, 2.0, 3, generator=generator)
    dense = _rel(new_up @ new_down, 2.0 * up @ down)
    assert linalg.relative_error(down, up, 2.0, new_down, new_up) == pytest.approx(dense, rel=1e-6)


def test_relative_error_of_zero_delta_is_zero():
    down, up = torch.zeros(3, 10, dtype=torch.float64), torch.zeros(7, 3, dtype=torch.float64)
    assert linalg.relative_error(down, up, 1.0, down[:1], up[:, :1]) == 0.0


def test_randomized_svd_with_power_iterations_reaches_the_optimum():
    down, up = _factors(400, 300, 64)
    optimum_error = _rel(_optimum(up @ down, 8), up @ down)
    errors = []
    for niter in (0, 4):
        new_down, new_up = linalg.randomized_svd(
            down, up, 1.0, 8, niter=niter, oversample=4, generator=torch.Generator().manual_seed(0)
        )
        errors.append(linalg.relative_error(down, up, 1.0, new_down, new_up))
    assert errors[0] > optimum_error * (1 + 1e-6)
    assert errors[1] == pytest.approx(optimum_error, rel=1e-3)


def test_randomized_svd_is_seeded():
    down, up = _factors(100, 80, 16)
    runs = [
        linalg.randomized_svd(down, up, 1.0, 4, niter=1, oversample=2, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_random_projection_is_gaussian_with_variance_one_over_rank():
    """R = down' @ pinv(down): entries ~ N(0, 1/k)."""
    down, up = _factors(50, 600, 40)
    new_down, new_up = linalg.random_projection(down, up, 1.0, 20, generator=torch.Generator().manual_seed(3))
    projection = new_down @ torch.linalg.pinv(down)
    assert projection.shape == (20, 40)
    assert projection.var().item() == pytest.approx(1 / 20, rel=0.15)
    assert torch.allclose(new_up, up @ projection.T, atol=1e-8)


def test_sparse_random_projection_density():
    down, up = _factors(50, 600, 40)
    new_down, _ = linalg.sparse_random_projection(
        down, up, 1.0, 20, density=0.25, generator=torch.Generator().manual_seed(3)
    )
    projection = new_down @ torch.linalg.pinv(down)
    nonzero = projection.abs() > 1e-9
    assert nonzero.double().mean().item() == pytest.approx(0.25, abs=0.06)
    assert torch.allclose(projection[nonzero].abs(), torch.full_like(projection[nonzero], 1 / math.sqrt(0.25 * 20)))


@pytest.mark.parametrize(("m", "n", "r"), SHAPES)
def test_extend_keeps_the_delta_and_adds_orthonormal_rows(m, n, r):
    down, up = _factors(m, n, r)
    rank = r + 5
    new_down, new_up = linalg.extend(down, up, 0.5, rank, generator=torch.Generator().manual_seed(0))
    assert new_down.shape == (rank, n) and new_up.shape == (m, rank)
    assert _rel(new_up @ new_down, 0.5 * up @ down) < 1e-12
    assert torch.equal(new_down[:r], down) and not new_up[:, r:].any()
    fresh = new_down[r:][new_down[r:].norm(dim=1) > 0]
    assert fresh.shape[0] == min(5, n - min(n, r))
    assert torch.allclose(fresh @ fresh.T, torch.eye(fresh.shape[0], dtype=torch.float64), atol=1e-10)
    assert (fresh @ down.T).abs().sum().item() < 1e-8


def test_zero_delta_has_an_empty_spectrum_and_extends():
    down, up = torch.randn(4, 30, dtype=torch.float64), torch.zeros(9, 4, dtype=torch.float64)
    assert linalg.factor_svd(down, up, 1.0).s.numel() == 0
    new_down, new_up = linalg.extend(down, up, 1.0, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(new_down[:4], down) and not new_up.any()
