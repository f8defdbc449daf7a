"""Input checks shared by the public functions (each raises ValueError/TypeError naming the fix)."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
from numpy.typing import NDArray

FLOAT_DTYPES = (np.float16, np.float32, np.float64)


def as_float_array(
    x: Any,
    name: str,
    *,
    ndim: int | None = None,
    allowed: tuple[type[np.floating[Any]], ...] = FLOAT_DTYPES,
) -> NDArray[np.floating[Any]]:
    """Return ``x`` as a floating-point ndarray without copying, or raise a clear error.

    Integers, booleans and complex numbers are refused rather than cast silently: a covariance of
    integer codes or of complex data is almost always a mistake upstream.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor: name the conversion
        raise TypeError(
            f"{name} is a torch tensor; rqcore's core works on NumPy arrays. Pass {name}.cpu().numpy() "
            "or use the rqcore_torch bridge."
        )
    arr = np.asarray(x)
    if arr.dtype.type not in allowed:
        names = ", ".join(np.dtype(t).name for t in allowed)
        raise TypeError(
            f"{name} has dtype {arr.dtype}; expected one of {names}. Cast it first, e.g. "
            f"{name}.astype(np.float64)."
        )
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {arr.shape}.")
    return arr


def check_finite(x: NDArray[Any], name: str) -> None:
    """Raise ValueError if ``x`` holds NaN or Inf, naming how many and where the first one is."""
    if x.size and not np.isfinite(x).all():
        bad = ~np.isfinite(x)
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} contains {int(bad.sum())} non-finite value(s) (NaN or Inf), the first at index "
            f"{first}; remove or impute them before passing the data."
        )


def check_positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    """Return ``value`` as an int >= ``minimum`` or raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return int(value)


def check_symmetric(a: NDArray[np.floating[Any]], name: str, *, rtol: float | None = None) -> None:
    """Raise ValueError if ``a`` is not symmetric to within ``rtol`` relative to its norm.

    The default tolerance scales with the dtype's precision (``100·eps``) so that matrices assembled in
    floating point (``X.T @ X``) pass while a genuinely asymmetric input is caught.
    """
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"{name} must be a square 2-D matrix, got shape {a.shape}.")
    if rtol is None:
        rtol = 100.0 * float(np.finfo(a.dtype).eps)
    scale = float(np.max(np.abs(a))) if a.size else 0.0
    asym = float(np.max(np.abs(a - a.T))) if a.size else 0.0
    if asym > rtol * max(scale, np.finfo(np.float64).tiny):
        raise ValueError(
            f"{name} is not symmetric: max |{name} - {name}.T| = {asym:.3g} exceeds {rtol:.1g} x "
            f"max |{name}| = {scale:.3g}. Symmetrize it, e.g. ({name} + {name}.T) / 2, if the asymmetry "
            "is rounding."
        )


def as_real(x: Any, name: str) -> float:
    """``x`` as a float, or a TypeError naming the parameter (strings and bools are not numbers here)."""
    if isinstance(x, (str, bytes, bool, np.bool_)):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__} {x!r}.")
    try:
        return float(x)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}.") from None
