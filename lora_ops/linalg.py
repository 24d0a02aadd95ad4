"""Rank changes of LoRA deltas ``D = scale * up @ down``, computed from the factors alone, many layers at once.

Shapes: ``down`` (A) is ``[..., r, n]``, ``up`` (B) is ``[..., m, r]``, ``scale`` is ``[...]``: the leading
dimensions hold a batch of layers of one shape, so that one call does the work of many (the per-call
overhead of small matrix problems dominates otherwise). The dense ``[m, n]`` delta is never formed.

The only work on the tall factors is a few matrix products: the ``[r, r]`` Gram matrices, made once by
:meth:`Factors.of`, then the new factors and the error terms. Every method (:func:`svd`,
:func:`randomized_svd`, :func:`random_projection`, :func:`sparse_random_projection`) is solved on the
Gram matrices in float64 and returns a :class:`RankMap`: ``down' = down_map @ down``, ``up' = up @ up_map``,
with the scale folded in.

Precision: the products on the tall factors run in the factors' dtype, float32 for 16-bit storage (whose
values float32 holds exactly) and float64 otherwise; everything ``[r, r]`` runs in float64. A float32 Gram
matrix is exact to about 1e-7 of its largest entry, so directions of a factor below ``sqrt(GRAM_RTOL)`` of its
largest singular value are numerical zeros there (3e-3 for float32, 1e-6 for float64). That is enough unless a
reduction keeps, or hides, directions near that floor (nearly low-rank layers): :func:`float32_suffices` finds
those deltas from the float32 result, and the caller solves them again from float64 factors.

How the factors share the singular values is a fixed choice: the SVD-based methods put ``sqrt(S)`` on
both sides (balanced factors, the same magnitude in A and B, which suits further fine-tuning and
low-precision storage); the projections keep A's row scale and fold ``scale`` into B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

# Products of a tall factor with fewer columns than this run transposed (see _tall_times_narrow).
TRANSPOSED_BELOW = 12
# Gram eigenvalues below this share of the largest are numerical zeros, by the dtype of the tall products.
GRAM_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}

# When a float32 solution (16-bit factors) is as good as a float64 one; see float32_suffices for the arithmetic.
# Error of a float32 Gram matrix of 16-bit factors, as a share of its largest eigenvalue: measured 0.6e-7 to
# 1.5e-7 (spectral norm) for n = 320 .. 18432, about sqrt(n) float32 roundings of 6e-8; taken 10x larger.
FLOAT32_GRAM_ERROR = 1e-6
# A reduction whose smallest kept eigenvalue of ``K K^T`` (``s_k^2``) is at least this share of the largest is
# resolved in float32: 100x FLOAT32_GRAM_ERROR, so every kept ``s^2`` carries at most 1% error, and 10x above the
# float32 GRAM_RTOL, below which float32 drops directions altogether.
RESOLVED = 1e-4
# Below RESOLVED, the optimum's own relative error ``e_opt`` (from the float32 spectrum) absorbs the float32 noise
# when it is at least this large. A Gram error of FLOAT32_GRAM_ERROR s_1^2 mixes a kept direction i with a
# dropped one j by about FLOAT32_GRAM_ERROR s_1^2 / (s_i^2 - s_j^2), which costs that squared times the gap in
# squared error; the error itself moves by that over 2 e_opt. With kept s_k^2 >= GRAM_RTOL s_1^2 = 1e-5 s_1^2
# (float32 keeps it at all) and a gap of that order, that is 16 x 1e-12 / 1e-5 / (2 x 1e-2) = 8e-5 at most for
# r - k = 16 dropped directions. Measured on 73 synthetic layers with s_k^2 at 1e-5 to 1e-4 of s_1^2 and e_opt
# 3e-3 to 6e-3 (float32 against float64 products): at most 1.1e-8, so the bound is conservative.
ABSORBED = 1e-2
# How much worse than float64 (absolute, in relative-error units) a float32 result may be: 10x below the 1e-4
# the tests ask for.
FLOAT32_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Factors:
    """A batch of deltas ``D = scale * up @ down`` with the Gram matrices of their factors.

    ``down [..., r, n]`` and ``up [..., m, r]`` share one floating dtype; ``scale [...]``, ``gram_down =
    down @ down^T`` and ``gram_up = up^T @ up`` (``[..., r, r]``) are float64.
    """

    down: Tensor
    up: Tensor
    scale: Tensor
    gram_down: Tensor
    gram_up: Tensor

    @classmethod
    def of(cls, down: Tensor, up: Tensor, scale: Tensor | float) -> Factors:
        """Wrap ``down [..., r, n]``, ``up [..., m, r]`` and ``scale`` (``[...]`` or one number) with their Grams."""
        scale = torch.as_tensor(scale, dtype=torch.float64, device=down.device).expand(down.shape[:-2])
        return cls(down, up, scale, (down @ down.mT).double(), (up.mT @ up).double())

    @property
    def rank(self) -> int:
        """``r``, the rank of the factors."""
        return self.down.shape[-2]

    @property
    def rtol(self) -> float:
        return GRAM_RTOL[self.down.dtype]

    def select(self, index: list[int]) -> Factors:
        """The deltas at ``index`` of a batch with one leading dimension."""
        return _select(self, index)

    def finite(self) -> Tensor:
        """``[...]`` bool: both Gram diagonals (sums of squares of B's columns and A's rows) are finite, which
        they are exactly when the factors are, unless a float32 product overflowed (values above ~1e19)."""
        traces = self.gram_down.diagonal(dim1=-2, dim2=-1).sum(-1) + self.gram_up.diagonal(dim1=-2, dim2=-1).sum(-1)
        return traces.isfinite()


def _select(batch, index: list[int]):
    """A copy of a dataclass of batched tensors (one leading dimension; a field may be None) holding only the items
    at ``index``."""
    values = {field.name: getattr(batch, field.name) for field in fields(batch)}
    return type(batch)(**{name: None if value is None else value[index] for name, value in values.items()})


def _scaled(scale: Tensor) -> Tensor:
    """``scale [...]`` as ``[..., 1, 1]``, to multiply matrices."""
    return scale[..., None, None]


@dataclass(frozen=True)
class RankMap:
    """New factors as transforms of the old: ``down' = down_map @ down`` ``[..., k, n]``, ``up' = up @ up_map``.

    ``down_map [..., k, r]`` and ``up_map [..., r, k]`` are float64. ``kept``: the factors stay as they are
    (the maps are the identity and ``scale`` times it), so they are passed through rather than multiplied.
    """

    down_map: Tensor
    up_map: Tensor
    kept: bool = False

    @classmethod
    def keep(cls, factors: Factors) -> RankMap:
        """The same factors, the scale folded into ``up``."""
        eye = torch.eye(factors.rank, dtype=torch.float64, device=factors.scale.device)
        return cls(eye.expand(*factors.scale.shape, -1, -1), _scaled(factors.scale) * eye, kept=True)

    @property
    def rank(self) -> int:
        """``k``, the rank of the new factors."""
        return self.down_map.shape[-2]

    def apply(self, factors: Factors) -> tuple[Tensor, Tensor]:
        """``(down' [..., k, n], up' [..., m, k])`` in the factors' dtype (kept factors are returned as they are)."""
        dtype = factors.down.dtype
        if self.kept:
            unscaled = bool((factors.scale == 1).all())
            return factors.down, factors.up if unscaled else _scaled(factors.scale).to(dtype) * factors.up
        return self.down_map.to(dtype) @ factors.down, _tall_times_narrow(factors.up, self.up_map.to(dtype))


