"""Numba kernels of :mod:`rqcore.covariance`: the O(n·d) and O(d²) passes around the BLAS products.

The products themselves (``X.T @ X``) are always left to BLAS ``?syrk``; these kernels fuse what would
otherwise be several NumPy passes (finiteness check, weighted column sums, row norms, centering,
scaling by ``sqrt(w)``, casting) into one sweep over the data, and update only the upper triangle of
the float64 totals.

All triangles here are the *upper* one in NumPy indexing (``i <= j``), which is what ``?syrk`` fills
with ``lower=0``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from rqcore._numba import njit

# Reassociation lets LLVM vectorize the reductions; "nnan"/"ninf" stay off so that non-finite values
# still propagate into the row norms, which is how the finiteness check works.
_FAST = {"reassoc", "contract", "nsz", "arcp"}


@njit(fastmath=_FAST)
def batch_stats(
    x: NDArray[np.floating],
    w: NDArray[np.float64],
    has_w: bool,
    colsum: NDArray[np.float64],
    colmax: NDArray[np.float64],
) -> tuple[float, float]:
    """One pass over ``x`` (n, d): ``colsum += Σ w x``, ``colmax = max(colmax, max |x|)`` per column;
    return ``(Σ w, Σ w ‖x‖⁴)``.

    The fourth moment doubles as the finiteness check: it is finite exactly when every entry is
    finite (a NaN/Inf row gives NaN/Inf even with weight 0, as ``0·inf = nan``) and nothing overflows,
    so no boolean temporary of the size of ``x`` is needed. The caller tests it after the loop; a
    test inside the loop would be at the mercy of the fast-math flags.
    """
    n, d = x.shape
    wsum = 0.0
    q4 = 0.0
    for i in range(n):
        wi = w[i] if has_w else 1.0
        r = 0.0
        for j in range(d):
            v = np.float64(x[i, j])
            r += v * v
            colsum[j] += wi * v
            colmax[j] = max(colmax[j], abs(v))
        wsum += wi
        # A zero-weight row adds nothing, even where r² would overflow; r·0 still carries a NaN/Inf
        # of the row into q4 for the finiteness check (no fast-math "nnan"/"ninf" to fold it away).
        q4 += wi * (r * r) if wi != 0.0 else r * 0.0
    return wsum, q4


@njit(fastmath=_FAST)
def fill_scaled(
    x: NDArray[np.floating],
    r0: int,
    w: NDArray[np.float64],
    has_w: bool,
    out: NDArray[np.floating],
) -> None:
    """``out[k] = sqrt(w[r0 + k]) · x[r0 + k]`` for ``k < len(out)``, cast to ``out``'s dtype."""
    m, d = out.shape
    for k in range(m):
        i = r0 + k
        s = np.sqrt(w[i]) if has_w else 1.0
        for j in range(d):
            out[k, j] = s * np.float64(x[i, j])


@njit(fastmath=_FAST)
def fill_centered(
    x: NDArray[np.floating],
    r0: int,
    w: NDArray[np.float64],
    has_w: bool,
    center: NDArray[np.float64],
    delta: NDArray[np.float64],
    out: NDArray[np.floating],
    z: NDArray[np.float64],
    m3: NDArray[np.float64],
    m2delta: NDArray[np.float64],
) -> tuple[float, float]:
    """Center rows ``r0:r0+len(out)`` of ``x`` at ``center`` and scale them by ``sqrt(w)`` into ``out``.

    Accumulates, with ``zᵢ = xᵢ − center`` computed in float64, the moments the Chan-style merge needs:
    ``m3 += Σ w ‖z‖² z``, ``m2delta += Σ w (z·delta) z`` (the batch scatter times ``delta`` without
    forming it) and returns ``(Σ w ‖z‖⁴, Σ w ‖z‖²)``. ``z`` is a length-d scratch vector.
    """
    m, d = out.shape
    q4 = 0.0
    q2 = 0.0
    for k in range(m):
        i = r0 + k
        wi = w[i] if has_w else 1.0
        s = np.sqrt(wi)
        r = 0.0
        t = 0.0
        for j in range(d):
            v = np.float64(x[i, j]) - center[j]
            z[j] = v
            r += v * v
            t += v * delta[j]
            out[k, j] = s * v
        a = wi * r
        b = wi * t
        for j in range(d):
            m3[j] += a * z[j]
            m2delta[j] += b * z[j]
        q4 += a * r
        q2 += a
    return q4, q2


