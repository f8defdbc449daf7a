"""The bridge's torch re-expression of the dense solver equals the core's."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

import rqcore

torch = pytest.importorskip("torch")
from rqcore_torch._linalg import dense_generalized_topk  # noqa: E402


def _pencil(d: int, rank_b: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scales = np.arange(1, d + 1) ** -0.8
    X = rng.standard_normal((3 * d, d)) * scales
    Y = rng.standard_normal((rank_b, d))
    return X.T @ X / (3 * d), Y.T @ Y / rank_b


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dense_topk_matches_core(largest: bool, dtype: torch.dtype) -> None:
    A, B = _pencil(80, 40, seed=3)  # rank-deficient B: reg matters
    core = rqcore.generalized_topk(A, B, 7, reg=1e-2, method="dense", largest=largest)
    values, vectors, eps = dense_generalized_topk(
        torch.from_numpy(A).to(dtype), torch.from_numpy(B).to(dtype), 7, reg=1e-2, largest=largest
    )
    assert float(eps) == pytest.approx(core.reg_used, rel=1e-6)
    V = vectors.double().numpy()
    lam = values.double().numpy()
    if dtype == torch.float64:
        np.testing.assert_allclose(lam, core.values, rtol=1e-10)
        # Compare directions, not signs: |V_torchᵀ M V_core| = I for distinct eigenvalues.
        M = B + core.reg_used * np.eye(80)
        np.testing.assert_allclose(np.abs(V.T @ M @ core.vectors), np.eye(7), atol=1e-8)
    else:
        # float32: eigenvalues to rounding of the reduced matrix's norm; pairs by backward error.
        lam_max = rqcore.generalized_topk(A, B, 1, reg=1e-2, method="dense").values[0]
        np.testing.assert_allclose(lam, core.values, rtol=0, atol=1e-5 * lam_max)
        # Backward error grows with cond(B + εI) ≈ 1e3 here: ~1e3·eps32 is the scale.
        assert rqcore.pair_residuals(A, B, lam, V, reg=1e-2).max() < 1e-4


def test_standard_problem_and_errors() -> None:
    A, _ = _pencil(20, 20, seed=1)
    values, vectors, _ = dense_generalized_topk(torch.from_numpy(A), None, 3)
    np.testing.assert_allclose(values.numpy(), scipy.linalg.eigvalsh(A)[::-1][:3], rtol=1e-12)
    V = vectors.numpy()
    np.testing.assert_allclose(A @ V, V * values.numpy(), atol=1e-12)
    with pytest.raises(ValueError, match="k must satisfy"):
        dense_generalized_topk(torch.from_numpy(A), None, 0)
    with pytest.raises(ValueError, match="not positive definite"):
        dense_generalized_topk(
            torch.from_numpy(A), torch.zeros(20, 20, dtype=torch.float64), 2, reg=0.0
        )
