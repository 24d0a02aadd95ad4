"""Rank changes of a LoRA delta ``D = scale * up @ down``, computed from the factors alone.

Shapes: ``down`` (A) is ``[r, n]``, ``up`` (B) is ``[m, r]``; the dense ``[m, n]`` delta is never formed.
Every function returns new factors ``(down' [k, n], up' [m, k])`` with the scale folded in, so that
``up' @ down'`` approximates (or, for :func:`extend`, equals) ``D``. Use float64 inputs.

How the factors share the singular values is a fixed choice: the SVD-based methods put ``sqrt(S)`` on
both sides (balanced factors, the same magnitude in A and B, which suits further fine-tuning and
low-precision storage); the projections and the extension keep A's row scale and fold ``scale`` into B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Gram eigenvalues below this share of the largest are numerical zeros (singular values below 1e-6 of the largest).
GRAM_RTOL = 1e-12


@dataclass(frozen=True)
class FactorSVD:
    """Thin SVD of ``D = scale * up @ down`` kept relative to the factors.

    ``D = (up @ left) @ diag(s) @ (right @ down)`` where ``up @ left`` ``[m, q]`` has orthonormal columns,
    ``right @ down`` ``[q, n]`` has orthonormal rows, ``s [q]`` is descending and ``q <= r`` is the
    numerical rank (0 for an all-zero delta). ``left`` is ``[r, q]`` and ``right`` is ``[q, r]``: every
    result is a small ``[r, k]`` transform of the input factors, so nothing ``[m, n]`` is ever formed.
    """

    s: Tensor
    left: Tensor
    right: Tensor

    @property
    def norm(self) -> float:
        """Frobenius norm of ``D``."""
        return torch.linalg.vector_norm(self.s).item()

    def balanced_factors(self, down: Tensor, up: Tensor, rank: int) -> tuple[Tensor, Tensor]:
        """Best factors of rank ``min(rank, q)`` (Eckart-Young), ``sqrt(s)`` on each side: ``(down' [k, n], up' [m, k])``."""
        root = self.s[:rank].sqrt()
        return (root[:, None] * self.right[:rank]) @ down, up @ (self.left[:, :rank] * root)


def _gram_basis(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvectors ``[r, q]`` and square roots of eigenvalues ``[q]`` of a PSD Gram matrix, numerical zeros dropped."""
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    keep = eigenvalues > GRAM_RTOL * eigenvalues[-1:].clamp(min=0)  # eigh sorts ascending; [-1:] is empty for r = 0
    return eigenvectors[:, keep], eigenvalues[keep].sqrt()


def factor_svd(down: Tensor, up: Tensor, scale: float) -> FactorSVD:
    """Exact thin SVD of ``scale * up @ down`` from the ``[r, r]`` Gram matrices of the factors.

    With ``down down^T = Va diag(a^2) Va^T`` and ``up^T up = Vb diag(b^2) Vb^T``, ``D = Qb C Qa^T`` where
    ``Qb = up Vb / b`` and ``Qa^T = (Va / a)^T down`` are orthonormal and ``C = scale diag(b) Vb^T Va diag(a)``
    is at most ``[r, r]``; the SVD of ``C`` gives ``D``'s. Cost: two ``[*, r]`` Gram products and ``r x r``
    eigen/singular value problems (BLAS-3 throughout, unlike a QR of each tall factor).
    """
    vb, b = _gram_basis(up.T @ up)
    va, a = _gram_basis(down @ down.T)
    u, s, wh = torch.linalg.svd(scale * (b[:, None] * (vb.T @ va) * a), full_matrices=False)
    return FactorSVD(s=s, left=vb @ (u / b[:, None]), right=(wh / a) @ va.T)


def svd(down: Tensor, up: Tensor, scale: float, rank: int) -> tuple[Tensor, Tensor]:
    """Optimal rank-``rank`` factors of ``D`` (exact truncated SVD)."""
    return factor_svd(down, up, scale).balanced_factors(down, up, rank)


