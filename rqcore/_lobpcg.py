"""LOBPCG with soft locking and a robust Rayleigh-Ritz, run in reduced coordinates.

With ``y = Lᵀ v`` the ``M``-inner product of pencil vectors is the Euclidean inner product of reduced
vectors, so an orthonormal reduced basis is an ``M``-orthonormal basis of the pencil: this is
``M``-orthonormal LOBPCG with the change of basis folded into the operator ``C = L⁻¹AL⁻ᵀ`` and the
preconditioner ``Lᵀ T L`` (``T ≈ (A − σM)⁻¹`` in pencil coordinates).

Robustness: the search directions ``[W, P]`` are orthogonalized against ``X`` and orthonormalized with
Cholesky-QR2; when the Gram matrix is numerically singular, its eigendecomposition drops the
near-dependent directions (the classic failure of LOBPCG: ``P`` and ``W`` become collinear near
convergence). Images under the operator follow the same transformations, so each iteration applies the
operator once, to the active residual block.

Implicit images carry rounding: an image ``AP`` obtained by combinations is accurate to about
``eps·‖C‖`` times the growth of the transformation, so ``P`` keeps only directions that kept at least
``_P_MIN_KEPT_NORM`` of their norm under the projection, and every ``_REFRESH_EVERY`` iterations (or when
``X`` drifts from orthonormality) ``X`` is re-orthonormalized and ``AX`` recomputed by the operator, and
``P`` restarts. Without these, a run asked for a tolerance below rounding (or an almost complete
search space, ``3m`` columns near ``d``) fell apart after reaching the answer, and returned Ritz
values off by 5 %–40 % of ``λ_max``. The pairs returned are the best the run saw (by the largest ratio of
estimate to threshold), not the last ones; a run that stops improving for ``_STALL_ITERATIONS``
iterations stops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.linalg
from numpy.typing import NDArray

from rqcore._eigen_kernels import column_norms, convergence_mask
from rqcore._lanczos import KrylovResult

FloatArray = NDArray[np.floating[Any]]


#: A direction of ``P`` is kept only if its projection against ``[X, W]`` keeps this fraction of its
#: norm: the implicit image ``AP`` then has relative rounding ≤ ``eps/_P_MIN_KEPT_NORM`` (≈ 2e-12).
_P_MIN_KEPT_NORM = 1e-4
#: ``X`` is re-orthonormalized and ``AX`` recomputed after this many iterations since the last refresh.
_REFRESH_EVERY = 20
#: ... or earlier once ``max|XᵀX − I|`` exceeds this.
_REFRESH_DRIFT = 1e-10
#: A run whose best ratio estimate/threshold has not improved for this many iterations stops.
_STALL_ITERATIONS = 60


def _orthonormal_transform(S: FloatArray, drop: float) -> NDArray[np.float64] | None:
    """``T`` with ``(S T)ᵀ (S T) = I`` (Cholesky-QR, or eigen-decomposition dropping dependence)."""
    G = np.asarray(S.T @ S, dtype=np.float64)
    G = (G + G.T) / 2
    if G.size == 0:
        return None
    try:
        R = scipy.linalg.cholesky(G, lower=False, check_finite=False)
        if np.min(np.abs(np.diag(R))) > np.sqrt(drop) * np.sqrt(np.max(np.diag(G))):
            return scipy.linalg.solve_triangular(
                R, np.eye(G.shape[0]), lower=False, check_finite=False
            )
    except np.linalg.LinAlgError:
        pass
    w, U = np.linalg.eigh(G)
    keep = w > drop * max(float(w[-1]), float(np.finfo(np.float64).tiny))
    if not keep.any():
        return None
    return U[:, keep] / np.sqrt(w[keep])


def _start_block(
    op: Callable[[FloatArray], FloatArray],
    X: FloatArray,
    order: NDArray[np.intp],
    dtype: np.dtype[Any],
) -> tuple[FloatArray, FloatArray, NDArray[np.float64]]:
    """Orthonormalize ``X``, apply the operator once, and rotate both to Ritz vectors in ``order``."""
    X, _ = np.linalg.qr(X)
    AX = np.asarray(op(X), dtype=dtype)
    H = np.asarray(X.T @ AX, dtype=np.float64)
    vals, S = np.linalg.eigh((H + H.T) / 2)
    S = S[:, order].astype(dtype)
    return X @ S, AX @ S, vals[order]


def lobpcg(
    op: Callable[[FloatArray], FloatArray],
    d: int,
    nwant: int,
    *,
    largest: bool,
    block: int,
    thresholds: Callable[[NDArray[np.float64], NDArray[np.float64] | None], NDArray[np.float64]],
    maxiter: int,
    start: FloatArray | None,
    precond: Callable[[FloatArray], FloatArray] | None,
    rng: np.random.Generator,
    dtype: np.dtype[Any],
) -> KrylovResult:
    """Block LOBPCG for ``nwant`` extreme eigenpairs of the symmetric ``op`` (block ``≥ nwant``).

    Soft locking: converged columns stay in ``X`` (and in every Rayleigh-Ritz) but contribute no new
    search directions, so the cost per iteration shrinks as pairs converge.
    """
    m = max(block, nwant)
    eps = float(np.finfo(dtype).eps)
    drop = 100 * eps
    X = rng.standard_normal((d, m)).astype(dtype)
    if start is not None and start.shape[1]:
        X[:, : start.shape[1]] = start
    order = np.arange(m - 1, -1, -1) if largest else np.arange(m)
    X, AX, theta = _start_block(op, X, order, dtype)
    P = np.zeros((d, 0), dtype=dtype)
    AP = np.zeros((d, 0), dtype=dtype)
    it = 1
    since_refresh = 0
    best: (
        tuple[float, NDArray[np.float64], FloatArray, NDArray[np.float64], NDArray[np.bool_]] | None
    )
    best = None
    best_it = 1
    while True:
        if since_refresh >= _REFRESH_EVERY or (
            since_refresh > 0 and float(np.max(np.abs(X.T @ X - np.eye(m)))) > _REFRESH_DRIFT
        ):
            # Rounding in the implicit images accumulates: start again from X itself.
            X, AX, theta = _start_block(op, X, order, dtype)
            P = np.zeros((d, 0), dtype=dtype)
            AP = np.zeros((d, 0), dtype=dtype)
            since_refresh = 0
        R = AX - X * theta.astype(dtype)
        est = column_norms(R)
        limits = thresholds(theta[:nwant], None)
        mask, _ = convergence_mask(est[:nwant], limits)
        worst = float(np.max(est[:nwant] / np.maximum(limits, float(np.finfo(np.float64).tiny))))
        if best is None or worst < best[0]:
            best = (worst, theta[:nwant].copy(), X[:, :nwant].copy(), est[:nwant].copy(), mask)
            best_it = it
        if mask.all() or it >= maxiter or it - best_it >= _STALL_ITERATIONS:
            break
        active = np.ones(m, dtype=np.bool_)
        active[:nwant] = ~mask
        Wd = R[:, active]
        if precond is not None:
            Wd = np.asarray(precond(Wd), dtype=dtype)
        # W ⟂ X (twice), then Cholesky-QR2 with drop.
        for _ in range(2):
            Wd = Wd - X @ (X.T @ Wd)
        T = _orthonormal_transform(Wd, drop)
        if T is None:
            break
        Wd = Wd @ T.astype(dtype)
        T = _orthonormal_transform(Wd, drop)
        if T is None:
            break
        Wd = Wd @ T.astype(dtype)
        AW = np.asarray(op(Wd), dtype=dtype)
        it += 1
        blocks = [X, Wd]
        images = [AX, AW]
        if P.shape[1]:
            # P ⟂ [X, W]; the images follow the same linear combinations. Directions that lose most of
            # their norm to the projection would carry amplified rounding into AP: they are dropped.
            pnorms = np.maximum(column_norms(P), float(np.finfo(np.float64).tiny))
            P, AP = P / pnorms.astype(dtype), AP / pnorms.astype(dtype)
            C1 = X.T @ P
            C2 = Wd.T @ P
            P = P - X @ C1 - Wd @ C2
            AP = AP - AX @ C1 - AW @ C2
            T = _orthonormal_transform(P, _P_MIN_KEPT_NORM**2)
            if T is not None:
                P, AP = P @ T.astype(dtype), AP @ T.astype(dtype)
                C1 = X.T @ P
                C2 = Wd.T @ P
                P = P - X @ C1 - Wd @ C2
                AP = AP - AX @ C1 - AW @ C2
                T = _orthonormal_transform(P, drop)
            if T is not None:
                P, AP = P @ T.astype(dtype), AP @ T.astype(dtype)
                blocks.append(P)
                images.append(AP)
        Sb = np.hstack(blocks)
        ASb = np.hstack(images)
        H = np.asarray(Sb.T @ ASb, dtype=np.float64)
        vals, U = np.linalg.eigh((H + H.T) / 2)
        ns = vals.size
        pick = np.arange(ns - 1, ns - 1 - m, -1) if largest else np.arange(m)
        Ux = U[:, pick].astype(dtype)
        theta = vals[pick]
        Xn = Sb @ Ux
        AXn = ASb @ Ux
        # New P: the non-X part of the update, for the active columns only (soft locking).
        Up = Ux[m:, :][:, active]
        P = Sb[:, m:] @ Up
        AP = ASb[:, m:] @ Up
        X, AX = Xn, AXn
        since_refresh += 1
    assert best is not None
    _, theta_b, Y_b, est_b, mask_b = best
    return KrylovResult(
        theta=np.asarray(theta_b, dtype=np.float64),
        Y=np.asarray(Y_b),
        estimates=np.asarray(est_b, dtype=np.float64),
        iterations=it,
        converged=bool(mask_b.all()),
        n_converged=int(np.count_nonzero(mask_b)),
    )
