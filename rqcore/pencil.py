"""A regularized symmetric-definite pencil, factored once and reused.

The solvers of :mod:`rqcore.generalized` work with ``A v = λ M v`` where ``M = B + εI``. Training loops
re-solve with the same ``B`` (the pretraining-proxy covariance) many times while ``A`` drifts; a
:class:`Pencil` holds the Cholesky factor of ``M`` so it is computed once.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import scipy.linalg
import scipy.linalg.blas
import scipy.sparse
from numpy.typing import NDArray

from rqcore._blas import SPLIT_SOLVE_MIN_DIM, split_triangular_solve
from rqcore._eigen_kernels import mirror_lower_triangle
from rqcore._threads import WIDE_MIN_DIM, caller_threads, current_threads, driver_threads, wide
from rqcore._validation import (
    as_float_array,
    as_real,
    check_finite,
    check_positive_int,
    check_symmetric,
)
from rqcore.exceptions import RqcoreWarning

__all__ = ["Pencil"]

FloatArray = NDArray[np.floating[Any]]

#: Blocks of at most this many columns go through the factor column by column with BLAS-2 ``trsv`` /
#: ``trmv``. Measured on one thread: OpenBLAS's ``trsm`` / ``trmm`` on one column is 2.6-4.5× slower
#: than ``trsv`` / ``trmv`` (d = 512: 55 against 21 µs, transposed 116 against 26 µs; d = 4096: 6.3
#: against 3.1 ms); two columns: 61 µs against 43 µs for two ``trsv`` calls (d = 4096: 6.7 against
#: 6.2 ms); from four columns on ``trsm`` is faster (d = 512: 77 against 87 µs).
_VECTOR_COLUMNS = 2


def _columnwise(routine: str, F: Any, X: Any, *, lower: int, trans: int) -> None:
    """Apply ``op(L)⁻¹`` (``routine="trsm"``) or ``op(L)`` (``"trmm"``) to each column of the
    Fortran-ordered block ``X`` in place, by ``trsv`` / ``trmv``."""
    name = "trsv" if routine == "trsm" else "trmv"
    (blas2,) = scipy.linalg.blas.get_blas_funcs((name,), (F, X))
    for j in range(X.shape[1]):
        X[:, j] = blas2(F, X[:, j], lower=lower, trans=trans, overwrite_x=1)


#: Up to this dimension the error for a ``B + εI`` that is not positive definite computes ``λ_min(B)``
#: (an ``O(d³)`` eigensolve, under a second at d = 2048) to name a ``reg`` that works.
_EXPLAIN_MAX_DIM = 2048


def _not_definite_message(B: FloatArray, reg: float, reg_used: float, trace: float) -> str:
    """The error message for a ``B + εI`` that is not positive definite, with a ``reg`` that works."""
    head = f"B + εI is not positive definite (reg={reg:g}, ε={reg_used:.3g}); B is singular or indefinite."
    d = B.shape[0]
    if d > _EXPLAIN_MAX_DIM:
        suggestion = max(10 * reg, 1e-6)
        return f"{head} Pass reg > 0 (e.g. reg={suggestion:g}) or check that B is a covariance."
    lam_min = float(
        scipy.linalg.eigvalsh(
            np.asarray(B, dtype=np.float64), subset_by_index=[0, 0], check_finite=False
        )[0]
    )
    # ε = reg·trace(B)/d (reg itself when trace(B) ≤ 0) must exceed −λ_min(B), with a margin.
    unit = trace / d if trace > 0 else 1.0
    needed = max(-lam_min, 0.0) / unit
    suggestion = float(f"{max(2.0 * needed, 1e-6, 10 * reg):.2g}")
    hint = " or check that B is a covariance (positive semi-definite)"
    if lam_min < 0:
        return (
            f"{head} Its smallest eigenvalue is {lam_min:.3g}, so reg must exceed {needed:.3g} "
            f"(ε = reg·{unit:.3g}): pass reg={suggestion:g}{hint}."
        )
    return f"{head} Pass reg > 0 (e.g. reg={suggestion:g}){hint}."


class Pencil:
    r"""The right-hand side ``M = B + ε·I`` of a generalized eigenproblem, with its Cholesky factor.

    Parameters
    ----------
    B : (d, d) array_like, sparse array or None
        Symmetric positive (semi-)definite matrix, float32 or float64. Sparse input is converted to a
        dense array (SciPy has no sparse Cholesky; a :class:`~rqcore.RqcoreWarning` says so). ``None``
        stands for the identity (the standard problem); then ``dim`` is required and ``reg`` is ignored.
    reg : float, default 1e-6
        Relative regularization: ``ε = reg · trace(B) / d`` (``reg`` itself when ``trace(B) = 0``).
        Scaling by the mean eigenvalue makes one default fit covariances of any scale; ``reg = 0`` is
        allowed when ``B`` is positive definite.
    dim : int, optional
        Dimension, required when ``B`` is None.
    copy : bool, default True
        Keep a private copy of ``B`` (one ``d²`` copy), so that later changes to the caller's array do
        not change the pencil. With ``copy=False`` the pencil refers to ``B`` itself: modifying ``B``
        afterwards leaves the factor of the old ``B`` beside the new ``B`` and makes the pencil
        inconsistent. :func:`~rqcore.generalized_topk` builds the pencil of an
        array ``B`` with ``copy=False``.

    Attributes
    ----------
    dim : int
        The dimension ``d``.
    reg : float
        The relative regularization asked for.
    reg_used : float
        The absolute shift ``ε`` added to the diagonal.
    dtype : numpy.dtype
        Working precision (float32 or float64, that of ``B``).
    cholesky_factor : (d, d) ndarray or None
        Lower-triangular ``L`` with ``L Lᵀ = M`` (None for the identity). Built on access (a new
        array each time): the pencil keeps ``L`` in the lower triangle of an array whose upper
        triangle serves the solvers.

    Raises
    ------
    ValueError
        If ``B`` is not square, not symmetric, holds NaN/Inf, ``reg < 0``, or ``B + εI`` is not positive
        definite (the message suggests a ``reg`` that would work).
    TypeError
        If ``B`` is not of a floating dtype.

    Notes
    -----
    Relative regularization is shrinkage in disguise: ``B + reg·μI`` with ``μ = trace(B)/d`` is, up to the
    factor ``1 + reg``, the shrunk covariance ``(1-α)B + αμI`` with ``α = reg/(1+reg)``. Since the pencil's
    eigenvectors are invariant to scaling ``M`` (only the eigenvalues scale), ``reg`` and a
    :class:`~rqcore.StreamingCovariance` shrinkage intensity describe the same family of estimates.

    Examples
    --------
    >>> import numpy as np
    >>> from rqcore import Pencil
    >>> B = np.diag([4.0, 1.0, 0.0])          # singular: needs reg > 0
    >>> P = Pencil(B, reg=0.1)
    >>> round(P.reg_used, 6)                   # 0.1 * trace(B) / 3
    0.166667
    >>> np.allclose(P.matvec(np.eye(3)), B + P.reg_used * np.eye(3))
    True
    """

    def __init__(
        self, B: Any, *, reg: float = 1e-6, dim: int | None = None, copy: bool = True
    ) -> None:
        reg = as_real(reg, "reg")
        if not np.isfinite(reg) or reg < 0:
            raise ValueError(f"reg must be a finite number >= 0, got {reg}.")
        self.reg = reg
        if B is None:
            if dim is None:
                raise ValueError("dim is required when B is None (the identity).")
            self.dim = check_positive_int(dim, "dim")
            self.B: FloatArray | None = None
            self.reg_used = 0.0
            self.dtype = np.dtype(np.float64)
            self._factor: FloatArray | None = None
            self._factor_cache: tuple[FloatArray, bool] | None = None
            self._mirrored = False
            return
        if scipy.sparse.issparse(B):
            warnings.warn(
                f"B is a sparse {B.shape} matrix; it is converted to a dense array because SciPy has "
                "no sparse Cholesky factorization.",
                RqcoreWarning,
                stacklevel=2,
            )
            B = B.toarray()
        B = as_float_array(B, "B", ndim=2, allowed=(np.float32, np.float64))
        if B.shape[0] != B.shape[1]:
            check_symmetric(B, "B")  # raises the standard shape message
        if dim is not None and dim != B.shape[0]:
            raise ValueError(f"dim={dim} does not match B's shape {B.shape}.")
        from rqcore._eigen_kernels import asymmetry_and_norm

        d = B.shape[0]
        # The factor's working copy first: a plain memcpy of Bᵀ (Fortran-ordered when B is C-ordered;
        # equal to B once checked) reads B in memory order, the cheapest way in from main memory; the
        # check's tiled reads then hit the cached copy. Checking B itself first cost 0.3 ms more at
        # d = 512 when B was not in cache (0.54 against 0.21 ms for the copy).
        shifted = np.array(B.T if B.flags.c_contiguous else B, dtype=B.dtype, order="F", copy=True)
        # One fused, cache-blocked pass (finiteness, max |B − Bᵀ|, max |B|, ‖B‖₁) instead of |B − Bᵀ|
        # temporaries; the standard checks run on B (and raise) only when it flags a problem.
        asym, scale, finite, b_norm = asymmetry_and_norm(shifted, threads=caller_threads())
        if not finite:
            check_finite(B, "B")
        if asym > 100.0 * float(np.finfo(B.dtype).eps) * max(scale, np.finfo(np.float64).tiny):
            check_symmetric(B, "B")
        self.dim = d
        if copy:  # a private, read-only copy (see ``copy``)
            B = np.array(B, copy=True)
            B.flags.writeable = False
        self.B = B
        self.dtype = B.dtype
        with np.errstate(over="ignore"):  # an overflow is refused just below
            trace = float(np.trace(shifted, dtype=np.float64))  # the copy is in cache
        if not (np.isfinite(b_norm) and np.isfinite(trace)):
            raise ValueError(
                "‖B‖₁ or trace(B) overflows float64 although B's entries are finite; scale B down "
                "(e.g. B / np.abs(B).max()): the eigenvectors do not change and the eigenvalues "
                "scale by the inverse factor."
            )
        self.reg_used = reg * (trace / d if trace > 0 else 1.0)
        self._one_norm: float | None = float(b_norm + self.reg_used)
        shifted.flat[:: d + 1] += self.reg_used
        (potrf,) = scipy.linalg.get_lapack_funcs(("potrf",), (shifted,))
        # Threads pay for the factorization from d = 512 on (rqcore._threads): below, one thread;
        # from there, the caller's count as it stands (outside a driver ``wide`` changes nothing).
        # Narrowing and widening the count around the call cost 0.13-0.20 ms at d = 512 on two
        # threads (potrf 1.34-1.96 ms called directly, 1.53-2.09 ms inside driver_threads and wide;
        # 0.2 s sleeps between calls).
        if d < WIDE_MIN_DIM:
            with driver_threads(d):
                factor, info = potrf(shifted, lower=1, clean=0, overwrite_a=1)
        else:
            with wide():
                factor, info = potrf(shifted, lower=1, clean=0, overwrite_a=1)
        if info != 0:
            raise ValueError(_not_definite_message(B, reg, self.reg_used, trace))
        self._factor = factor
        self._factor_cache = None
        self._mirrored = False  # upper triangle: what potrf left there until _mirror() copies Lᵀ

    @property
    def is_identity(self) -> bool:
        """True when the pencil stands for the standard problem (``M = I``)."""
        return self.B is None

    def _mirror(self) -> None:
        """Copy ``Lᵀ`` onto the factor's upper triangle (once, on the first block solve with ``Lᵀ``).

        Solves and products with ``Lᵀ`` then run as non-transposed BLAS calls on the upper triangle,
        4-26 % faster than transposed calls on the lower one, most for narrow blocks (``trsm`` at
        d = 4096, 16 columns: 7.8 vs 10.5 ms on 2 threads, 11.7 vs 13.8 ms on 1; 128 columns: 48.2
        vs 50.4 ms on 1); the copy costs about one such call
        (d = 4096: 18 ms on 1 thread, 10 ms on 2), so single-vector runs, which gain nothing
        (``trsv`` is as fast transposed), do not pay it.
        """
        if self._factor is None or self._mirrored:
            return
        # Race-free without a lock: the lower triangle never changes, the flag is set only once the
        # copy is complete, and a concurrent second copy writes the same values.
        mirror_lower_triangle(self._factor, threads=caller_threads())
        self._mirrored = True

    def _upper_operand(self, dtype: np.dtype[Any]) -> tuple[FloatArray, int, int]:
        """``(F, lower, trans)`` for BLAS calls with ``Lᵀ``: the upper triangle once mirrored, else
        the transposed lower triangle."""
        F, upper_ready = self._factor_f(dtype)
        return (F, 0, 0) if upper_ready else (F, 1, 1)

    @property
    def cholesky_factor(self) -> FloatArray | None:
        """Lower-triangular ``L`` with ``L Lᵀ = M`` (a new array; None for the identity)."""
        if self._factor is None:
            return None
        return np.tril(self._factor)

    def __repr__(self) -> str:
        kind = "identity" if self.is_identity else f"dtype={self.dtype.name}"
        return f"Pencil(dim={self.dim}, {kind}, reg={self.reg:g}, reg_used={self.reg_used:.3g})"

    def matvec(self, X: FloatArray) -> FloatArray:
        """Return ``M @ X`` for a vector or a (d, m) block, without forming ``M``.

        Parameters
        ----------
        X : (d,) or (d, m) ndarray
            A vector or a block of columns.

        Returns
        -------
        ndarray
            A new array of ``X``'s shape (the identity pencil returns a copy of ``X``).

        Examples
        --------
        >>> import numpy as np
        >>> from rqcore import Pencil
        >>> P = Pencil(np.diag([4.0, 1.0]), reg=0.0)
        >>> P.matvec(np.ones(2))
        array([4., 1.])
        """
        if self.B is None:
            return np.array(X, copy=True)
        return self.B @ X + self.reg_used * X

    def solve(self, X: FloatArray) -> FloatArray:
        """Return ``M⁻¹ X`` using the stored Cholesky factor (LAPACK ``potrs``).

        Parameters
        ----------
        X : (d,) or (d, m) ndarray
            A vector or a block of columns.

        Returns
        -------
        ndarray
            A new array of ``X``'s shape (the identity pencil returns a copy of ``X``).

        Examples
        --------
        >>> import numpy as np
        >>> from rqcore import Pencil
        >>> Pencil(np.diag([4.0, 1.0]), reg=0.0).solve(np.ones(2))
        array([0.25, 1.  ])
        """
        if self._factor is None:
            return np.array(X, copy=True)
        # LAPACK potrs reads the lower triangle only.
        return scipy.linalg.cho_solve((self._factor, True), X, check_finite=False)

    def solve_lower(self, X: FloatArray) -> FloatArray:
        """Return ``L⁻¹ X`` (forward substitution), with ``M = L Lᵀ``.

        Parameters
        ----------
        X : (d,) or (d, m) ndarray
            A vector or a block of columns.

        Returns
        -------
        ndarray
            A new array of ``X``'s shape (the identity pencil returns a copy of ``X``).
        """
        if self._factor is None:
            return np.array(X, copy=True)
        return self._triangular("trsm", X, trans=False)

    def solve_upper(self, X: FloatArray) -> FloatArray:
        """Return ``L⁻ᵀ X`` (back substitution); maps reduced-problem vectors back to the pencil's.

        Parameters
        ----------
        X : (d,) or (d, m) ndarray
            A vector or a block of columns.

        Returns
        -------
        ndarray
            A new array of ``X``'s shape (the identity pencil returns a copy of ``X``).
        """
        if self._factor is None:
            return np.array(X, copy=True)
        return self._triangular("trsm", X, trans=True)

    def reduce(self, A: FloatArray) -> FloatArray:
        """Return the standard-form matrix ``L⁻¹ A L⁻ᵀ`` (lower triangle valid, as LAPACK ``sygst``).

        The reduced matrix has the pencil's eigenvalues; its eigenvectors ``y`` map back by
        ``v = L⁻ᵀ y``, which makes them ``M``-orthonormal.

        Parameters
        ----------
        A : (d, d) ndarray
            Symmetric; only its lower triangle is read.

        Returns
        -------
        (d, d) ndarray
            Fortran-ordered, in the wider of ``A``'s and the pencil's dtypes; only the lower
            triangle is valid.

        Examples
        --------
        >>> import numpy as np
        >>> from rqcore import Pencil
        >>> C = Pencil(np.diag([4.0, 1.0]), reg=0.0).reduce(np.diag([8.0, 3.0]))
        >>> np.diag(C)
        array([2., 3.])
        """
        if self._factor is None:
            return np.array(A, dtype=self.dtype if A.dtype != np.float32 else A.dtype, copy=True)
        dtype = np.result_type(A.dtype, self.dtype)
        (sygst,) = scipy.linalg.get_lapack_funcs(("sygst",), (np.empty(0, dtype=dtype),))
        # A is symmetric: copy Aᵀ (Fortran-ordered when A is C-ordered), a plain memcpy.
        work = np.array(A.T if A.flags.c_contiguous else A, dtype=dtype, order="F", copy=True)
        factor = self._factor.astype(dtype, copy=False)  # sygst reads its lower triangle only
        reduced, info = sygst(work, factor, itype=1, lower=1, overwrite_a=1)
        if info != 0:  # pragma: no cover - sygst fails only on invalid arguments
            raise RuntimeError(f"LAPACK sygst failed with info={info}.")
        return reduced

    # --- additions for the iterative solvers (reduced-coordinate helpers) -----------------------------

    @property
    def one_norm(self) -> float:
        """``‖M‖₁`` (cached): the scale of ``M`` in the residual measure of :func:`pair_residuals`."""
        cached = getattr(self, "_one_norm", None)
        if cached is None:
            if self.B is None:
                cached = 1.0
            else:
                from rqcore._eigen_kernels import max_abs_column_sum

                cached = max_abs_column_sum(self.B) + self.reg_used
            self._one_norm = float(cached)
        return float(cached)

    def _factor_f(self, dtype: np.dtype[Any]) -> tuple[FloatArray, bool]:
        """The factor in ``dtype``, Fortran-ordered for BLAS (a cast copy for another dtype is
        cached), and whether its upper triangle holds ``Lᵀ`` (its lower one always holds ``L``)."""
        assert self._factor is not None
        mirrored = self._mirrored  # read before the copy: a copy made after it is complete
        if self._factor.dtype == dtype:
            return self._factor, mirrored
        cache = self._factor_cache
        if cache is None or cache[0].dtype != dtype or (mirrored and not cache[1]):
            cache = (np.asfortranarray(self._factor, dtype=dtype), mirrored)
            self._factor_cache = cache
        return cache

    def _triangular(self, routine: str, X: FloatArray, *, trans: bool) -> FloatArray:
        """``L X`` / ``Lᵀ X`` (``routine="trmm"``, half the flops of a general product) or ``L⁻¹ X`` /
        ``L⁻ᵀ X`` (``"trsm"``) into a new array, with the BLAS routine called directly (no LAPACK
        ``trtrs`` checks, and the mirrored upper triangle when there is one)."""
        assert self._factor is not None
        dtype = np.result_type(X.dtype, self._factor.dtype)
        if dtype not in (np.float32, np.float64):
            dtype = np.dtype(np.float64)
        X2 = np.asarray(X, dtype=dtype)
        vector = X2.ndim == 1
        X2 = np.array(X2[:, None] if vector else X2, dtype=dtype, order="F", copy=True)
        if X2.size == 0:
            return X2[:, 0] if vector else X2
        if trans:
            F, lower, trans_a = self._upper_operand(dtype)
        else:
            F, lower, trans_a = self._factor_f(dtype)[0], 1, 0
        if X2.shape[1] <= _VECTOR_COLUMNS:
            _columnwise(routine, F, X2, lower=lower, trans=trans_a)
            out = X2
        else:
            (blas,) = scipy.linalg.blas.get_blas_funcs((routine,), (X2,))
            out = blas(1.0, F, X2, lower=lower, trans_a=trans_a, overwrite_b=1)
        return out[:, 0] if vector else out

    def lower_matmul(self, X: FloatArray) -> FloatArray:
        """Return ``L X``: maps reduced-coordinate residuals to the pencil's (``A v − λMv = L r``).

        Parameters
        ----------
        X : (d,) or (d, m) ndarray
            A vector or a block of columns.

        Returns
        -------
        ndarray
            A new array of ``X``'s shape (the identity pencil returns a copy of ``X``).
        """
        if self._factor is None:
            return np.array(X, copy=True)
        return self._triangular("trmm", X, trans=False)

    def upper_matmul(self, X: FloatArray) -> FloatArray:
        """Return ``Lᵀ X``: maps pencil vectors to reduced coordinates (``y = Lᵀ v``).

        Parameters
        ----------
        X : (d,) or (d, m) ndarray
            A vector or a block of columns.

        Returns
        -------
        ndarray
            A new array of ``X``'s shape (the identity pencil returns a copy of ``X``).
        """
        if self._factor is None:
            return np.array(X, copy=True)
        return self._triangular("trmm", X, trans=True)

    def _trsm(self, X: FloatArray, *, trans: bool, overwrite: bool = False) -> FloatArray:
        """``L⁻¹ X`` (``trans=False``) or ``L⁻ᵀ X`` with BLAS ``trsm`` on a (d, m) block, no copies
        beyond the result (``overwrite=True`` solves in place when ``X`` is Fortran-ordered)."""
        if trans:
            self._mirror()  # block solves with Lᵀ repeat: worth the copy
            F, lower, trans_a = self._upper_operand(np.dtype(X.dtype))
        else:
            F, lower, trans_a = self._factor_f(np.dtype(X.dtype))[0], 1, 0
        narrow = X.shape[1] <= _VECTOR_COLUMNS
        split = (
            not narrow and not trans_a and self.dim >= SPLIT_SOLVE_MIN_DIM and current_threads() > 1
        )
        if narrow or split:  # both work in place on a Fortran-ordered block
            out = X if overwrite and X.flags.f_contiguous else np.array(X, order="F", copy=True)
            if narrow:
                _columnwise("trsm", F, out, lower=lower, trans=trans_a)
                return out
            leaf = max(512, self.dim // 4)  # two levels: d = 4096 → blocks of 1024
            return split_triangular_solve(F, out, upper=not lower, leaf=leaf)
        (trsm,) = scipy.linalg.blas.get_blas_funcs(("trsm",), (F, X))
        # L⁻¹ X on the lower triangle, L⁻ᵀ X on the upper one (Lᵀ), both non-transposed once mirrored.
        return trsm(1.0, F, X, lower=lower, trans_a=trans_a, overwrite_b=int(overwrite))

    def apply_reduced(self, A: Any, X: FloatArray) -> FloatArray:
        """Return ``L⁻¹ A L⁻ᵀ X`` without forming the reduced matrix (two triangular solves around
        ``A @``).

        ``A`` may be an ndarray, a sparse array or a LinearOperator; ``X`` is a vector or a (d, b)
        block (``4·d²·b`` flops for dense ``A``): BLAS-3 ``trsm`` for blocks, ``trsv`` for one or two
        columns, where OpenBLAS's ``trsm`` is 2-4× slower (a LinearOperator for ``eigsh`` calls this
        with one vector per product).

        Parameters
        ----------
        A : (d, d) ndarray, sparse array or LinearOperator
            The symmetric left-hand side.
        X : (d,) or (d, b) ndarray
            Reduced-coordinate vectors.

        Returns
        -------
        ndarray
            ``L⁻¹ A L⁻ᵀ X``, of ``X``'s shape.
        """
        Z = self.solve_upper(X)
        Z = np.asarray(A @ Z)
        return self.solve_lower(Z)
