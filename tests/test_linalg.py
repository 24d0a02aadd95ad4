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
    return (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]


def _rel(x, y):
    return ((x - y).norm() / y.norm()).item()


def _generators(count, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(count)]


@pytest.mark.parametrize(("m", "n", "r"), SHAPES)
def test_factor_svd_matches_dense_svd(m, n, r):
    down, up = _factors(m, n, r)
    thin = linalg.FactorSVD.of(linalg.Factors.of(down, up, 0.75))
    dense = torch.linalg.svdvals(0.75 * up @ down)
    q = min(m, n, r)
    assert int(thin.ranks) == q
    assert torch.allclose(thin.s[:q], dense[:q], rtol=1e-9, atol=1e-12 * dense[0])
    assert not thin.s[q:].any()
    assert thin.norm.item() == pytest.approx((0.75 * up @ down).norm().item(), rel=1e-12)


def test_factor_svd_from_a_cholesky_factor_only_where_certified_and_the_same_as_from_eigh():
    down, up = _factors(64, 48, 8)
    nearly_dependent = up.clone()
    nearly_dependent[:, -1] = up[:, 0] * (1 + 1e-9)  # up^T up then has an eigenvalue ~1e-18 of its largest
    alone = linalg.FactorSVD.of(linalg.Factors.of(down, up, 0.75))
    with_dependent = linalg.FactorSVD.of(
        linalg.Factors.of(torch.stack([down, down]), torch.stack([up, nearly_dependent]), 0.75)
    )
    assert alone.up_eigenvalues is None  # certified: solved from the Cholesky factor of up^T up
    assert with_dependent.up_eigenvalues is not None  # one matrix is not: the batch is solved from eigh
    assert int(with_dependent.ranks[1]) == 7
    assert torch.allclose(alone.s, with_dependent.s[0], rtol=1e-12)
    for cholesky_basis, eigh_basis in (
        (up @ alone.left, up @ with_dependent.left[0]),
        ((alone.right @ down).T, (with_dependent.right[0] @ down).T),
    ):
        signs = (cholesky_basis * eigh_basis).sum(0).sign()
        assert torch.allclose(cholesky_basis, eigh_basis * signs, atol=1e-10)


@pytest.mark.parametrize(("m", "n", "r"), SHAPES)
@pytest.mark.parametrize("rank", [1, 3])
def test_svd_is_the_dense_optimum(m, n, r, rank):
    down, up = _factors(m, n, r)
    factors = linalg.Factors.of(down, up, 1.5)
    new_down, new_up = linalg.svd(linalg.FactorSVD.of(factors), rank).apply(factors)
    optimum = _optimum(1.5 * up @ down, rank)
    assert new_down.shape == (rank, n) and new_up.shape == (m, rank)
    assert _rel(new_up @ new_down, optimum) < 1e-10


def test_svd_factors_are_balanced():
    down, up = _factors(64, 48, 8)
    factors = linalg.Factors.of(down, up, 1.0)
    new_down, new_up = linalg.svd(linalg.FactorSVD.of(factors), 4).apply(factors)
    assert torch.allclose(new_down.norm(dim=1), new_up.norm(dim=0), rtol=1e-9)


def test_a_batch_gives_what_each_delta_gives_alone():
    """Three deltas of one shape with different scales, at once and one by one."""
    pairs = [_factors(30, 20, 6, seed) for seed in range(3)]
    scales = torch.tensor([0.5, 1.0, -2.0], dtype=torch.float64)
    batch = linalg.Factors.of(torch.stack([d for d, _ in pairs]), torch.stack([u for _, u in pairs]), scales)
    thin = linalg.FactorSVD.of(batch)
    new_down, new_up = linalg.svd(thin, 2).apply(batch)
    for index, (down, up) in enumerate(pairs):
        alone = linalg.Factors.of(down, up, scales[index].item())
        alone_down, alone_up = linalg.svd(linalg.FactorSVD.of(alone), 2).apply(alone)
        assert torch.allclose(thin.s[index], linalg.FactorSVD.of(alone).s, rtol=1e-12)
        assert torch.allclose(new_up[index] @ new_down[index], alone_up @ alone_down, atol=1e-12)