@njit(fastmath=_FAST)
def add_upper(
    dst: NDArray[np.float64],
    beta: float,
    src: NDArray[np.floating],
    c: float,
    v: NDArray[np.float64],
) -> None:
    """Upper triangle only: ``dst = beta·dst + src + c·v vᵀ`` (``src`` may be float32).

    Both matrices are Fortran-ordered (as ``?syrk`` returns them), so the loop runs down columns.
    """
    d = dst.shape[0]
    for j in range(d):
        cvj = c * v[j]
        for i in range(j + 1):
            dst[i, j] = beta * dst[i, j] + np.float64(src[i, j]) + cvj * v[i]


@njit(fastmath=_FAST)
def rank1_upper(dst: NDArray[np.float64], c: float, v: NDArray[np.float64]) -> None:
    """Upper triangle only: ``dst += c·v vᵀ`` (Fortran-ordered ``dst``)."""
    d = dst.shape[0]
    for j in range(d):
        cvj = c * v[j]
        for i in range(j + 1):
            dst[i, j] += cvj * v[i]


@njit(fastmath=_FAST)
def upper_matvec(a: NDArray[np.float64], v: NDArray[np.float64]) -> NDArray[np.float64]:
    """``A v`` for the symmetric ``A`` stored in the upper triangle of Fortran-ordered ``a``."""
    d = a.shape[0]
    out = np.zeros(d)
    for j in range(d):
        vj = v[j]
        acc = 0.0
        for i in range(j):
            aij = a[i, j]
            out[i] += aij * vj
            acc += aij * v[i]
        out[j] += acc + a[j, j] * vj
    return out


@njit(fastmath=_FAST)
def symmetrize_scaled(a: NDArray[np.float64], scale: float) -> NDArray[np.float64]:
    """Full symmetric C-ordered copy of ``scale · A`` from the upper triangle of Fortran-ordered ``a``."""
    d = a.shape[0]
    out = np.empty((d, d))
    for j in range(d):
        for i in range(j + 1):
            v = scale * a[i, j]
            out[i, j] = v
            out[j, i] = v
    return out


@njit(fastmath=_FAST)
def upper_trace_frob(a: NDArray[np.float64], scale: float) -> tuple[float, float]:
    """``(trace(sA), ‖sA‖_F²)`` of the symmetric ``A`` held in the upper triangle of ``a``.

    ``scale`` (a power of two near ``1/max|a_jj|``) keeps the squares of entries beyond 1e154 finite.
    """
    d = a.shape[0]
    tr = 0.0
    off = 0.0
    diag = 0.0
    for j in range(d):
        for i in range(j):
            v = scale * a[i, j]
            off += v * v
        v = scale * a[j, j]
        diag += v * v
        tr += v
    return tr, diag + 2.0 * off


@njit()
def upper_gram_excess(a: NDArray[np.float64]) -> float:
    """Largest ``(|a_ij| − √(a_ii·a_jj)) / √(a_ii·a_jj)`` over the upper triangle; inf on a negative diagonal.

    A Gram (scatter) matrix satisfies Cauchy–Schwarz, ``|a_ij| ≤ √(a_ii·a_jj)``, so a positive value
    beyond rounding means the matrix is not positive semidefinite. O(d²), no temporaries; entries
    whose bound is below ``1e-13·max(diag)`` are compared against that floor instead (rounding of the
    centering leaves such dust on constant features).
    """
    d = a.shape[0]
    top = 0.0
    for j in range(d):
        if a[j, j] < 0.0:
            return np.inf
        top = max(top, a[j, j])
    floor = 1e-13 * top
    worst = 0.0
    for j in range(d):
        for i in range(j):
            bound = max(np.sqrt(a[i, i]) * np.sqrt(a[j, j]), floor)
            if bound == 0.0:
                if a[i, j] != 0.0:
                    return np.inf
                continue
            worst = max(worst, (abs(a[i, j]) - bound) / bound)
    return worst
