"""The iterative drivers' own products, through SciPy's BLAS.

NumPy and SciPy wheels each bundle an OpenBLAS. After a multi-threaded call, OpenBLAS's worker threads
spin for a while before they sleep, and a multi-threaded call into the *other* copy meanwhile competes
with them for the cores: on 2 cores, d = 4096, a ``(4096, 300) × (300, 32)`` NumPy product on two
threads between the operator's SciPy ``trsm``/``gemm`` calls made those calls 2.1× slower (37 → 80 ms)
and itself slower than on one thread (4.3 → 6.6 ms), while the same product through SciPy's ``gemm``
ran 1.9× faster on two threads (2.2 → 1.2 ms) and left the operator's calls unchanged. So every product
a Lanczos/Davidson driver may run on several threads goes through :func:`gemm` here (the same library
as the operator's ``trsm``/``gemm``); the LOBPCG driver runs single-threaded and keeps NumPy's ``@``. On one thread it is also the faster call for the tall-times-small shape
``(d, n) × (n, c)``: 2.0 against 3.8 ms for NumPy's ``@`` (d = 4096, n = 300, c = 32), whose row-major
call puts the small dimension first.
"""

from __future__ import annotations

import ctypes
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


# --- triangular solves split into diagonal blocks and GEMM updates (threaded calls) -------------------

#: Factors of at least this order are solved by :func:`split_triangular_solve` when the call runs on
#: several threads. OpenBLAS threads ``trsm`` over the right-hand sides, which a block of 8-32 columns
#: does not fill, while the ``gemm`` updates of the split solve are threaded over the rows. Measured on
#: 2 threads, alone (random factor): d = 4096, 8 / 16 / 32 columns 9.0 → 6.3 / 8.8 → 7.3 / 12.2 →
#: 10.3 ms; d = 2048, 16 columns 1.8 → 1.7 ms; d = 1024 no gain. Inside the cold (4096, 32) block
#: Lanczos 7.6 → 6.9 ms per 16-column solve (the solve within noise, 0.77 s), warm re-solves 5 %
#: faster ((4096, 8) 150 → 142 ms, (4096, 32) 226 → 214 ms). On one thread the split is 1-3 % slower
#: and is not used.
SPLIT_SOLVE_MIN_DIM = 2048

_FORTRAN_BLAS: dict[tuple[str, str], Any] = {}


def _fortran_blas(name: str, dtype: np.dtype[Any]) -> tuple[Any, Any]:
    """``(routine, pointer type)``: a ctypes handle of SciPy's ``cython_blas`` ``d``/``s`` + ``name``
    (``"trsm"`` or ``"gemm"``), the same OpenBLAS as :mod:`scipy.linalg.blas` but with explicit leading
    dimensions, so sub-blocks of a matrix are passed without copies."""
    from numba.extending import get_cython_function_address

    prefix = "d" if dtype == np.float64 else "s"
    key = (prefix, name)
    if key not in _FORTRAN_BLAS:
        real = ctypes.POINTER(ctypes.c_double if prefix == "d" else ctypes.c_float)
        integer = ctypes.POINTER(ctypes.c_int)
        char = ctypes.c_char_p
        args: list[Any]
        if name == "trsm":  # side, uplo, transa, diag, m, n, alpha, a, lda, b, ldb
            args = [char] * 4 + [integer, integer, real, real, integer, real, integer]
        else:  # gemm: transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc
            args = [char, char, integer, integer, integer, real, real, integer, real, integer, real]
            args += [real, integer]
        address = get_cython_function_address("scipy.linalg.cython_blas", prefix + name)
        _FORTRAN_BLAS[key] = (ctypes.CFUNCTYPE(None, *args)(address), real)
    return _FORTRAN_BLAS[key]


def split_triangular_solve(F: FloatArray, X: FloatArray, *, upper: bool, leaf: int) -> FloatArray:
    """``T⁻¹ X`` in place for the triangle ``T`` of the square Fortran-ordered ``F`` (its lower
    triangle, or its upper one with ``upper=True``) and a Fortran-ordered ``X`` of ``F``'s dtype.

    The triangle is halved recursively down to blocks of at most ``leaf`` rows; each level is two
    solves with the diagonal blocks and one ``gemm`` with the off-diagonal block (half of all flops at
    the first level), called on sub-blocks of ``F`` and ``X`` in place through SciPy's ``cython_blas``.
    """
    n, b = X.shape
    assert F.flags.f_contiguous and X.flags.f_contiguous and F.dtype == X.dtype
    trsm, real = _fortran_blas("trsm", F.dtype)
    gemm_, _ = _fortran_blas("gemm", F.dtype)
    scalar = ctypes.c_double if F.dtype == np.float64 else ctypes.c_float
    one, minus_one = scalar(1.0), scalar(-1.0)
    ld_f = ctypes.c_int(F.shape[0])
    ld_x = ctypes.c_int(n)
    cols = ctypes.c_int(b)
    item = F.itemsize
    f_base, x_base = F.ctypes.data, X.ctypes.data
    ld = F.shape[0]
    uplo = b"U" if upper else b"L"

    def f_at(i: int, j: int) -> Any:
        return ctypes.cast(f_base + (i + j * ld) * item, real)

    def x_at(i: int) -> Any:
        return ctypes.cast(x_base + i * item, real)

    def solve(lo: int, hi: int) -> None:
        size = hi - lo
        if size <= leaf:
            m = ctypes.c_int(size)
            trsm(b"L", uplo, b"N", b"N", m, cols, one, f_at(lo, lo), ld_f, x_at(lo), ld_x)
            return
        h = lo + size // 2
        # lower: X₁ = L₁₁⁻¹X₁, then X₂ −= L₂₁X₁; upper: X₂ = U₂₂⁻¹X₂, then X₁ −= U₁₂X₂
        first, second = ((lo, h), (h, hi)) if not upper else ((h, hi), (lo, h))
        solve(*first)
        m, k = ctypes.c_int(second[1] - second[0]), ctypes.c_int(first[1] - first[0])
        gemm_(
            b"N",
            b"N",
            m,
            cols,
            k,
            minus_one,
            f_at(second[0], first[0]),
            ld_f,
            x_at(first[0]),
            ld_x,
            one,
            x_at(second[0]),
            ld_x,
        )
        solve(*second)

    solve(0, n)
    return X
