"""Eigenpairs at one end of a dense symmetric matrix, LAPACK step by step (``sytrd`` + ``stemr``).

LAPACK's subset drivers (``syevr`` and ``syevx`` with an index range) reduce to tridiagonal form and
then, for anything but the whole spectrum, find the wanted eigenvalues by bisection (``stebz``) and
their vectors by inverse iteration (``stein``): ``syevr`` uses MRRR (``stemr``) only for all pairs.
On the reduced matrices of rqcore's dense method that tridiagonal part is a large share of the solve
(d = 1024, 128 pairs, one thread: ``stebz`` 33 ms + ``stein`` 10 ms against ``sytrd`` 46 ms), and
``stemr`` asked for the same index range directly takes 27 ms. So this module calls the three steps
itself: ``sytrd`` (blocked, with its optimal workspace), ``stemr`` on the index range, and the
back-transformation with the Householder reflectors of ``sytrd`` (``ormqr``, which is what ``ormtr``
calls for a lower triangle). Should ``stemr`` report a failure (it can, rarely, when it finds no
representation that separates a cluster), ``stebz`` + ``stein`` solve the same tridiagonal matrix;
float32 always takes that path (MRRR's orthogonality, ``O(n·eps)``, is too loose in single precision).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg
from numpy.typing import NDArray

FloatArray = NDArray[np.floating[Any]]


def _lwork(query: Any) -> int:
    """Workspace size from a LAPACK ``*_lwork`` query (last element is ``info``)."""
    *sizes, info = query
    if info != 0:  # pragma: no cover - a query fails only on invalid arguments
        raise RuntimeError(f"LAPACK workspace query failed with info={info}.")
    return int(sizes[0])


def _mrrr(
    diag: FloatArray, off: FloatArray, first: int, last: int
) -> tuple[FloatArray, FloatArray] | None:
    """``stemr`` on the index range ``first … last`` (0-based); None when it reports a failure."""
    n = diag.shape[0]
    stemr, stemr_lwork = scipy.linalg.get_lapack_funcs(("stemr", "stemr_lwork"), (diag,))
    off_n = np.zeros(n, dtype=diag.dtype)  # stemr wants an off-diagonal of length n
    off_n[:-1] = off
    lwork, liwork, info = stemr_lwork(diag, off_n, 2, 0.0, 0.0, first + 1, last + 1)
    if info != 0:
        return None
    count, w, Z, info = stemr(
        diag, off_n, 2, 0.0, 0.0, first + 1, last + 1, lwork=lwork, liwork=liwork
    )
    if info != 0 or count != last - first + 1:
        return None
    return w[:count], Z[:, :count]


def _tridiagonal_subset(
    diag: FloatArray, off: FloatArray, first: int, last: int
) -> tuple[FloatArray, FloatArray]:
    """Eigenpairs ``first … last`` (0-based, ascending) of the symmetric tridiagonal ``(diag, off)``.

    ``stemr`` (MRRR) in float64; ``stebz`` + ``stein`` in float32, and when ``stemr`` fails. MRRR's
    vectors are orthogonal to ``O(n·eps)``: float32 dense results at d = 300, k = 40 were
    ``M``-orthonormal to 4.4e-6 / 1.4e-5 (largest / smallest pairs) with it and to 1.1e-6 / 3.2e-7
    with inverse iteration, against the ``1e-4`` float32 results promise, and the bound grows with
    ``n``. Returns ``(w, Z)`` in ascending order, ``Z`` of shape ``(n, last − first + 1)``.
    """
    found = _mrrr(diag, off, first, last) if diag.dtype == np.float64 else None
    if found is not None:
        return found
    stebz, stein = scipy.linalg.get_lapack_funcs(("stebz", "stein"), (diag,))
    count, w, iblock, isplit, info = stebz(diag, off, 2, 0.0, 0.0, first + 1, last + 1, 0.0, "B")
    if info != 0:  # pragma: no cover - bisection does not fail on finite input
        raise np.linalg.LinAlgError(f"LAPACK stebz failed with info={info}.")
    Z, info = stein(diag, off, w[:count], iblock, isplit)
    if info != 0:  # pragma: no cover
        raise np.linalg.LinAlgError(f"LAPACK stein: {info} eigenvectors did not converge.")
    order = np.argsort(w[:count], kind="stable")  # stebz's "B" order is by block
    return w[:count][order], Z[:, order]


def subset_eigh(
    H: FloatArray, p: int, largest: bool, *, overwrite: bool = False
) -> tuple[FloatArray, FloatArray]:
    """The ``p`` eigenpairs of the symmetric ``H`` (its lower triangle) at the wanted end.

    Parameters
    ----------
    H : (n, n) ndarray of float32 or float64
        Symmetric; only the lower triangle is read.
    p : int
        Number of eigenpairs, ``1 ≤ p ≤ n``.
    largest : bool
        The largest (True) or the smallest eigenvalues.
    overwrite : bool, default False
        Whether ``H`` may be destroyed (saves a copy when it is Fortran-ordered).

    Returns
    -------
    values : (p,) ndarray
        The extreme eigenvalue first (descending when ``largest``, else ascending).
    vectors : (n, p) ndarray, Fortran-ordered
        Orthonormal eigenvectors, column ``j`` for ``values[j]``.
    """
    n = H.shape[0]
    first, last = (n - p, n - 1) if largest else (0, p - 1)
    if n == 1:  # no reflectors to apply
        vals, S = scipy.linalg.eigh(
            H, subset_by_index=(first, last), overwrite_a=overwrite, check_finite=False
        )
        return (vals[::-1], S[:, ::-1]) if largest else (vals, S)
    work = H if overwrite and H.flags.f_contiguous else np.array(H, order="F", copy=True)
    sytrd, sytrd_lwork, ormqr = scipy.linalg.get_lapack_funcs(
        ("sytrd", "sytrd_lwork", "ormqr"), (work,)
    )
    # The default workspace of SciPy's wrapper (n) forces the unblocked, BLAS-2 code: ask for the
    # optimal one (d = 1024: 46 against 82 ms).
    reflectors, diag, off, tau, info = sytrd(
        work, lower=1, lwork=_lwork(sytrd_lwork(n, lower=1)), overwrite_a=1
    )
    if info != 0:  # pragma: no cover - sytrd fails only on invalid arguments
        raise RuntimeError(f"LAPACK sytrd failed with info={info}.")
    w, Z = _tridiagonal_subset(diag, off, first, last)
    if largest:
        w, Z = w[::-1], Z[:, ::-1]
    # H = Q T Qᵀ with Q = diag(1, Q̃); the n − 1 reflectors of Q̃ sit below the subdiagonal, i.e. in
    # the (n − 1) × (n − 1) matrix that starts one element into the Fortran buffer with leading
    # dimension n. That matrix is a contiguous (n, n − 1) array seen from there (its last row is never
    # read by ormqr, which reads rows 1 … n − 1 of column j only), so no copy is made.
    flat = reflectors.reshape(-1, order="F")
    householder = flat[1 : 1 + n * (n - 1)].reshape((n, n - 1), order="F")
    tail = np.asfortranarray(Z[1:])
    _, work_query, info = ormqr("L", "N", householder, tau, tail, -1)
    tail, _, info = ormqr(
        "L", "N", householder, tau, tail, max(1, int(work_query[0])), overwrite_c=1
    )
    if info != 0:  # pragma: no cover - ormqr fails only on invalid arguments
        raise RuntimeError(f"LAPACK ormqr failed with info={info}.")
    vectors = np.empty((n, p), dtype=work.dtype, order="F")
    vectors[0] = Z[0]
    vectors[1:] = tail
    return np.ascontiguousarray(w), vectors
