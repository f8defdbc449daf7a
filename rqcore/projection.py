r"""From a solved pencil to an update rule: spectral coordinates, gates and the null-space baseline.

A linear layer ``y = W x`` with input dimension ``d`` is updated by ``ΔW``, a stack of row vectors
``w ∈ R^d``. With the task covariance ``C_t``, the proxy (pretraining) covariance ``C_p`` and
``M = C_p + εI``, the generalized eigenvectors ``V`` (``C_t V = M V Λ``, ``Vᵀ M V = I``) give each row the
coordinates ``c = Vᵀ M w``; then ``wᵀ M w = Σ c_j²`` (the regularized penalty) and ``wᵀ C_t w = Σ λ_j c_j²``
(the utility) when the basis is full. :class:`RayleighBasis` holds this coordinate system and gates
updates in it; :class:`NullspaceProjector` is the hard Adam-NSCL/GPM-style baseline. Both follow the
:class:`Projector` protocol. See ``docs/concepts.md`` for the derivations.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import scipy.linalg
import scipy.linalg.blas
from numpy.typing import ArrayLike, NDArray

from rqcore import _projection_kernels as _kernels
from rqcore import gates
from rqcore._eigen_kernels import max_abs_column_sum
from rqcore._validation import as_float_array, as_real, check_finite, check_symmetric
from rqcore.generalized import GeneralizedEigenResult, generalized_topk
from rqcore.pencil import Pencil

__all__ = [
    "NullspaceProjector",
    "PenaltyEstimate",
    "Projector",
    "QuadraticForm",
    "RayleighBasis",
    "default_gains",
    "projector_from_state_dict",
]

FloatArray = NDArray[np.floating[Any]]
Float64Array = NDArray[np.float64]
GainsSpec = Callable[[FloatArray], ArrayLike] | ArrayLike
_WORK_DTYPES = (np.float32, np.float64)


# --------------------------------------------------------------------------------------- results


def _frozen(a: ArrayLike) -> FloatArray:
    """``a`` C-ordered and read-only: a private copy of a writeable array, a view of a read-only one.

    A read-only input is shared on purpose (a result's vectors, a product made for the basis), which
    spares a second d×k array beside the result a basis came from.
    """
    arr = np.asarray(a)
    if arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, order="C", copy=True)
    else:
        arr = arr.view()
    arr.flags.writeable = False
    return arr


class QuadraticForm(NamedTuple):
    """A quadratic form evaluated on every row of ``G``: ``per_row[i] = G[i] · C · G[i]``.

    Attributes
    ----------
    per_row : (n,) ndarray of float64
        One value per row (a single value for a 1-D ``G``).
    total : float
        ``per_row.sum()``: the form summed over rows, i.e. ``trace(G C Gᵀ)``.
    """

    per_row: Float64Array
    total: float


class PenaltyEstimate(NamedTuple):
    r"""Cheap O(n·d·k) bounds on the exact penalty ``wᵀ C_p w`` of each row, from a top-k basis.

    With ``c = Vᵀ M w`` and the M-orthogonal complement part ``r = w − V c``,
    ``wᵀ C_p w = Σ_j c_j² + rᵀ M r − ε‖w‖²`` exactly, and ``0 ≤ rᵀ M r ≤ μ‖r‖²`` with ``μ ≥ λ_max(M)``.

    Attributes
    ----------
    in_span : (n,) ndarray of float64
        ``Σ_j c_j²``: the regularized penalty ``(Vc)ᵀ M (Vc)`` of the part inside ``span(V)``, exact.
    complement : (n,) ndarray of float64
        ``‖r‖²``, squared Euclidean norm of the M-orthogonal complement part (0 up to rounding for a
        full basis).
    lower : (n,) ndarray of float64
        ``Σ c_j² − ε‖w‖² ≤ wᵀ C_p w``.
    upper : (n,) ndarray of float64
        ``Σ c_j² + μ‖r‖² − ε‖w‖² ≥ wᵀ C_p w``. For a full basis (``k = d``) ``r = 0`` and
        ``lower = upper = wᵀ C_p w`` exactly (up to rounding).
    """

    in_span: Float64Array
    complement: Float64Array
    lower: Float64Array
    upper: Float64Array

    @property
    def total_lower(self) -> float:
        """Lower bound on the penalty summed over rows."""
        return float(self.lower.sum())

    @property
    def total_upper(self) -> float:
        """Upper bound on the penalty summed over rows."""
        return float(self.upper.sum())


# -------------------------------------------------------------------------------------- protocol
@runtime_checkable
class Projector(Protocol):
    """What every update rule offers, so that a training-loop bridge treats all methods alike.

    Attributes
    ----------
    dim : int
        Input dimension ``d`` of the rows it acts on.

    Notes
    -----
    ``apply(G, out=None)`` maps an ``(n, d)`` block (or a ``(d,)`` row) to the filtered block, in G's
    dtype; ``out=G`` works in place. ``penalty(G)`` returns the exact :class:`QuadraticForm` of the
    covariance that the method protects. ``state_dict()`` returns plain values (NumPy arrays, floats,
    ints, strings) and ``from_state_dict`` rebuilds an equal object from it;
    :func:`projector_from_state_dict` dispatches on ``state["kind"]``. :class:`RayleighBasis` and
    :class:`NullspaceProjector` implement it.

    Examples
    --------
    >>> import numpy as np
    >>> from rqcore import NullspaceProjector, Projector
    >>> isinstance(NullspaceProjector(np.eye(3), rank=1), Projector)
    True
    """

    dim: int

    def apply(self, G: ArrayLike, out: FloatArray | None = None) -> FloatArray:
        """Filter the rows of ``G``."""
        ...

    def penalty(self, G: ArrayLike) -> QuadraticForm:
        """Exact penalty of each row of ``G``."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Plain-value state."""
        ...

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Projector:
        """Rebuild from :meth:`state_dict`."""
        ...


# ------------------------------------------------------------------------------------- helpers
def _rows(G: ArrayLike, dim: int, name: str = "G") -> tuple[FloatArray, bool]:
    """Return ``G`` as a 2-D float32/float64 array of ``dim`` columns (a view) and whether it was 1-D."""
    arr = as_float_array(G, name, allowed=_WORK_DTYPES)
    if arr.ndim == 1:
        arr, was_1d = arr[None, :], True
    elif arr.ndim == 2:
        was_1d = False
    else:
        raise ValueError(f"{name} must be a (n, d) block or a (d,) row, got shape {arr.shape}.")
    if arr.shape[1] != dim:
        raise ValueError(f"{name} has {arr.shape[1]} columns but the basis has dimension d={dim}.")
    return arr, was_1d


def _non_finite_error(name: str) -> ValueError:
    return ValueError(
        f"{name} contains NaN or Inf (or values so large that its coordinates overflow); remove or "
        "clip them before applying the projection."
    )


def _gemm_into(out: FloatArray, Z: FloatArray, Vc: FloatArray, alpha: float, beta: float) -> None:
    """``out ← alpha·Z·Vᵀ + beta·out`` in place with one BLAS gemm, for C- or F-ordered ``out``.

    ``Z`` is (n, k) C-ordered and ``Vc`` (d, k) C-ordered, so ``Z.T`` and ``Vc.T`` are Fortran-ordered
    views and BLAS reads them through transpose flags without a copy.
    """
    gemm = scipy.linalg.blas.get_blas_funcs("gemm", dtype=out.dtype)
    if out.flags.c_contiguous:  # outᵀ (d, n), Fortran-ordered = V·Zᵀ
        res = gemm(alpha, Vc.T, Z.T, beta=beta, c=out.T, trans_a=1, overwrite_c=1)
        target = out.T
    else:  # F-ordered (n, d) = Z·Vᵀ
        res = gemm(alpha, Z.T, Vc.T, beta=beta, c=out, trans_a=1, overwrite_c=1)
        target = out
    if not np.shares_memory(res, target):  # pragma: no cover - f2py copies only on odd layouts
        target[...] = res


def _spectral_gate(
    G: FloatArray,
    Vc: FloatArray,
    MVc: FloatArray,
    scale: FloatArray,
    complement: float,
    out: FloatArray | None,
) -> FloatArray:
    """``complement·G + (G·MV)·diag(scale)·Vᵀ`` for a 2-D ``G``, with ``scale = gains − complement``.

    Cost: two BLAS products of O(n·d·k) and, unless ``complement`` is 0 (or 1 in place), one O(n·d)
    scaled copy. The complement term enters the second gemm as ``beta·C`` with ``C = complement·G``
    prepared by one ``np.multiply`` and ``beta = 1``: OpenBLAS scales ``C`` in a separate pass whenever
    ``beta ∉ {0, 1}``, so folding the factor into the copy saves a full pass over the output.
    """
    n, _ = G.shape
    if out is None:
        out = np.empty_like(
            G, order="F" if G.flags.f_contiguous and not G.flags.c_contiguous else "C"
        )
        target = out
    elif (out.flags.c_contiguous or out.flags.f_contiguous) and (
        out is G or not np.may_share_memory(out, G)
    ):
        target = out
    else:  # out aliases G in another layout, or is strided: work in a temporary
        target = np.empty_like(G, order="C")
    if n == 0:
        return out
    # Coordinates first (out may be G itself), through SciPy's BLAS like the second product: NumPy's
    # own OpenBLAS, called between two SciPy calls, left its threads spinning against SciPy's and
    # cost a fixed ~8 ms per call on 2 cores (d = 4096, k = 32, n = 16…256).
    gemm = scipy.linalg.blas.get_blas_funcs("gemm", dtype=G.dtype)
    if G.flags.c_contiguous:
        Z = gemm(1.0, MVc.T, G.T).T  # Zᵀ = MVᵀGᵀ on Fortran views: Z comes out C-ordered
    else:
        Z = np.ascontiguousarray(gemm(1.0, G, MVc))
    if not _kernels.scale_columns_checked(Z, scale):
        raise _non_finite_error("G")
    if complement == 0.0:
        beta = 0.0  # BLAS does not read C when beta = 0
    elif target is G and complement == 1.0:
        beta = 1.0
    else:
        np.multiply(G, complement, out=target)
        beta = 1.0
    _gemm_into(target, Z, Vc, 1.0, beta)
    if target is not out:
        out[...] = target
    return out


def _check_out(out: Any, G: FloatArray, was_1d: bool) -> FloatArray | None:
    """Validate ``out`` (same shape and dtype as ``G``) and return its 2-D view."""
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a NumPy array, got {type(out).__name__}.")
    if out.dtype != G.dtype:
        raise TypeError(f"out has dtype {out.dtype} but G has {G.dtype}; they must match.")
    expected = (G.shape[1],) if was_1d else G.shape
    if out.shape != expected:
        raise ValueError(f"out has shape {out.shape}; expected {expected}.")
    if not out.flags.writeable:
        raise ValueError("out is read-only.")
    return out[None, :] if was_1d else out


def _quadratic(G: FloatArray, C: FloatArray | None, was_1d: bool) -> QuadraticForm:
    """Exact per-row ``w·C·w`` (``C = None``: identity) in the wider of the two dtypes."""
    if C is None:
        per_row = _kernels.row_sumsq(np.ascontiguousarray(G))
    else:
        dtype = np.result_type(G.dtype, C.dtype)
        Gw = np.ascontiguousarray(G, dtype=dtype)
        per_row = _kernels.row_dots(Gw, np.ascontiguousarray(Gw @ C.astype(dtype, copy=False)))
    return QuadraticForm(per_row, float(per_row.sum()))


def _spectral_norm_bound(B: FloatArray | None, eps: float, pencil: Pencil | None = None) -> float:
    """``μ ≥ λ_max(B + εI)`` in O(d²): min of ‖B‖_F and ‖B‖₁ (both bound ‖B‖₂ for symmetric B).

    Both are single passes without d×d temporaries; ``‖B‖₁ + ε`` comes from ``pencil`` (cached)
    when it holds this ``B`` and ``ε``.
    """
    if B is None:
        return 1.0
    Bd = np.asarray(B)
    if Bd.size == 0:
        return eps
    fro = float(np.linalg.norm(Bd.ravel(order="K")))  # one BLAS nrm2 over the memory
    if pencil is not None and pencil.B is B and pencil.reg_used == eps:
        return min(fro + eps, pencil.one_norm)
    return min(fro, float(max_abs_column_sum(Bd))) + eps


def default_gains(values: ArrayLike) -> Float64Array:
    r"""The default gains of a :class:`RayleighBasis`: :func:`gates.ratio` with ``τ`` = median of ``λ⁺``.

    Parameters
    ----------
    values : (k,) array_like
        Generalized eigenvalues.

    Returns
    -------
    gains : (k,) ndarray of float64
        ``λ⁺/(λ⁺ + τ)`` with ``λ⁺ = max(λ, 0)`` and ``τ = median(λ⁺)`` (the mean of the positive ``λ⁺``
        when that median is 0; all zeros when no eigenvalue is positive).

    Notes
    -----
    Why this default: it is scale-free (rescaling ``C_t`` or ``C_p`` rescales ``λ`` and ``τ`` alike, so
    the gains do not change), it never passes a direction completely nor blocks a positive one, and
    half of the basis's directions keep at least half of their step. Directions that buy more utility
    per unit penalty than the typical one pass, the others are damped in proportion to ``λ``.

    Examples
    --------
    >>> from rqcore.projection import default_gains
    >>> default_gains([4.0, 2.0, 1.0])
    array([0.66666667, 0.5       , 0.33333333])
    """
    lam = np.maximum(np.asarray(values, dtype=np.float64), 0.0)
    if lam.size == 0 or not np.any(lam > 0):
        return np.zeros(lam.size, dtype=np.float64)
    tau = float(np.median(lam))
    if tau <= 0.0:
        tau = float(lam[lam > 0].mean())
    return gates.ratio(lam, tau)


# ------------------------------------------------------------------------------ RayleighBasis
class RayleighBasis:
    r"""The spectral coordinate system of one pencil ``C_t v = λ (C_p + εI) v``, and the gates built on it.

    Usually built with :meth:`from_pencil` or :meth:`from_result`; the constructor takes the arrays.

    Parameters
    ----------
    values : (k,) array_like
        Generalized eigenvalues ``λ_j``.
    vectors : (d, k) array_like
        Eigenvectors ``V`` with ``Vᵀ M V = I`` (float32 or float64).
    dual : (d, k) array_like, optional
        ``M V``; computed from ``B`` and ``reg_used`` when omitted.
    B : (d, d) ndarray, optional
        The proxy covariance ``C_p`` (kept by reference). None means ``C_p = I`` (the standard problem),
        unless ``cp_known=False``.
    reg_used : float, default 0.0
        The absolute shift ``ε`` (``M = B + εI``).
    A : (d, d) ndarray, sparse array or LinearOperator, optional
        The task covariance ``C_t`` (kept by reference), needed only by :meth:`utility`.
    pencil : Pencil, optional
        The factored pencil, kept for reuse (``generalized_topk(A2, basis.pencil, k)``).
    gains : callable, array_like or float, optional
        The gains used by :meth:`apply`: a function of the eigenvalues (re-evaluated by :meth:`update`),
        a (k,) array or a scalar. Default :func:`default_gains`.
    complement : float, default 0.0
        Gain ``g⊥`` of the M-orthogonal complement of ``span(V)`` used by :meth:`apply`.
    cp_known : bool, default True
        False when ``C_p`` is not available (a state dict saved without covariances): :meth:`penalty`
        then raises.

    Attributes
    ----------
    values : (k,) ndarray
    vectors : (d, k) ndarray
        ``V``, C-ordered.
    MV : (d, k) ndarray
        The dual basis ``M V``, C-ordered; ``MVᵀ V = I`` and, for a full basis, ``V MVᵀ = I``.
    reg_used : float
        ``ε``.
    dim : int
        ``d``.
    rank : int
        ``k``, the number of basis vectors (``k = d``: full basis).
    A, B : ndarray or None
        ``C_t`` and ``C_p``, by reference.
    pencil : Pencil or None
    gains : (k,) ndarray of float64
        The resolved gains of :meth:`apply`.
    complement : float
        ``g⊥`` of :meth:`apply`.

    Raises
    ------
    ValueError
        On shape mismatches or non-finite input.
    TypeError
        On non-floating input.

    Notes
    -----
    Two maps must not be confused. A *step* ``w`` (a row of ``ΔW``) has coordinates ``c = Vᵀ M w``
    (:meth:`coordinates`, ``G·MV`` for a block); then ``w = V c + r`` with ``r`` M-orthogonal to
    ``span(V)``. A *gradient* ``g`` is a covector: writing ``ΔW = Z Vᵀ`` the chain rule gives
    ``∂L/∂Z = G V`` (:meth:`gradient_coordinates`), which is what a per-direction optimizer keeps
    moments of. :meth:`reconstruct` maps ``Z`` back (``Z Vᵀ``).

    Examples
    --------
    >>> import numpy as np
    >>> from rqcore import RayleighBasis
    >>> A = np.diag([4.0, 1.0, 0.5])
    >>> B = np.diag([1.0, 1.0, 2.0])
    >>> basis = RayleighBasis.from_pencil(A, B, reg=0.0)       # full basis (k = d)
    >>> basis.values
    array([4.  , 1.  , 0.25])
    >>> G = np.array([[1.0, 1.0, 1.0]])
    >>> basis.gate(G, [1.0, 0.0, 0.0])                         # keep only the top direction
    array([[1., 0., 0.]])
    >>> basis.penalty(G).total                                  # wᵀ C_p w = 1 + 1 + 2
    4.0
    """

    def __init__(
        self,
        values: ArrayLike,
        vectors: ArrayLike,
        *,
        dual: ArrayLike | None = None,
        B: FloatArray | None = None,
        reg_used: float = 0.0,
        A: Any = None,
        pencil: Pencil | None = None,
        gains: GainsSpec | None = None,
        complement: float = 0.0,
        cp_known: bool = True,
    ) -> None:
        self.A = A
        self.pencil = pencil
        self._gain_rule: Callable[[FloatArray], ArrayLike] | None = default_gains
        self.gains: Float64Array = np.empty(0)
        self.complement = 0.0
        self._set_basis(values, vectors, dual, B, reg_used, cp_known)
        self.configure(gains=default_gains if gains is None else gains, complement=complement)

    # ------------------------------------------------------------------ construction
    def _set_basis(
        self,
        values: ArrayLike,
        vectors: ArrayLike,
        dual: ArrayLike | None,
        B: FloatArray | None,
        reg_used: float,
        cp_known: bool,
    ) -> None:
        V = as_float_array(vectors, "vectors", ndim=2, allowed=_WORK_DTYPES)
        lam = as_float_array(values, "values", ndim=1)
        d, k = V.shape
        if k < 1 or d < 1:
            raise ValueError(f"vectors must have shape (d, k) with d, k >= 1, got {V.shape}.")
        if lam.shape != (k,):
            raise ValueError(f"values has shape {lam.shape}; expected ({k},) to match vectors.")
        check_finite(V, "vectors")
        check_finite(lam, "values")
        eps = as_real(reg_used, "reg_used")
        if not np.isfinite(eps) or eps < 0:
            raise ValueError(f"reg_used must be a finite number >= 0, got {reg_used!r}.")
        if B is not None:
            B = as_float_array(B, "B", ndim=2, allowed=_WORK_DTYPES)
            if B.shape != (d, d):
                raise ValueError(f"B has shape {B.shape} but the basis has dimension d={d}.")
            pencil = getattr(self, "pencil", None)
            if pencil is None or B is not pencil.B:  # a Pencil's B was checked when it was factored
                check_finite(B, "B")
        V = np.ascontiguousarray(V)
        if dual is None:
            if not cp_known:
                raise ValueError("dual (M V) is required when C_p is not known.")
            MV = V.copy() if B is None else B @ V + eps * V
            MV.flags.writeable = False  # made here: _frozen shares it instead of copying
        else:
            MV = as_float_array(dual, "dual", ndim=2, allowed=_WORK_DTYPES)
            if MV.shape != (d, k):
                raise ValueError(f"dual has shape {MV.shape}; expected {(d, k)}.")
            check_finite(MV, "dual")
        # Read-only (the per-dtype casts below are cached: an array changed in place would leave
        # them stale); writeable inputs are copied, read-only ones shared (see _frozen).
        self._values = _frozen(lam)
        self._vectors = _frozen(V)
        self._MV = _frozen(np.asarray(MV, dtype=V.dtype))
        self.B = B
        self.reg_used = eps
        self._cp_known = bool(cp_known)
        self.dim, self.rank = d, k
        self._m_norm_bound = (
            _spectral_norm_bound(B, eps, getattr(self, "pencil", None))
            if cp_known
            else float("nan")
        )
        self._cast_cache: dict[np.dtype[Any], tuple[FloatArray, FloatArray]] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unpickled (or deep-copied) arrays come back writeable: freeze them again, and start a
        # fresh cast cache rather than trust one computed from arrays that could then change.
        self.__dict__.update(state)
        for name in ("_values", "_vectors", "_MV"):
            getattr(self, name).flags.writeable = False
        self._cast_cache = {}

    @property
    def values(self) -> FloatArray:
        """``(k,)`` eigenvalues, read-only (:meth:`update` or a new basis replaces them)."""
        return self._values

    @property
    def vectors(self) -> FloatArray:
        """``(d, k)`` ``V``, C-ordered and read-only."""
        return self._vectors

    @property
    def MV(self) -> FloatArray:
        """``(d, k)`` dual basis ``M V``, C-ordered and read-only."""
        return self._MV

    @classmethod
    def from_result(
        cls,
        result: GeneralizedEigenResult,
        A: Any = None,
        *,
        gains: GainsSpec | None = None,
        complement: float = 0.0,
    ) -> RayleighBasis:
        """Build the basis of an existing :func:`~rqcore.generalized_topk` result.

        The basis shares ``result.vectors`` (no d×k copy, as :attr:`vectors` is read-only): do not
        change the result's arrays in place while the basis is in use.

        Parameters
        ----------
        result : GeneralizedEigenResult
            Carries ``values``, ``vectors`` and the ``pencil`` (for ``C_p`` and ``ε``).
        A : array, sparse array or LinearOperator, optional
            ``C_t``, kept by reference for :meth:`utility`.
        gains, complement
            As in the constructor.

        Returns
        -------
        RayleighBasis

        Raises
        ------
        TypeError
            If ``result`` is not a :class:`~rqcore.GeneralizedEigenResult`.

        Examples
        --------
        >>> import numpy as np
        >>> from rqcore import RayleighBasis, generalized_topk
        >>> res = generalized_topk(np.diag([3.0, 2.0, 1.0]), np.eye(3), k=2, reg=0.0)
        >>> RayleighBasis.from_result(res).rank
        2
        """
        if not isinstance(result, GeneralizedEigenResult):
            raise TypeError(
                f"result must be a GeneralizedEigenResult, got {type(result).__name__}."
            )
        pencil = result.pencil
        # Read-only views: the basis shares the result's vectors (and the product made here)
        # instead of copying them; the result's own arrays stay writeable.
        V = np.ascontiguousarray(result.vectors).view()
        V.flags.writeable = False
        MV = pencil.matvec(V.astype(pencil.dtype, copy=False)).astype(V.dtype, copy=False)
        MV.flags.writeable = False
        return cls(
            result.values,
            V,
            dual=MV,
            B=pencil.B,
            reg_used=pencil.reg_used,
            A=A,
            pencil=pencil,
            gains=gains,
            complement=complement,
        )

    @classmethod
    def from_pencil(
        cls,
        A: Any,
        B: Any = None,
        k: int | None = None,
        *,
        reg: float = 1e-6,
        gains: GainsSpec | None = None,
        complement: float = 0.0,
        **solver_options: Any,
    ) -> RayleighBasis:
        """Solve ``A v = λ (B + εI) v`` and return the basis of its top ``k`` eigenvectors.

        Parameters
        ----------
        A : (d, d) array_like, sparse array or LinearOperator
            ``C_t``, the task covariance (kept by reference).
        B : (d, d) array_like, :class:`~rqcore.Pencil` or None
            ``C_p``, a prepared pencil, or None for the standard problem.
        k : int, optional
            Number of eigenvectors; None gives the full basis (``k = d``), solved with
            ``method="dense"`` unless another method is passed.
        reg : float, default 1e-6
            Relative regularization (see :class:`~rqcore.Pencil`).
        gains, complement
            As in the constructor.
        **solver_options
            Passed to :func:`~rqcore.generalized_topk` (``method``, ``tol``, ``seed``...).

        Returns
        -------
        RayleighBasis

        Raises
        ------
        ValueError, TypeError
            As :func:`~rqcore.generalized_topk`.

        Examples
        --------
        >>> import numpy as np
        >>> from rqcore import RayleighBasis
        >>> basis = RayleighBasis.from_pencil(np.diag([2.0, 1.0]), None)
        >>> basis.values, basis.rank
        (array([2., 1.]), 2)
        """
        d = int(np.shape(A)[0])
        if k is None:
            k = d
            solver_options.setdefault("method", "dense")
        result = generalized_topk(A, B, k, reg=reg, **solver_options)
        return cls.from_result(result, A=A, gains=gains, complement=complement)

    def update(self, new_result: GeneralizedEigenResult, A: Any = None) -> RayleighBasis:
        """Replace the basis by a refreshed solve of the same dimension (in place).

        Parameters
        ----------
        new_result : GeneralizedEigenResult
            The new eigenpairs (``k`` may change).
        A : array, optional
            The new ``C_t``; None keeps the current reference (pass it when ``C_t`` has changed, or
            :meth:`utility` measures against the old one).

        Returns
        -------
        RayleighBasis
            ``self``. Gains given as a function are re-evaluated on the new eigenvalues; fixed gains
            are kept.

        Raises
        ------
        ValueError
            If the dimension differs, or fixed gains no longer match the new ``k``.

        Examples
        --------
        >>> import numpy as np
        >>> from rqcore import RayleighBasis, generalized_topk
        >>> basis = RayleighBasis.from_pencil(np.diag([1.0, 2.0]), None)
        >>> basis.update(generalized_topk(np.diag([5.0, 2.0]), None, k=2)).values
        array([5., 2.])
        """
        if not isinstance(new_result, GeneralizedEigenResult):
            raise TypeError(
                f"new_result must be a GeneralizedEigenResult, got {type(new_result).__name__}."
            )
        d_new = new_result.vectors.shape[0]
        if d_new != self.dim:
            raise ValueError(
                f"the new result has dimension {d_new} but this basis has d={self.dim}; build a new "
                "RayleighBasis for a different layer."
            )
        k_new = new_result.vectors.shape[1]
        if self._gain_rule is None and k_new != self.rank:
            raise ValueError(
                f"this basis has fixed gains of length {self.rank} but the new result has k={k_new}; "
                "call configure(gains=...) with a function of the eigenvalues first."
            )
        fresh = RayleighBasis.from_result(new_result)
        # Gains first: a rule that fails on the new eigenvalues must leave this basis as it was.
        gains = fresh._resolve_gains(self._gain_rule if self._gain_rule is not None else self.gains)
        previous, self.pencil = self.pencil, fresh.pencil  # first: _set_basis trusts its B
        try:
            self._set_basis(fresh.values, fresh.vectors, fresh.MV, fresh.B, fresh.reg_used, True)
        except BaseException:
            self.pencil = previous
            raise
        if A is not None:
            self.A = A
        self.gains = gains
        return self

    # ------------------------------------------------------------------ configuration
    def _resolve_gains(self, gains: GainsSpec) -> Float64Array:
        raw = gains(self.values) if callable(gains) else gains
        g = np.asarray(raw, dtype=np.float64)
        if g.ndim == 0:
            g = np.full(self.rank, float(g))
        if g.shape != (self.rank,):
            raise ValueError(f"gains must be a scalar or have shape ({self.rank},), got {g.shape}.")
        if not np.isfinite(g).all():
            raise ValueError("gains contains NaN or Inf.")
        return g

    def configure(
        self, gains: GainsSpec | None = None, complement: float | None = None
    ) -> RayleighBasis:
        """Set the gains and complement gain used by :meth:`apply` (in place).

        Parameters
        ----------
        gains : callable, array_like or float, optional
            A function of the eigenvalues (e.g. ``lambda lam: gates.ratio(lam, tau=1.0)``; it is
            re-evaluated after :meth:`update`), a (k,) array or a scalar (fixed). None keeps the current.
        complement : float, optional
            ``g⊥``; None keeps the current.

        Returns
        -------
        RayleighBasis
            ``self``.

        Raises
        ------
        ValueError
            If the gains have the wrong shape or are not finite.

        Examples
        --------
        >>> import numpy as np
        >>> from rqcore import RayleighBasis, gates
        >>> basis = RayleighBasis.from_pencil(np.diag([3.0, 1.0]), None)
        >>> basis.configure(gains=lambda lam: gates.hard(lam, rank=1)).gains
        array([1., 0.])
        """
        if gains is not None:
            self.gains = self._resolve_gains(gains)
            self._gain_rule = gains if callable(gains) else None
        if complement is not None:
            c = as_real(complement, "complement")
            if not np.isfinite(c):
                raise ValueError(f"complement must be finite, got {complement!r}.")
            self.complement = c
        return self

    def with_gains(
        self, gains: GainsSpec | None = None, complement: float | None = None
    ) -> RayleighBasis:
        """A shallow copy with other gains (arrays shared, covariances by reference).

        Parameters
        ----------
        gains, complement
            As in :meth:`configure`.

        Returns
        -------
        RayleighBasis

        Examples
        --------
        >>> import numpy as np
        >>> from rqcore import RayleighBasis
        >>> basis = RayleighBasis.from_pencil(np.diag([3.0, 1.0]), None)
        >>> basis.with_gains(1.0, complement=1.0).gains
        array([1., 1.])
        """
        other = copy.copy(self)
        other._cast_cache = self._cast_cache  # the casts are read-only: share them
        return other.configure(gains=gains, complement=complement)

    def __repr__(self) -> str:
        return (
            f"RayleighBasis(dim={self.dim}, rank={self.rank}, dtype={self.vectors.dtype.name}, "
            f"reg_used={self.reg_used:.3g}, complement={self.complement:g})"
        )

    # ------------------------------------------------------------------ maps
    def _cast(self, dtype: np.dtype[Any]) -> tuple[FloatArray, FloatArray]:
        """``(V, MV)`` in ``dtype``, C-ordered, cast once and cached."""
        cached = self._cast_cache.get(dtype)
        if cached is None:
            cached = (
                np.ascontiguousarray(self.vectors, dtype=dtype),
                np.ascontiguousarray(self.MV, dtype=dtype),
            )
            self._cast_cache[dtype] = cached
        return cached

    def _rows_times(self, G: ArrayLike, *, dual: bool) -> FloatArray:
        """``G · MV`` (``dual``) or ``G · V`` in G's dtype; NaN/Inf in G shows up in the product."""
        G2, was_1d = _rows(G, self.dim)
        with np.errstate(invalid="ignore", over="ignore"):  # reported just below
            Z = G2 @ self._cast(G2.dtype)[1 if dual else 0]
        if not np.isfinite(Z).all():
            raise _non_finite_error("G")
        return Z[0] if was_1d else Z

    def coordinates(self, G: ArrayLike) -> FloatArray:
        """Spectral coordinates of a step: ``G · MV`` (each row ``c = Vᵀ M w``).

        Parameters
        ----------
        G : (n, d) or (d,) array_like
            Rows of a step ``ΔW`` (float32 or float64).

        Returns
        -------
        (n, k) or (k,) ndarray, in G's dtype

        Raises
        ------
        ValueError
            On a dimension mismatch or NaN/Inf.
        TypeError
            On a non-float32/float64 dtype.

        Examples
        --------
        >>> import numpy as np
        >>> from rqcore import RayleighBasis
        >>> basis = RayleighBasis.from_pencil(np.diag([8.0, 1.0]), np.diag([4.0, 1.0]), reg=0.0)
        >>> np.abs(basis.coordinates(np.array([1.0, 1.0])))   # c = Vᵀ M w, V = diag(1/2, 1)
        array([2., 1.])
        """
        return self._rows_times(G, dual=True)

    def gradient_coordinates(self, G: ArrayLike) -> FloatArray:
        """Coordinates of a gradient (covector) under ``ΔW = Z Vᵀ``: ``∂L/∂Z = G · V``.

        Parameters
        ----------
        G : (n, d) or (d,) array_like
            Gradient rows ``∂L/∂ΔW``.

        Returns
        -------
        (n, k) or (k,) ndarray, in G's dtype

        Raises
        ------
        ValueError, TypeError
            As :meth:`coordinates`.

        Examples
        --------
        >>> import numpy as np
        >>> from rqcore import RayleighBasis
        >>> basis = RayleighBasis.from_pencil(np.diag([8.0, 1.0]), np.diag([4.0, 1.0]), reg=0.0)
        >>> np.abs(basis.gradient_coordinates(np.array([1.0, 1.0])))   # G·V, V = diag(1/2, 1)
        array([0.5, 1. ])
        """
        return self._rows_times(G, dual=False)

    def reconstruct(self, Z: ArrayLike) -> FloatArray:
        """Map spectral coordinates back to rows: ``Z · Vᵀ``.

        Parameters
        ----------
        Z : (n, k) or (k,) array_like

        Returns
        -------
        (n, d) or (d,) ndarray, in Z's dtype

        Raises
        ------
        ValueError, TypeError
            On a shape mismatch, NaN/Inf or a non-float dtype.

        Examples
        --------
        >>> import numpy as np
        >>> from rqcore import RayleighBasis
        >>> basis = RayleighBasis.from_pencil(np.diag([8.0, 1.0]), np.diag([4.0, 1.0]), reg=0.0)
        >>> w = np.array([1.0, 3.0])
        >>> np.allclose(basis.reconstruct(basis.coordinates(w)), w)   # full basis: exact
        True
        """
        Z2, was_1d = _rows(Z, self.rank, "Z")
        check_finite(Z2, "Z")
        out = Z2 @ self._cast(Z2.dtype)[0].T
        return out[0] if was_1d else out

    def gate(
        self,
        G: ArrayLike,
        gains: GainsSpec,
        *,
        complement: float = 0.0,
        out: FloatArray | None = None,
    ) -> FloatArray:
        r"""Scale each spectral component of each row by its gain, the rest of the row by ``g⊥``.

        Returns ``g⊥·G + (G·MV)·diag(gains − g⊥)·Vᵀ``: with ``w = V c + r`` (``r`` M-orthogonal to
        ``span(V)``) each row becomes ``V diag(g) c + g⊥ r``. Exact for any ``G``; O(n·d·k) with two
        BLAS products and no d×d matrix.

        Parameters
        ----------
        G : (n, d) or (d,) array_like
            Rows to gate, float32 or float64; the computation runs in G's dtype.
        gains : (k,) array_like, float or callable
            Per-direction gains (any finite reals; the :mod:`rqcore.gates` functions give ``[0, 1]``),
            or a function of the eigenvalues.
        complement : float, default 0.0
            ``g⊥``, the gain of everything outside ``span(V)`` (irrelevant for a full basis).
        out : ndarray, optional
            Destination with G's shape and dtype; may be ``G`` itself (in place).

        Returns
        -------
        ndarray
            ``out`` if given, else a new array with G's shape, dtype and (C or F) order.

        Raises
        ------
        ValueError
            On a dimension mismatch, NaN/Inf in ``G`` (detected through ``G·MV``, see Notes), bad gains
            or a bad ``out``.
        TypeError
            On a non-float32/float64 ``G`` or an ``out`` of another dtype.

        Notes
        -----
        A NaN or Inf anywhere in a row of ``G`` makes that row's coordinates ``G·MV`` non-finite under
        IEEE arithmetic, so finiteness is checked on the (n, k) coordinates rather than by an extra
        O(n·d) scan of ``G`` (a finite ``G`` whose coordinates overflow is refused too). The check runs
        before anything is written, so a failed in-place call leaves ``G`` intact.

        Examples
        --------
        >>> import numpy as np
        >>> from rqcore import RayleighBasis
        >>> basis = RayleighBasis.from_pencil(np.diag([2.0, 1.0, 0.5]), None, k=1)
        >>> G = np.array([[1.0, 2.0, 3.0]])
        >>> basis.gate(G, [0.5], complement=0.0)        # half of the top direction, nothing else
        array([[0.5, 0. , 0. ]])
        >>> basis.gate(G, [0.5], complement=1.0)        # half of the top direction, the rest kept
        array([[0.5, 2. , 3. ]])
        """
        G2, was_1d = _rows(G, self.dim)
        out2 = _check_out(out, G2, was_1d)
        g = self._resolve_gains(gains)
        gperp = as_real(complement, "complement")
        if not np.isfinite(gperp):
            raise ValueError(f"complement must be finite, got {complement!r}.")
        Vc, MVc = self._cast(G2.dtype)
        with np.errstate(over="ignore"):
            scale = (g - gperp).astype(G2.dtype)
        if not (np.isfinite(scale).all() and np.isfinite(G2.dtype.type(gperp))):
            raise ValueError(
                f"the gains (max |g| = {float(np.max(np.abs(g))):.3g}) or complement ({gperp:.3g}) "
                f"overflow G's dtype {G2.dtype}; pass float64 G or smaller gains."
            )
        result = _spectral_gate(G2, Vc, MVc, scale, gperp, out2)
        if out is not None:
            return out  # the caller's array itself (``res is out``), 1-D or not
        return result[0] if was_1d else result

    def apply(self, G: ArrayLike, out: FloatArray | None = None) -> FloatArray:
        """The :class:`Projector` map: :meth:`gate` with the configured ``gains`` and ``complement``.

        Parameters
        ----------
        G : (n, d) or (d,) array_like
        out : ndarray, optional
            As in :meth:`gate`.

        Returns
        -------
        ndarray

        Raises
        ------
        ValueError, TypeError
            As :meth:`gate`.

        Examples
        --------
        >>> import numpy as np
        >>> from rqcore import RayleighBasis
        >>> basis = RayleighBasis.from_pencil(np.diag([3.0, 1.0]), None)   # default gains
        >>> basis.gains                                       # ratio with τ = median = 2
        array([0.6       , 0.33333333])
        >>> basis.apply(np.array([1.0, 1.0]))
        array([0.6       , 0.33333333])
        """
        return self.gate(G, self.gains, complement=self.complement, out=out)

    # ------------------------------------------------------------------ monitoring
    def penalty(self, G: ArrayLike) -> QuadraticForm:
        r"""Exact penalty ``wᵀ C_p w`` of each row (O(n·d²)), for monitoring.

        Parameters
        ----------
        G : (n, d) or (d,) array_like

        Returns
        -------
        QuadraticForm
            ``per_row`` (n,) and ``total``, in float64.

        Raises
        ------
        ValueError
            On a dimension mismatch, NaN/Inf, or when ``C_p`` is not available.

        Notes
        -----
        This is the unregularized penalty. The coordinates measure the regularized one,
        ``wᵀ M w = wᵀ C_p w + ε‖w‖²``, which equals ``Σ_j c_j²`` for a full basis. For a top-k basis see
        :meth:`penalty_estimate` (cheap bounds). For the standard problem (``C_p = I``) it is ``‖w‖²``.

        Examples
        --------
        >>> import numpy as np
        >>> from rqcore import RayleighBasis
        >>> basis = RayleighBasis.from_pencil(np.eye(2), np.diag([2.0, 3.0]), reg=0.0)
        >>> basis.penalty(np.array([[1.0, 1.0], [0.0, 1.0]])).per_row
        array([5., 3.])
        """
        if not self._cp_known:
            raise ValueError(
                "C_p is not available (the basis was restored from a state dict saved without "
                "covariances); use penalty_estimate or restore with covariances=True."
            )
        G2, was_1d = _rows(G, self.dim)
        check_finite(G2, "G")
        return _quadratic(G2, self.B, was_1d)

    def utility(self, G: ArrayLike) -> QuadraticForm:
        r"""Exact utility ``wᵀ C_t w`` of each row (O(n·d²)), for monitoring.

        Parameters
        ----------
        G : (n, d) or (d,) array_like

        Returns
        -------
        QuadraticForm

        Raises
        ------
        ValueError
            On a dimension mismatch, NaN/Inf, or when ``C_t`` (``A``) was not given.

        Notes
        -----
        For a full basis ``wᵀ C_t w = Σ_j λ_j c_j²``. For a top-k basis the span and complement parts
        split additively (the cross term ``(Vc)ᵀ C_t r = cᵀ Λ Vᵀ M r`` vanishes).

        Examples
        --------
        >>> import numpy as np
        >>> from rqcore import RayleighBasis
        >>> basis = RayleighBasis.from_pencil(np.diag([2.0, 3.0]), None)
        >>> basis.utility(np.array([1.0, 1.0])).total
        5.0
        """
        if self.A is None:
            raise ValueError(
                "C_t (A) is not available; pass A to from_result/update to monitor it."
            )
        G2, was_1d = _rows(G, self.dim)
        check_finite(G2, "G")
        if isinstance(self.A, np.ndarray):
            return _quadratic(G2, self.A, was_1d)
        AG = np.asarray(self.A @ np.asarray(G2, dtype=np.float64).T, dtype=np.float64).T
        per_row = _kernels.row_dots(
            np.ascontiguousarray(G2, dtype=np.float64), np.ascontiguousarray(AG)
        )
        return QuadraticForm(per_row, float(per_row.sum()))

    def penalty_estimate(self, G: ArrayLike) -> PenaltyEstimate:
        r"""Cheap (O(n·d·k)) bounds on the exact penalty ``wᵀ C_p w``, from the coordinates.

        Parameters
        ----------
        G : (n, d) or (d,) array_like

        Returns
        -------
        PenaltyEstimate
            ``in_span = Σ c_j²`` (exact regularized penalty of the span part), ``complement = ‖r‖²``,
            ``lower ≤ wᵀ C_p w ≤ upper``; ``lower = upper`` for a full basis.

        Raises
        ------
        ValueError, TypeError
            As :meth:`coordinates`.

        Notes
        -----
        ``wᵀ M w = Σ c_j² + rᵀ M r`` exactly (the parts are M-orthogonal) and ``0 ≤ rᵀ M r ≤ μ‖r‖²`` with
        ``μ = min(‖C_p‖_F, ‖C_p‖₁) + ε ≥ λ_max(M)``; subtracting ``ε‖w‖²`` turns both bounds into bounds
        on ``wᵀ C_p w``. The gap is ``μ‖r‖²``: small when the basis captures the row. Without ``C_p``
        (``cp_known=False``, no stored bound) ``μ`` is unknown: ``upper`` is ``inf`` except for rows
        in the span.

        Examples
        --------
        >>> import numpy as np
        >>> from rqcore import RayleighBasis
        >>> basis = RayleighBasis.from_pencil(np.diag([3.0, 1.0]), np.diag([1.0, 2.0]), k=1, reg=0.0)
        >>> est = basis.penalty_estimate(np.array([1.0, 1.0]))
        >>> float(est.lower[0]), float(est.upper[0])     # exact: 1 + 2 = 3, μ = 2
        (1.0, 3.0)
        """
        G2, _ = _rows(G, self.dim)
        Vc, MVc = self._cast(G2.dtype)
        with np.errstate(invalid="ignore", over="ignore"):  # reported just below
            Z = np.ascontiguousarray(G2 @ MVc)
        if not np.isfinite(Z).all():
            raise _non_finite_error("G")
        R = np.array(G2, order="C", copy=True)
        if R.shape[0]:
            _gemm_into(R, Z, Vc, -1.0, 1.0)  # r = w − V c
        in_span = _kernels.row_sumsq(Z)
        comp = _kernels.row_sumsq(R)
        shift = self.reg_used * _kernels.row_sumsq(np.ascontiguousarray(G2))
        lower = in_span - shift
        if np.isfinite(self._m_norm_bound):
            upper = in_span + self._m_norm_bound * comp - shift
        else:  # C_p unknown (cp_known=False): no bound on rᵀMr unless r = 0
            upper = np.where(comp == 0.0, lower, np.inf)
        return PenaltyEstimate(in_span, comp, lower, upper)

    # ------------------------------------------------------------------ state
    def state_dict(self, *, covariances: bool = True) -> dict[str, Any]:
        """Plain-value state: NumPy arrays, floats and strings.

        Parameters
        ----------
        covariances : bool, default True
            Include ``C_p`` (``"B"``) and ``C_t`` (``"A"``, when it is an ndarray), by reference. Without
            them the restored basis gates and estimates but cannot compute exact penalties/utilities.

        Returns
        -------
        dict
            Keys ``kind, values, vectors, dual, reg_used, gains, complement, gains_rule, cp,
            m_norm_bound`` and optionally ``B``, ``A``. ``gains_rule`` is ``"default"``, ``"fixed"`` or
            ``"callable"`` (a function cannot be stored: its current values are, and
            :meth:`from_state_dict` takes it back through ``gains=``).

        Examples
        --------
        >>> import numpy as np
        >>> from rqcore import RayleighBasis
        >>> basis = RayleighBasis.from_pencil(np.diag([3.0, 1.0]), np.eye(2))
        >>> again = RayleighBasis.from_state_dict(basis.state_dict())
        >>> np.array_equal(again.vectors, basis.vectors) and np.array_equal(again.gains, basis.gains)
        True
        """
        if self._gain_rule is default_gains:
            rule = "default"
        elif self._gain_rule is None:
            rule = "fixed"
        else:
            rule = "callable"
        if not self._cp_known:
            cp = "absent"
        else:
            cp = "identity" if self.B is None else "matrix"
        state: dict[str, Any] = {
            "kind": "RayleighBasis",
            "values": self.values.copy(),
            "vectors": self.vectors.copy(),
            "dual": self.MV.copy(),
            "reg_used": self.reg_used,
            "gains": self.gains.copy(),
            "complement": self.complement,
            "gains_rule": rule,
            "cp": cp if covariances or cp == "identity" else "absent",
            "m_norm_bound": self._m_norm_bound,
        }
        if covariances:
            if self.B is not None:
                state["B"] = self.B
            if isinstance(self.A, np.ndarray):
                state["A"] = self.A
        return state

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Any], *, gains: GainsSpec | None = None
    ) -> RayleighBasis:
        """Rebuild a basis from :meth:`state_dict` (arrays equal bit for bit).

        Parameters
        ----------
        state : dict
        gains : callable or array_like, optional
            Overrides the stored gains (e.g. to re-attach a gain function).

        Returns
        -------
        RayleighBasis

        Raises
        ------
        ValueError
            If ``state`` is not a RayleighBasis state or is inconsistent.

        Examples
        --------
        >>> import numpy as np
        >>> from rqcore import RayleighBasis
        >>> basis = RayleighBasis.from_pencil(np.diag([3.0, 1.0]), None, complement=0.5)
        >>> RayleighBasis.from_state_dict(basis.state_dict()).complement
        0.5
        """
        if state.get("kind") != "RayleighBasis":
            raise ValueError(f"not a RayleighBasis state (kind={state.get('kind')!r}).")
        cp = state["cp"]
        if cp not in ("identity", "matrix", "absent"):
            raise ValueError(f"unknown cp={cp!r} in the state.")
        if cp == "matrix" and "B" not in state:
            raise ValueError("the state says cp='matrix' but holds no 'B'.")
        if gains is None:
            gains = default_gains if state["gains_rule"] == "default" else state["gains"]
        basis = cls(
            state["values"],
            state["vectors"],
            dual=state["dual"],
            B=state.get("B") if cp == "matrix" else None,
            reg_used=float(state["reg_used"]),
            A=state.get("A"),
            gains=gains,
            complement=float(state["complement"]),
            cp_known=cp != "absent",
        )
        basis._values = _frozen(state["values"])
        basis._m_norm_bound = float(state["m_norm_bound"])
        return basis


