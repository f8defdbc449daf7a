"""Top-k eigenpairs of a regularized generalized symmetric-definite eigenproblem.

``generalized_topk(A, B, k)`` solves ``A v = λ (B + εI) v`` for the ``k`` largest (or smallest)
eigenvalues. This module holds the public front end, its result object, the shared residual measure and
the dense back end; the iterative back ends live in private modules.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.linalg
import scipy.linalg.blas
import scipy.sparse
import scipy.sparse.linalg
from numpy.typing import NDArray

from rqcore._blas import gemm, solve_right_upper
from rqcore._eigen_kernels import (
    asymmetry_and_norm,
    column_norms,
    max_abs_column_sum,
    pair_residual_norms,
    residual_thresholds,
)
from rqcore._lanczos import KrylovResult, _wanted_eigh, block_lanczos, warm_block_davidson
from rqcore._lobpcg import lobpcg
from rqcore._threads import caller_threads, driver_threads, wide, widens
from rqcore._validation import as_float_array, as_real, check_finite, check_symmetric
from rqcore.exceptions import ConvergenceWarning, RqcoreWarning
from rqcore.pencil import Pencil

__all__ = ["GeneralizedEigenResult", "generalized_topk", "pair_residuals"]

FloatArray = NDArray[np.floating[Any]]


@dataclass(repr=False, eq=False)
class GeneralizedEigenResult:
    """Eigenpairs returned by :func:`generalized_topk`.

    Unpacks as ``values, vectors = generalized_topk(A, B, k)``. Results compare by identity (``==``
    is ``is``); compare their arrays with ``numpy.array_equal`` or ``numpy.allclose``.

    Attributes
    ----------
    values : (k,) ndarray
        Eigenvalues, largest first when ``largest=True``, smallest first otherwise.
    vectors : (d, k) ndarray
        Eigenvectors, ``M``-orthonormal: ``vectors.T @ (B + εI) @ vectors = I``.
    residuals : (k,) ndarray
        Backward-error-type residual of each pair,
        ``‖Av − λMv‖ / ((‖A‖₁ + |λ|‖M‖₁)·‖v‖)`` with ``M = B + εI`` (see :func:`pair_residuals`).
    iterations : int
        Iterations of the back end (0 for the dense method; operator products for the single-vector
        Lanczos path, block products for the block Lanczos).
    converged : bool
        Whether every pair reached the tolerance (for every method; a ``ConvergenceWarning`` says
        when not).
    method : str
        The back end used (``"dense"``, ``"lanczos"``, ``"lobpcg"``), with the reason for a fallback in
        parentheses, e.g. ``"dense (fallback: k close to d)"``.
    reg_used : float
        The absolute shift ``ε`` added to ``B``'s diagonal.
    pencil : Pencil
        The factored right-hand side, to reuse in the next solve (``generalized_topk(A2, result.pencil, k)``).
        Built from an array ``B`` it refers to ``B`` without a copy (``Pencil(..., copy=False)``): do not
        modify ``B`` while reusing it, or pass ``Pencil(B)``, which keeps a copy.

    Examples
    --------
    >>> import numpy as np
    >>> from rqcore import generalized_topk
    >>> result = generalized_topk(np.diag([3.0, 2.0, 1.0]), np.eye(3), k=2, reg=0.0)
    >>> result.values, result.method, bool(result.converged)
    (array([3., 2.]), 'dense', True)
    >>> values, vectors = result                  # unpacks like scipy.linalg.eigh
    >>> vectors.shape
    (3, 2)
    """

    values: FloatArray
    vectors: FloatArray
    residuals: FloatArray
    iterations: int
    converged: bool
    method: str
    reg_used: float
    pencil: Pencil = field(compare=False)
    #: ``Lᵀ·vectors`` (orthonormal columns) for a warm start from this result (``v0=result``).
    _reduced: FloatArray | None = field(default=None, repr=False, compare=False)
    #: Guard directions for that warm start: the Ritz vectors just past the k-th of the final basis,
    #: as ``(Lᵀ·guard, guard)`` (block Lanczos and warm Davidson results; None otherwise).
    _guard: tuple[FloatArray, FloatArray] | None = field(default=None, repr=False, compare=False)

    def __iter__(self) -> Iterator[FloatArray]:
        """Yield ``values`` then ``vectors`` so the result unpacks like ``scipy.linalg.eigh``'s."""
        yield self.values
        yield self.vectors

    def __repr__(self) -> str:
        worst = float(np.max(self.residuals)) if self.residuals.size else 0.0
        return (
            f"GeneralizedEigenResult(k={self.values.size}, d={self.vectors.shape[0]}, "
            f"method={self.method!r}, converged={self.converged}, iterations={self.iterations}, "
            f"max_residual={worst:.2e}, reg_used={self.reg_used:.3g})"
        )


def _operator_one_norm(A: Any) -> float:
    """‖A‖₁ (= ‖A‖_∞ for symmetric A), exact for arrays and sparse matrices, estimated for operators."""
    if isinstance(A, np.ndarray):
        norm = max_abs_column_sum(A) if A.ndim == 2 else float(np.sum(np.abs(A)))
    elif scipy.sparse.issparse(A):
        norm = float(abs(A).sum(axis=0).max())
    else:
        norm = float(scipy.sparse.linalg.onenormest(_SymmetricOperator(A)))
    _check_norm_finite(norm, "A")
    return norm


def _check_norm_finite(norm: float, name: str) -> None:
    """Refuse a matrix whose entries are finite but whose ‖·‖₁ overflows float64.

    The residual measure divides by that norm: an infinite one reads every pair as converged.
    """
    if not math.isfinite(norm):
        factor = "the same factor" if name == "A" else "the inverse factor"
        raise ValueError(
            f"‖{name}‖₁ overflows float64 although its entries are finite; scale {name} down "
            f"(e.g. {name} / np.abs({name}).max()): the eigenvectors do not change and the "
            f"eigenvalues scale by {factor}."
        )


def _balancing_scale(a_norm: float, m_norm: float, dtype: np.dtype[Any]) -> float:
    """A power of two ``s`` that brings ``s·‖A‖₁/‖M‖₁`` near 1 when the ratio is extreme, else 1.

    The iterative drivers square residuals and Gram entries: with ``‖A‖₁/‖M‖₁`` near 1e±150 those
    under- or overflow (values off by 1e-4 of λ_max with residuals reported as 0, or a LAPACK
    failure). Scaling ``A`` by a power of two is exact and scales the eigenvalues by ``s`` only; the
    residual measure of :func:`pair_residuals` does not change.
    """
    if not (a_norm > 0 and m_norm > 0 and math.isfinite(a_norm) and math.isfinite(m_norm)):
        return 1.0
    exponent = math.log2(a_norm) - math.log2(m_norm)
    window = 60 if dtype == np.float64 else 20
    if abs(exponent) <= window:
        return 1.0
    return float(2.0 ** (-round(exponent)))


class _SymmetricOperator(scipy.sparse.linalg.LinearOperator):
    """Wraps a symmetric operator so that ``rmatvec`` (needed by ``onenormest``) is ``matvec``."""

    def __init__(self, A: scipy.sparse.linalg.LinearOperator) -> None:
        super().__init__(dtype=A.dtype, shape=A.shape)
        self._op = A

    def _matvec(self, x: FloatArray) -> FloatArray:
        return np.asarray(self._op.matvec(x))

    def _rmatvec(self, x: FloatArray) -> FloatArray:
        return np.asarray(self._op.matvec(x))

    def _matmat(self, X: FloatArray) -> FloatArray:
        return np.asarray(self._op.matmat(X))


def pair_residuals(
    A: Any,
    B: Any,
    values: FloatArray,
    vectors: FloatArray,
    *,
    reg: float = 0.0,
    norms: tuple[float, float] | None = None,
) -> NDArray[np.float64]:
    r"""Relative residual of each eigenpair of the pencil ``(A, M)``, ``M = B + εI``.

    ``r_j = ‖A v_j − λ_j M v_j‖₂ / ((‖A‖₁ + |λ_j|·‖M‖₁) · ‖v_j‖₂)``, a backward error: a pair with
    ``r_j ≤ tol`` is an exact eigenpair of a pencil perturbed by about ``tol`` relative to its norms. It is
    the one measure used for rqcore and for every peer in the benchmarks.

    Parameters
    ----------
    A : (d, d) ndarray, sparse array or LinearOperator
        The symmetric left-hand side.
    B : (d, d) ndarray, :class:`Pencil` or None
        The right-hand side (None: identity). A :class:`Pencil` brings its own ``ε``.
    values : (k,) array_like
        Eigenvalues.
    vectors : (d, k) array_like
        Eigenvectors (any normalization).
    reg : float, default 0.0
        Relative regularization when ``B`` is an array (as in :class:`Pencil`).
    norms : (float, float), optional
        Precomputed ``(‖A‖₁, ‖M‖₁)``; they are computed when omitted.

    Returns
    -------
    residuals : (k,) ndarray of float64

    Raises
    ------
    ValueError
        If the shapes disagree (``values`` must have one entry per column of ``vectors``, and
        ``vectors`` as many rows as ``A``), or an input is not finite.

    Notes
    -----
    An array ``B`` is only multiplied, never factored: ``B`` may be singular (``reg = 0``), as when
    checking pairs of a pencil whose ``B + εI`` is positive semidefinite only. ``‖M‖₁`` is taken as
    ``‖B‖₁ + ε``, the bound :class:`Pencil` uses.

    Examples
    --------
    >>> import numpy as np
    >>> from rqcore import pair_residuals
    >>> A, B = np.diag([3.0, 2.0, 1.0]), np.diag([1.0, 1.0, 0.0])
    >>> pair_residuals(A, B, [3.0, 2.0], np.eye(3)[:, :2])
    array([0., 0.])
    """
    V = np.asarray(vectors, dtype=np.float64)
    if V.ndim == 1:
        V = V[:, None]
    lam = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if V.ndim != 2 or lam.ndim != 1 or lam.shape[0] != V.shape[1]:
        raise ValueError(
            f"values has shape {np.shape(values)} and vectors {np.shape(vectors)}; pass a (d, k) "
            "block of vectors and one eigenvalue per column."
        )
    d = V.shape[0]
    if d == 0:
        raise ValueError("vectors has 0 rows: the pencil needs d >= 1.")
    if tuple(np.shape(A)) != (d, d):
        raise ValueError(f"A has shape {np.shape(A)} but vectors has {d} rows; they must agree.")
    check_finite(V, "vectors")
    check_finite(lam, "values")
    reg = as_real(reg, "reg")
    if not (math.isfinite(reg) and reg >= 0):
        raise ValueError(f"reg must be a finite number >= 0, got {reg}.")
    if isinstance(B, Pencil) or B is None:
        pencil = B if isinstance(B, Pencil) else Pencil(None, dim=d)
        if pencil.dim != d:
            raise ValueError(f"the pencil has dimension {pencil.dim} but vectors has {d} rows.")
        MV = np.asarray(pencil.matvec(V.astype(pencil.dtype, copy=False)), dtype=np.float64)
        if norms is None:
            norms = (_operator_one_norm(A), pencil.one_norm)
    else:
        # Multiply only: a Pencil would factor B + εI, which needs it definite and costs O(d³).
        if scipy.sparse.issparse(B):
            B = B.toarray()
        B64 = as_float_array(B, "B", ndim=2).astype(np.float64, copy=False)
        if B64.shape != (d, d):
            raise ValueError(f"B has shape {B64.shape} but vectors has {d} rows; they must agree.")
        check_finite(B64, "B")
        with np.errstate(over="ignore"):  # an overflow is refused just below
            trace = float(np.trace(B64))
            eps = reg * (trace / d if trace > 0 else 1.0)
            m_norm = max_abs_column_sum(B64) + eps
        _check_norm_finite(m_norm, "B")  # an infinite ‖M‖₁ would read every pair as exact
        MV = B64 @ V + eps * V
        if norms is None:
            norms = (_operator_one_norm(A), m_norm)
    AV = np.asarray(A @ V, dtype=np.float64)
    return _residual_measures(AV, MV, lam, V, norms)


