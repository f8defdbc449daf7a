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
    X, _ = np.linalg.qr(X)
    AX = np.asarray(op(X), dtype=dtype)
    H = np.asarray(X.T @ AX, dtype=np.float64)
    vals, S = np.linalg.eigh((H + H.T) / 2)
    order = np.arange(m - 1, -1, -1) if largest else np.arange(m)
    S = S[:, order].astype(dtype)
    theta = vals[order]
    X, AX = X @ S, AX @ S
    P = np.zeros((d, 0), dtype=dtype)
    AP = np.zeros((d, 0), dtype=dtype)
    it = 1
    est = np.full(m, np.inf)
    mask = np.zeros(nwant, dtype=np.bool_)
    while True:
        R = AX - X * theta.astype(dtype)
        est = column_norms(R)
        mask, _ = convergence_mask(est[:nwant], thresholds(theta[:nwant], None))
        if mask.all() or it >= maxiter:
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
            # P ⟂ [X, W]; the images follow the same linear combinations.
            C1 = X.T @ P
            C2 = Wd.T @ P
            P = P - X @ C1 - Wd @ C2
            AP = AP - AX @ C1 - AW @ C2
            T = _orthonormal_transform(P, drop)
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
        order = np.arange(ns - 1, ns - 1 - m, -1) if largest else np.arange(m)
        Ux = U[:, order].astype(dtype)
        theta = vals[order]
        Xn = Sb @ Ux
        AXn = ASb @ Ux
        # New P: the non-X part of the update, for the active columns only (soft locking).
        Up = Ux[m:, :][:, active]
        P = Sb[:, m:] @ Up
        AP = ASb[:, m:] @ Up
        X, AX = Xn, AXn
    return KrylovResult(
        theta=np.asarray(theta[:nwant], dtype=np.float64),
        Y=np.asarray(X[:, :nwant]),
        estimates=np.asarray(est[:nwant], dtype=np.float64),
        iterations=it,
        converged=bool(mask.all()),
        n_converged=int(np.count_nonzero(mask)),
    )
