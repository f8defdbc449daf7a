"""Numba kernels of :mod:`rqcore.projection`: the small fused passes that BLAS does not offer.

The products themselves (``G·MV``, ``Z·Vᵀ``, ``G·C``) stay in BLAS; these kernels only fuse the O(n·k)
and O(n·d) element-wise work around them so that no temporary of the size of ``G`` is created.
"""

from __future__ import annotations

import numpy as np

from rqcore._numba import njit

__all__ = ["row_dots", "row_sumsq", "scale_columns_checked"]


@njit(nogil=True)
def scale_columns_checked(Z: np.ndarray, scale: np.ndarray) -> bool:
    """Multiply column ``j`` of the C-ordered ``Z`` by ``scale[j]`` in place; return True if all finite.

    The finiteness test rides along for free: it is how a NaN/Inf in ``G`` is detected (any non-finite
    entry of a row of ``G`` makes that row of ``Z = G·MV`` non-finite under IEEE arithmetic), at O(n·k)
    instead of a full O(n·d) scan of ``G``. It looks at ``Z`` before scaling, so a zero gain cannot hide
    a NaN (``NaN·0`` is NaN anyway, but ``Inf·0`` would be too).
    """
    n, k = Z.shape
    finite = True
    for i in range(n):
        for j in range(k):
            z = Z[i, j]
            if not np.isfinite(z):
                finite = False
            Z[i, j] = z * scale[j]
    return finite


@njit(nogil=True)
def row_dots(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Per-row inner products ``Σ_j X[i, j]·Y[i, j]``, accumulated in float64 (no n×d temporary)."""
    n, d = X.shape
    out = np.empty(n, dtype=np.float64)
    for i in range(n):
        acc = 0.0
        for j in range(d):
            acc += np.float64(X[i, j]) * np.float64(Y[i, j])
        out[i] = acc
    return out


@njit(nogil=True)
def row_sumsq(X: np.ndarray) -> np.ndarray:
    """Per-row squared Euclidean norms ``Σ_j X[i, j]²``, accumulated in float64."""
    n, d = X.shape
    out = np.empty(n, dtype=np.float64)
    for i in range(n):
        acc = 0.0
        for j in range(d):
            x = np.float64(X[i, j])
            acc += x * x
        out[i] = acc
    return out
