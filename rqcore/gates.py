r"""Gain functions: how much of each spectral direction an update keeps.

Each function maps the generalized eigenvalues ``λ_j`` of the pencil ``(C_t, C_p + εI)`` to gains
``g_j ∈ [0, 1]`` that :meth:`rqcore.RayleighBasis.gate` applies to the spectral coordinates of an update.
``λ_j`` is the task utility gained per unit of pretraining penalty spent when moving along direction
``j``, so every gain here is non-decreasing in ``λ``: directions that buy much utility for little
penalty pass, the others are damped.

Eigenvalues computed in floating point can come out slightly negative (or exactly zero) even when
``C_t`` is positive semi-definite; every function clips them (at 0, or at a tiny positive number where a
logarithm is taken) rather than failing.

The two helpers pick the ``ratio`` gain's scale ``τ`` from an interpretable target:
:func:`tau_for_utility_fraction` and :func:`tau_for_penalty_budget`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.special
from numpy.typing import ArrayLike, NDArray

from rqcore._validation import as_float_array, as_real

__all__ = [
    "hard",
    "power",
    "ratio",
    "sigmoid",
    "tau_for_penalty_budget",
    "tau_for_utility_fraction",
    "threshold",
]

Float64Array = NDArray[np.float64]

# Smallest eigenvalue fed to a logarithm: rounding makes some λ ≤ 0, which have no log.
_TINY = float(np.finfo(np.float64).tiny)
_BISECTION_STEPS = 200


def _eigenvalues(values: ArrayLike) -> Float64Array:
    """Validate a 1-D finite array of eigenvalues and return it as float64."""
    lam = as_float_array(values, "values", ndim=1)
    if lam.size and not np.isfinite(lam).all():
        raise ValueError("values contains NaN or Inf; eigenvalues must be finite.")
    return np.asarray(lam, dtype=np.float64)


def _power_of_two_scale(x: float) -> float:
    """The power of two nearest below ``x > 0`` (dividing by it is exact)."""
    return float(np.ldexp(1.0, int(np.floor(np.log2(x)))))


def _positive_scalar(x: Any, name: str, *, allow_zero: bool = False) -> float:
    """Return ``x`` as a finite float > 0 (or ≥ 0) or raise ValueError."""
    value = as_real(x, name)
    if not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {x!r}.")
    return value


def ratio(values: ArrayLike, tau: float) -> Float64Array:
    r"""Soft gain ``g = λ⁺ / (λ⁺ + τ)`` with ``λ⁺ = max(λ, 0)``.

    Parameters
    ----------
    values : (k,) array_like
        Generalized eigenvalues (utility per unit penalty of each direction).
    tau : float
        Scale, ``τ > 0``: a direction passes half-way when its utility per unit penalty equals ``τ``.

    Returns
    -------
    gains : (k,) ndarray of float64
        In ``[0, 1)``; non-decreasing in ``λ``.

    Raises
    ------
    ValueError
        If ``tau`` is not a finite positive number or ``values`` is not 1-D and finite.

    Notes
    -----
    Meaning: the gain passes a direction when the utility it buys per unit of penalty is large compared
    with ``τ`` (``g → 1`` for ``λ ≫ τ``, ``g ≈ λ/τ`` for ``λ ≪ τ``). It is the per-direction minimizer of
    ``(1-g)²·λ + τ·g²``: the utility-weighted distance from the full step plus ``τ`` times the penalty
    of the kept part (both per unit ``c_j²``); setting the derivative to zero gives ``g = λ/(λ+τ)``,
    the Wiener (ridge) shrinkage factor with signal ``λ`` and noise ``τ``.

    Examples
    --------
    >>> from rqcore import gates
    >>> gates.ratio([3.0, 1.0, 0.0, -1e-12], tau=1.0)
    array([0.75, 0.5 , 0.  , 0.  ])
    """
    lam = np.maximum(_eigenvalues(values), 0.0)
    t = _positive_scalar(tau, "tau")
    # 1/(1 + τ/λ) rather than λ/(λ + τ): λ + τ overflows for λ, τ near 1e308 (the gain fell to 0).
    with np.errstate(divide="ignore", over="ignore"):
        return np.where(lam > 0.0, 1.0 / (1.0 + t / np.where(lam > 0.0, lam, 1.0)), 0.0)


def hard(values: ArrayLike, rank: int) -> Float64Array:
    """Hard gain: 1 for the ``rank`` largest eigenvalues, 0 for the others.

    Parameters
    ----------
    values : (k,) array_like
        Generalized eigenvalues.
    rank : int
        How many directions pass, ``0 ≤ rank ≤ k``.

    Returns
    -------
    gains : (k,) ndarray of float64
        Zeros and ones; non-decreasing in ``λ``.

    Raises
    ------
    ValueError
        If ``rank`` is outside ``[0, k]``.
    TypeError
        If ``rank`` is not an integer.

    Notes
    -----
    Meaning: keep the ``rank`` directions with the best utility per unit penalty, drop the rest (a
    truncated spectral projection). Ties are broken deterministically: among equal eigenvalues the one
    with the smaller index passes first (a stable sort of ``-λ``).

    Examples
    --------
    >>> from rqcore import gates
    >>> gates.hard([1.0, 3.0, 2.0, 2.0], rank=2)
    array([0., 1., 1., 0.])
    """
    lam = _eigenvalues(values)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise TypeError(f"rank must be an integer, got {type(rank).__name__}.")
    if not 0 <= rank <= lam.size:
        raise ValueError(f"rank must satisfy 0 <= rank <= {lam.size}, got {rank}.")
    gains = np.zeros(lam.size, dtype=np.float64)
    gains[np.argsort(-lam, kind="stable")[: int(rank)]] = 1.0
    return gains


def threshold(values: ArrayLike, tau: float) -> Float64Array:
    """Threshold gain: 1 where ``λ ≥ τ``, 0 elsewhere.

    Parameters
    ----------
    values : (k,) array_like
        Generalized eigenvalues.
    tau : float
        Threshold (any finite real; ``τ ≤ 0`` passes every direction with ``λ ≥ τ``).

    Returns
    -------
    gains : (k,) ndarray of float64
        Zeros and ones; non-decreasing in ``λ``.

    Raises
    ------
    ValueError
        If ``tau`` or ``values`` is not finite.

    Notes
    -----
    Meaning: pass exactly the directions whose utility per unit penalty is at least ``τ``; the hard
    counterpart of :func:`ratio` (which is 1/2 at ``λ = τ``).

    Examples
    --------
    >>> from rqcore import gates
    >>> gates.threshold([3.0, 1.0, 0.5], tau=1.0)
    array([1., 1., 0.])
    """
    lam = _eigenvalues(values)
    t = as_real(tau, "tau")
    if not np.isfinite(t):
        raise ValueError(f"tau must be finite, got {tau!r}.")
    return (lam >= t).astype(np.float64)


def sigmoid(values: ArrayLike, tau: float, temperature: float = 1.0) -> Float64Array:
    r"""Logistic gain on the log scale, ``g = σ((log λ⁺ − log τ) / T)``.

    Parameters
    ----------
    values : (k,) array_like
        Generalized eigenvalues; clipped below at the smallest positive float64 before the logarithm.
    tau : float
        Midpoint, ``τ > 0`` (``g = 1/2`` at ``λ = τ``).
    temperature : float, default 1.0
        Width ``T > 0`` in natural-log units: ``g`` goes from about 0.12 to 0.88 over ``λ ∈ τ·[e^{-2T},
        e^{2T}]``; ``T → 0`` tends to :func:`threshold`.

    Returns
    -------
    gains : (k,) ndarray of float64
        In ``[0, 1]``; non-decreasing in ``λ``.

    Raises
    ------
    ValueError
        If ``tau`` or ``temperature`` is not a finite positive number.

    Notes
    -----
    Meaning: a soft threshold whose sharpness is set independently of its position. With ``T = 1`` it
    equals :func:`ratio` exactly, since ``σ(log(λ/τ)) = λ/(λ+τ)``; smaller ``T`` is sharper. Working on
    ``log λ`` makes it scale-free: multiplying every ``λ`` and ``τ`` by the same factor leaves ``g``
    unchanged.

    Examples
    --------
    >>> import numpy as np
    >>> from rqcore import gates
    >>> lam = np.array([4.0, 1.0, 0.25])
    >>> np.allclose(gates.sigmoid(lam, tau=1.0), gates.ratio(lam, tau=1.0))
    True
    >>> gates.sigmoid(lam, tau=1.0, temperature=0.5).round(3)
    array([0.941, 0.5  , 0.059])
    """
    lam = np.maximum(_eigenvalues(values), _TINY)
    t = _positive_scalar(tau, "tau")
    temp = _positive_scalar(temperature, "temperature")
    return np.asarray(scipy.special.expit((np.log(lam) - np.log(t)) / temp), dtype=np.float64)


def power(values: ArrayLike, alpha: float = 1.0) -> Float64Array:
    """Normalized power gain ``g = (λ⁺ / λ⁺_max)^α``.

    Parameters
    ----------
    values : (k,) array_like
        Generalized eigenvalues, clipped at 0.
    alpha : float, default 1.0
        Exponent ``α ≥ 0``: 0 passes every direction (all ones), 1 is linear in ``λ``, large ``α``
        keeps only the top of the spectrum.

    Returns
    -------
    gains : (k,) ndarray of float64
        In ``[0, 1]``, 1 at the largest eigenvalue; non-decreasing in ``λ``. All zeros when no
        eigenvalue is positive (and ``α > 0``).

    Raises
    ------
    ValueError
        If ``alpha`` is negative or not finite.

    Notes
    -----
    Meaning: scale every direction relative to the best one, with no threshold to choose. Being
    normalized by ``λ_max`` it is invariant to rescaling ``C_t`` or ``C_p``; note that it depends on the
    whole set of eigenvalues (through ``λ_max``), unlike :func:`ratio`.

    Examples
    --------
    >>> from rqcore import gates
    >>> gates.power([4.0, 2.0, 1.0, -0.5], alpha=0.5)
    array([1.        , 0.70710678, 0.5       , 0.        ])
    """
    lam = np.maximum(_eigenvalues(values), 0.0)
    a = _positive_scalar(alpha, "alpha", allow_zero=True)
    top = float(lam.max()) if lam.size else 0.0
    if top <= 0.0:
        return np.ones_like(lam) if a == 0 else np.zeros_like(lam)
    return np.clip((lam / top) ** a, 0.0, 1.0)


def _bisect_log_tau(
    objective: Callable[[float], float], target: float, scale: float
) -> tuple[float, float]:
    """Bracket ``[lo, hi]`` with ``objective(lo) ≥ target ≥ objective(hi)`` for a decreasing objective.

    Works in ``log τ`` (τ spans many decades) and stops when the bracket is ~1e-13 wide relatively.
    """
    lo = hi = scale
    for _ in range(2000):  # expand until bracketed; each step is a factor 2 in τ
        if objective(hi) <= target:
            break
        hi *= 2.0
    for _ in range(2000):
        if objective(lo) >= target:
            break
        lo /= 2.0
    log_lo, log_hi = np.log(lo), np.log(hi)
    for _ in range(_BISECTION_STEPS):
        if log_hi - log_lo < 1e-13:
            break
        mid = 0.5 * (log_lo + log_hi)
        if objective(float(np.exp(mid))) >= target:
            log_lo = mid
        else:
            log_hi = mid
    return float(np.exp(log_lo)), float(np.exp(log_hi))


def _fraction(p: Any, name: str) -> float:
    value = as_real(p, name)
    if not np.isfinite(value) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {p!r}.")
    return value


def tau_for_utility_fraction(values: ArrayLike, p: float) -> float:
    r"""The ``τ`` at which the :func:`ratio` gain keeps a fraction ``p`` of the total utility weight.

    Defined by ``U(τ) = Σ_j λ⁺_j g_j(τ) / Σ_j λ⁺_j = p`` with ``g_j(τ) = λ⁺_j / (λ⁺_j + τ)`` and
    ``λ⁺ = max(λ, 0)``.

    Parameters
    ----------
    values : (k,) array_like
        Generalized eigenvalues; at least one must be positive.
    p : float
        Target fraction, ``0 < p < 1``.

    Returns
    -------
    tau : float
        The largest ``τ`` found with ``U(τ) ≥ p`` (the lower end of a bisection bracket of relative
        width ~1e-13 in ``τ``), so the target is met, never missed.

    Raises
    ------
    ValueError
        If ``p`` is not in ``(0, 1)`` or no eigenvalue is positive.

    Notes
    -----
    Meaning: ``Σ_j λ_j`` is the utility of a step that spends one unit of penalty on every direction
    (``c_j = 1``); ``U(τ)`` is the share of it that the gated step still captures to first order (its
    inner product with the full step in the utility metric, ``Σ λ_j g_j``). ``U`` decreases
    continuously and strictly from 1 (``τ → 0``) to 0 (``τ → ∞``), so the solution exists and is unique;
    it is found by bisection in ``log τ``. The answer scales with ``λ``: multiplying every eigenvalue
    by ``s`` multiplies ``τ`` by ``s``.

    Examples
    --------
    >>> import numpy as np
    >>> from rqcore import gates
    >>> lam = np.array([10.0, 1.0, 0.1])
    >>> tau = gates.tau_for_utility_fraction(lam, 0.5)
    >>> g = gates.ratio(lam, tau)
    >>> round(float(lam @ g / lam.sum()), 8)
    0.5
    """
    lam = np.maximum(_eigenvalues(values), 0.0)
    target = _fraction(p, "p")
    total = float(lam.sum())
    if total <= 0.0:
        raise ValueError("no eigenvalue is positive: there is no utility to keep a fraction of.")
    # U(τ) is invariant to scaling λ and τ together: work with λ / 2^j (exact) so that λ² neither
    # over- nor underflows, and scale τ back.
    unit = _power_of_two_scale(float(lam.max()))
    pos = lam[lam > 0] / unit
    total_unit = float(pos.sum())

    def kept(tau: float) -> float:
        return float(np.sum(pos * pos / (pos + tau)) / total_unit)

    lo, _ = _bisect_log_tau(kept, target, float(np.median(pos)))
    return lo * unit


def tau_for_penalty_budget(values: ArrayLike, coords: ArrayLike, q: float) -> float:
    r"""The ``τ`` at which the :func:`ratio`-gated step spends a fraction ``q`` of the step's penalty.

    Defined by ``P(τ) = Σ_{rows} Σ_j g_j(τ)² c_j² / Σ_{rows} Σ_j c_j² = q`` with ``g_j(τ) = λ⁺_j /
    (λ⁺_j + τ)``, where ``c`` are the step's spectral coordinates (:meth:`RayleighBasis.coordinates`).
    ``Σ c_j²`` is the step's (regularized) penalty ``wᵀ(C_p + εI)w`` inside the basis's span; the
    gated step's is ``Σ g_j² c_j²``.

    Parameters
    ----------
    values : (k,) array_like
        Generalized eigenvalues.
    coords : (n, k) or (k,) array_like
        Spectral coordinates of the step (one row per output unit).
    q : float
        Budget, a fraction ``0 < q < 1`` of the step's penalty.

    Returns
    -------
    tau : float
        The smallest ``τ`` found with ``P(τ) ≤ q`` (the upper end of a bisection bracket of relative
        width ~1e-13 in ``τ``), so the budget is respected, never exceeded.

    Raises
    ------
    ValueError
        If ``q`` is not in ``(0, 1)``, the shapes disagree, the step is zero, or the budget cannot bind:
        ``q ≥ P(0⁺)``, the share of the penalty on directions with ``λ > 0`` (every ``τ > 0`` then meets
        it).

    Notes
    -----
    ``P`` decreases continuously and strictly in ``τ`` (where the step has weight on ``λ > 0``) from
    ``P(0⁺)`` to 0, so the solution is unique; it is found by bisection in ``log τ``. For a top-k basis
    this controls the part of the penalty inside the span; the complement part, ``g⊥²`` times the
    complement's penalty, comes on top (see :meth:`RayleighBasis.penalty_estimate`).

    Examples
    --------
    >>> import numpy as np
    >>> from rqcore import gates
    >>> lam = np.array([10.0, 1.0, 0.1])
    >>> c = np.array([[1.0, 2.0, 3.0]])
    >>> tau = gates.tau_for_penalty_budget(lam, c, 0.25)
    >>> g = gates.ratio(lam, tau)
    >>> round(float(np.sum(g**2 * c**2) / np.sum(c**2)), 8)
    0.25
    """
    lam = np.maximum(_eigenvalues(values), 0.0)
    c = as_float_array(coords, "coords")
    if c.ndim == 1:
        c = c[None, :]
    if c.ndim != 2 or c.shape[1] != lam.size:
        raise ValueError(f"coords must have shape (n, {lam.size}) or ({lam.size},), got {c.shape}.")
    if not np.isfinite(c).all():
        raise ValueError("coords contains NaN or Inf.")
    target = _fraction(q, "q")
    c64 = np.asarray(c, dtype=np.float64)
    top_c = float(np.max(np.abs(c64))) if c64.size else 0.0
    if top_c > 0.0:  # P(τ) is invariant to scaling c: keep c² inside float64's range
        c64 = c64 / _power_of_two_scale(top_c)
    weight = np.sum(c64**2, axis=0)  # Σ_rows c_j², per direction
    total = float(weight.sum())
    if total <= 0.0:
        raise ValueError("the step is zero (all coordinates vanish); it has no penalty to budget.")
    mask = lam > 0
    reachable = float(weight[mask].sum()) / total
    if target >= reachable:
        raise ValueError(
            f"the budget q={target:g} cannot bind: only a fraction {reachable:.6g} of the step's penalty "
            "lies on directions with λ > 0, which is what the ratio gain keeps as τ → 0."
        )
    unit = _power_of_two_scale(float(lam.max()))  # τ scales with λ (exact powers of two)
    pos, w = lam[mask] / unit, weight[mask]

    def spent(tau: float) -> float:
        g = pos / (pos + tau)
        return float(np.sum(g * g * w) / total)

    _, hi = _bisect_log_tau(spent, target, float(np.median(pos)))
    return hi * unit
