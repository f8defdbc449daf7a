"""Numba kernels for the bookkeeping of the iterative eigensolvers.

Only what BLAS does not do lives here: fused reductions over columns (norms, residual norms, absolute
column sums) that NumPy would compute through (d, k) temporaries, and the per-pair convergence tests.
Every product of a (d, ·) block with a matrix stays a GEMM/TRSM in the Python drivers.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from numpy.typing import NDArray

from rqcore._numba import njit

__all__ = [
    "asymmetry_and_norm",
    "column_norms",
    "convergence_mask",
    "max_abs_column_sum",
    "mirror_lower_triangle",
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


#: Outside ``[_SAFE_NORM_MIN, _SAFE_NORM_MAX]`` a plain sum of squares may have under- or overflowed
#: (squares leave float64's range below about 1e-154 and above 1e154): such columns are recomputed
#: with their largest entry scaled out (as LAPACK's ``nrm2`` does, but only where needed).
_SAFE_NORM_MIN = 1e-140
_SAFE_NORM_MAX = 1e140


def _rescaled_norms(X: NDArray[Any], out: NDArray[np.float64]) -> NDArray[np.float64]:
    """Recompute, with scaling, the entries of ``out`` (norms of ``X``'s columns) outside the safe range."""
    risky = ~((out >= _SAFE_NORM_MIN) & (out <= _SAFE_NORM_MAX))  # also 0, inf and NaN
    if not risky.any():
        return out
    for j in np.flatnonzero(risky):
        col = np.asarray(X[:, j], dtype=np.float64)
        big = float(np.max(np.abs(col))) if col.size else 0.0
        if big > 0 and np.isfinite(big):
            out[j] = big * float(np.sqrt(np.sum((col / big) ** 2)))
    return out


def column_norms(X: NDArray[Any]) -> NDArray[np.float64]:
    """Euclidean norm of each column of a (d, k) block, accumulated in float64 (free of spurious
    under- and overflow: risky columns are recomputed with scaling)."""
    if X.ndim == 1:
        X = X[:, None]
    if X.flags.f_contiguous and not X.flags.c_contiguous:
        out = np.sqrt(np.einsum("ij,ij->j", X, X, dtype=np.float64))
    else:
        out = _column_norms(np.ascontiguousarray(X))
    return _rescaled_norms(X, out)


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
    """``‖AV[:, j] − λ_j MV[:, j]‖₂`` for every column, fused (no (d, k) temporary; columns whose sum
    of squares may have under- or overflowed are recomputed with scaling)."""
    lam64 = np.ascontiguousarray(lam, dtype=np.float64)
    out = _pair_residual_norms(np.ascontiguousarray(AV), np.ascontiguousarray(MV), lam64)
    risky = ~((out >= _SAFE_NORM_MIN) & (out <= _SAFE_NORM_MAX))
    if risky.any():
        idx = np.flatnonzero(risky)
        R = (
            np.asarray(AV[:, idx], dtype=np.float64)
            - np.asarray(MV[:, idx], dtype=np.float64) * lam64[idx]
        )
        out[idx] = _rescaled_norms(R, np.zeros(idx.size))
    return out


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


#: Tile size of :func:`_asymmetry_norm_blocks`. The transposed reads ``A[j, i]`` of a tile walk down
#: ``bs`` rows; at a power-of-two leading dimension those rows map to one L1 cache set, so only tiles
#: of at most 8 rows (the set's ways) stay cached from one ``i`` to the next. Measured, 1 thread
#: (64 → 8, with the finiteness test moved out of the inner loop): d = 512 290 → 200 µs, d = 1024
#: 1.27 → 0.83 ms, d = 4096 30.8 → 24.5 ms; d = 1000 788 → 763 µs.
_SYMMETRY_TILE = 8


@njit(fastmath=False, nogil=True)
def _asymmetry_norm_blocks(A: Any, row_blocks: Any, acc: Any) -> tuple[float, float]:
    # Visits the tiles (ib, jb ≤ ib) of the given row blocks, comparing A[i, j] with A[j, i], and sums
    # |a_ij| per column into ``acc`` (‖A‖₁ in the same pass). Every entry lands in exactly one column
    # sum, so a NaN or Inf anywhere leaves a non-finite sum: the caller tests finiteness on ``acc``
    # (n values) instead of a running test here, whose dependency chain cost a third of the pass.
    # nogil, so two threads can share one matrix (each with its own ``acc``).
    n = A.shape[0]
    asym = 0.0
    scale = 0.0
    bs = _SYMMETRY_TILE
    for block in row_blocks:
        ib = block * bs
        for jb in range(0, ib + 1, bs):
            for i in range(ib, min(ib + bs, n)):
                ri = 0.0
                for j in range(jb, min(jb + bs, i)):
                    a = A[i, j]
                    c = A[j, i]
                    asym = max(asym, abs(a - c))
                    aa = abs(a)
                    ac = abs(c)
                    scale = max(scale, max(aa, ac))
                    acc[j] += aa
                    ri += ac
                acc[i] += ri
                if jb <= i < jb + bs:  # the diagonal entry, once
                    a = A[i, i]
                    scale = max(scale, abs(a))
                    acc[i] += abs(a)
    return asym, scale


@njit(fastmath=False, nogil=True)
def _asymmetry_norm_rows(A: Any, acc: Any) -> tuple[float, float]:
    # Same results as _asymmetry_norm_blocks over all row blocks, for matrices that fit in cache:
    # each 8-row block is first read whole, in memory order (the column sums), then its lower tiles
    # are compared with the rows above, which that first read left in cache. A matrix not in cache is
    # thus fetched in memory order rather than by the tiles' strided reads.
    n = A.shape[0]
    asym = 0.0
    scale = 0.0
    bs = _SYMMETRY_TILE
    for ib in range(0, n, bs):
        ie = min(ib + bs, n)
        for i in range(ib, ie):
            for j in range(n):
                acc[j] += abs(A[i, j])
        for jb in range(0, ib + 1, bs):
            for i in range(ib, ie):
                for j in range(jb, min(jb + bs, i)):
                    a = A[i, j]
                    c = A[j, i]
                    asym = max(asym, abs(a - c))
                    scale = max(scale, max(abs(a), abs(c)))
                if jb <= i < jb + bs:
                    scale = max(scale, abs(A[i, i]))
    return asym, scale


#: Matrices up to this size take :func:`_asymmetry_norm_rows`. At d = 512 (2 MiB), 1 thread: 0.53 →
#: 0.37–0.39 ms when ``A`` is not in cache (after a 0.2 s sleep), 0.21 ms either way when it is; at
#: d = 1024 the rows above are no longer cached and it is slower (0.83 → 0.90 ms warm).
_ROW_ORDER_MAX_BYTES = 2 << 20


#: From this dimension on, ``asymmetry_and_norm(A, threads=2)`` splits the pass over two threads
#: (d = 4096: 30 → 16 ms when introduced, 32–35 → 23–27 ms in later runs; one core does not saturate
#: the memory bus).
_TWO_THREAD_MIN_DIM = 2048


def asymmetry_and_norm(A: NDArray[Any], *, threads: int = 1) -> tuple[float, float, bool, float]:
    """``(max |A − Aᵀ|, max |A|, all finite, ‖A‖₁)`` of a square matrix in one cache-blocked pass
    (``‖A‖₁`` is the maximal absolute column sum; meaningful only when the matrix is finite).

    With ``threads ≥ 2`` and ``d ≥ 2048`` the pass runs on two threads (a short-lived Python thread
    and the caller, each on half of the tiles; the kernel releases the GIL).
    """
    n = A.shape[0]
    if A.size == 0:
        return 0.0, 0.0, True, 0.0
    nb = -(-n // _SYMMETRY_TILE)
    if threads < 2 or n < _TWO_THREAD_MIN_DIM:
        acc = np.zeros(n)
        if A.nbytes <= _ROW_ORDER_MAX_BYTES and A.flags.c_contiguous:
            a, s = _asymmetry_norm_rows(A, acc)
        else:
            a, s = _asymmetry_norm_blocks(A, np.arange(nb), acc)
        return float(a), float(s), bool(np.isfinite(acc).all()), float(acc.max())
    # Row block b holds b + 1 tiles: pairing b with nb − 1 − b gives equal work per pair.
    pairs = [(b, nb - 1 - b) for b in range((nb + 1) // 2)]
    halves = [
        np.array(sorted({x for pair in part for x in pair}), dtype=np.int64)
        for part in (pairs[: len(pairs) // 2], pairs[len(pairs) // 2 :])
    ]
    accs = [np.zeros(n), np.zeros(n)]
    out: list[tuple[float, float]] = [(0.0, 0.0)]

    def helper() -> None:
        out[0] = _asymmetry_norm_blocks(A, halves[1], accs[1])

    worker = threading.Thread(target=helper, name="rqcore-symmetry-check")
    worker.start()
    try:
        a0, s0 = _asymmetry_norm_blocks(A, halves[0], accs[0])
    finally:
        worker.join()
    a1, s1 = out[0]
    sums = accs[0] + accs[1]
    return float(max(a0, a1)), float(max(s0, s1)), bool(np.isfinite(sums).all()), float(sums.max())


@njit(fastmath=False, nogil=True)
def _mirror_tiles(F: Any, column_blocks: Any, bs: int) -> None:
    # F[j, i] = F[i, j] for i > j, tile by tile: each row of a (bs × bs) tile of the lower triangle is
    # written as a contiguous column segment of the mirrored tile. Small tiles: at a power-of-two
    # leading dimension the rows of a tall tile map to the same cache sets.
    n = F.shape[0]
    for cb in column_blocks:
        j0 = cb * bs
        j1 = min(j0 + bs, n)
        for i0 in range(j0, n, bs):
            for i in range(i0, min(i0 + bs, n)):
                for j in range(j0, min(j1, i)):
                    F[j, i] = F[i, j]


#: Tile size of :func:`mirror_lower_triangle` (d = 4096, 1 thread: 16 → 18 ms, 32 → 26 ms, 64 → 26 ms).
_MIRROR_TILE = 16


def mirror_lower_triangle(F: NDArray[Any], *, threads: int = 1) -> None:
    """Copy the strictly lower triangle of the square Fortran-ordered ``F`` onto its upper triangle.

    With ``threads ≥ 2`` and ``d ≥ 2048`` the copy runs on two threads (a short-lived Python thread
    and the caller, each on half of the tiles; d = 4096: 18 → 10 ms).
    """
    n = F.shape[0]
    if n < 2:
        return
    nb = -(-n // _MIRROR_TILE)
    if threads < 2 or n < _TWO_THREAD_MIN_DIM:
        _mirror_tiles(F, np.arange(nb), _MIRROR_TILE)
        return
    # Column block b holds nb − b tiles: pairing b with nb − 1 − b gives equal work per pair.
    pairs = [(b, nb - 1 - b) for b in range((nb + 1) // 2)]
    halves = [
        np.array(sorted({x for pair in part for x in pair}), dtype=np.int64)
        for part in (pairs[0::2], pairs[1::2])
    ]
    worker = threading.Thread(
        target=_mirror_tiles, args=(F, halves[1], _MIRROR_TILE), name="rqcore-mirror"
    )
    worker.start()
    try:
        _mirror_tiles(F, halves[0], _MIRROR_TILE)
    finally:
        worker.join()
