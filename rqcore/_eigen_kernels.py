"""Numba kernels for the bookkeeping of the iterative eigensolvers.

Only what BLAS does not do lives here: fused reductions over columns (norms, residual norms, absolute
column sums) that NumPy would compute through (d, k) temporaries, and the per-pair convergence tests.
Every product of a (d, ·) block with a matrix stays a GEMM/TRSM in the Python drivers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from rqcore._numba import njit

__all__ = [
    "asymmetry",
    "asymmetry_and_norm",
    "column_norms",
    "convergence_mask",
    "max_abs_column_sum",
    "pair_residual_norms",
    "residual_thresholds",
]


@njit(fastmath=False)
def _max_abs_column_sum(A: Any) -> float:
    # Row-major traversal of a C-ordered array: sum |a_ij| into a per-column accumulator.
    n, m = A.shape
    acc = np.zeros(m)
    for i in range(n):
        for j in range(m):
            acc[j] += abs(A[i, j])
    best = 0.0
    for j in range(m):
        if acc[j] > best:
            best = acc[j]
    return best


def max_abs_column_sum(A: NDArray[Any]) -> float:
    """``‖A‖₁`` of a dense symmetric matrix without the ``|A|`` temporary (one pass over memory)."""
    if A.size == 0:
        return 0.0
    if A.flags.f_contiguous and not A.flags.c_contiguous:
        A = A.T  # callers pass symmetric matrices: ‖Aᵀ‖₁ = ‖A‖₁, and Aᵀ reads memory in order
    return float(_max_abs_column_sum(np.ascontiguousarray(A)))


@njit(fastmath=False)
def _column_norms(X: Any) -> Any:
    n, m = X.shape
    out = np.zeros(m)
    for i in range(n):
        for j in range(m):
            out[j] += float(X[i, j]) * float(X[i, j])
    return np.sqrt(out)


def column_norms(X: NDArray[Any]) -> NDArray[np.float64]:
    """Euclidean norm of each column of a (d, k) block, accumulated in float64."""
    if X.ndim == 1:
        X = X[:, None]
    if X.flags.f_contiguous and not X.flags.c_contiguous:
        return np.sqrt(np.einsum("ij,ij->j", X, X, dtype=np.float64))
    return _column_norms(np.ascontiguousarray(X))


@njit(fastmath=False)
def _pair_residual_norms(AV: Any, MV: Any, lam: Any) -> Any:
    n, m = AV.shape
    out = np.zeros(m)
    for i in range(n):
        for j in range(m):
            r = float(AV[i, j]) - lam[j] * float(MV[i, j])
            out[j] += r * r
    return np.sqrt(out)


def pair_residual_norms(
    AV: NDArray[Any], MV: NDArray[Any], lam: NDArray[Any]
) -> NDArray[np.float64]:
    """``‖AV[:, j] − λ_j MV[:, j]‖₂`` for every column, fused (no (d, k) temporary)."""
    lam64 = np.ascontiguousarray(lam, dtype=np.float64)
    return _pair_residual_norms(np.ascontiguousarray(AV), np.ascontiguousarray(MV), lam64)


@njit(fastmath=False)
def residual_thresholds(theta: Any, tol: float, a_over_m: float, floor: float) -> Any:
    """Per-pair bound on the reduced residual ``‖Cy − θy‖`` that guarantees the pencil measure.

    With ``v = L⁻ᵀy``, ``‖y‖ = 1``: ``‖Av − θMv‖ = ‖L r‖ ≤ ‖L‖‖r‖`` and ``‖v‖ ≥ 1/‖L‖``, so the measure of
    :func:`rqcore.pair_residuals` is at most ``‖M‖₂‖r‖/(‖A‖₁ + |θ|‖M‖₁) ≤ ‖r‖/(‖A‖₁/‖M‖₁ + |θ|)``.
    ``floor`` keeps the threshold above what rounding in the products allows.
    """
    out = np.empty(theta.shape[0])
    for j in range(theta.shape[0]):
        t = tol * (a_over_m + abs(theta[j]))
        out[j] = t if t > floor else floor
    return out


@njit(fastmath=False)
def convergence_mask(estimates: Any, thresholds: Any) -> Any:
    """Boolean mask ``estimates <= thresholds`` and the count of leading converged pairs."""
    m = estimates.shape[0]
    mask = np.empty(m, dtype=np.bool_)
    leading = 0
    still = True
    for j in range(m):
        mask[j] = estimates[j] <= thresholds[j]
        if still and mask[j]:
            leading += 1
        else:
            still = False
    return mask, leading


@njit(fastmath=False)
def _asymmetry_norm(A: Any) -> tuple[float, float, float, float]:
    # Branch-free body (max, and a NaN/Inf detector ``a − a`` that is 0 for finite a), blocked so that
    # A[i, j] and A[j, i] both stay in cache; also sums |a_ij| per column (‖A‖₁ in the same pass).
    n = A.shape[0]
    asym = 0.0
    scale = 0.0
    check = 0.0
    acc = np.zeros(n)
    bs = 64
    for ib in range(0, n, bs):
        for jb in range(0, ib + 1, bs):
            for i in range(ib, min(ib + bs, n)):
                ri = 0.0
                for j in range(jb, min(jb + bs, i)):
                    a = A[i, j]
                    c = A[j, i]
                    check += (a - a) + (c - c)
                    asym = max(asym, abs(a - c))
                    aa = abs(a)
                    ac = abs(c)
                    scale = max(scale, max(aa, ac))
                    acc[j] += aa
                    ri += ac
                acc[i] += ri
                if jb <= i < jb + bs:  # the diagonal entry, once
                    a = A[i, i]
                    check += a - a
                    scale = max(scale, abs(a))
                    acc[i] += abs(a)
    norm = 0.0
    for j in range(n):
        norm = max(norm, acc[j])
    return asym, scale, check, norm


def asymmetry(A: NDArray[Any]) -> tuple[float, float, bool]:
    """``(max |A − Aᵀ|, max |A|, all finite)`` of a square matrix in one cache-blocked pass."""
    a, s, f, _ = asymmetry_and_norm(A)
    return a, s, f


def asymmetry_and_norm(A: NDArray[Any]) -> tuple[float, float, bool, float]:
    """``(max |A − Aᵀ|, max |A|, all finite, ‖A‖₁)`` of a square matrix in one cache-blocked pass
    (``‖A‖₁`` is the maximal absolute column sum; meaningful only when the matrix is finite)."""
    if A.size == 0:
        return 0.0, 0.0, True, 0.0
    a, s, c, norm = _asymmetry_norm(A)
    finite = bool(c == 0.0)
    return float(a), float(s), finite, float(norm)