def _residual_measures(
    AV: Any, MV: Any, values: Any, V: Any, norms: tuple[float, float]
) -> NDArray[np.float64]:
    """The measure of :func:`pair_residuals` from the products ``AV`` and ``MV`` (0 for ``v = 0``)."""
    lam = np.asarray(values, dtype=np.float64)
    a_norm, m_norm = norms
    numerator = pair_residual_norms(AV, MV, lam)
    denominator = (a_norm + np.abs(lam) * m_norm) * column_norms(V)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), 0.0)


_METHODS = ("auto", "dense", "lanczos", "lobpcg")


def _validate_A(A: Any) -> tuple[Any, int, np.dtype[Any], bool, float | None]:
    """Return (A, d, dtype, is_operator, ‖A‖₁ or None) after checking shape, dtype, symmetry and
    finiteness (for a dense ``A`` the norm comes from the same pass as the symmetry check)."""
    if isinstance(A, scipy.sparse.linalg.LinearOperator):
        if len(A.shape) != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"A must be a square operator, got shape {A.shape}.")
        dtype = np.dtype(A.dtype) if A.dtype is not None else np.dtype(np.float64)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"A has dtype {dtype}; expected float32 or float64.")
        return A, A.shape[0], dtype, True, None
    if scipy.sparse.issparse(A):
        if A.shape[0] != A.shape[1]:
            raise ValueError(f"A must be square, got shape {A.shape}.")
        if A.dtype not in (np.float32, np.float64):
            raise TypeError(f"A has dtype {A.dtype}; expected float32 or float64.")
        if not np.isfinite(A.data).all():
            raise ValueError("A contains NaN or Inf; remove them before solving.")
        asym = abs(A - A.T).max() if A.nnz else 0.0
        scale = abs(A).max() if A.nnz else 0.0
        if asym > 100 * np.finfo(A.dtype).eps * max(scale, np.finfo(np.float64).tiny):
            raise ValueError(
                f"A is not symmetric: max |A - A.T| = {asym:.3g} (max |A| = {scale:.3g}); "
                "symmetrize it, e.g. (A + A.T) / 2."
            )
        return A.tocsr(), A.shape[0], np.dtype(A.dtype), True, None
    arr = as_float_array(A, "A", ndim=2, allowed=(np.float32, np.float64))
    if arr.shape[0] != arr.shape[1]:
        raise ValueError(f"A must be a square 2-D matrix, got shape {arr.shape}.")
    # One fused pass (symmetry, finiteness, ‖A‖₁) instead of |A − Aᵀ| temporaries.
    # The pass follows the caller's BLAS thread setting (two threads halve it at d ≥ 2048).
    asym, scale, finite, a_norm = asymmetry_and_norm(arr, threads=caller_threads())
    if not finite:
        check_finite(arr, "A")
        _check_norm_finite(a_norm, "A")
    rtol = 100.0 * float(np.finfo(arr.dtype).eps)
    if asym > rtol * max(scale, np.finfo(np.float64).tiny):
        check_symmetric(arr, "A")  # raises with the standard message
    return arr, arr.shape[0], arr.dtype, False, a_norm


def _apply_symmetric(A: Any, V: FloatArray) -> FloatArray:
    """``A @ V`` for the (validated, symmetric) ``A``; a dense ``A`` goes through SciPy's ``gemm``.

    Same library as the operator's products, so threaded calls do not compete with a second OpenBLAS
    (see :mod:`rqcore._blas`); a C-ordered ``A`` is passed as its Fortran-ordered transpose (equal).
    """
    if isinstance(A, np.ndarray) and A.dtype == V.dtype and A.dtype in (np.float32, np.float64):
        A_f = A if A.flags.f_contiguous else A.T
        if V.ndim == 2 and V.shape[1] == 1:
            # One column: gemm would not forward to gemv (2× slower); the dot-product gemv (trans on
            # the Fortran view, A_fᵀ = A) is as fast as NumPy's.
            (gemv,) = scipy.linalg.blas.get_blas_funcs(("gemv",), (A_f,))
            with wide():
                return gemv(1.0, A_f, np.ravel(V), trans=1)[:, None]
        return gemm(A_f, np.asfortranarray(V))
    return np.asarray(A @ V)


def _materialize(A: Any, d: int, dtype: np.dtype[Any]) -> FloatArray:
    """Dense copy of an operator or sparse matrix (for the dense fallback)."""
    if scipy.sparse.issparse(A):
        return np.asarray(A.toarray(), dtype=dtype)
    dense = np.asarray(A @ np.eye(d, dtype=dtype), dtype=dtype)
    return (dense + dense.T) / 2