# -------------------------------------------------------------------------- NullspaceProjector
class NullspaceProjector:
    r"""Project rows onto the orthogonal complement of a covariance's dominant eigen-directions.

    The hard baseline of Adam-NSCL / GPM-style methods: from one covariance ``C`` (standard eigenproblem,
    :func:`scipy.linalg.eigh`) keep the top ``r`` eigenvectors ``U`` and map ``G ↦ G − (G U) Uᵀ``.

    Parameters
    ----------
    C : (d, d) array_like
        Symmetric positive semi-definite covariance (float32 or float64), kept by reference.
    energy : float, default 0.99
        ``r`` is the smallest number with ``Σ_{i≤r} λ_i ≥ energy · Σ_i λ_i`` (eigenvalues clipped at 0,
        so ``Σ λ_i`` is the trace of the PSD part), ``0 < energy ≤ 1``.
    rank : int, optional
        Use the top ``rank`` directions instead (``0 ≤ rank ≤ d``); overrides ``energy``.

    Attributes
    ----------
    basis : (d, r) ndarray
        ``U``, orthonormal, C-ordered.
    values : (d,) ndarray
        All eigenvalues of ``C``, descending.
    rank : int
        ``r``.
    dim : int
        ``d``.
    C : ndarray or None
        The covariance, by reference (None after restoring a state dict saved without it).

    Raises
    ------
    ValueError
        If ``C`` is not square, symmetric and finite, or ``energy``/``rank`` is out of range.
    TypeError
        On a non-floating ``C``.

    Notes
    -----
    A projected row ``w`` lies in the span of the discarded eigenvectors, so
    ``wᵀ C w ≤ λ_{r+1} ‖w‖² ≤ (1 − energy) · tr(C) · ‖w‖²`` (the second step because
    ``λ_{r+1} ≤ Σ_{i>r} λ_i``). Unlike a :class:`RayleighBasis` it ignores the task covariance: a
    direction is blocked because the old data uses it, whatever the new task gains from it.

    Examples
    --------
    >>> import numpy as np
    >>> from rqcore import NullspaceProjector
    >>> P = NullspaceProjector(np.diag([10.0, 1.0, 0.01]), energy=0.9)
    >>> P.rank
    1
    >>> P.apply(np.array([1.0, 2.0, 3.0]))
    array([0., 2., 3.])
    """

    def __init__(self, C: ArrayLike, energy: float = 0.99, rank: int | None = None) -> None:
        Cm = as_float_array(C, "C", ndim=2, allowed=_WORK_DTYPES)
        check_finite(Cm, "C")
        check_symmetric(Cm, "C")
        energy = as_real(energy, "energy")
        if not np.isfinite(energy) or not 0.0 < energy <= 1.0:
            raise ValueError(f"energy must lie in (0, 1], got {energy!r}.")
        d = Cm.shape[0]
        values, vectors = scipy.linalg.eigh(Cm, check_finite=False)
        values, vectors = values[::-1], vectors[:, ::-1]
        if rank is None:
            pos = np.maximum(values.astype(np.float64), 0.0)
            cum = np.cumsum(pos)
            r = 0 if cum[-1] <= 0 else min(int(np.searchsorted(cum, energy * cum[-1])) + 1, d)
        else:
            if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
                raise TypeError(f"rank must be an integer, got {type(rank).__name__}.")
            if not 0 <= rank <= d:
                raise ValueError(f"rank must satisfy 0 <= rank <= d = {d}, got {rank}.")
            r = int(rank)
        self._init(Cm, np.ascontiguousarray(values), np.ascontiguousarray(vectors[:, :r]), energy)

    def _init(
        self, C: FloatArray | None, values: FloatArray, basis: FloatArray, energy: float
    ) -> None:
        self.C = C
        self.values = values
        # Both callers pass a fresh private array: freeze it in place (its per-dtype casts are
        # cached), no second d×r copy.
        basis.flags.writeable = False
        self._basis = basis
        self.energy = energy
        self.dim, self.rank = basis.shape
        self._cast_cache: dict[np.dtype[Any], FloatArray] = {}

    def __repr__(self) -> str:
        return f"NullspaceProjector(dim={self.dim}, rank={self.rank}, energy={self.energy:g})"

    @property
    def basis(self) -> FloatArray:
        """``(d, r)`` orthonormal ``U`` of the kept directions, C-ordered and read-only."""
        return self._basis

    def __setstate__(self, state: dict[str, Any]) -> None:
        # As RayleighBasis: unpickled arrays come back writeable; freeze, and drop the cast cache.
        self.__dict__.update(state)
        self._basis.flags.writeable = False
        self._cast_cache = {}

    @property
    def captured_energy(self) -> float:
        """Fraction of ``Σ λ⁺`` held by the kept directions."""
        pos = np.maximum(self.values.astype(np.float64), 0.0)
        total = float(pos.sum())
        return float(pos[: self.rank].sum() / total) if total > 0 else 1.0

    def _cast(self, dtype: np.dtype[Any]) -> FloatArray:
        cached = self._cast_cache.get(dtype)
        if cached is None:
            cached = np.ascontiguousarray(self.basis, dtype=dtype)
            self._cast_cache[dtype] = cached
        return cached

    def apply(self, G: ArrayLike, out: FloatArray | None = None) -> FloatArray:
        """Remove the kept directions from each row: ``G − (G U) Uᵀ``.

        Parameters
        ----------
        G : (n, d) or (d,) array_like
            float32 or float64; the computation runs in G's dtype.
        out : ndarray, optional
            Destination with G's shape and dtype; may be ``G`` (in place).

        Returns
        -------
        ndarray

        Raises
        ------
        ValueError, TypeError
            On a dimension mismatch, NaN/Inf, a bad dtype or a bad ``out``.

        Examples
        --------
        >>> import numpy as np
        >>> from rqcore import NullspaceProjector
        >>> P = NullspaceProjector(np.diag([2.0, 1.0]), rank=1)
        >>> P.apply(np.array([[3.0, 4.0]]))
        array([[0., 4.]])
        """
        G2, was_1d = _rows(G, self.dim)
        out2 = _check_out(out, G2, was_1d)
        if self.rank == 0:
            if not np.isfinite(G2).all():
                raise _non_finite_error("G")
            result = np.array(G2, copy=True) if out2 is None else out2
            if out2 is not None and out2 is not G2:
                out2[...] = G2
        else:
            U = self._cast(G2.dtype)
            # The gate with V = MV = U (M = I), gains 0 and complement 1.
            scale = np.zeros(self.rank, dtype=G2.dtype)
            result = _spectral_gate(G2, U, U, scale - 1.0, 1.0, out2)
        if out is not None:
            return out  # the caller's array itself (``res is out``), 1-D or not
        return result[0] if was_1d else result

    def penalty(self, G: ArrayLike) -> QuadraticForm:
        """Exact ``wᵀ C w`` of each row (O(n·d²)).

        Parameters
        ----------
        G : (n, d) or (d,) array_like

        Returns
        -------
        QuadraticForm

        Raises
        ------
        ValueError
            On a dimension mismatch, NaN/Inf, or when ``C`` is not available.

        Examples
        --------
        >>> import numpy as np
        >>> from rqcore import NullspaceProjector
        >>> P = NullspaceProjector(np.diag([2.0, 1.0]), rank=1)
        >>> P.penalty(np.array([1.0, 1.0])).total
        3.0
        """
        if self.C is None:
            raise ValueError("C is not available (restored from a state dict saved without it).")
        G2, was_1d = _rows(G, self.dim)
        check_finite(G2, "G")
        return _quadratic(G2, self.C, was_1d)

    def state_dict(self, *, covariances: bool = True) -> dict[str, Any]:
        """Plain-value state: ``kind, values, basis, energy`` and ``C`` (by reference) if asked.

        Parameters
        ----------
        covariances : bool, default True
            Include ``C`` (needed by :meth:`penalty`).

        Returns
        -------
        dict

        Examples
        --------
        >>> import numpy as np
        >>> from rqcore import NullspaceProjector
        >>> P = NullspaceProjector(np.diag([2.0, 1.0]), rank=1)
        >>> NullspaceProjector.from_state_dict(P.state_dict()).rank
        1
        """
        state: dict[str, Any] = {
            "kind": "NullspaceProjector",
            "values": self.values.copy(),
            "basis": self.basis.copy(),
            "energy": self.energy,
        }
        if covariances and self.C is not None:
            state["C"] = self.C
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> NullspaceProjector:
        """Rebuild from :meth:`state_dict` without a new eigendecomposition.

        Parameters
        ----------
        state : dict

        Returns
        -------
        NullspaceProjector

        Raises
        ------
        ValueError
            If ``state`` is not a NullspaceProjector state.

        Examples
        --------
        >>> import numpy as np
        >>> from rqcore import NullspaceProjector
        >>> P = NullspaceProjector(np.diag([2.0, 1.0]), rank=1)
        >>> Q = NullspaceProjector.from_state_dict(P.state_dict(covariances=False))
        >>> np.array_equal(Q.basis, P.basis), Q.C is None
        (True, True)
        """
        if state.get("kind") != "NullspaceProjector":
            raise ValueError(f"not a NullspaceProjector state (kind={state.get('kind')!r}).")
        basis = as_float_array(state["basis"], "basis", ndim=2, allowed=_WORK_DTYPES)
        check_finite(basis, "state['basis']")
        values = np.array(state["values"], copy=True)
        C = state.get("C")
        if C is not None:
            C = as_float_array(C, "C", ndim=2, allowed=_WORK_DTYPES)
            check_finite(C, "state['C']")
            if C.shape != (basis.shape[0], basis.shape[0]):
                raise ValueError(
                    f"state['C'] has shape {C.shape} but the basis has {basis.shape[0]} rows; "
                    "the state is inconsistent."
                )
        obj = cls.__new__(cls)
        obj._init(C, values, np.array(basis, order="C", copy=True), float(state["energy"]))
        return obj


def projector_from_state_dict(state: dict[str, Any]) -> RayleighBasis | NullspaceProjector:
    """Rebuild any projector from its state dict, dispatching on ``state["kind"]``.

    Parameters
    ----------
    state : dict
        From :meth:`RayleighBasis.state_dict` or :meth:`NullspaceProjector.state_dict`.

    Returns
    -------
    RayleighBasis or NullspaceProjector

    Raises
    ------
    ValueError
        On an unknown ``kind``.

    Examples
    --------
    >>> import numpy as np
    >>> from rqcore import NullspaceProjector, projector_from_state_dict
    >>> P = NullspaceProjector(np.eye(2), rank=1)
    >>> type(projector_from_state_dict(P.state_dict())).__name__
    'NullspaceProjector'
    """
    kind = state.get("kind")
    if kind == "RayleighBasis":
        return RayleighBasis.from_state_dict(state)
    if kind == "NullspaceProjector":
        return NullspaceProjector.from_state_dict(state)
    raise ValueError(
        f"unknown projector kind {kind!r}; expected 'RayleighBasis' or 'NullspaceProjector'."
    )