def randomized_svd(
    down: Tensor, up: Tensor, scale: float, rank: int, *, niter: int, oversample: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors from a randomized range finder (Halko et al. 2011) with ``niter`` power iterations.

    The sketch ``Q [m, rank + oversample]`` spans an approximation of ``D``'s range; the exact SVD of
    ``Q^T D`` (again from factors) is then truncated. With a sketch at least as wide as ``r`` it is exact.
    """
    width = min(rank + oversample, up.shape[0], down.shape[1])
    omega = torch.randn(down.shape[1], width, generator=generator, dtype=torch.float64).to(down)
    q, _ = torch.linalg.qr(up @ (down @ omega))
    for _ in range(niter):
        z, _ = torch.linalg.qr(down.T @ (up.T @ q))
        q, _ = torch.linalg.qr(up @ (down @ z))
    projected_up = q.T @ up
    new_down, projected_new_up = svd(down, projected_up, scale, rank)
    return new_down, q @ projected_new_up


def random_projection(
    down: Tensor, up: Tensor, scale: float, rank: int, *, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Gaussian projection of the rank space: ``down' = R down``, ``up' = scale up R^T``, ``R [k, r] ~ N(0, 1/k)``.

    ``E[R^T R] = I``, so the delta is kept in expectation only; the error is measured, not bounded.
    """
    projection = torch.randn(rank, down.shape[0], generator=generator, dtype=torch.float64).to(down)
    projection /= math.sqrt(rank)
    return projection @ down, scale * (up @ projection.T)


def sparse_random_projection(
    down: Tensor, up: Tensor, scale: float, rank: int, *, density: float | None, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Sparse projection (Li, Hastie & Church 2006): ``R [k, r]`` entries ``±1/sqrt(density k)`` with
    probability ``density / 2`` each, else 0, so ``E[R^T R] = I``. ``density`` defaults to ``1/sqrt(r)``."""
    density = density if density is not None else 1 / math.sqrt(down.shape[0])
    shape = (rank, down.shape[0])
    keep = torch.rand(shape, generator=generator, dtype=torch.float64) < density
    sign = torch.where(torch.rand(shape, generator=generator, dtype=torch.float64) < 0.5, -1.0, 1.0)
    projection = (keep * sign / math.sqrt(density * rank)).to(down)
    return projection @ down, scale * (up @ projection.T)


def _orthonormal_columns(x: Tensor) -> Tensor:
    """Orthonormal columns spanning a well-conditioned ``[n, e]`` matrix (Cholesky QR, done twice for accuracy)."""
    for _ in range(2):
        lower = torch.linalg.cholesky(x.T @ x)
        x = torch.linalg.solve_triangular(lower.T, x, upper=True, left=False)
    return x


def extend(down: Tensor, up: Tensor, scale: float, rank: int, *, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Exact rank increase: ``down' = [down; E]``, ``up' = [scale up, 0]``, so ``up' @ down' = D``.

    The new rows ``E`` are orthonormal and orthogonal to ``down``'s row space where ``n`` allows
    (``n - rank(down)`` such rows exist); any rows beyond that are zero. Fine-tuning can continue from
    the result: the new directions are live in A and start with zero weight in B.
    """
    r, n = down.shape
    extra = rank - r
    eigenvectors, roots = _gram_basis(down @ down.T)
    basis = down.T @ (eigenvectors / roots)
    fresh = min(extra, n - basis.shape[1])
    rows = torch.zeros(extra, n, dtype=down.dtype, device=down.device)
    if fresh > 0:
        noise = torch.randn(n, fresh, generator=generator, dtype=torch.float64).to(down)
        for _ in range(2):
            noise -= basis @ (basis.T @ noise)
        rows[:fresh] = _orthonormal_columns(noise).T
    new_up = up if scale == 1.0 else scale * up
    return torch.cat([down, rows]), torch.cat([new_up, torch.zeros(up.shape[0], extra).to(up)], dim=1)


def _trace_product(x: Tensor, y: Tensor) -> float:
    """``trace(x @ y)`` for square ``x``, ``y`` of the same size, without the product."""
    return (x * y.T).sum().item()


def relative_error(
    down: Tensor, up: Tensor, scale: float, new_down: Tensor, new_up: Tensor, norm: float | None = None
) -> float:
    """``||scale up down - new_up new_down||_F / ||scale up down||_F``, exactly, from ``[r, k]`` Gram matrices.

    ``||D - D'||^2 = ||D||^2 - 2 <D, D'> + ||D'||^2`` with ``<D, D'> = scale trace((up^T new_up)(new_down down^T))``.
    Computed in float64, errors below about 1e-8 are round-off. ``norm``: ``||D||_F`` when already known.
    A zero delta has error 0.
    """
    total = scale**2 * _trace_product(up.T @ up, down @ down.T) if norm is None else norm**2
    if total == 0:
        return 0.0
    cross = scale * _trace_product(up.T @ new_up, new_down @ down.T)
    new = _trace_product(new_up.T @ new_up, new_down @ new_down.T)
    return math.sqrt(max(total - 2 * cross + new, 0.0) / total)