def _dense_topk(
    A: FloatArray, pencil: Pencil, k: int, largest: bool
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Cholesky reduction (``sygst``) + LAPACK on the reduced matrix, back-transformed.

    The subset path of :func:`rqcore._subset_eigh.subset_eigh` (``sytrd`` + ``stemr`` on the index
    range), or divide and conquer on all pairs (``syevd``) when more than a quarter are wanted
    (:func:`rqcore._lanczos._wanted_eigh`). Against SciPy's ``syevr`` subset, 1 thread: d = 1024,
    k = 128: 86 against 106 ms; d = 512, k = 128: 24 against 33 ms.
    """
    values, Y = _wanted_eigh(pencil.reduce(A), k, largest, overwrite=True)
    vectors = pencil.solve_upper(Y)
    return np.ascontiguousarray(values), np.ascontiguousarray(vectors), Y


# ----------------------------------------------------------------------------------------------------
# Iterative back ends: choice of method and parameters, operators, verification.

#: Below this dimension, or for ``k > d / 4``, the iterative methods hand over to the dense one: the
#: Krylov basis would be a large fraction of the space, and LAPACK is then faster and exact.
_DENSE_MAX_D = 64
_DENSE_K_FRACTION = 4
#: ``method="auto"`` already prefers LAPACK for ``k ≥ d/8`` with a dense ``A`` (measured: at d = 1024,
#: k = 128 the dense path takes about half the time of the Lanczos run, cold or warm).
_DENSE_AUTO_K_FRACTION = 8
#: Cold solves with a dense ``A`` also go to LAPACK where ``k`` is past the single-vector path and the
#: block Lanczos is overhead-bound: ``d ≤ 1024`` with ``k > 32``, and ``1024 < d ≤ 1536`` with
#: ``k ≥ d/16``.
#: Dense against block Lanczos, ms, 1 / 2 threads: (512, 36) 21 / 22 against 48 / 55; (1024, 48) 113 / 76
#: against 127 / 101; (1024, 64) 118 / 83 against 179 / 142; (1536, 96) 366 / 256 against 346 / 276;
#: (1536, 128) – / 282 against – / 378; Lanczos stays ahead at (1024, 32) (ARPACK, 54 against
#: ≈ 100 ms), (1536, 48) 230 against 337 ms and (2048, 128) 687 against 908 ms. Warm starts keep the
#: block Davidson, which is faster there ((1024, 48): 55 against 101 ms; (1536, 96): 223 against 319).
_COLD_DENSE_SMALL_D = 1024
_COLD_DENSE_MID_D = 1536
_COLD_DENSE_MID_K_FRACTION = 16


def _fallback_reason(d: int, k: int) -> str | None:
    if d < _DENSE_MAX_D:
        return f"d < {_DENSE_MAX_D}"
    if _DENSE_K_FRACTION * k > d:
        return "k close to d"
    return None


def _cold_prefers_dense(d: int, k: int) -> bool:
    """Whether LAPACK beats the iterative paths on a cold solve with a dense ``A`` (see above)."""
    if d <= _COLD_DENSE_SMALL_D:
        return k > _SINGLE_VECTOR_SMALL_D_MAX_K
    return d <= _COLD_DENSE_MID_D and _COLD_DENSE_MID_K_FRACTION * k >= d


def _auto_method(d: int, k: int, *, is_operator: bool, warm: bool, precond: bool) -> str:
    """The rule behind ``method="auto"`` (documented in :func:`generalized_topk` and docs/solvers.md)."""
    if _fallback_reason(d, k) is not None:
        return "dense"
    if not is_operator and (
        _DENSE_AUTO_K_FRACTION * k >= d or (not warm and not precond and _cold_prefers_dense(d, k))
    ):
        return "dense"
    if precond:
        return "lobpcg"
    return "lanczos"


def _lanczos_params(d: int, k: int, warm: bool) -> tuple[int, int]:
    """Block size and restart size of the block Lanczos (measured on power-law pencils)."""
    if warm and k <= 32:
        b = k
        basis = 3 * k + 16
    else:  # large k: a block of k columns converges worse per column than the cold block size
        b = min(k, max(8, k // 2)) if k <= 32 else max(32, k // 4)
        basis = 2 * k + 4 * b
    return b, max(min(basis, d - b), k + b)


def _check_preconditioner(M: Any, d: int) -> None:
    """Raise a clear error for a preconditioner of the wrong kind or shape (before any work)."""
    if isinstance(M, np.ndarray) or scipy.sparse.issparse(M):
        if M.shape != (d, d):
            raise ValueError(f"the preconditioner M has shape {M.shape}; it must be ({d}, {d}).")
        if not np.issubdtype(M.dtype, np.floating):
            raise TypeError(f"the preconditioner M has dtype {M.dtype}; expected a floating dtype.")
    elif isinstance(M, scipy.sparse.linalg.LinearOperator):
        if tuple(M.shape) != (d, d):
            raise ValueError(f"the preconditioner M has shape {M.shape}; it must be ({d}, {d}).")
    elif not callable(M):
        raise TypeError(
            f"M must be an array, a LinearOperator or a callable, got {type(M).__name__}."
        )


def _as_preconditioner(M: Any) -> Callable[[FloatArray], FloatArray]:
    if isinstance(M, np.ndarray) or scipy.sparse.issparse(M):
        return lambda X: np.asarray(M @ X)
    if isinstance(M, scipy.sparse.linalg.LinearOperator):
        return lambda X: np.asarray(M.matmat(X))
    if callable(M):
        return lambda X: np.asarray(M(X))
    raise TypeError(f"M must be an array, a LinearOperator or a callable, got {type(M).__name__}.")


def _shift_invert(
    A: FloatArray, pencil: Pencil, a_norm: float, dtype: np.dtype[Any]
) -> tuple[float, FloatArray] | None:
    """A shift ``σ`` below the spectrum and the Cholesky factor of ``A − σM`` (None if none found).

    ``σ = −10⁻³‖A‖₁/‖M‖₁`` works for positive semi-definite ``A`` (covariances) and keeps the smallest
    eigenvalues well separated after the transformation ``μ = 1/(λ − σ)``; ten and a hundred times
    that serve a slightly indefinite ``A``. Further down the shift helps no more: with
    ``|σ| ≫ |λ_min|`` the transformed spectrum is an almost affine image of ``C``'s, compressed towards
    ``1/|σ|``, so the iteration behaves like plain Lanczos on ``C`` but loses digits (a far shift such as
    the guaranteed ``−1.01‖A‖₁/ε`` left residuals of 6e-10 … 1e-5 on an indefinite ``A``). None then
    sends the caller to the plain iteration, for which the smallest eigenvalues of an indefinite
    ``A`` are extreme ones.
    """
    m_norm = pencil.one_norm
    shifts = [-1e-3 * a_norm / m_norm, -1e-2 * a_norm / m_norm, -1e-1 * a_norm / m_norm]
    for sigma in shifts:
        if not sigma < 0:
            continue
        K = np.array(A, dtype=dtype, order="F", copy=True)
        if pencil.B is None:
            K.flat[:: pencil.dim + 1] -= sigma
        else:
            K -= sigma * pencil.B
            K.flat[:: pencil.dim + 1] -= sigma * pencil.reg_used
        try:
            G = scipy.linalg.cholesky(K, lower=True, overwrite_a=True, check_finite=False)
        except np.linalg.LinAlgError:
            continue
        return float(sigma), G
    return None


@dataclass
class _Problem:
    """What the iterative drivers need: the reduced operator and the map back to eigenvalues."""

    op: Callable[[FloatArray], FloatArray]
    largest: bool  # wanted end of op's spectrum
    to_lambda: Callable[[NDArray[np.float64]], NDArray[np.float64]]
    transform: str  # "none" or "shift-invert"
    sigma: float = 0.0
    back: bool = False  # op returns (C Y, L⁻ᵀ Y)
    op_back: Callable[[FloatArray], FloatArray] | None = None  # Z ↦ C Lᵀ Z = L⁻¹ A Z


#: Blocks of at most this many columns are multiplied by ``A`` column by column with ``symv`` (one
#: triangle of ``A`` read per column) instead of one ``gemm``: OpenBLAS's ``gemm`` does not forward
#: narrow blocks to BLAS-2 and streams the full square. Measured (d = 4096, 1 thread): 1 column 3.6
#: against 11.4 ms, 3 columns 9.8 against 13.1 ms, 4 columns 13.2 against 12.8 ms (2 threads: 5.5
#: against 7.3 ms at 3 columns, 7.9 against 7.6 at 4). The warm Davidson's last steps expand 1-3 pairs.
_SYMV_MAX_COLUMNS = 3


def _times_symmetric(A_f: FloatArray, Z: FloatArray, gemm: Any) -> FloatArray:
    """``A Z`` for the Fortran-ordered view ``A_f`` of the validated symmetric ``A`` and a
    Fortran-ordered block ``Z``: ``symv`` per column for narrow blocks, one ``gemm`` otherwise."""
    if Z.shape[1] > _SYMV_MAX_COLUMNS:
        return gemm(1.0, A_f, Z)
    (symv,) = scipy.linalg.blas.get_blas_funcs(("symv",), (A_f,))
    W = np.empty(Z.shape, dtype=np.result_type(A_f.dtype, Z.dtype), order="F")
    for j in range(Z.shape[1]):
        W[:, j] = symv(1.0, A_f, Z[:, j], lower=0)
    return W


def _build_problem(
    A: Any,
    pencil: Pencil,
    *,
    largest: bool,
    is_operator: bool,
    a_norm: float,
    dtype: np.dtype[Any],
) -> _Problem:
    identity: Callable[[NDArray[np.float64]], NDArray[np.float64]] = lambda t: t  # noqa: E731
    if not largest and not is_operator:
        si = _shift_invert(A, pencil, a_norm, dtype)
        if si is not None:
            sigma, G = si

            def op_si(Y: FloatArray) -> FloatArray:
                Z = pencil.lower_matmul(Y)
                Z = scipy.linalg.cho_solve((G, True), Z, check_finite=False)
                return pencil.upper_matmul(Z)

            return _Problem(
                op=op_si,
                largest=True,
                to_lambda=lambda mu: sigma + 1.0 / mu,
                transform="shift-invert",
                sigma=sigma,
            )
    if isinstance(A, np.ndarray) and not pencil.is_identity and A.dtype == pencil.dtype:
        # BLAS directly: trsm, symm (one triangle of A, Fortran view of the symmetric array), trsm
        # in place; no copies of A or of the (d, b) blocks.
        # gemm on the full square rather than symm: OpenBLAS's gemm is 10-20 % faster per column
        # (measured at d = 512 … 4096, b = 8 … 128, 1 thread).
        A_f = A if A.flags.f_contiguous else A.T
        (gemm,) = scipy.linalg.blas.get_blas_funcs(("gemm",), (A_f,))

        def op_pair(Y: FloatArray) -> tuple[FloatArray, FloatArray]:
            Z = pencil._trsm(np.asfortranarray(Y), trans=True)
            W = _times_symmetric(A_f, Z, gemm)
            return pencil._trsm(W, trans=False, overwrite=True), Z

        def op_back(Z: FloatArray) -> FloatArray:
            W = _times_symmetric(A_f, np.asfortranarray(Z), gemm)
            return pencil._trsm(W, trans=False, overwrite=True)

    else:

        def op_pair(Y: FloatArray) -> tuple[FloatArray, FloatArray]:
            Z = pencil.solve_upper(Y)
            return pencil.solve_lower(np.asarray(A @ Z)), Z

        def op_back(Z: FloatArray) -> FloatArray:
            return pencil.solve_lower(np.asarray(A @ Z))

    return _Problem(
        op=op_pair,  # type: ignore[arg-type]
        largest=largest,
        to_lambda=identity,
        transform="none",
        back=True,
        op_back=op_back,
    )


#: Single-vector Lanczos (ARPACK's implicitly restarted Lanczos, BLAS-2 products) for cold solves of
#: the largest pairs with a dense ``A``: for small ``k`` it needs about ``2.5k`` to ``3k`` products
#: where a block method needs several times more columns (measured on power-law pencils, 1 thread:
#: d = 512, k = 8: 28 products against 80 columns of the ``b = 8`` block run; d = 4096, k = 8: 0.39 s
#: against 0.65 s), and below d ≈ 1500 the cache-resident BLAS-2 products also win at k = 32.
_SINGLE_VECTOR_MAX_K = 8
_SINGLE_VECTOR_SMALL_D = 1536
_SINGLE_VECTOR_SMALL_D_MAX_K = 32
#: ARPACK's test ``‖Cy − θy‖ ≤ tol_A·|θ|`` bounds the pencil measure by ``tol_A`` but over-solves it by
#: four to five orders of magnitude on the benchmark pencils; ``tol_A = 100·tol`` still gave measures
#: ≤ 1e-10 for tol = 1e-8 at d = 512 … 2048, k = 8, 32 and saves up to a restart. The true measure is
#: checked afterwards and the block iteration takes over when it fails.
_SINGLE_VECTOR_TOL_FACTOR = 100.0
#: Warm starts (``v0``) up to this dimension also take the single-vector path, started from the sum of
#: the previous reduced vectors: it needs about as many products as a cold run, but at d ≤ 1024 that is
#: still 1.6-3× faster than the warm block Davidson (whose small blocks are overhead-bound there);
#: at d = 2048 the Davidson is ≈ 25 % faster (measured, 1 thread).
_SINGLE_VECTOR_WARM_MAX_D = 1536
#: ARPACK's Lanczos basis is ``ncv = max(2k + 1, this)`` vectors (``eigsh``'s default floor is 20).
#: Total products over power-law pencils (α = 0.5, 1, 2; four seeds each; d = 512 … 4096 for k = 8,
#: 512 and 1024 otherwise), for ``ncv`` = 2k+1 / … / 20: k = 2 (5, 8, 12, 20): 492 / 459 / 482 / 555;
#: k = 4 (9, 12, 16, 20): 532 / 545 / 593 / 633; k = 8 (16 … 20): 1556 / 1555 / 1550 / 1578 / 1582;
#: from k = 16 on ``2k + 1`` was within 2 % of the best ``ncv`` up to ``2k + 8``.
_SINGLE_VECTOR_MIN_NCV = 8


def _longest_repeat(values: NDArray[Any], tol: float) -> int:
    """Length of the longest run of equal eigenvalues in ``values`` (sorted), equal meaning within
    ``10·tol`` of the largest ``|value|``; 1 when all are distinct, 0 when there are none."""
    if values.size < 2:
        return int(values.size)
    scale = float(np.max(np.abs(values)))
    equal = np.abs(np.diff(np.asarray(values, dtype=np.float64))) <= 10.0 * tol * scale
    longest = run = 1
    for same in equal:
        run = run + 1 if same else 1
        longest = max(longest, run)
    return longest


def _use_single_vector(d: int, k: int) -> bool:
    return k <= _SINGLE_VECTOR_MAX_K or (
        d <= _SINGLE_VECTOR_SMALL_D and k <= _SINGLE_VECTOR_SMALL_D_MAX_K
    )


#: Dimension from which the single-vector products run ``symv`` on the caller's thread count.
_SYMV_WIDE_MIN_DIM = 1024


class _RecordedReducedOperator(scipy.sparse.linalg.LinearOperator):
    """``C = L⁻¹AL⁻ᵀ`` for ARPACK, one vector per product, keeping each product's ``x``, ``L⁻ᵀx`` and
    ``AL⁻ᵀx``.

    A product is two ``trsv`` around one ``symv``, called directly (no wrappers; the only copies are
    the three record columns). ``matvec`` is overridden itself, not only ``_matvec``: ARPACK's driver calls it once per
    step, and the base class's shape checks and reshapes cost a few µs each time.

    Every Ritz vector ARPACK returns lies in the span of the vectors it multiplied (a Krylov space), so
    the recorded columns give ``L⁻ᵀY`` and ``AL⁻ᵀY`` by small products (:func:`_back_from_products`)
    instead of a triangular solve and a product with ``A`` on the whole block. Recording stops (and the
    caller falls back to those) past ``limit`` products.
    """

    def __init__(self, A: FloatArray, pencil: Pencil, limit: int, start: int) -> None:
        d = pencil.dim
        super().__init__(dtype=A.dtype, shape=(d, d))
        # trsv is as fast transposed as not, so this path does not ask for the mirrored factor.
        self._F, self._up_lower, self._up_trans = pencil._upper_operand(np.dtype(A.dtype))
        self._A_f = A if A.flags.f_contiguous else A.T
        self._trsv, self._symv = scipy.linalg.blas.get_blas_funcs(
            ("trsv", "symv"), (self._F, self._A_f)
        )
        # symv gains from threads from d = 1024 on (2 threads: 75 → 50 µs at d = 1024, 185 → 93 µs at
        # 1536, but 18.6 → 18.2 µs at 512, where switching the count twice costs ≈ 5 µs); trsv never.
        self._widen = widens() and d >= _SYMV_WIDE_MIN_DIM
        self.limit = limit
        self.count = 0
        self.recording = limit > 0
        size = min(start, limit)
        self._X, self._Z, self._W = (
            np.empty((d, size), dtype=A.dtype, order="F") for _ in range(3)
        )

    def _grow(self) -> None:
        """Double the record's capacity (up to ``limit``)."""
        j = self.count
        size = min(2 * j, self.limit)
        self._X, self._Z, self._W = (
            np.asfortranarray(np.concatenate([B[:, :j], np.empty_like(B[:, : size - j])], axis=1))
            for B in (self._X, self._Z, self._W)
        )

    def matvec(self, x: Any) -> FloatArray:
        """``C x`` for one vector (recording ``x``, ``L⁻ᵀx`` and ``AL⁻ᵀx``)."""
        x = np.ravel(x)
        z = self._trsv(self._F, x, lower=self._up_lower, trans=self._up_trans)  # L⁻ᵀ x
        if self._widen:
            with wide():
                w = self._symv(1.0, self._A_f, z, lower=0)
        else:
            w = self._symv(1.0, self._A_f, z, lower=0)
        j = self.count
        if self.recording and j >= self.limit:
            self.recording = False
        if self.recording:
            # Copies into the record, not BLAS output written there: solving and multiplying in the
            # record's columns made the 28 products of d = 512, k = 8 0.16-0.33 ms slower.
            if j == self._X.shape[1]:
                self._grow()
            self._X[:, j] = x
            self._Z[:, j] = z
            self._W[:, j] = w
        self.count = j + 1
        return self._trsv(self._F, w, lower=1, overwrite_x=1)  # L⁻¹ w

    def _matvec(self, x: Any) -> FloatArray:
        return self.matvec(x)

    def recorded(self) -> tuple[FloatArray, FloatArray, FloatArray] | None:
        """``(X, Z, W)`` of every product so far, or None when recording stopped."""
        if not self.recording or self.count == 0:
            return None
        n = self.count
        return self._X[:, :n], self._Z[:, :n], self._W[:, :n]


def _back_from_products(
    Y: FloatArray, recorded: tuple[FloatArray, FloatArray, FloatArray], tol: float
) -> tuple[FloatArray, FloatArray, FloatArray] | None:
    """``(Y', L⁻ᵀY', AL⁻ᵀY')`` with ``Y' = Xc ≈ Y`` from the recorded products ``(X, L⁻ᵀX, AL⁻ᵀX)``.

    ``c`` solves the normal equations ``XᵀX c = XᵀY`` (``n × n``, ``n`` products): ``d·n²`` flops
    where the direct way costs a triangular solve and a product with ``A`` (``3d²k``); d = 512, k = 8,
    28 products: 0.31 → 0.07 ms. The three results are consistent whatever the rounding in ``c`` (all
    are the same combination of columns), and the caller's Rayleigh-Ritz and residuals use them
    together. Returns None when ``Y'`` misses ``Y`` by more than ``0.1·tol`` (relative): then the
    caller takes the direct way.
    """
    X, Z, W = recorded  # at most d columns (the recording limit), so XᵀX can be definite
    G = gemm(X, X, trans_a=True)
    R = gemm(X, np.asfortranarray(Y, dtype=X.dtype), trans_a=True)
    # SciPy's LAPACK (posv reads G's upper triangle): NumPy's solve goes to NumPy's own OpenBLAS,
    # which took 67 against 5 µs here, called between SciPy's BLAS calls.
    (posv,) = scipy.linalg.get_lapack_funcs(("posv",), (G,))
    _, c, info = posv(G, R, lower=0, overwrite_a=1, overwrite_b=1)
    if info != 0:  # pragma: no cover - n independent Krylov vectors make XᵀX positive definite
        return None
    Y_fit = gemm(X, np.asfortranarray(c))
    # Columnwise, in float64 (a Numba pass; NumPy's norm also goes to its own BLAS).
    misfit = column_norms(np.asarray(Y_fit - Y, dtype=np.float64))
    if not bool(np.all(misfit <= 0.1 * tol * column_norms(np.asarray(Y, dtype=np.float64)))):
        return None
    return Y_fit, gemm(Z, c), gemm(W, c)


def _single_vector_lanczos(
    A: FloatArray,
    pencil: Pencil,
    k: int,
    tol: float,
    rng: np.random.Generator,
    start: FloatArray | None = None,
) -> (
    tuple[FloatArray, int, FloatArray | None, FloatArray | None, NDArray[np.float64] | None] | None
):
    """Largest ``k`` eigenvectors of ``C = L⁻¹AL⁻ᵀ`` by ARPACK (``eigsh``), products by BLAS-2.

    ARPACK stops when ``‖Cy − θy‖ ≤ tol·|θ|``, which bounds the pencil measure by ``tol``
    (``‖Lr‖ ≤ ‖L‖‖r‖``, ``‖v‖ ≥ 1/‖L‖``); the caller checks the true measure anyway. Returns
    ``(Y, products, V, AV, θ)`` with ``V = L⁻ᵀY`` and ``AV`` from the recorded products
    (:class:`_RecordedReducedOperator`) and ARPACK's Ritz values ``θ`` (ascending); the last three
    are None when not at hand (and then ``Y`` is ARPACK's), or None when ARPACK does not converge.
    """
    d = pencil.dim
    ncv = min(max(2 * k + 1, _SINGLE_VECTOR_MIN_NCV), d - 1)
    # Recording pays while the normal equations (d·n²) cost less than the direct back-transform (3d²k).
    limit = min(d, max(2 * ncv, math.isqrt(3 * d * k)))
    op = _RecordedReducedOperator(A, pencil, limit, start=2 * ncv)
    if start is None:
        v0 = rng.standard_normal(d).astype(A.dtype)
    else:  # warm: the sum of the previous reduced vectors (each weighted equally)
        v0 = np.asarray(start.sum(axis=1), dtype=A.dtype)
        size = float(np.sum(column_norms(start)))
        if not float(np.linalg.norm(v0)) > 1e-8 * size:
            # The columns cancel (e.g. [x, −x]) or vanish: ARPACK rejects a zero start vector.
            weights = np.asarray(rng.standard_normal(start.shape[1]), dtype=start.dtype)
            v0 = np.asarray(start @ weights, dtype=A.dtype)
            if not float(np.linalg.norm(v0)) > 1e-8 * size or size == 0.0:
                v0 = rng.standard_normal(d).astype(A.dtype)
    try:
        theta, Y = scipy.sparse.linalg.eigsh(
            op, k, which="LA", tol=_SINGLE_VECTOR_TOL_FACTOR * tol, v0=v0, ncv=ncv
        )
    except scipy.sparse.linalg.ArpackNoConvergence:  # pragma: no cover - the block path takes over
        return None
    Y = np.asarray(Y, dtype=A.dtype)
    recorded = op.recorded()
    back = None if recorded is None else _back_from_products(Y, recorded, tol)
    if back is None:
        return Y, op.count, None, None, None
    return back[0], op.count, back[1], back[2], np.asarray(theta, dtype=np.float64)


#: Warm starts (``v0`` given, ``"lanczos"``, no spectral transformation) run a block Davidson from the
#: whole of ``span(Lᵀv0)`` first (see :func:`rqcore._lanczos.warm_block_davidson`); it hands over to the
#: block Lanczos after this many block products.
_WARM_MAX_STEPS = 40
#: The warm Davidson and the block Lanczos's exact stop accept a pair below ``_ACCEPT_TOL_FACTOR·tol``
#: (its measure is the returned residual, computed as ``‖L(Cy − θy)‖``; the margin absorbs the
#: rounding of a recomputation from ``AV``, ``MV``).
_ACCEPT_TOL_FACTOR = 0.9
#: Basis size that triggers a thick restart of the warm Davidson: ``min(max(min(f·k + 16, d/2), 2k + 16),
#: d − k)`` with this ``f``.
_WARM_BASIS_FACTOR = 4


#: Guard pairs a result keeps for the next warm start (``_guard_size(k)`` Ritz vectors just past the
#: k-th, from the final basis of the block Lanczos or the warm Davidson). Starting the Davidson from
#: ``k + g`` directions lets the pairs at the ``k``/``k+1`` boundary converge in fewer steps.
_GUARD_MIN = 16
_GUARD_MAX = 64


def _guard_size(k: int) -> int:
    return min(max(_GUARD_MIN, k), _GUARD_MAX)


#: A warm start block whose Gram matrix ``G`` has ``‖G − I‖_F`` at most this is orthonormalized by one
#: Cholesky-QR pass (d = 4096, k = 128: 8 ms against 25 ms for Householder QR): then
#: ``cond(G) ≤ 1.1/0.9``, and one pass leaves the block orthonormal to rounding. A previous result's
#: vectors (``M``-orthonormal) give ``‖G − I‖_F`` of order ``√k·eps``.
_CHOLQR_START_MAX_DEVIATION = 0.1


def _orthonormal_start(Y0: FloatArray) -> tuple[FloatArray, NDArray[np.float64]] | None:
    """``(X0, R)`` with ``Y0 = X0 R``, ``X0`` orthonormal, ``R`` upper triangular; None when ``R`` is
    too ill-conditioned for ``v0 R⁻¹`` to be accurate (then the caller restarts from ``X0``)."""
    G = np.asarray(gemm(Y0, Y0, trans_a=True), dtype=np.float64)
    k = G.shape[0]
    if float(np.linalg.norm(G - np.eye(k))) <= _CHOLQR_START_MAX_DEVIATION:
        Rc = scipy.linalg.cholesky((G + G.T) / 2, lower=False, check_finite=False)
        return solve_right_upper(Rc, np.array(Y0, order="F", copy=True)), Rc
    Q, Rr = np.linalg.qr(Y0)
    diag = np.abs(np.diag(Rr))
    # Reusing v0 needs a well-conditioned R (rounding in v0 R⁻¹ grows with cond(R)).
    if bool(diag.min() > 1e-2 * max(float(diag.max()), 1e-300)):
        return Q, np.asarray(Rr, dtype=np.float64)
    return None


def _warm_davidson(
    problem: _Problem,
    pencil: Pencil,
    v0: FloatArray,
    Y0: FloatArray,
    k: int,
    *,
    tol: float,
    norms: tuple[float, float],
    maxiter: int,
    rng: np.random.Generator,
    dtype: np.dtype[Any],
    orthonormal: bool = False,
    guard: tuple[FloatArray, FloatArray] | None = None,
) -> tuple[KrylovResult, NDArray[np.float64]]:
    """Warm start from the whole previous block: Rayleigh-Ritz on ``span(Lᵀv0)``, then block Davidson.

    With ``m = k`` columns the first product reuses ``v0`` itself as ``L⁻ᵀX0`` (``X0 = Lᵀv0 R⁻¹`` with
    ``R`` from a QR of ``Lᵀv0``; ``R = I`` when ``orthonormal``, i.e. ``Y0`` is a previous result's
    reduced vectors), which saves one triangular solve; fewer columns are padded with random ones.
    ``guard`` (a previous result's ``(Lᵀg, g)``, orthonormal and orthogonal to ``Y0``; only with
    ``orthonormal``) widens the start block to ``k + g`` columns.
    """
    d = pencil.dim
    a_norm, m_norm = norms
    assert problem.op_back is not None
    maxbasis = min(max(min(int(_WARM_BASIS_FACTOR * k) + 16, d // 2), 2 * k + 16), d - k)
    start = None
    if Y0.shape[1] == k:
        start = (Y0, None) if orthonormal else _orthonormal_start(Y0)
    if start is not None:
        X0, Rr = start
        Z0 = np.array(v0, dtype=dtype, order="F", copy=True)
        if Rr is not None:
            Z0 = solve_right_upper(Rr, Z0)  # Z0 = v0 R⁻¹ = L⁻ᵀ X0 (v0 = L⁻ᵀ Y0 = L⁻ᵀ X0 R)
        # The start block takes at most half the Davidson's basis (the rest is for expansions).
        ng = 0 if guard is None or not orthonormal else min(guard[0].shape[1], maxbasis // 2 - k)
        if ng > 0:
            assert guard is not None
            X0 = np.hstack([X0, guard[0][:, :ng]])
            Z0 = np.hstack([Z0, guard[1][:, :ng]])
        X0 = np.asfortranarray(X0, dtype=dtype)
        Z0 = np.asfortranarray(Z0, dtype=dtype)
        W0 = np.asarray(problem.op_back(Z0), dtype=dtype)
    else:
        pad = rng.standard_normal((d, k - Y0.shape[1])).astype(dtype)
        X0, _ = np.linalg.qr(np.hstack([Y0, pad]) if pad.shape[1] else Y0)
        out = problem.op(X0)
        W0, Z0 = np.asarray(out[0], dtype=dtype), np.asarray(out[1], dtype=dtype)
    tiny = float(np.finfo(np.float64).tiny)

    def measure(
        R: FloatArray, theta: NDArray[np.float64], vnorms: NDArray[np.float64]
    ) -> NDArray[np.float64]:
        # Av − θMv = L(Cy − θy): one trmm of the residual block gives the measure of pair_residuals.
        with wide():
            LR = pencil.lower_matmul(R)
        num = column_norms(np.asarray(LR, dtype=np.float64))
        den = (a_norm + np.abs(theta) * m_norm) * np.maximum(vnorms, tiny)
        return num / den

    sqrt_m = math.sqrt(m_norm)

    def bound(
        rnorms: NDArray[np.float64], theta: NDArray[np.float64], vnorms: NDArray[np.float64]
    ) -> NDArray[np.float64]:
        # ‖L r‖ ≤ ‖L‖‖r‖ with ‖L‖² = ‖M‖₂ ≤ ‖M‖₁ (over-estimates by about two orders here).
        return sqrt_m * rnorms / ((a_norm + np.abs(theta) * m_norm) * np.maximum(vnorms, tiny))

    return warm_block_davidson(
        problem.op,  # type: ignore[arg-type]
        d,
        k,
        largest=problem.largest,
        X0=X0,
        W0=W0,
        Z0=Z0,
        measure=measure,
        bound=bound,
        tol=_ACCEPT_TOL_FACTOR * tol,
        maxiter=maxiter,
        maxbasis=maxbasis,
        rng=rng,
        dtype=dtype,
        guard=_guard_size(k),
    )


def _finalize(
    A: Any,
    pencil: Pencil,
    Y: FloatArray,
    norms: tuple[float, float],
    largest: bool,
    V: FloatArray | None = None,
    AV: FloatArray | None = None,
    theta: NDArray[np.float64] | None = None,
) -> tuple[FloatArray, FloatArray, NDArray[np.float64], FloatArray]:
    """Back-transform, final Rayleigh-Ritz in the pencil's coordinates, and true residuals.

    The small Rayleigh-Ritz on ``(VᵀAV, VᵀMV)`` makes the vectors ``M``-orthonormal to working precision
    and gives Rayleigh-quotient eigenvalues (quadratically accurate) whatever transformation was iterated.
    The residuals are the measure of :func:`pair_residuals`, from the products ``AV`` and ``MV``.
    Returns ``(values, vectors, residuals, Y S)``: the last are the reduced coordinates ``Lᵀv`` of the
    returned vectors (the same rotation applied to ``Y``), kept for warm starts.

    ``theta``, with ``V`` and ``AV``, are Ritz values of ``C`` whose vectors ``Y`` already are
    Rayleigh-Ritz vectors (ARPACK's, on the single-vector path): when ``Y`` is orthonormal to
    ``1000·eps`` the Rayleigh-Ritz is skipped (it would rotate by rounding only; ``VᵀMV = YᵀY``) and
    ``theta`` are the values. The residuals are computed either way.
    """
    with wide():
        if V is None:
            V = pencil.solve_upper(Y)
        if AV is None:
            AV = _apply_symmetric(A, V)
        if not pencil.is_identity and Y.dtype == pencil.dtype:
            # M V = L Lᵀ V = L Y: one trmm (d²k flops) instead of the product with B (2d²k). V = L⁻ᵀY
            # comes from a backward-stable triangular solve, so L Y differs from M V by
            # O(d·eps·‖M‖‖V‖) only.
            MV = pencil.lower_matmul(Y)
        else:
            MV = pencil.matvec(V)
    V, AV, MV = (np.asfortranarray(X, dtype=V.dtype) for X in (V, AV, MV))
    if theta is not None:
        Yf = np.asfortranarray(Y, dtype=V.dtype)
        gram = np.asarray(gemm(Yf, Yf, trans_a=True), dtype=np.float64)
        deviation = float(np.max(np.abs(gram - np.eye(gram.shape[0]))))
        if deviation <= 1e3 * float(np.finfo(V.dtype).eps):
            order = np.argsort(theta)
            if largest:
                order = order[::-1]
            w = np.asarray(theta, dtype=np.float64)[order]
            V, AV, MV, Yf = (X[:, order] for X in (V, AV, MV, Yf))
            res = _residual_measures(AV, MV, w, V, norms)
            return np.ascontiguousarray(w, dtype=V.dtype), np.ascontiguousarray(V), res, Yf
    H = np.asarray(gemm(V, AV, trans_a=True), dtype=np.float64)
    G = np.asarray(gemm(V, MV, trans_a=True), dtype=np.float64)
    H = (H + H.T) / 2
    G = (G + G.T) / 2
    try:
        w, S = scipy.linalg.eigh(H, G, check_finite=False)
    except np.linalg.LinAlgError:  # pragma: no cover - G is ≈ I by construction
        w, S = scipy.linalg.eigh(H, check_finite=False)
    if largest:
        w, S = w[::-1], S[:, ::-1]
    S = S.astype(V.dtype)
    V, AV, MV = gemm(V, S), gemm(AV, S), gemm(MV, S)
    Y_rot = gemm(np.asfortranarray(Y, dtype=V.dtype), S)
    res = _residual_measures(AV, MV, w, V, norms)
    return np.ascontiguousarray(w, dtype=V.dtype), np.ascontiguousarray(V), res, Y_rot


def _widened(f: Callable[..., Any]) -> Callable[..., Any]:
    """``f`` run with the caller's BLAS thread count (for the large products inside a driver)."""

    def run(*args: Any) -> Any:
        with wide():
            return f(*args)

    return run


def _iterative(
    A: Any,
    pencil: Pencil,
    k: int,
    *,
    method: str,
    largest: bool,
    tol: float,
    maxiter: int | None,
    v0: FloatArray | None,
    M: Any,
    rng: np.random.Generator,
    is_operator: bool,
    dtype: np.dtype[Any],
    a_norm: float | None = None,
    v0_reduced: FloatArray | None = None,
    v0_guard: tuple[FloatArray, FloatArray] | None = None,
) -> tuple[
    FloatArray,
    FloatArray,
    NDArray[np.float64],
    int,
    str,
    FloatArray | None,
    tuple[FloatArray, FloatArray] | None,
]:
    """Run an iterative back end; returns ``(values, vectors, residuals, iterations, label, Y, guard)``.

    ``Y`` are the reduced coordinates ``Lᵀ·vectors`` (orthonormal), or None where not at hand;
    ``guard`` the guard pairs for the next warm start (see ``GeneralizedEigenResult._guard``) or None.
    ``v0_reduced``, when given, is ``Lᵀv0`` with orthonormal columns (a previous result's), which
    saves the product and the orthonormalization of the warm start; ``v0_guard`` that result's guard
    pairs.
    """
    d = pencil.dim
    if a_norm is None:
        with wide():
            a_norm = _operator_one_norm(A)
    m_norm = pencil.one_norm
    a_over_m = a_norm / m_norm
    warm = v0 is not None
    precond = None if M is None else _widened(_as_preconditioner(M))
    # With a user preconditioner LOBPCG iterates on C itself (the preconditioner is the accelerator).
    use_si = not largest and not is_operator and (method == "lanczos" or precond is None)
    with wide():
        problem = _build_problem(
            A,
            pencil,
            largest=largest or not use_si,
            is_operator=is_operator,
            a_norm=a_norm,
            dtype=dtype,
        )
    # The drivers run single-threaded BLAS (rqcore._threads); the operator's large products get the
    # caller's thread count back.
    problem.op = _widened(problem.op)
    if problem.op_back is not None:
        problem.op_back = _widened(problem.op_back)
    if not largest and problem.transform == "none":
        problem.largest = False
    label = method if problem.transform == "none" else f"{method} (shift-invert)"
    if precond is not None and method == "lobpcg":
        pre = precond

        def reduced_precond(R: FloatArray) -> FloatArray:
            return pencil.upper_matmul(pre(pencil.lower_matmul(R)))
    else:
        reduced_precond = None  # type: ignore[assignment]

    eps = float(np.finfo(dtype).eps)
    cnorm_factor = 1.0  # for shift-invert: guess of ‖C − σ‖ relative to ‖A‖₁/‖M‖₁ + |σ|

    def thresholds(
        theta: NDArray[np.float64], vnorms: NDArray[np.float64] | None
    ) -> NDArray[np.float64]:
        if vnorms is not None:
            # measure ≤ ‖L‖‖r‖/((‖A‖₁ + |θ|‖M‖₁)‖v‖) with ‖L‖² = ‖M‖₂ ≤ ‖M‖₁ and ‖v‖ known.
            return tol * scale * (a_norm + np.abs(theta) * m_norm) * vnorms / math.sqrt(m_norm)
        if problem.transform == "none":
            return residual_thresholds(theta, tol * scale, a_over_m, 0.0)
        # ‖(C − λ)y‖ = ‖(C − σ) r_T‖ / μ ≤ ‖C − σ‖ ‖r_T‖ / μ for T = (C − σ)⁻¹, T y = μ y + r_T.
        lam = problem.to_lambda(theta)
        cnorm = cnorm_factor * (a_over_m + abs(problem.sigma))
        bound = residual_thresholds(lam, tol * scale, a_over_m, 0.0)
        return bound * np.abs(theta) / cnorm

    def exact(
        Q: FloatArray,
        G: NDArray[np.float64],
        theta: NDArray[np.float64],
        vnorms: NDArray[np.float64] | None,
    ) -> NDArray[np.float64]:
        # Av − θMv = L(Cy − θy) = (LQ)(G s): one trmm of the (d, b) block Q gives the true measure.
        # A pair passes at 0.9·tol (the margin absorbs a recomputation from AV, MV); when every pair
        # passes, the driver returns these measures with θ and L⁻ᵀY (no final Rayleigh-Ritz).
        with wide():
            LQ = pencil.lower_matmul(Q)
        num = column_norms(np.asarray(LQ @ G.astype(LQ.dtype), dtype=np.float64))
        assert vnorms is not None
        den = (a_norm + np.abs(theta) * m_norm) * np.maximum(vnorms, np.finfo(np.float64).tiny)
        measures = num / den
        last_exact["theta"] = np.array(theta, dtype=np.float64)
        last_exact["measures"] = measures
        return measures / (_ACCEPT_TOL_FACTOR * tol * scale)

    last_exact: dict[str, NDArray[np.float64]] = {}

    if v0_reduced is not None:
        start: FloatArray | None = v0_reduced
    else:
        with wide():
            start = None if v0 is None else pencil.upper_matmul(v0.astype(dtype, copy=False))
    used = 0
    single_ok = (
        method == "lanczos"
        and (v0 is None or d <= _SINGLE_VECTOR_WARM_MAX_D)
        and maxiter is None
        and largest
        and problem.back
        and isinstance(A, np.ndarray)
        and not pencil.is_identity
        and A.dtype == pencil.dtype
        and _use_single_vector(d, k)
    )
    if (
        method == "lanczos"
        and v0 is not None
        and start is not None
        and not single_ok
        and problem.back
        and problem.op_back is not None
        and problem.transform == "none"
    ):
        budget_w = _WARM_MAX_STEPS if maxiter is None else max(int(maxiter), 1)
        warm_res = _warm_davidson(
            problem,
            pencil,
            v0.astype(dtype, copy=False),
            start,
            k,
            tol=tol,
            norms=(a_norm, m_norm),
            maxiter=budget_w,
            rng=rng,
            dtype=dtype,
            orthonormal=v0_reduced is not None,
            guard=v0_guard,
        )
        used = warm_res[0].iterations
        if warm_res[0].converged:
            res_w, meas_w = warm_res
            assert res_w.V is not None
            return (
                np.ascontiguousarray(res_w.theta, dtype=dtype),
                np.ascontiguousarray(res_w.V),
                meas_w,
                used,
                label,
                res_w.Y,
                res_w.guard,
            )
        # Not converged within its steps: the block Lanczos finishes from the current Ritz vectors.
        start = warm_res[0].Y
        if maxiter is not None and used >= int(maxiter):
            fin = _finalize(A, pencil, warm_res[0].Y, (a_norm, m_norm), largest, V=warm_res[0].V)
            return fin[0], fin[1], fin[2], used, label, fin[3], warm_res[0].guard
    if method == "lanczos":
        b, basis = _lanczos_params(d, k, warm)
        # A warm start keeps all its columns: block_lanczos widens its first block to hold them (the
        # leading b columns alone left the others' pairs worse than v0 itself after a few products).
        default_maxiter = max(100, 20 * math.ceil(d / b))
    else:
        b = k + min(max(2, k // 4), 16)  # guard vectors, also when warm
        b = min(b, d // 3)
        basis = 0
        default_maxiter = max(200, min(5000, d))
    budget = default_maxiter if maxiter is None else max(int(maxiter), 1)
    scale = 1.0
    values = vectors = residuals = Y_out = None
    guard_out: tuple[FloatArray, FloatArray] | None = None
    if single_ok:
        single = _single_vector_lanczos(A, pencil, k, tol, rng, start)
        if single is not None:
            Y1, products, V1, AV1, theta1 = single
            values, vectors, residuals, Y_out = _finalize(
                A, pencil, Y1, (a_norm, m_norm), largest, V=V1, AV=AV1, theta=theta1
            )
            copies = _longest_repeat(values, tol)
            if copies < 2 and bool(np.all(residuals <= tol)):
                return values, vectors, residuals, products, label, Y_out, None
            # A repeated eigenvalue among the wanted ones (its missing copies enter a single-vector
            # Krylov space by rounding only), rounding or a loose ARPACK estimate: the block iteration
            # takes over, with a block wider than the run of copies seen (up to k, which suffices for
            # the k wanted pairs), from a random start on a cold solve and from ``Lᵀv0`` on a warm
            # one (not from the ARPACK pairs: a start block holding some pairs converged to ~1e-17
            # and others not made the block iteration stall in a test).
            b = min(k, max(b, copies + 1))
    while True:
        if method == "lanczos":
            res: KrylovResult = block_lanczos(
                problem.op,
                d,
                k,
                largest=problem.largest,
                block=b,
                maxbasis=basis,
                thresholds=thresholds,
                maxiter=budget - used,
                start=start,
                rng=rng,
                dtype=dtype,
                back=problem.back,
                exact=exact if problem.back else None,
                guard=_guard_size(k) if problem.transform == "none" else 0,
            )
        else:
            res = lobpcg(
                (lambda Y: problem.op(Y)[0]) if problem.back else problem.op,
                d,
                k,
                largest=problem.largest,
                block=b,
                thresholds=thresholds,
                maxiter=budget - used,
                start=start,
                precond=reduced_precond,
                rng=rng,
                dtype=dtype,
            )
        used += res.iterations
        Y = res.Y
        guard_out = res.guard
        accepted = last_exact.get("measures")
        if (
            res.converged
            and res.V is not None
            and accepted is not None
            and accepted.shape[0] == k
            and np.array_equal(last_exact["theta"], res.theta)
            and bool(np.all(accepted <= tol))
        ):
            # The exact test passed on these very Ritz pairs: θ are their Rayleigh quotients, L⁻ᵀY
            # their pencil vectors (M-orthonormal to rounding), and the measures the true ones.
            values = np.ascontiguousarray(res.theta, dtype=dtype)
            vectors = np.ascontiguousarray(res.V)
            residuals = np.asarray(accepted, dtype=np.float64)
            Y_out = Y
            break
        if Y.shape[1] < k:  # ran out of iterations before the basis held k vectors
            pad = rng.standard_normal((d, k - Y.shape[1])).astype(dtype)
            Y, _ = np.linalg.qr(np.hstack([Y, pad]))
        values, vectors, residuals, Y_out = _finalize(
            A,
            pencil,
            Y,
            (a_norm, m_norm),
            largest,
            V=res.V if res.V is not None and res.V.shape[1] == Y.shape[1] else None,
        )
        if bool(np.all(residuals <= tol)) or used >= budget or not res.converged:
            break
        # The estimate said converged but the true measure disagrees (shift-invert's guess of ‖C‖, or
        # rounding in the reduced products): tighten and continue from the current vectors.
        if problem.transform == "shift-invert":
            cnorm_factor *= 100.0
        else:
            scale *= 0.01
        if scale < 10 * eps:
            break
        with wide():
            start = pencil.upper_matmul(vectors)
    return values, vectors, residuals, used, label, Y_out, guard_out


def generalized_topk(
    A: Any,
    B: Any = None,
    k: int = 6,
    *,
    reg: float = 1e-6,
    method: str = "auto",
    largest: bool = True,
    tol: float | None = None,
    maxiter: int | None = None,
    v0: Any = None,
    M: Any = None,
    seed: int | np.random.Generator | None = None,
) -> GeneralizedEigenResult:
    r"""The ``k`` extreme eigenpairs of ``A v = λ (B + εI) v``.

    Parameters
    ----------
    A : (d, d) ndarray, sparse array or LinearOperator
        Symmetric matrix (float32/float64). Operators and sparse arrays are used through products only
        by the iterative methods; the dense method materializes them.
    B : (d, d) ndarray, sparse array, :class:`Pencil` or None
        Symmetric positive (semi-)definite right-hand side, a prepared :class:`Pencil` (its factorization
        is reused; ``reg`` is then taken from it), or None for the standard problem (``reg`` ignored).
    k : int
        Number of eigenpairs, ``1 ≤ k ≤ d``.
    reg : float, default 1e-6
        Relative regularization, ``ε = reg · trace(B) / d``; see :class:`Pencil`.
    method : {"auto", "dense", "lanczos", "lobpcg"}
        Back end; see Notes.
    largest : bool, default True
        The largest eigenvalues (True) or the smallest (False).
    tol : float, optional
        Residual tolerance, in the measure of :func:`pair_residuals`; default ``1e-10`` in float64,
        ``1e-5`` in float32 (the working precision is that of ``A`` and ``B`` combined: float32 only
        when both are float32). The iterative methods iterate until every pair meets it; for
        ``"dense"`` (exact to rounding in the reduced problem) it is the check behind ``converged``,
        which an ill-conditioned pencil can fail.
    maxiter : int, optional
        Iteration limit of the iterative methods: block products for ``"lanczos"``, iterations for
        ``"lobpcg"``. Default ``max(100, 20·⌈d/b⌉)`` and ``max(200, min(5000, d))``. Giving it makes
        ``"lanczos"`` use the block iteration (whose products it counts) instead of the single-vector
        path.
    v0 : (d, m) array_like or GeneralizedEigenResult, optional
        Warm start with ``m ≤ k`` columns, e.g. the previous result's vectors. The iteration starts from
        the whole of ``span(v0)`` (in reduced coordinates ``Lᵀ v0``) padded with random columns: a
        Rayleigh-Ritz on it is accepted at once when every pair is already below ``tol``. Passing the
        previous result itself (``v0=previous``) starts from its vectors and, when ``B`` is the same
        :class:`Pencil` (``B=previous.pencil``), also reuses their reduced coordinates, which saves a
        triangular product and an orthonormalization (about 5 % of a warm solve at d = 4096), and
        the guard directions a block Lanczos or warm Davidson result keeps (the Ritz vectors just
        past the k-th), so the iteration starts from ``k + g`` directions (9–23 % faster at
        d = 4096, k = 32 and 128, 1 and 2 threads).
    M : array, LinearOperator or callable, optional
        Preconditioner for LOBPCG, an approximation of ``(A − σ(B + εI))⁻¹`` applied to (d, m) blocks.
        Passing one makes ``method="auto"`` choose LOBPCG.
    seed : int or numpy.random.Generator, optional
        Seed of the random start blocks.

    Returns
    -------
    GeneralizedEigenResult
        Unpacks as ``values, vectors``; also has ``residuals``, ``iterations``, ``converged``,
        ``method``, ``reg_used`` and ``pencil``.

    Raises
    ------
    ValueError
        On ``k`` outside ``[1, d]``, shape mismatches, NaN/Inf, a non-symmetric ``A`` or ``B``, or
        ``B + εI`` not positive definite ("pass reg > 0").
    TypeError
        On non-floating input.

    Warns
    -----
    ConvergenceWarning
        When an iterative method does not reach ``tol`` within ``maxiter``; the best pairs found are
        returned with ``converged=False``. Also when a dense solve's residuals exceed ``tol`` (an
        ill-conditioned pencil), with ``converged=False``.
    RqcoreWarning
        When ``B`` is sparse (converted to dense), or a float32 :class:`Pencil` comes with float64
        ``A`` (factored again in float64 for the solve).

    Notes
    -----
    All methods work on the reduced problem ``C y = λ y``, ``C = L⁻¹AL⁻ᵀ``, ``M = B + εI = LLᵀ``
    (``L`` computed once by :class:`Pencil`), and map back with ``v = L⁻ᵀy``, which makes the vectors
    ``M``-orthonormal. Every iterative result carries the residuals of :func:`pair_residuals`: either
    from a final Rayleigh-Ritz in the pencil's coordinates (``AV``, ``MV``), or, where a driver's exact
    test stopped it (block Lanczos, warm block Davidson), the measures that test computed as
    ``‖L(Cy − θy)‖`` — the same quantity up to rounding, and at most ``0.9·tol``.

    Scale: when ``‖A‖₁/‖M‖₁`` lies outside ``2^±60`` (``2^±20`` in float32) the iterative methods work on
    ``2^j·A`` with that ratio near 1 and divide the values by ``2^j`` (exact), so that squared
    residuals and Gram entries neither under- nor overflow; norms are recomputed with scaling where a
    sum of squares leaves the safe range. Any scale works whose norms ``‖A‖₁`` and ``‖B‖₁`` float64
    represents; beyond that a ValueError asks to scale the matrix down.

    ``"dense"``
        ``sygst``, then ``sytrd`` + ``stemr`` on the index subset (``syevd`` on all pairs for
        ``k > d/4``). Exact to rounding; costs ``O(d³)`` whatever ``k``. Do not
        use for large ``d`` with small ``k``, or when ``A`` is only available as an operator.
    ``"lanczos"``
        For a dense ``A``, ``largest=True`` and small ``k`` (``k ≤ 8``, or ``k ≤ 32`` with
        ``d ≤ 1536``; warm starts only for ``d ≤ 1536``) a single-vector implicitly restarted Lanczos
        (ARPACK, ``ncv = max(2k+1, 8)``, BLAS-2 ``trsv``/``symv`` products called directly) runs
        first; its result is accepted only if the true measure of every pair is below ``tol`` and no
        two of its eigenvalues are equal (within ``10·tol`` relative: a single-vector Krylov space
        sees the copies of a repeated eigenvalue through rounding only), otherwise the block
        iteration solves the problem. Otherwise:
        thick-restart block Lanczos with full (block CGS2) reorthogonalization; ``C`` is applied as two
        triangular solves around a product with ``A`` (never formed; BLAS ``trsm``/``gemm`` directly,
        no copies). It stops as soon as the true residual measure of every wanted pair is below
        ``0.9·tol`` (computed from the Krylov relation with one ``trmm`` of the next block). Convergence is driven by the gap
        between the ``k``-th and ``(k+1)``-th eigenvalue relative to the spread of the spectrum; heavy
        tails make ``largest=True`` easy and ``largest=False`` hard, so for the smallest eigenvalues
        with a dense ``A`` it iterates on ``(C − σ)⁻¹`` (shift-invert, one Cholesky of ``A − σM``,
        ``σ`` below the spectrum: ``−10⁻³``, ``−10⁻²`` or ``−10⁻¹·‖A‖₁/‖M‖₁``, the first that factors).
        When none does (an indefinite ``A``, whose smallest eigenvalues are then extreme ones), and
        with an operator ``A``, the smallest end is iterated directly, which can be slow for a
        clustered smallest end. Not for ``k`` close to ``d``.
    ``"lobpcg"``
        Block LOBPCG (``M``-orthonormal through the reduced coordinates), soft locking, Cholesky-QR2
        Rayleigh-Ritz that drops near-dependent directions. It shines with a good preconditioner ``M``
        (then the spectrum of the preconditioned operator drives convergence); without one it needs
        more products than Lanczos for the same accuracy.
    ``"auto"``
        Dense when ``d < 64`` or ``k > d/4`` (a Krylov basis would fill a large part of the space), or
        ``k ≥ d/8`` with a dense ``A`` (LAPACK is then faster, cold or warm), or, for a cold solve
        with a dense ``A`` and no preconditioner, ``k > 32`` with ``d ≤ 1024`` or ``k ≥ d/16`` with
        ``1024 < d ≤ 1536`` (past the single-vector path, where the block Lanczos is slower than
        LAPACK); otherwise LOBPCG when a preconditioner ``M`` is given, else Lanczos (cold or warm).
        A forced
        iterative method falls back to dense under the same conditions and says so in
        ``result.method``, e.g. ``"dense (fallback: k close to d)"``.

    Warm starts: pass ``v0=previous`` (or ``previous.vectors``) and ``B=previous.pencil``; ``B`` is
    never refactored. On
    the single-vector path (``d ≤ 1536``, small ``k``) ARPACK starts from the sum of the columns of
    ``Lᵀv0``. Otherwise (``"lanczos"`` without shift-invert) a block Davidson starts from the whole of
    ``span(Lᵀv0)``: Rayleigh-Ritz (accepted at once if every pair is below ``tol``), then one product per
    step on the residuals of the pairs still above ``tol``; the returned residuals are its true measures
    (``‖L(Cy − θy)‖``, equal to those of :func:`pair_residuals` up to rounding). If it has not converged
    after 40 block products, the block Lanczos finishes from its Ritz vectors. ``iterations`` counts
    block products on both.

    Threads: the iterative methods run their own small BLAS/LAPACK calls on one thread and give the
    caller's BLAS thread count (e.g. from ``threadpoolctl.threadpool_limits``) to the products with
    ``A`` and the Cholesky factor, and to the drivers' own large products (through SciPy's BLAS, the
    same OpenBLAS as the operator's calls); for ``d < 512`` everything runs on one thread, where two were
    measured slower. The caller's setting is restored on return. See docs/solvers.md, *Threads*.

    Examples
    --------
    >>> import numpy as np
    >>> from rqcore import generalized_topk
    >>> A = np.diag([1.0, 2.0, 3.0, 4.0])
    >>> B = np.diag([1.0, 1.0, 2.0, 2.0])
    >>> values, vectors = generalized_topk(A, B, k=2, reg=0.0)
    >>> values
    array([2., 2.])
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")
    A, d, dtype, is_operator, a_norm = _validate_A(A)
    if d == 0:
        raise ValueError("A is 0x0: the pencil needs d >= 1.")
    if isinstance(B, Pencil):
        pencil = B
        if pencil.dim != d:
            raise ValueError(f"the pencil has dimension {pencil.dim} but A is {d}x{d}.")
        if pencil.B is not None and pencil.dtype == np.float32 and dtype == np.float64:
            # A float32 factor would cap a float64 solve at float32 accuracy.
            warnings.warn(
                "the Pencil is float32 but A is float64: it is factored again in float64 for this "
                "solve (build the Pencil from a float64 B to reuse it, or pass float32 A).",
                RqcoreWarning,
                stacklevel=2,
            )
            pencil = Pencil(pencil.B.astype(np.float64), reg=pencil.reg, copy=False)
    else:
        if B is not None and np.shape(B) != (d, d):
            raise ValueError(f"B has shape {np.shape(B)} but A is {d}x{d}; they must match.")
        if dtype == np.float64 and getattr(B, "dtype", None) == np.float32:
            # Factor in the working precision (float64 unless both are float32).
            B = B.astype(np.float64)
        pencil = Pencil(B, reg=reg, dim=d, copy=False)  # no d² copy per solve (documented)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an integer, got {type(k).__name__}.")
    if not 1 <= k <= d:
        raise ValueError(f"k must satisfy 1 <= k <= d = {d}, got k={k}.")
    k = int(k)
    v0_reduced = None
    v0_guard = None
    if isinstance(v0, GeneralizedEigenResult):
        previous = v0
        v0 = previous.vectors
        # Its reduced coordinates are valid for the same factorization only.
        if previous.pencil is pencil and previous._reduced is not None:
            v0_reduced = previous._reduced
            v0_guard = previous._guard
    if v0 is not None:
        v0 = as_float_array(v0, "v0", allowed=(np.float32, np.float64))
        if v0.ndim == 1:
            v0 = v0[:, None]
        if v0.ndim != 2 or v0.shape[0] != d or not 1 <= v0.shape[1] <= k:
            raise ValueError(
                f"v0 must have shape (d, m) with d={d} and 1 <= m <= k={k}, got {v0.shape}."
            )
        check_finite(v0, "v0")
    if tol is not None:
        if isinstance(tol, bool) or not isinstance(tol, (int, float, np.integer, np.floating)):
            raise TypeError(f"tol must be a real number, got {type(tol).__name__} {tol!r}.")
        if not (np.isfinite(tol) and tol > 0):
            raise ValueError(f"tol must be a finite number > 0, got {tol}.")
    if M is not None:
        _check_preconditioner(M, d)
    if maxiter is not None and (
        isinstance(maxiter, bool) or not isinstance(maxiter, (int, np.integer)) or maxiter < 1
    ):
        raise ValueError(f"maxiter must be a positive integer, got {maxiter!r}.")
    work_dtype = np.dtype(np.result_type(dtype, pencil.dtype))
    if v0_reduced is not None and (
        v0 is None or v0_reduced.shape != v0.shape or v0_reduced.dtype != work_dtype
    ):
        v0_reduced = None
    if v0_reduced is None or (
        v0_guard is not None and any(g.dtype != work_dtype or g.shape[0] != d for g in v0_guard)
    ):
        v0_guard = None
    if tol is None:
        tol = 1e-10 if work_dtype == np.float64 else 1e-5
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    chosen = method
    if method == "auto":
        chosen = _auto_method(
            d, k, is_operator=is_operator, warm=v0 is not None, precond=M is not None
        )
    used = chosen
    if chosen != "dense":
        reason = _fallback_reason(d, k)
        if reason is not None:
            chosen, used = "dense", f"dense (fallback: {reason})"

    Y: FloatArray | None  # reduced coordinates of the vectors, kept for warm starts
    guard: tuple[FloatArray, FloatArray] | None = None
    if chosen == "dense":
        # The working precision (float64 unless A and B are both float32; B=None counts as float64).
        A_dense = (
            _materialize(A, d, work_dtype) if is_operator else A.astype(work_dtype, copy=False)
        )
        with driver_threads(d):
            with wide():  # LAPACK gains from threads from d = 512 on
                values, vectors, Y = _dense_topk(A_dense, pencil, k, largest)
            if a_norm is None or pencil.is_identity:
                AV = MV = None
            else:
                # M V = L Lᵀ V = L Y: one trmm (d²k flops) instead of the product with B (2d²k).
                AV = np.asarray(_apply_symmetric(A, vectors), dtype=np.float64)
                with wide():
                    MV = np.asarray(pencil.lower_matmul(Y), dtype=np.float64)
        if AV is None or MV is None or a_norm is None:
            residuals = pair_residuals(
                A,
                pencil,
                values,
                vectors,
                norms=None if a_norm is None else (a_norm, pencil.one_norm),
            )
        else:
            residuals = _residual_measures(AV, MV, values, vectors, (a_norm, pencil.one_norm))
        iterations = 0
        converged = bool(np.all(residuals <= tol))
        if not converged:
            warnings.warn(
                f"generalized_topk ({used}): the worst residual is {float(np.max(residuals)):.2e} > "
                f"tol={tol:.1e}. LAPACK solved the reduced problem to rounding, so the pencil is too "
                "ill-conditioned for this tolerance: pass a larger reg, or loosen tol.",
                ConvergenceWarning,
                stacklevel=2,
            )
    else:
        A_work = A if is_operator or A.dtype == work_dtype else A.astype(work_dtype)
        a_norm_work = a_norm if A_work is A else None
        if a_norm_work is None:
            with driver_threads(d), wide():  # the operator's thread rule (one thread below d = 512)
                a_norm_work = _operator_one_norm(A_work)
        balance = _balancing_scale(a_norm_work, pencil.one_norm, work_dtype)
        if balance != 1.0:  # extreme scale of A against M: iterate on 2^j·A (exact), map back
            if isinstance(A_work, scipy.sparse.linalg.LinearOperator):
                A_work = balance * A_work
            else:
                A_work = A_work * work_dtype.type(balance)
            a_norm_work *= balance
        with driver_threads(d):
            solved = _iterative(
                A_work,
                pencil,
                k,
                method=chosen,
                largest=largest,
                tol=float(tol),
                maxiter=maxiter,
                v0=v0,
                M=M,
                rng=rng,
                is_operator=is_operator,
                dtype=work_dtype,
                a_norm=a_norm_work,
                v0_reduced=v0_reduced,
                v0_guard=v0_guard,
            )
        values, vectors, residuals, iterations, used, Y, guard = solved
        if balance != 1.0:
            values = values / values.dtype.type(balance)
        converged = bool(np.all(residuals <= tol))
        if not converged:
            warnings.warn(
                f"generalized_topk ({used}) did not converge: after {iterations} iterations the worst "
                f"residual is {float(np.max(residuals)):.2e} > tol={tol:.1e}; "
                f"{int(np.count_nonzero(residuals <= tol))} of {k} pairs converged. Returning the best "
                "pairs found; raise maxiter, loosen tol, or pass a preconditioner (method='lobpcg').",
                ConvergenceWarning,
                stacklevel=2,
            )
    if Y is not None and (Y.shape != vectors.shape or Y.dtype != vectors.dtype):
        Y = None
    if Y is None:  # no reduced coordinates to start from, so no guard either
        guard = None
    return GeneralizedEigenResult(
        values=values,
        vectors=vectors,
        residuals=residuals,
        iterations=iterations,
        converged=converged,
        method=used,
        reg_used=pencil.reg_used,
        pencil=pencil,
        _reduced=Y,
        _guard=guard,
    )
