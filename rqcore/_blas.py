"""The iterative drivers' own products, through SciPy's BLAS.

NumPy and SciPy wheels each bundle an OpenBLAS. After a multi-threaded call, OpenBLAS's worker threads
spin for a while before they sleep, and a multi-threaded call into the *other* copy meanwhile competes
with them for the cores: on 2 cores, d = 4096, a ``(4096, 300) × (300, 32)`` NumPy product on two
threads between the operator's SciPy ``trsm``/``gemm`` calls made those calls 2.1× slower (37 → 80 ms)
and itself slower than on one thread (4.3 → 6.6 ms), while the same product through SciPy's ``gemm``
ran 1.9× faster on two threads (2.2 → 1.2 ms) and left the operator's calls unchanged. So every product
a driver may run on several threads goes through :func:`gemm` here (the same library as the operator's
``trsm``/``gemm``). On one thread it is also the faster call for the tall-times-small shape
``(d, n) × (n, c)``: 2.0 against 3.8 ms for NumPy's ``@`` (d = 4096, n = 300, c = 32), whose row-major
call puts the small dimension first.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg.blas
from numpy.typing import NDArray

from rqcore._threads import wide

FloatArray = NDArray[np.floating[Any]]

#: Products of at least this many flops get the caller's BLAS thread count (inside a driver, where
#: :func:`rqcore._threads.wide` allows it, i.e. for d ≥ 512). Alone, on 2 cores, a second thread pays
#: from about 5·10⁶ flops (``(4096, n) × (n, 16)``: 0.12 → 0.13 ms at 2·10⁶, 0.39 → 0.26 ms at 8·10⁶,
#: 0.83 → 0.46 ms at 2·10⁷); inside the solvers 5·10⁶ and 2·10⁷ were within noise of each other (cold
#: (4096, 32) 0.89 / 0.86 s, warm (2048, 8) 47 / 55 ms, warm (4096, 8) 204 / 171 ms), so the higher one
#: stays.
WIDE_MIN_FLOPS = 2e7


def gemm(
    a: FloatArray,
    b: FloatArray,
    *,
    trans_a: bool = False,
    alpha: float = 1.0,
    beta: float = 0.0,
    c: FloatArray | None = None,
) -> FloatArray:
    """``alpha · op(a) @ b + beta · c`` with SciPy's BLAS, ``op(a) = aᵀ`` when ``trans_a``.

    ``c`` (Fortran-ordered, of the result's dtype) is updated in place and returned; otherwise a new
    Fortran-ordered array is. ``a`` should be Fortran-ordered (a slice of columns of a Fortran array is;
    anything else is copied by the wrapper); ``b`` is small and copied if needed.
    """
    (blas_gemm,) = scipy.linalg.blas.get_blas_funcs(("gemm",), (a, b))
    m = a.shape[1] if trans_a else a.shape[0]
    flops = 2.0 * m * b.shape[0] * b.shape[1]
    if c is not None:
        assert c.flags.f_contiguous and c.dtype == blas_gemm.dtype
    if b.shape[0] == 0:  # BLAS rejects k = 0; the product is zero
        if c is None:
            return np.zeros((m, b.shape[1]), dtype=blas_gemm.dtype, order="F")
        c *= beta
        return c
    kwargs: dict[str, Any] = {"trans_a": int(trans_a)}
    if c is not None:
        kwargs.update(beta=beta, c=c, overwrite_c=1)
    if flops >= WIDE_MIN_FLOPS:
        with wide():
            return blas_gemm(alpha, a, b, **kwargs)
    return blas_gemm(alpha, a, b, **kwargs)


def solve_right_upper(R: NDArray[Any], X: FloatArray) -> FloatArray:
    """``X R⁻¹`` for an upper-triangular ``R``, in place when ``X`` is Fortran-ordered of ``X``'s own
    dtype (right-side ``trsm``: no transposed copies, as ``solve_triangular(R, X.T, trans="T").T``
    would make). ``R`` is cast to ``X``'s dtype."""
    (trsm,) = scipy.linalg.blas.get_blas_funcs(("trsm",), (X,))
    return trsm(1.0, np.asarray(R, dtype=X.dtype), X, side=1, lower=0, overwrite_b=1)