def _tall_times_narrow(tall: Tensor, narrow: Tensor) -> Tensor:
    """``tall @ narrow`` ``[..., m, k]`` (contiguous) for ``tall [..., m, r]`` and ``narrow [..., r, k]``.

    Below :data:`TRANSPOSED_BELOW` columns it is computed as ``(narrow^T tall^T)^T``, which torch's CPU matrix
    product (MKL) runs 1.5x to 3.5x faster there and 3x slower from 16 columns on (batches of ``[3072, 42]`` and
    ``[12288, 84]`` float32 factors, one thread, ``benchmarks`` machine)."""
    if narrow.shape[-1] < TRANSPOSED_BELOW:
        return (narrow.mT @ tall.mT).mT.contiguous()
    return tall @ narrow


def _tall_transposed_times_narrow(tall: Tensor, narrow: Tensor) -> Tensor:
    """``tall^T @ narrow`` ``[..., r, k]`` for ``tall [..., m, r]`` and ``narrow [..., m, k]``, computed as
    ``(narrow^T tall)^T``: as fast or faster for every ``k`` measured (4 to 32), 4x at ``k = 4``."""
    return (narrow.mT @ tall).mT


def _eigh_descending(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues ``[..., r]`` and eigenvectors ``[..., r, r]`` of symmetric matrices, largest eigenvalue first."""
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    return eigenvalues.flip(-1), eigenvectors.flip(-1)


def _roots(eigenvalues: Tensor, rtol: float) -> tuple[Tensor, Tensor]:
    """Square roots of descending PSD eigenvalues ``[..., r]`` and their inverses; both are 0 for numerical zeros
    (below ``rtol`` of the largest)."""
    keep = eigenvalues > rtol * eigenvalues[..., :1].clamp(min=0)
    keep &= eigenvalues[..., :1] > 0
    roots = eigenvalues.clamp(min=0).sqrt() * keep
    return roots, torch.where(keep, roots.reciprocal(), 0.0)


def _certified_cholesky(gram: Tensor, rtol: float) -> Tensor | None:
    """Lower Cholesky factors ``L`` (``gram = L L^T``) of a batch of PSD matrices ``[..., r, r]`` whose every
    eigenvalue is certified above ``rtol`` of the largest, so that :func:`_roots` would drop none: ``gram - rtol *
    trace(gram) * I`` has a Cholesky factorization too (``trace >= largest``). None unless every matrix passes.

    A Cholesky factorization and a triangular inverse cost about a tenth of an ``eigh`` of the same matrix."""
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    _, margin = torch.linalg.cholesky_ex(gram - _scaled(rtol * trace) * eye)
    if bool(margin.any()):
        return None
    lower, info = torch.linalg.cholesky_ex(gram)
    return None if bool(info.any()) else lower


def _basis(gram: Tensor, rtol: float) -> tuple[Tensor, Tensor, Tensor]:
    """Eigenvectors ``[..., r, r]`` of PSD matrices, largest eigenvalue first, with the square roots of the
    eigenvalues and their inverses ``[..., r]`` (:func:`_roots`)."""
    eigenvalues, eigenvectors = _eigh_descending(gram)
    return eigenvectors, *_roots(eigenvalues, rtol)


@dataclass(frozen=True)
class FactorSVD:
    """Thin SVDs of a batch of deltas, kept relative to the factors.

    ``D = (up @ left) @ diag(s) @ (right @ down)`` where ``s [..., r]`` is descending and zero beyond the
    numerical rank ``q`` (0 for an all-zero delta); the first ``q`` columns of ``up @ left`` are orthonormal,
    as are the first ``q`` rows of ``right @ down``, and the rest are zero. ``left`` and ``right`` are
    ``[..., r, r]`` float64. ``up_eigenvalues [..., r]`` (descending) and ``up_vectors [..., r, r]`` are the
    eigendecomposition of ``up^T up`` they were solved from (:func:`float32_suffices` reads the dropped ones), or
    None where ``up^T up`` was certified well conditioned (:func:`_certified_cholesky`: no direction dropped).
    """

    s: Tensor
    left: Tensor
    right: Tensor
    up_eigenvalues: Tensor | None
    up_vectors: Tensor | None

    @classmethod
    def of(cls, factors: Factors) -> FactorSVD:
        """From the Gram matrices: with ``up^T up = C C^T``, ``D = (up C^-T) K`` where the first factor is
        orthonormal and ``K = scale C^T down``; the eigenvectors ``U`` and eigenvalues ``s^2`` of ``K K^T = scale^2
        C^T gram_down C`` give ``left = C^-T U``, ``right = U^T K / s``. ``C`` is the Cholesky factor where every
        matrix of the batch is certified well conditioned (:func:`_certified_cholesky`), else ``Vb diag(b)`` from
        the eigendecomposition ``up^T up = Vb diag(b^2) Vb^T``, with ``C^-T = Vb diag(1 / b)`` and the directions
        of numerically zero ``b`` dropped. Both give the same SVD; the Cholesky factor is cheaper."""
        lower = _certified_cholesky(factors.gram_up, factors.rtol)
        if lower is None:
            eigenvalues, vb = _eigh_descending(factors.gram_up)
            b, b_inverse = _roots(eigenvalues, factors.rtol)
            root, inverse = b[..., :, None] * vb.mT, vb * b_inverse[..., None, :]  # C^T and C^-T
        else:
            eigenvalues = vb = None
            eye = torch.eye(factors.rank, dtype=torch.float64, device=lower.device)
            root, inverse = lower.mT, torch.linalg.solve_triangular(lower.mT, eye, upper=True)
        core = _scaled(factors.scale) * root
        u, s, s_inverse = _basis(core @ factors.gram_down @ core.mT, factors.rtol)
        return cls(
            s=s,
            left=inverse @ u,
            right=(u.mT * s_inverse[..., :, None]) @ core,
            up_eigenvalues=eigenvalues,
            up_vectors=vb,
        )

    @property
    def norm(self) -> Tensor:
        """``[...]``: Frobenius norms of the deltas."""
        return torch.linalg.vector_norm(self.s, dim=-1)

    @property
    def ranks(self) -> Tensor:
        """``[...]``: numerical ranks ``q``."""
        return (self.s > 0).sum(-1)

    def select(self, index: list[int]) -> FactorSVD:
        """The SVDs at ``index`` of a batch with one leading dimension."""
        return _select(self, index)


def float32_suffices(factors: Factors, thin: FactorSVD, kept: int) -> Tensor:
    """``[...]`` bool: the leading ``kept`` directions of ``thin`` (computed from ``factors`` with float32 tall
    products), and the error of keeping only them, are within ``FLOAT32_TOLERANCE`` of what float64 products give.

    Two ways float32 loses, both read from the float32 result itself. (1) ``s_k^2``, ``k = min(kept, r)``, is
    below ``RESOLVED`` of ``s_1^2`` (or zero: float32 found fewer than ``k`` directions) while the optimum's error
    ``e_opt = sqrt(sum_{j>k} s_j^2) / ||D||`` is below ``ABSORBED``: the kept directions are then as uncertain as
    the error they leave. (2) Eigenvalues ``b_i^2`` of ``up^T up`` below ``GRAM_RTOL`` of the largest were dropped
    as numerical zeros; with ``D = scale sum_i (up v_i)(v_i^T down)``, a sum of orthogonal terms, they hid at most
    ``h = scale^2 sum_i (b_i^2 + FLOAT32_GRAM_ERROR b_1^2) v_i^T gram_down v_i`` of ``||D||^2``, which can raise
    the error to ``sqrt(e_opt^2 + h / ||D||^2)``: the rise must stay below ``FLOAT32_TOLERANCE``.
    ``kept = 0`` (nothing is dropped: the factors are kept as they are) and all-zero deltas always suffice."""
    squares = thin.s.square()
    everything = torch.ones(squares.shape[:-1], dtype=torch.bool, device=squares.device)
    if kept == 0:
        return everything
    kept = min(kept, factors.rank)
    resolved = squares[..., kept - 1] >= RESOLVED * squares[..., 0]
    # a dropped direction of up leaves a zero in s; without one, and with the kept directions resolved, done
    full = squares[..., -1] > 0
    if bool((resolved & full).all()):
        return everything
    hidden = torch.zeros_like(squares[..., 0])
    if not bool(full.all()) and thin.up_eigenvalues is not None:
        eigenvalues, eigenvectors = thin.up_eigenvalues, thin.up_vectors
        largest = eigenvalues[..., :1].clamp(min=0)
        dropped = eigenvalues <= GRAM_RTOL[torch.float32] * largest
        weights = (eigenvectors * (factors.gram_down @ eigenvectors)).sum(-2)  # v_i^T gram_down v_i
        bounds = (eigenvalues.clamp(min=0) + FLOAT32_GRAM_ERROR * largest) * weights.clamp(min=0)
        hidden = factors.scale.square() * (bounds * dropped).sum(-1)
    energy = squares.sum(-1) + hidden
    optimum = torch.where(energy > 0, squares[..., kept:].sum(-1) / energy, 0.0).sqrt()
    resolved |= optimum >= ABSORBED
    growth = (optimum.square() + torch.where(energy > 0, hidden / energy, 0.0)).sqrt() - optimum
    return (squares[..., 0] == 0) | (resolved & (growth <= FLOAT32_TOLERANCE))


def svd(thin: FactorSVD, rank: int) -> RankMap:
    """Optimal factors of rank ``min(rank, r)`` (Eckart-Young), ``sqrt(s)`` on each side; directions beyond ``q``
    are zero rows and columns."""
    root = thin.s[..., :rank].sqrt()
    return RankMap(
        down_map=root[..., :, None] * thin.right[..., :rank, :], up_map=thin.left[..., :rank] * root[..., None, :]
    )


def _orthonormal(coefficients: Tensor, gram: Tensor, rtol: float) -> Tensor:
    """Coefficients ``[..., r, w]`` of an orthonormal basis of the span of ``X @ coefficients``, for any ``X``
    with Gram matrix ``gram = X^T X`` ``[..., r, r]`` (numerically dependent directions become zero columns)."""
    vectors, _, inverse = _basis(coefficients.mT @ gram @ coefficients, rtol)
    return coefficients @ (vectors * inverse[..., None, :])


def randomized_svd(
    factors: Factors, rank: int, *, niter: int, oversample: int, generators: list[torch.Generator]
) -> RankMap:
    """Rank-``rank`` factors from a randomized range finder (Halko et al. 2011) with ``niter`` power iterations.

    The sketch ``Q = up @ X`` ``[m, w]`` (``w = rank + oversample``) spans an approximation of ``D``'s range:
    ``Q = orth(D Omega)``, then ``niter`` times ``Q = orth(D orth(D^T Q))``, each step carried out on the
    coefficients ``X`` ``[r, w]`` through the Gram matrices; the exact SVD of ``Q^T D`` is then truncated.
    With a sketch at least as wide as ``r`` it is exact. One generator per delta draws its ``Omega``.
    """
    down, scale, rtol = factors.down, _scaled(factors.scale), factors.rtol
    width = min(rank + oversample, factors.up.shape[-2], down.shape[-1])
    omega = _draw(generators, lambda g: torch.randn(down.shape[-1], width, generator=g, dtype=torch.float64))
    sketch = _orthonormal(scale * (down @ omega.to(down)).double(), factors.gram_up, rtol)
    for _ in range(niter):
        back = _orthonormal(scale * factors.gram_up @ sketch, factors.gram_down, rtol)
        sketch = _orthonormal(scale * factors.gram_down @ back, factors.gram_up, rtol)
    projected = scale * sketch.mT @ factors.gram_up  # Q^T D = projected @ down, [..., w, r]
    u, s, s_inverse = _basis(projected @ factors.gram_down @ projected.mT, rtol)
    u = u[..., :rank]
    return RankMap(
        down_map=(u.mT * s_inverse[..., :rank, None].sqrt()) @ projected,
        up_map=sketch @ (u * s[..., None, :rank].sqrt()),
    )


def _draw(generators: list[torch.Generator], draw) -> Tensor:
    """One random tensor per delta, each from its own generator (CPU), stacked ``[..., *shape]``."""
    return torch.stack([draw(generator) for generator in generators])


def random_projection(factors: Factors, rank: int, *, generators: list[torch.Generator]) -> RankMap:
    """Gaussian projection of the rank space: ``down' = R down``, ``up' = scale up R^T``, ``R [k, r] ~ N(0, 1/k)``.

    ``E[R^T R] = I``, so the delta is kept in expectation only; the error is measured, not bounded.
    """
    shape = (rank, factors.rank)
    projection = _draw(generators, lambda g: torch.randn(shape, generator=g, dtype=torch.float64))
    return _projection(factors, projection / math.sqrt(rank))


def sparse_random_projection(
    factors: Factors, rank: int, *, density: float | None, generators: list[torch.Generator]
) -> RankMap:
    """Sparse projection (Li, Hastie & Church 2006): ``R [k, r]`` entries ``±1/sqrt(density k)`` with
    probability ``density / 2`` each, else 0, so ``E[R^T R] = I``. ``density`` defaults to ``1/sqrt(r)``."""
    density = density if density is not None else 1 / math.sqrt(factors.rank)
    shape = (rank, factors.rank)

    def draw(generator: torch.Generator) -> Tensor:
        keep = torch.rand(shape, generator=generator, dtype=torch.float64) < density
        sign = torch.where(torch.rand(shape, generator=generator, dtype=torch.float64) < 0.5, -1.0, 1.0)
        return keep * sign

    return _projection(factors, _draw(generators, draw) / math.sqrt(density * rank))


def _projection(factors: Factors, projection: Tensor) -> RankMap:
    projection = projection.to(factors.scale.device, torch.float64)
    return RankMap(down_map=projection, up_map=_scaled(factors.scale) * projection.mT)


def extension_rows(down: Tensor, count: int, *, generator: torch.Generator) -> Tensor:
    """``count`` rows ``[count, n]`` to append to one ``down [k, n]`` for an exact rank increase (with zero
    columns in up).

    They are orthonormal and orthogonal to ``down``'s row space where ``n`` allows (``n - rank(down)``
    such rows exist); any rows beyond that are zero. Fine-tuning can continue from the result: the new
    directions are live in A and start with zero weight in B.
    """
    n = down.shape[1]
    eigenvectors, _, inverse = _basis((down @ down.T).double(), GRAM_RTOL[down.dtype])
    basis = down.T @ (eigenvectors * inverse).to(down)
    fresh = min(count, n - int((inverse > 0).sum()))
    rows = torch.zeros(count, n, dtype=down.dtype, device=down.device)
    if fresh > 0:
        noise = torch.randn(n, fresh, generator=generator, dtype=torch.float64).to(down)
        for _ in range(2):
            noise -= basis @ (basis.T @ noise)
        rows[:fresh] = _orthonormal_columns(noise).T
    return rows


def _orthonormal_columns(x: Tensor) -> Tensor:
    """Orthonormal columns spanning a well-conditioned ``[n, e]`` matrix (Cholesky QR, done twice for accuracy)."""
    for _ in range(2):
        lower = torch.linalg.cholesky(x.T @ x)
        x = torch.linalg.solve_triangular(lower.T, x, upper=True, left=False)
    return x


def _trace_product(x: Tensor, y: Tensor) -> Tensor:
    """``trace(x @ y)`` ``[...]`` for ``x [..., a, b]`` and ``y [..., b, a]``, without the product."""
    return (x * y.mT).sum((-2, -1))


def relative_error(
    factors: Factors, rank_map: RankMap, new: tuple[Tensor, Tensor], written: tuple[Tensor, Tensor], norm: Tensor
) -> Tensor:
    """``[...]``: ``||D - up_w @ down_w||_F / ||D||_F`` for the factors as stored, ``written = (down_w, up_w)``.

    ``new = rank_map.apply(factors)`` are the factors before rounding, ``norm = ||D||_F`` ``[...]``. With
    ``P = up @ up_map`` and ``Q = down_map @ down``, ``D - P Q = up M down`` for ``M = scale I - up_map down_map``
    and, with the roundings ``e_u = up_w - P`` and ``e_d = down_w - Q``, ``E = up_w down_w - P Q = [e_u, P] @
    [down_w; e_d]``, so ``||D - up_w down_w||^2 = ||up M down||^2 - 2 <up M down, E> + ||E||^2``: three terms,
    each computed without subtracting large numbers, so a tiny error (an exact upsampling) is still resolved. The
    only products with the tall factors are ``up^T e_u``, ``e_d down^T``, ``e_u^T e_u`` and ``e_d e_d^T``; every
    product with ``P`` or ``Q`` comes from the Gram matrices. A zero delta has error 0; overflowed factors give inf
    or NaN.
    """
    (new_down, new_up), (written_down, written_up) = new, written
    up_map, down_map = rank_map.up_map, rank_map.down_map
    eye = torch.eye(factors.rank, dtype=torch.float64, device=norm.device)
    mixing = _scaled(factors.scale) * eye - up_map @ down_map
    error_up = torch.sub(written_up, new_up)  # e_u [..., m, k], in the factors' dtype, which holds written values
    error_down = torch.sub(written_down, new_down)  # e_d [..., k, n]
    up_error = _tall_transposed_times_narrow(factors.up, error_up).double()  # [..., r, k]
    error_down_down = (error_down @ factors.down.mT).double()  # [..., k, r]
    error_up_gram = (error_up.mT @ error_up).double()  # [..., k, k]
    error_down_gram = (error_down @ error_down.mT).double()
    # up^T [e_u, P] and [down_w; e_d] down^T
    up_left = torch.cat([up_error, factors.gram_up @ up_map], dim=-1)
    right_down = torch.cat([down_map @ factors.gram_down + error_down_down, error_down_down], dim=-2)
    residual = _trace_product(mixing.mT @ factors.gram_up @ mixing, factors.gram_down)
    cross = _trace_product(mixing.mT, up_left @ right_down)
    # ||E||^2 = trace([e_u, P]^T [e_u, P] @ [down_w; e_d] [down_w; e_d]^T), block by block
    new_error_down = down_map @ error_down_down.mT  # Q e_d^T
    written_error_down = new_error_down + error_down_gram  # down_w e_d^T
    written_down_gram = (
        down_map @ factors.gram_down @ down_map.mT + new_error_down + new_error_down.mT + error_down_gram
    )
    rounding = (
        _trace_product(error_up_gram, written_down_gram)
        + 2 * _trace_product(up_error.mT @ up_map, written_error_down.mT)  # e_u^T P against (down_w e_d^T)^T
        + _trace_product(up_map.mT @ factors.gram_up @ up_map, error_down_gram)  # P^T P against e_d e_d^T
    )
    squared = residual - 2 * cross + rounding
    return torch.where(norm > 0, squared.clamp(min=0).sqrt() / norm, 0.0)
