"""Torch re-expressions of rqcore's dense operators, for statistics that live on an accelerator.

Each function mirrors one in :mod:`rqcore` and is tested equal to it (``tests/test_torch_linalg.py``);
the maths and its documentation live in the core.
"""

from __future__ import annotations

import torch

__all__ = ["dense_generalized_topk"]


def dense_generalized_topk(
    A: torch.Tensor,
    B: torch.Tensor | None,
    k: int,
    *,
    reg: float = 1e-6,
    largest: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of ``A v = λ (B + εI) v`` on ``A``'s device: torch's version of ``method="dense"``.

    Mirrors :func:`rqcore.generalized_topk` with ``method="dense"``: ``ε = reg·trace(B)/d`` (``reg``
    when the trace is 0), Cholesky ``LLᵀ = B + εI``, eigendecomposition of ``L⁻¹AL⁻ᵀ``, and
    back-substitution, so the vectors are ``(B + εI)``-orthonormal.

    Parameters
    ----------
    A : (d, d) Tensor
        Symmetric, float32 or float64.
    B : (d, d) Tensor or None
        Symmetric positive (semi-)definite, same device and dtype as ``A``; None for the standard problem.
    k : int
        Number of pairs, ``1 ≤ k ≤ d``.
    reg : float, default 1e-6
        Relative regularization (ignored when ``B`` is None).
    largest : bool, default True
        Largest (sorted descending) or smallest (ascending) eigenvalues.

    Returns
    -------
    values : (k,) Tensor
    vectors : (d, k) Tensor
    reg_used : () Tensor
        The absolute shift ``ε``, kept on the device (reading it would synchronize).

    Raises
    ------
    ValueError
        On shape mismatch, ``k`` outside ``[1, d]``, or ``B + εI`` not positive definite.
    """
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"A must be a square matrix, got shape {tuple(A.shape)}.")
    d = A.shape[0]
    if not 1 <= k <= d:
        raise ValueError(f"k must satisfy 1 <= k <= d = {d}, got k={k}.")
    if B is None:
        values, vectors = torch.linalg.eigh(A)
        reg_used = torch.zeros((), dtype=A.dtype, device=A.device)
    else:
        if B.shape != A.shape:
            raise ValueError(f"B has shape {tuple(B.shape)} but A is {d}x{d}; they must match.")
        trace = torch.diagonal(B).sum()
        # torch.where keeps the branch on the device: no host synchronization.
        reg_used = reg * torch.where(trace > 0, trace / d, torch.ones_like(trace))
        shifted = B + reg_used * torch.eye(d, dtype=B.dtype, device=B.device)
        factor, info = torch.linalg.cholesky_ex(shifted)
        if bool(info.item()):  # one sync per solve, needed to report a failed factorization
            raise ValueError(
                f"B + εI is not positive definite (reg={reg:g}); pass reg > 0 or a larger reg."
            )
        half = torch.linalg.solve_triangular(factor, A, upper=False)  # L⁻¹A
        reduced = torch.linalg.solve_triangular(factor, half.mT, upper=False)  # L⁻¹AL⁻ᵀ
        values, Y = torch.linalg.eigh((reduced + reduced.mT) / 2)
        vectors = torch.linalg.solve_triangular(factor.mT, Y, upper=True)
    if largest:
        return values[-k:].flip(0), vectors[:, -k:].flip(1), reg_used
    return values[:k], vectors[:, :k], reg_used
