"""Streaming (mergeable, optionally exponentially decayed) second-moment accumulators.

:class:`StreamingCovariance` accumulates ``Σ w x xᵀ`` (or the centered scatter about the running mean)
of a stream of row batches with BLAS ``?syrk`` and keeps the few extra moments that the Ledoit–Wolf and
OAS shrinkage estimators need, so that shrunk covariances come from the stream without storing it.
See ``docs/covariance.md`` for the semantics and the measured speed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.linalg import blas

from rqcore import _covariance_kernels as _k
from rqcore._validation import as_float_array, check_finite, check_positive_int

__all__ = ["StreamingCovariance"]

FORMAT_VERSION = 1
# float32 products are summed by BLAS in float32 over at most this many rows, then added into the
# float64 total: the error stays ~1e-8 relative however long the stream (a float32 total would drift).
_F32_CHUNK_ROWS = 4096
# float32 batches whose scaled rows √w·x reach beyond this range are summed in float64 instead: a chunk
# of 4096 products of entries up to 1e15 stays below float32's 3.4e38, and entries down to 1e-15 keep
# their products (≥ 1e-30) normal.
_F32_SAFE_MIN = 1e-15
_F32_SAFE_MAX = 1e15
# Bound on a batch's second moments (n · max w · max x²) that leaves headroom for the sums.
_SECOND_MOMENT_LIMIT = 1e300
# Scratch buffers (weighted, centered, cast or non-contiguous input) are capped at this many bytes.
_BUFFER_BYTES = 32 << 20
_STATE_KEYS = (
    "format_version",
    "dim",
    "centered",
    "decay",
    "count",
    "total_weight",
    "sum",
    "scatter",
    "third",
    "fourth",
)
_SHRINKAGE_METHODS = ("ledoit-wolf", "oas")


def _check_decay(decay: Any) -> float:
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
        raise TypeError(f"decay must be a real number in (0, 1], got {type(decay).__name__}.")
    value = float(decay)
    if not (0.0 < value <= 1.0):
        raise ValueError(f"decay must be in (0, 1] (1 means no forgetting), got {decay!r}.")
    return value


def _check_weights(weights: Any, n: int) -> NDArray[np.float64]:
    w = np.asarray(weights)
    if w.dtype.kind not in "iuf":
        raise TypeError(
            f"weights must be real numbers (integer or float dtype), got dtype {w.dtype}."
        )
    if w.ndim != 1:
        raise ValueError(f"weights must be 1-dimensional, got shape {w.shape}.")
    if w.shape[0] != n:
        raise ValueError(f"weights has length {w.shape[0]} but X has {n} rows; they must match.")
    w = np.ascontiguousarray(w, dtype=np.float64)
    check_finite(w, "weights")
    if n and w.min() < 0:
        first = int(np.argmax(w < 0))
        raise ValueError(
            f"weights must be non-negative frequency weights; weights[{first}] = {w[first]!r}."
        )
    return w


def _chan_moments(
    na: Any,
    nb: Any,
    delta: Any,
    tr_a: Any,
    tr_b: Any,
    m2a_delta: Any,
    m2b_delta: Any,
    m3a: Any,
    m3b: Any,
    m4a: Any,
    m4b: Any,
) -> tuple[Any, Any]:
    """Merge the third-order vectors and fourth moments of two groups about their own means.

    With ``n = na + nb``, ``δ = μ_b − μ_a``, ``a = nb/n``, ``b = na/n`` the merged mean is
    ``μ = μ_a + aδ = μ_b − bδ``; expanding ``‖y − aδ‖⁴`` (``y = x − μ_a``, ``Σ_A w y = 0``) and summing
    gives the terms below, with ``M2 δ``, ``tr M2`` and ``m3 = Σ w ‖y‖² y`` of each group.

    Written with operators only, so the torch bridge runs the same formula on device tensors.
    """
    n = na + nb
    a = nb / n
    b = na / n
    dd = delta @ delta
    m4 = (
        m4a
        + m4b
        + 4.0 * a * a * (delta @ m2a_delta)
        + 4.0 * b * b * (delta @ m2b_delta)
        - 4.0 * a * (m3a @ delta)
        + 4.0 * b * (m3b @ delta)
        + 2.0 * dd * (a * a * tr_a + b * b * tr_b)
        + n * a * b * (a**3 + b**3) * dd * dd  # = na·nb·(na³ + nb³)/n⁴, free of over/underflow
    )
    m3 = (
        m3a
        + m3b
        + 2.0 * (b * m2b_delta - a * m2a_delta)
        + ((b * tr_b - a * tr_a) + n * a * b * (b - a) * dd) * delta  # = na·nb·(na − nb)/n²
    )
    return m3, m4


def _finite_or_overflowed(
    third: NDArray[np.float64], fourth: float
) -> tuple[NDArray[np.float64], float]:
    """``(third, fourth)``, or ``(0, +inf)`` once either has overflowed.

    Both feed only the Ledoit–Wolf intensity (``third`` only through later merges), so an overflow
    is recorded as ``fourth = +inf`` — which :meth:`StreamingCovariance.shrinkage_intensity`
    reports — rather than as NaN/Inf that would make the state unsaveable.
    """
    fourth = float(fourth)
    if math.isfinite(fourth) and np.isfinite(third).all():
        return third, fourth
    return np.zeros_like(third), math.inf


def _state_scalar(state: Mapping[str, Any], key: str) -> NDArray[Any]:
    value = np.asarray(state[key])
    if value.shape != ():
        raise ValueError(f"state[{key!r}] must be a scalar, got shape {value.shape}.")
    return value


def _state_integer(state: Mapping[str, Any], key: str) -> int:
    value = _state_scalar(state, key)
    if value.dtype.kind not in "iu":
        raise ValueError(f"state[{key!r}] must be an integer, got {value.dtype} {value!r}.")
    return int(value)


def _state_bool(state: Mapping[str, Any], key: str) -> bool:
    value = _state_scalar(state, key)
    if value.dtype.kind != "b":
        raise ValueError(f"state[{key!r}] must be a bool, got {value.dtype} {value!r}.")
    return bool(value)


def _state_real(state: Mapping[str, Any], key: str) -> float:
    value = _state_scalar(state, key)
    if value.dtype.kind not in "fiu":
        raise ValueError(f"state[{key!r}] must be a real number, got {value.dtype} {value!r}.")
    return float(value)


class StreamingCovariance:
    """Streaming, mergeable accumulator of (weighted, optionally centered) second moments.

    Feed row batches with :meth:`update`; read the estimate with :meth:`covariance`. Totals are kept in
    float64 whatever the input dtype; products run in BLAS ``?syrk`` (half the flops of ``X.T @ X``).

    Parameters
    ----------
    dim : int
        Number of columns (features) of every batch.
    centered : bool, default False
        If False, estimate the uncentered second moment ``Σ w x xᵀ / (Σ w − ddof)``. If True, estimate
        the ordinary covariance about the (weighted) mean, accumulated with a parallel (Chan et al.)
        update that stays accurate for data with a large mean.
    decay : float, default 1.0
        Exponential forgetting factor in (0, 1]: before each :meth:`update` adds its batch, every total
        (weight, sums, scatter, higher moments) is multiplied by ``decay``. 1 keeps everything.

    Attributes
    ----------
    dim, centered, decay, count, total_weight, mean
        See the properties.

    Raises
    ------
    TypeError
        If ``dim`` is not an integer, ``centered`` not a bool or ``decay`` not a real number.
    ValueError
        If ``dim < 1`` or ``decay`` is outside (0, 1].

    See Also
    --------
    numpy.cov : the batch equivalent (``fweights`` semantics for the weights).
    sklearn.covariance.ledoit_wolf, sklearn.covariance.oas : the shrinkage rules reproduced here.

    Notes
    -----
    *Weights* are frequency weights: a row of weight 2 counts as the row twice, and ``ddof`` is
    subtracted from the total weight as for ``numpy.cov(..., fweights=w)`` (here they may be
    non-integer). A row of weight 0 contributes nothing but is still counted in :attr:`count`.

    *Centered mode* keeps the running weighted sum ``s``, the scatter ``M2 = Σ w (x−μ)(x−μ)ᵀ`` about
    the running mean ``μ = s / Σ w`` and, for Ledoit–Wolf, ``m3 = Σ w ‖x−μ‖²(x−μ)`` and
    ``m4 = Σ w ‖x−μ‖⁴``. Each batch is centered at its own mean, its scatter taken by ``syrk`` and the
    groups combined with the correction ``(n_a n_b / n) δδᵀ`` (``δ`` the difference of the means)
    and the matching corrections of ``m3`` and ``m4``; nothing of the form ``E[xxᵀ] − μμᵀ`` is formed.

    *Decay* multiplies all totals (``total_weight``, ``sum``, ``scatter``, ``third``, ``fourth``) by
    ``decay`` at the start of every non-empty :meth:`update`, so a row seen ``k`` updates ago has
    weight ``w·decayᵏ``; the mean is unchanged by the decay itself. :attr:`count` counts rows seen and
    is not decayed; :attr:`total_weight` is the decayed effective weight.

    The object is picklable, compares equal to another exactly when their :meth:`state_dict` are equal
    element by element, and is not hashable (it is mutable).

    Examples
    --------
    >>> import numpy as np
    >>> from rqcore import StreamingCovariance
    >>> rng = np.random.default_rng(0)
    >>> X = rng.standard_normal((1000, 3)) + 100.0
    >>> acc = StreamingCovariance(3, centered=True)
    >>> for batch in np.array_split(X, 7):
    ...     _ = acc.update(batch)
    >>> bool(np.allclose(acc.covariance(ddof=1), np.cov(X, rowvar=False)))
    True
    >>> acc.count, acc.total_weight
    (1000, 1000.0)
    """

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, dim: int, *, centered: bool = False, decay: float = 1.0) -> None:
        self._dim = check_positive_int(dim, "dim")
        if not isinstance(centered, (bool, np.bool_)):
            raise TypeError(f"centered must be a bool, got {type(centered).__name__}.")
        self._centered = bool(centered)
        self._decay = _check_decay(decay)
        d = self._dim
        self._count = 0
        self._weight = 0.0
        self._sum = np.zeros(d)
        # Only the upper triangle is maintained; Fortran order so that ?syrk updates it in place.
        self._scatter = np.zeros((d, d), order="F")
        self._third = np.zeros(d)
        self._fourth = 0.0
        self._work: dict[str, NDArray[Any]] = {}  # scratch buffers, not state

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        """Number of features."""
        return self._dim

    @property
    def centered(self) -> bool:
        """Whether the covariance is taken about the mean."""
        return self._centered

    @property
    def decay(self) -> float:
        """Per-update forgetting factor in (0, 1]."""
        return self._decay

    @property
    def count(self) -> int:
        """Number of rows seen (zero-weight rows included; never decayed)."""
        return self._count

    @property
    def total_weight(self) -> float:
        """Sum of the (decayed) weights, ``Σ w``; equals :attr:`count` without weights or decay."""
        return self._weight

    @property
    def mean(self) -> NDArray[np.float64]:
        """Weighted mean of the rows seen (float64 copy); ValueError before any weight is seen."""
        self._require_data()
        return self._sum / self._weight

    # ------------------------------------------------------------------ accumulation
    def update(self, X: Any, weights: Any = None) -> StreamingCovariance:
        """Add a batch of rows.

        Parameters
        ----------
        X : array_like of shape (n, dim)
            float16, float32 or float64 rows, any memory layout; ``n = 0`` is a no-op (no decay).
        weights : array_like of shape (n,), optional
            Non-negative finite frequency weights (integer or float). Default: all ones.

        Returns
        -------
        self : StreamingCovariance

        Raises
        ------
        TypeError
            If ``X`` does not have a float16/32/64 dtype or ``weights`` is not real.
        ValueError
            If ``X`` is not 2-D or has the wrong width, if ``X`` or ``weights`` holds NaN/Inf, if a
            weight is negative or ``weights`` has the wrong length, or if the batch's second moments
            overflow float64 (entries near 1e154). Everything is checked before the state changes:
            after an error the accumulator is exactly as before. Fourth moments that overflow
            (entries near 1e77) are kept as ``+inf``; only ``shrinkage="ledoit-wolf"`` needs them,
            and it raises then.

        Notes
        -----
        float64 input goes to ``dsyrk``; float32 (and float16, cast to float32 first) to ``ssyrk``
        over chunks of at most 4096 rows whose float32 results are added into the float64 total.
        Weighted rows are scaled by ``sqrt(w)`` before the product; in centered mode each batch is
        centered at its own weighted mean (computed in float64) before the product.

        Examples
        --------
        >>> import numpy as np
        >>> acc = StreamingCovariance(2)
        >>> _ = acc.update(np.array([[1.0, 2.0], [3.0, 4.0]]), weights=[1.0, 3.0])
        >>> acc.covariance()
        array([[ 7. ,  9.5],
               [ 9.5, 13. ]])
        """
        X = as_float_array(X, "X", ndim=2)
        if X.shape[1] != self._dim:
            raise ValueError(
                f"X has {X.shape[1]} columns but this accumulator has dim={self._dim}."
            )
        n = X.shape[0]
        has_w = weights is not None
        w = _check_weights(weights, n) if has_w else np.empty(0)
        if n == 0:
            return self
        if X.dtype == np.float16:  # no half-precision BLAS: compute in float32
            X = np.asarray(X, dtype=np.float32, order="C")
        colsum = np.zeros(self._dim)
        colmax = np.zeros(self._dim)
        wsum, q4 = _k.batch_stats(X, w, has_w, colsum, colmax)
        if not np.isfinite(q4):  # NaN/Inf somewhere, or Σ w ‖x‖⁴ overflows
            check_finite(X, "X")  # raises with the position of the first bad value
            w_max = float(w.max()) if has_w else 1.0
            x_max = float(colmax.max())
            # Σ w x_i x_j ≤ n · w_max · x_max²: the second moments fit, only the fourth (which
            # only Ledoit–Wolf reads) overflowed. Keep it as +inf; ledoit-wolf then says so.
            if not (x_max * x_max * w_max * max(n, 1) < _SECOND_MOMENT_LIMIT):
                raise ValueError(
                    f"the batch's second moments overflow float64 (max |x| = {x_max:.3g}, "
                    f"max weight = {w_max:.3g}); rescale the data."
                )
            q4 = math.inf
        if not has_w:
            wsum = float(n)
        if not np.isfinite(wsum):
            raise ValueError(
                f"the batch's total weight overflows float64 (sum of {n} weights); rescale the weights."
            )
        if X.dtype == np.float32 and not self._float32_safe(colmax, w, has_w):
            X = np.asarray(X, dtype=np.float64)
        # ---- validated: from here on the state changes.
        if self._centered:
            self._update_centered(X, w, has_w, colsum, wsum)
        else:
            self._syrk_into_total(X, w, has_w, self._decay)
            self._fourth = self._decay * self._fourth + q4
            self._weight = self._decay * self._weight + wsum
            self._sum = self._decay * self._sum + colsum
        self._count += n
        return self

    @staticmethod
    def _float32_safe(colmax: NDArray[np.float64], w: NDArray[np.float64], has_w: bool) -> bool:
        """Whether ``ssyrk`` can sum the scaled rows ``√w·x`` without over- or underflow.

        Each column's largest entry (``colmax``), times the largest and the smallest positive ``√w``,
        must lie in ``[_F32_SAFE_MIN, _F32_SAFE_MAX]`` (conservative: the diagonal products of a column
        of tiny entries underflowed to 0, and large ones overflowed to inf).
        """
        nonzero = colmax[colmax > 0]
        if nonzero.size == 0:
            return True
        if has_w:
            positive = w[w > 0]
            if positive.size == 0:
                return True
            w_hi, w_lo = math.sqrt(float(positive.max())), math.sqrt(float(positive.min()))
        else:
            w_hi = w_lo = 1.0
        return bool(
            float(nonzero.max()) * w_hi <= _F32_SAFE_MAX
            and float(nonzero.min()) * w_lo >= _F32_SAFE_MIN
        )

    def _update_centered(
        self,
        X: NDArray[np.floating[Any]],
        w: NDArray[np.float64],
        has_w: bool,
        colsum: NDArray[np.float64],
        wsum: float,
    ) -> None:
        decay = self._decay
        d = self._dim
        if wsum == 0.0:  # only zero weights: the batch has no mean; just forget.
            self._scatter *= decay
            self._third *= decay
            self._fourth *= decay
            self._weight *= decay
            self._sum *= decay
            return
        na = decay * self._weight
        nb = wsum
        mean_b = colsum / wsum
        if na > 0.0:
            delta = mean_b - self._sum / self._weight
            m2a_delta = decay * _k.upper_matvec(self._scatter, delta)
            tr_a = decay * float(np.trace(self._scatter))
        else:
            delta = np.zeros(d)
            m2a_delta = np.zeros(d)
            tr_a = 0.0
        c = na * nb / (na + nb)
        m3b = np.zeros(d)
        m2b_delta = np.zeros(d)
        z = np.zeros(d)
        q4b = 0.0
        q2b = 0.0
        dtype = np.float64 if X.dtype == np.float64 else np.float32
        rows = self._chunk_rows(X.shape[0], dtype)
        buf = self._buffer("centered", rows, dtype)
        beta = decay
        for r0 in range(0, X.shape[0], rows):
            m = min(rows, X.shape[0] - r0)
            chunk = buf[:m]
            q4, q2 = _k.fill_centered(X, r0, w, has_w, mean_b, delta, chunk, z, m3b, m2b_delta)
            q4b += q4
            q2b += q2
            self._syrk_chunk(chunk, beta)
            beta = 1.0
        _k.rank1_upper(self._scatter, c, delta)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is recorded as +inf
            self._third, self._fourth = _finite_or_overflowed(*_chan_moments(
                na, nb, delta, tr_a, q2b, m2a_delta, m2b_delta,
                decay * self._third, m3b, decay * self._fourth, q4b,
            ))  # fmt: skip
        self._weight = na + nb
        self._sum = decay * self._sum + colsum

    def _syrk_into_total(
        self, X: NDArray[np.floating[Any]], w: NDArray[np.float64], has_w: bool, beta: float
    ) -> None:
        """``upper(scatter) = beta·scatter + Σ w x xᵀ`` for the uncentered update."""
        n = X.shape[0]
        if (
            not has_w
            and X.dtype == np.float64
            and X.flags.f_contiguous
            and not X.flags.c_contiguous
        ):
            # Xᵀ X straight from the Fortran-ordered data: no copy.
            self._scatter = blas.dsyrk(1.0, X, beta=beta, c=self._scatter, trans=1, overwrite_c=1)
            return
        if not has_w and X.flags.c_contiguous and X.dtype in (np.float64, np.float32):
            rows = n if X.dtype == np.float64 else _F32_CHUNK_ROWS
            for r0 in range(0, n, rows):
                self._syrk_chunk(X[r0 : r0 + rows], beta)
                beta = 1.0
            return
        dtype = np.float64 if X.dtype == np.float64 else np.float32
        rows = self._chunk_rows(n, dtype)
        buf = self._buffer("scaled", rows, dtype)
        for r0 in range(0, n, rows):
            chunk = buf[: min(rows, n - r0)]
            _k.fill_scaled(X, r0, w, has_w, chunk)
            self._syrk_chunk(chunk, beta)
            beta = 1.0

    def _syrk_chunk(self, chunk: NDArray[np.floating[Any]], beta: float) -> None:
        """``upper(scatter) = beta·scatter + chunkᵀ chunk`` for a C-contiguous float32/64 chunk."""
        if chunk.dtype == np.float64:
            self._scatter = blas.dsyrk(
                1.0, chunk.T, beta=beta, c=self._scatter, trans=0, overwrite_c=1
            )
        else:
            c32 = self._work.get("c32")
            if c32 is None:
                c32 = self._work["c32"] = np.empty((self._dim, self._dim), np.float32, order="F")
            c32 = blas.ssyrk(1.0, chunk.T, beta=0.0, c=c32, trans=0, overwrite_c=1)
            _k.add_upper(self._scatter, beta, c32, 0.0, self._sum)  # c = 0: no rank-1 term

    def _chunk_rows(self, n: int, dtype: type[np.floating[Any]]) -> int:
        per_row = self._dim * np.dtype(dtype).itemsize
        rows = max(64, _BUFFER_BYTES // per_row)
        if dtype == np.float32:
            rows = min(rows, _F32_CHUNK_ROWS)
        return min(n, rows)

    def _buffer(self, name: str, rows: int, dtype: type[np.floating[Any]]) -> NDArray[Any]:
        key = f"{name}-{np.dtype(dtype).name}"
        buf = self._work.get(key)
        if buf is None or buf.shape[0] < rows:
            buf = self._work[key] = np.empty((rows, self._dim), dtype=dtype)
        return buf

    # ------------------------------------------------------------------ merging
    def merge(self, other: StreamingCovariance) -> StreamingCovariance:
        """Add another accumulator's statistics into this one, in place.

        The result equals, up to rounding, one accumulator fed both streams, in any order: use it to
        reduce per-worker accumulators (map-reduce, ``torch.distributed``-style all-reduce).

        Parameters
        ----------
        other : StreamingCovariance
            Same ``dim``, ``centered`` and ``decay``. Left unchanged (``acc.merge(acc)`` doubles).

        Returns
        -------
        self : StreamingCovariance

        Raises
        ------
        TypeError
            If ``other`` is not a StreamingCovariance.
        ValueError
            If ``dim``, ``centered`` or ``decay`` differ.

        Notes
        -----
        Decay is not applied by a merge: the decayed totals are added, i.e. the two streams' histories
        are treated as aligned in time (update ``k`` of one stream happened together with update ``k``
        of the other, as with data-parallel workers that update in lockstep). In centered mode the
        groups are combined with Chan et al.'s correction ``(n_a n_b / n) δδᵀ`` and the matching
        corrections of the third and fourth moments.

        Examples
        --------
        >>> import numpy as np
        >>> X = np.arange(12.0).reshape(6, 2) ** 2
        >>> a = StreamingCovariance(2, centered=True).update(X[:2])
        >>> b = StreamingCovariance(2, centered=True).update(X[2:])
        >>> bool(np.allclose(a.merge(b).covariance(), np.cov(X, rowvar=False, bias=True)))
        True
        """
        if not isinstance(other, StreamingCovariance):
            raise TypeError(f"can only merge a StreamingCovariance, got {type(other).__name__}.")
        for name in ("dim", "centered", "decay"):
            if getattr(self, name) != getattr(other, name):
                raise ValueError(
                    f"cannot merge accumulators with different {name}: "
                    f"{getattr(self, name)!r} != {getattr(other, name)!r}."
                )
        if other is self:
            other = self.copy()
        d = self._dim
        na, nb = self._weight, other._weight
        if not self._centered:
            _k.add_upper(self._scatter, 1.0, other._scatter, 0.0, self._sum)
            self._fourth += other._fourth
        else:
            if na > 0.0 and nb > 0.0:
                delta = other._sum / nb - self._sum / na
                m2a_delta = _k.upper_matvec(self._scatter, delta)
                m2b_delta = _k.upper_matvec(other._scatter, delta)
                tr_a = float(np.trace(self._scatter))
                tr_b = float(np.trace(other._scatter))
                with np.errstate(over="ignore", invalid="ignore"):  # recorded as +inf
                    self._third, self._fourth = _finite_or_overflowed(*_chan_moments(
                        na, nb, delta, tr_a, tr_b, m2a_delta, m2b_delta,
                        self._third, other._third, self._fourth, other._fourth,
                    ))  # fmt: skip
                _k.add_upper(self._scatter, 1.0, other._scatter, na * nb / (na + nb), delta)
            else:  # one side has no weight: its moments are all zero
                self._third, self._fourth = _finite_or_overflowed(
                    self._third + other._third, self._fourth + other._fourth
                )
                _k.add_upper(self._scatter, 1.0, other._scatter, 0.0, np.zeros(d))
        self._sum = self._sum + other._sum
        self._weight = na + nb
        self._count += other._count
        return self

    @classmethod
    def merged(cls, accumulators: Iterable[StreamingCovariance]) -> StreamingCovariance:
        """Return a new accumulator holding the merge of ``accumulators`` (left unchanged).

        Parameters
        ----------
        accumulators : iterable of StreamingCovariance
            At least one; all with the same ``dim``, ``centered`` and ``decay``.

        Returns
        -------
        StreamingCovariance

        Raises
        ------
        ValueError
            If ``accumulators`` is empty or they are incompatible (see :meth:`merge`).

        Examples
        --------
        >>> import numpy as np
        >>> parts = [StreamingCovariance(2).update(np.eye(2) * k) for k in (1.0, 2.0, 3.0)]
        >>> StreamingCovariance.merged(parts).count
        6
        """
        items = [acc.copy() for acc in accumulators]
        if not items:
            raise ValueError("merged() needs at least one accumulator.")
        # Pairwise (tree) reduction: rounding grows like log(k) rather than k.
        while len(items) > 1:
            paired = [items[i].merge(items[i + 1]) for i in range(0, len(items) - 1, 2)]
            items = paired + items[len(paired) * 2 :]
        return items[0]

    def copy(self) -> StreamingCovariance:
        """Return an independent copy with the same state.

        Returns
        -------
        StreamingCovariance

        Examples
        --------
        >>> acc = StreamingCovariance(2)
        >>> acc.copy() == acc
        True
        """
        # A trusted state: copied field by field, not re-validated (from_state_dict checks files).
        other = type(self)(self._dim, centered=self._centered, decay=self._decay)
        other._count, other._weight, other._fourth = self._count, self._weight, self._fourth
        other._sum = self._sum.copy()
        other._third = self._third.copy()
        other._scatter = self._scatter.copy(order="F")
        return other

    # ------------------------------------------------------------------ estimates
    def covariance(
        self, ddof: float = 0, shrinkage: float | str | None = None
    ) -> NDArray[np.float64]:
        """Return the current estimate as a fresh symmetric float64 (dim, dim) array.

        Parameters
        ----------
        ddof : float, default 0
            Subtracted from :attr:`total_weight` in the denominator (``ddof=1`` for the unbiased
            estimate, like :func:`numpy.cov` with ``fweights``).
        shrinkage : None, float in [0, 1], "ledoit-wolf" or "oas", default None
            Shrink toward the scaled identity: ``(1 − α) S + α (tr S / dim) I``. A float is ``α``
            itself (like :func:`sklearn.covariance.shrunk_covariance`); "ledoit-wolf" and "oas"
            compute ``α`` from the streamed moments exactly as :func:`sklearn.covariance.ledoit_wolf`
            and :func:`sklearn.covariance.oas` (with ``assume_centered = not centered``) do on the
            data (weights acting as repetitions).

        Returns
        -------
        ndarray of shape (dim, dim)
            ``scatter / (total_weight − ddof)``, shrunk if requested.

        Raises
        ------
        ValueError
            If no data (no positive weight) has been accumulated, if ``total_weight − ddof <= 0``, or
            if ``shrinkage`` is not one of the accepted values.

        Notes
        -----
        The Ledoit–Wolf and OAS intensities are computed from the ``ddof = 0`` moments (as sklearn
        does) and then applied to ``S`` with the requested ``ddof``; with ``ddof = 0`` the result is
        sklearn's estimate. The solvers' relative ridge ``M = B + reg·(tr B / d)·I`` equals
        ``(1 + reg)·[(1 − α) B + α (tr B / d) I]`` with ``α = reg / (1 + reg)``.

        Examples
        --------
        >>> import numpy as np
        >>> acc = StreamingCovariance(2).update(np.array([[2.0, 0.0], [0.0, 4.0]]))
        >>> acc.covariance(shrinkage=0.5)
        array([[3.5, 0. ],
               [0. , 6.5]])
        """
        self._require_data()
        if isinstance(ddof, bool) or not isinstance(ddof, numbers.Real) or not np.isfinite(ddof):
            raise ValueError(f"ddof must be a finite real number, got {ddof!r}.")
        denom = self._weight - float(ddof)
        if denom <= 0.0:
            raise ValueError(
                f"total_weight - ddof = {self._weight!r} - {ddof!r} <= 0; accumulate more data or "
                "lower ddof."
            )
        alpha = self._shrinkage_intensity(shrinkage)
        cov = _k.symmetrize_scaled(self._scatter, 1.0 / denom)
        if alpha != 0.0:
            d = self._dim
            mu = float(np.trace(cov)) / d
            cov *= 1.0 - alpha
            cov.flat[:: d + 1] += alpha * mu
        return cov

    def shrinkage_intensity(self, method: str) -> float:
        """Return the Ledoit–Wolf or OAS shrinkage intensity ``α`` of the current statistics.

        Parameters
        ----------
        method : {"ledoit-wolf", "oas"}

        Returns
        -------
        float
            ``α`` in [0, 1], as sklearn's ``ledoit_wolf`` / ``oas`` would return it for the data.

        Raises
        ------
        ValueError
            If ``method`` is unknown or no data has been accumulated.

        Examples
        --------
        >>> import numpy as np
        >>> acc = StreamingCovariance(2).update(np.array([[1.0, 0.0], [0.0, 1.0]]))
        >>> acc.shrinkage_intensity("oas")
        1.0
        """
        if method not in _SHRINKAGE_METHODS:
            raise ValueError(f"method must be one of {_SHRINKAGE_METHODS}, got {method!r}.")
        return self._shrinkage_intensity(method)

    def _shrinkage_intensity(self, shrinkage: float | str | None) -> float:
        if shrinkage is None:
            return 0.0
        if isinstance(shrinkage, str):
            if shrinkage not in _SHRINKAGE_METHODS:
                raise ValueError(
                    f"shrinkage must be None, a float in [0, 1], 'ledoit-wolf' or 'oas'; got "
                    f"{shrinkage!r}."
                )
            self._require_data()
            d = self._dim
            if d == 1:  # sklearn: the result is the same whatever the shrinkage
                return 0.0
            n = self._weight
            # Both intensities are ratios of moments of equal degree: scale by a power of two so
            # that squares of entries beyond 1e154 (or below 1e-154) neither over- nor underflow.
            top = float(np.max(np.diagonal(self._scatter)))
            scale = math.ldexp(1.0, -math.frexp(top)[1]) if top > 0.0 else 1.0
            tr, frob = _k.upper_trace_frob(self._scatter, scale)
            tr /= n  # moments of the ddof=0 estimate S0 = scatter / n
            frob /= n * n
            mu = tr / d
            if shrinkage == "oas":
                alpha = frob / (d * d)
                num = alpha + mu * mu
                den = (n + 1.0) * (alpha - mu * mu / d)
                # den ∝ the spread of S0's eigenvalues, ≥ 0 but negative by rounding when S0 ∝ I:
                # then the target is S0 itself and sklearn's α = 1 (min(num/den, 1) gave -8e15).
                return 1.0 if den <= 0.0 else min(num / den, 1.0)
            if not math.isfinite(self._fourth):
                raise ValueError(
                    "shrinkage='ledoit-wolf' needs the fourth moments Σ w‖x‖⁴, which overflowed "
                    "float64 (data beyond about 1e77); rescale the data, or use shrinkage='oas'."
                )
            beta = (self._fourth * scale * scale / n - frob) / (d * n)
            delta = (frob - 2.0 * mu * tr + d * mu * mu) / d
            beta = min(beta, delta)
            return 0.0 if beta <= 0.0 else min(beta / delta, 1.0)
        if isinstance(shrinkage, bool) or not isinstance(shrinkage, numbers.Real):
            raise ValueError(
                f"shrinkage must be None, a float in [0, 1], 'ledoit-wolf' or 'oas'; got "
                f"{shrinkage!r}."
            )
        alpha = float(shrinkage)
        if not (0.0 <= alpha <= 1.0):
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage!r}.")
        return alpha

    def _require_data(self) -> None:
        if self._weight <= 0.0:
            raise ValueError(
                "no data has been accumulated yet (total weight is 0); call update() first."
            )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, NDArray[Any]]:
        """Return the complete state as a dict of fresh NumPy arrays (scalars as 0-d arrays).

        Returns
        -------
        dict
            ========================  ===========  ==============================================
            key                       dtype/shape  meaning
            ========================  ===========  ==============================================
            ``"format_version"``      int64, ()    1
            ``"dim"``                 int64, ()    number of features ``d``
            ``"centered"``            bool, ()     centered mode
            ``"decay"``               float64, ()  forgetting factor in (0, 1]
            ``"count"``               int64, ()    rows seen (not decayed)
            ``"total_weight"``        float64, ()  ``W = Σ w`` (decayed)
            ``"sum"``                 float64, (d) ``Σ w x`` (decayed); the mean is ``sum / W``
            ``"scatter"``             float64,     ``Σ w x xᵀ`` if not centered, else
                                      (d, d)       ``Σ w (x−μ)(x−μ)ᵀ`` with ``μ = sum / W``;
                                                   full and exactly symmetric
            ``"third"``               float64, (d) ``Σ w ‖x−μ‖² (x−μ)`` if centered, else zeros
            ``"fourth"``              float64, ()  ``Σ w ‖x−μ‖⁴`` if centered, else ``Σ w ‖x‖⁴``
            ========================  ===========  ==============================================

            All sums run over the rows seen, each row's weight multiplied by ``decay`` once per later
            update. The dict round-trips bit-exactly through :meth:`from_state_dict`, ``numpy.savez``
            / ``numpy.load`` and pickle.

        Examples
        --------
        >>> import numpy as np
        >>> acc = StreamingCovariance(2).update(np.ones((3, 2)))
        >>> sorted(acc.state_dict())[:4]
        ['centered', 'count', 'decay', 'dim']
        >>> StreamingCovariance.from_state_dict(acc.state_dict()) == acc
        True
        """
        return {
            "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
            "dim": np.array(self._dim, dtype=np.int64),
            "centered": np.array(self._centered, dtype=np.bool_),
            "decay": np.array(self._decay, dtype=np.float64),
            "count": np.array(self._count, dtype=np.int64),
            "total_weight": np.array(self._weight, dtype=np.float64),
            "sum": self._sum.copy(),
            "scatter": _k.symmetrize_scaled(self._scatter, 1.0),
            "third": self._third.copy(),
            "fourth": np.array(self._fourth, dtype=np.float64),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> StreamingCovariance:
        """Rebuild an accumulator from :meth:`state_dict` output (or ``numpy.load`` of its savez).

        Parameters
        ----------
        state : mapping
            The keys listed in :meth:`state_dict`, values array-like. Only the upper triangle of
            ``"scatter"`` is read.

        Returns
        -------
        StreamingCovariance

        Raises
        ------
        ValueError
            If a key is missing or unknown, the format version is not supported, a shape is wrong or
            a value is out of range (negative weight or count, non-finite numbers, a scatter that
            fails a necessary condition of positive semidefiniteness: a negative diagonal entry or an
            entry beyond ``√(a_ii·a_jj)`` by more than 1 %, checked in O(d²)).

        Examples
        --------
        >>> import io
        >>> import numpy as np
        >>> acc = StreamingCovariance(2, centered=True).update(np.eye(2))
        >>> f = io.BytesIO()
        >>> np.savez(f, **acc.state_dict())
        >>> _ = f.seek(0)
        >>> StreamingCovariance.from_state_dict(np.load(f)) == acc
        True
        """
        keys = set(state.keys())
        missing = [k for k in _STATE_KEYS if k not in keys]
        unknown = sorted(keys - set(_STATE_KEYS))
        if missing or unknown:
            raise ValueError(f"invalid state dict: missing keys {missing}, unknown keys {unknown}.")
        version = int(np.asarray(state["format_version"]))
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported state format_version {version} (expected 1).")
        acc = cls(
            _state_integer(state, "dim"),
            centered=_state_bool(state, "centered"),
            decay=_state_real(state, "decay"),
        )
        d = acc._dim
        count = _state_integer(state, "count")
        weight = _state_real(state, "total_weight")
        fourth = _state_real(state, "fourth")
        arrays = {}
        for key, shape in (("sum", (d,)), ("third", (d,)), ("scatter", (d, d))):
            arr = np.array(state[key], dtype=np.float64, order="F")
            if arr.shape != shape:
                raise ValueError(f"state[{key!r}] has shape {arr.shape}, expected {shape}.")
            check_finite(arr, f"state[{key!r}]")
            arrays[key] = arr
        if (
            count < 0
            or not (np.isfinite(weight) and weight >= 0.0)
            or not (fourth >= 0.0)  # +inf: the fourth moments overflowed (see update)
        ):
            raise ValueError(
                f"invalid state: count={count}, total_weight={weight}, fourth={fourth} (count and "
                "total_weight must be >= 0, fourth a number >= 0 or +inf)."
            )
        # 1 %: float32 (or TF32) sums of products break Cauchy–Schwarz by up to ~1e-5 (1e-3) in
        # valid states; an edited or corrupted file breaks it grossly.
        if _k.upper_gram_excess(arrays["scatter"]) > 1e-2:
            raise ValueError(
                "invalid state: state['scatter'] cannot be positive semidefinite (a negative "
                "diagonal entry, or an entry beyond √(a_ii·a_jj)); a scatter written by "
                "state_dict() never looks like that, so the file is corrupted or was edited."
            )
        if weight == 0.0 and (
            fourth != 0.0 or any(np.any(arrays[key] != 0.0) for key in ("sum", "third", "scatter"))
        ):
            raise ValueError(
                "invalid state: total_weight is 0 but the sums are not (a state with no weight holds "
                "zeros only)."
            )
        acc._count, acc._weight, acc._fourth = count, weight, fourth
        acc._sum, acc._third, acc._scatter = arrays["sum"], arrays["third"], arrays["scatter"]
        return acc

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self).from_state_dict, (self.state_dict(),))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StreamingCovariance):
            return NotImplemented
        a, b = self.state_dict(), other.state_dict()
        return all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in _STATE_KEYS)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dim={self._dim}, centered={self._centered}, "
            f"decay={self._decay!r}, count={self._count}, total_weight={self._weight!r})"
        )