def test_select_keeps_the_chosen_deltas_of_a_batch():
    pairs = [_factors(30, 20, 6, seed) for seed in range(3)]
    scales = torch.tensor([0.5, 1.0, -2.0], dtype=torch.float64)
    batch = linalg.Factors.of(torch.stack([d for d, _ in pairs]), torch.stack([u for _, u in pairs]), scales)
    thin = linalg.FactorSVD.of(batch)
    chosen, chosen_thin = batch.select([2, 0]), thin.select([2, 0])
    assert torch.equal(chosen.down, batch.down[[2, 0]]) and torch.equal(chosen.scale, scales[[2, 0]])
    assert torch.equal(chosen.gram_up, batch.gram_up[[2, 0]]) and torch.equal(chosen_thin.s, thin.s[[2, 0]])
    new_down, new_up = linalg.svd(chosen_thin, 2).apply(chosen)
    alone_down, alone_up = linalg.svd(linalg.FactorSVD.of(batch.select([0])), 2).apply(batch.select([0]))
    assert torch.allclose(new_up[1] @ new_down[1], alone_up[0] @ alone_down[0], atol=1e-12)


@pytest.mark.parametrize(("m", "n", "r"), SHAPES)
def test_relative_error_matches_dense(m, n, r):
    down, up = _factors(m, n, r)
    factors = linalg.Factors.of(down, up, 2.0)
    rank_map = linalg.random_projection(factors, 3, generators=_generators(1))
    rank_map = linalg.RankMap(rank_map.down_map[0], rank_map.up_map[0])
    new = rank_map.apply(factors)
    dense = _rel(new[1] @ new[0], 2.0 * up @ down)
    norm = linalg.FactorSVD.of(factors).norm
    assert linalg.relative_error(factors, rank_map, new, new, norm).item() == pytest.approx(dense, rel=1e-9)


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
def test_relative_error_is_that_of_the_rounded_factors(stored):
    """Rounding to 16 bits moves the error by ~1e-3; the formula follows it exactly, even for an exact upsampling."""
    down, up = _factors(64, 48, 8)
    factors = linalg.Factors.of(down, up, 1.0)
    thin = linalg.FactorSVD.of(factors)
    for rank_map in (linalg.svd(thin, 3), linalg.RankMap.keep(factors)):
        new = rank_map.apply(factors)
        written = new[0].to(stored), new[1].to(stored)
        dense = _rel(written[1].double() @ written[0].double(), up @ down)
        assert linalg.relative_error(factors, rank_map, new, written, thin.norm).item() == pytest.approx(
            dense, abs=1e-9
        )


def test_relative_error_of_zero_delta_is_zero():
    down, up = torch.zeros(3, 10, dtype=torch.float64), torch.zeros(7, 3, dtype=torch.float64)
    factors = linalg.Factors.of(down, up, 1.0)
    thin = linalg.FactorSVD.of(factors)
    rank_map = linalg.svd(thin, 1)
    new = rank_map.apply(factors)
    assert linalg.relative_error(factors, rank_map, new, new, thin.norm).item() == 0.0


def test_randomized_svd_with_power_iterations_reaches_the_optimum():
    down, up = _factors(400, 300, 64)
    factors = linalg.Factors.of(down, up, 1.0)
    thin = linalg.FactorSVD.of(factors)
    optimum_error = _rel(_optimum(up @ down, 8), up @ down)
    errors = []
    for niter in (0, 4):
        rank_map = linalg.randomized_svd(factors, 8, niter=niter, oversample=4, generators=[torch.Generator()])
        new = rank_map.apply(factors)
        errors.append(linalg.relative_error(factors, rank_map, new, new, thin.norm).item())
        assert errors[-1] == pytest.approx(_rel(new[1] @ new[0], up @ down), rel=1e-9)
    assert errors[0] > optimum_error * (1 + 1e-6)
    assert errors[1] == pytest.approx(optimum_error, rel=1e-3)


def test_randomized_svd_is_seeded():
    down, up = _factors(100, 80, 16)
    factors = linalg.Factors.of(down, up, 1.0)
    runs = [
        linalg.randomized_svd(factors, 4, niter=1, oversample=2, generators=_generators(1, 7)).apply(factors)
        for _ in range(2)
    ]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_random_projection_is_gaussian_with_variance_one_over_rank():
    """R = down' @ pinv(down): entries ~ N(0, 1/k)."""
    down, up = _factors(50, 600, 40)
    factors = linalg.Factors.of(down, up, 1.0)
    new_down, new_up = linalg.random_projection(factors, 20, generators=_generators(1, 3)).apply(factors)
    projection = new_down @ torch.linalg.pinv(down)
    assert projection.shape == (1, 20, 40)
    assert projection.var().item() == pytest.approx(1 / 20, rel=0.15)
    assert torch.allclose(new_up, up @ projection.mT, atol=1e-8)


def test_sparse_random_projection_density():
    down, up = _factors(50, 600, 40)
    factors = linalg.Factors.of(down, up, 1.0)
    rank_map = linalg.sparse_random_projection(factors, 20, density=0.25, generators=_generators(1, 3))
    projection = rank_map.apply(factors)[0] @ torch.linalg.pinv(down)
    nonzero = projection.abs() > 1e-9
    assert nonzero.double().mean().item() == pytest.approx(0.25, abs=0.06)
    assert torch.allclose(projection[nonzero].abs(), torch.full_like(projection[nonzero], 1 / math.sqrt(0.25 * 20)))


def test_kept_factors_are_passed_through_with_the_scale_in_up():
    down, up = _factors(64, 48, 8)
    for scale in (1.0, 0.5):
        new_down, new_up = linalg.RankMap.keep(linalg.Factors.of(down, up, scale)).apply(
            linalg.Factors.of(down, up, scale)
        )
        assert new_down is down and torch.equal(new_up, scale * up)


@pytest.mark.parametrize(("m", "n", "r"), SHAPES)
def test_extension_rows_are_orthonormal_and_orthogonal_to_down(m, n, r):
    down, _ = _factors(m, n, r)
    rows = linalg.extension_rows(down, 5, generator=torch.Generator().manual_seed(0))
    assert rows.shape == (5, n)
    fresh = rows[rows.norm(dim=1) > 0]
    assert fresh.shape[0] == min(5, n - min(n, r))
    assert torch.allclose(fresh @ fresh.T, torch.eye(fresh.shape[0], dtype=torch.float64), atol=1e-10)
    assert (fresh @ down.T).abs().sum().item() < 1e-8


def test_zero_delta_has_an_empty_spectrum_and_extends():
    down, up = torch.randn(4, 30, dtype=torch.float64), torch.zeros(9, 4, dtype=torch.float64)
    assert int(linalg.FactorSVD.of(linalg.Factors.of(down, up, 1.0)).ranks) == 0
    rows = linalg.extension_rows(down[:0], 6, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(rows @ rows.T, torch.eye(6, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
def test_float32_products_of_16_bit_factors_keep_the_spectrum(stored):
    """The precision contract for 16-bit storage: spectra within 1e-4 relative of the float64 ones, and a
    factor of lower rank than its width still has that numerical rank (float32 round-off is not a direction)."""
    down, up = _factors(300, 200, 12)
    down, up = down.to(stored).double(), up.to(stored).double()  # exact 16-bit values: the true spectrum in float64
    up[:, -3:] = up[:, :3]  # up has rank 9
    exact = linalg.FactorSVD.of(linalg.Factors.of(down, up, 1.0))
    single = linalg.FactorSVD.of(linalg.Factors.of(down.float(), up.float(), 1.0))
    q = int(exact.ranks)
    assert int(single.ranks) == q
    assert torch.allclose(single.s[:q], exact.s[:q], rtol=1e-4)
