"""Accuracy and behaviour of generalized_topk for every method (dense, lanczos, lobpcg, auto)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse
import scipy.sparse.linalg
from _scripts import run_quick
from hypothesis import given, settings
from hypothesis import strategies as st

from rqcore import ConvergenceWarning, Pencil, RqcoreWarning, generalized_topk, pair_residuals

METHODS = ["dense", "lanczos", "lobpcg"]
EPS = np.finfo(np.float64).eps
C_EIG = 1e3  # eigenvalues within C_EIG·eps·λ_max of LAPACK (absolute)


def power_law_pencil(d, *, alpha=1.0, n_a=None, n_b=None, seed=0):
    """Covariances of samples whose columns are scaled by j^(-alpha/2) (heavy-tailed spectra)."""
    rng = np.random.default_rng(seed)
    s = np.arange(1, d + 1) ** (-alpha / 2)
    X = rng.standard_normal((n_a or 2 * d, d)) * s
    Y = rng.standard_normal((n_b or 2 * d, d)) * s[rng.permutation(d)]
    return X.T @ X / X.shape[0], Y.T @ Y / Y.shape[0]


def analytic_pencil(lam, *, seed=0):
    """A = M V Λ Vᵀ M with V = L⁻ᵀQ: exact eigenpairs (λ, V) of (A, M), M = LLᵀ."""
    rng = np.random.default_rng(seed)
    d = lam.size
    G = rng.standard_normal((d, d))
    M = G @ G.T / d + 0.5 * np.eye(d)
    L = np.linalg.cholesky(M)
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    V = scipy.linalg.solve_triangular(L, Q, lower=True, trans="T")
    MV = M @ V
    A = MV @ np.diag(lam) @ MV.T
    return (A + A.T) / 2, M, V


def reference(A, M, k, largest):
    w, V = scipy.linalg.eigh(A, M)
    if largest:
        return w[::-1][:k], V[:, ::-1][:, :k], w
    return w[:k], V[:, :k], w


def check_result(res, A, M, k, largest, *, tol=1e-10, c_eig=C_EIG, angle=1e-6):
    ref_w, ref_V, all_w = reference(A, M, k, largest)
    lam_max = np.max(np.abs(all_w))
    assert res.values.shape == (k,) and res.vectors.shape == (A.shape[0], k)
    np.testing.assert_allclose(res.values, ref_w, rtol=0, atol=c_eig * EPS * lam_max)
    step = -1 if largest else 1
    assert np.all(np.diff(res.values) * step >= -c_eig * EPS * lam_max)
    assert np.max(res.residuals) <= tol
    gram = res.vectors.T @ M @ res.vectors
    assert np.max(np.abs(gram - np.eye(k))) <= 1e-10
    # Subspaces: compare the span of every group of eigenvalues that is separated from the rest.
    if k == A.shape[0]:
        return
    gap_next = np.abs(all_w[::-1][k] - ref_w[-1]) if largest else np.abs(all_w[k] - ref_w[-1])
    if gap_next > 1e-6 * lam_max:
        angles = scipy.linalg.subspace_angles(res.vectors, ref_V)
        assert np.max(angles) <= angle


def reg_M(B, reg):
    d = B.shape[0]
    return B + reg * np.trace(B) / d * np.eye(d)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("largest", [True, False])
def test_power_law_pencil(method, largest):
    A, B = power_law_pencil(200, seed=1)
    res = generalized_topk(A, B, 8, reg=1e-3, method=method, largest=largest, seed=0)
    assert res.method.startswith(method)
    assert res.converged
    check_result(res, A, reg_M(B, 1e-3), 8, largest)
    if method != "dense":
        assert res.iterations > 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("largest", [True, False])
def test_rank_deficient_B(method, largest):
    A, B = power_law_pencil(160, n_b=40, seed=2)
    assert np.linalg.matrix_rank(B) <= 40
    res = generalized_topk(A, B, 6, reg=1e-2, method=method, largest=largest, seed=0)
    check_result(res, A, reg_M(B, 1e-2), 6, largest)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("largest", [True, False])
def test_analytic_clustered_and_repeated(method, largest):
    d = 120
    rng = np.random.default_rng(3)
    lam = np.sort(rng.uniform(0.1, 1.0, d))
    lam[-3:] = 5.0  # a repeated eigenvalue at the top
    lam[-6:-3] = 4.0 + 1e-9 * np.arange(3)  # a tight cluster below it
    lam[:3] = 0.01  # repeated at the bottom
    lam[3:6] = 0.02 + 1e-9 * np.arange(3)
    A, M, V = analytic_pencil(lam, seed=4)
    res = generalized_topk(A, M, 6, reg=0.0, method=method, largest=largest, seed=1)
    expected = (
        np.array([5.0] * 3 + [4.0 + 2e-9, 4.0 + 1e-9, 4.0])
        if largest
        else np.array([0.01] * 3 + [0.02, 0.02 + 1e-9, 0.02 + 2e-9])
    )
    np.testing.assert_allclose(res.values, expected, rtol=0, atol=C_EIG * EPS * 5.0)
    cols = np.argsort(lam)[::-1][:6] if largest else np.argsort(lam)[:6]
    for group in (cols[:3], cols[3:]):  # each cluster's subspace, not individual vectors
        sel = np.isin(cols, group)
        angles = scipy.linalg.subspace_angles(res.vectors[:, sel], V[:, group])
        assert np.max(angles) <= 1e-6
    assert np.max(np.abs(res.vectors.T @ M @ res.vectors - np.eye(6))) <= 1e-10


@pytest.mark.parametrize("copies", [2, 3, 4])
@pytest.mark.parametrize("method", ["auto", "lanczos"])
def test_repeated_top_eigenvalue_every_k(copies, method):
    """Every copy of a repeated top eigenvalue, for each k up to 8 (the single-vector path's range).

    A single-vector Krylov space holds one vector of an eigenspace in exact arithmetic; ARPACK missed
    a copy (multiplicity 3 or 4) in 18 of these 144 runs (7 with ``eigsh``'s default ``ncv``) before
    the block iteration took over on a run of equal values.
    """
    d = 120
    rng = np.random.default_rng(3)
    lam = np.sort(rng.uniform(0.1, 1.0, d))
    lam[-copies:] = 5.0
    lam[-copies - 3 : -copies] = 4.0 + 1e-9 * np.arange(3)
    A, M, V = analytic_pencil(lam, seed=4)
    top = np.sort(lam)[::-1]
    for k in range(1, 9):
        for seed in range(6):
            res = generalized_topk(A, M, k, reg=0.0, method=method, seed=seed)
            assert res.method == "lanczos"
            np.testing.assert_allclose(res.values, top[:k], rtol=0, atol=C_EIG * EPS * 5.0)
            assert np.max(res.residuals) <= 1e-8
            n5 = min(k, copies)  # the returned copies of 5 span part of its eigenspace
            angles = scipy.linalg.subspace_angles(
                res.vectors[:, :n5], V[:, np.argsort(lam)[-copies:]]
            )
            assert angles.size == n5 and np.max(angles) <= 1e-6
            assert np.max(np.abs(res.vectors.T @ M @ res.vectors - np.eye(k))) <= 1e-10


def test_longest_repeat():
    from rqcore.generalized import _longest_repeat

    assert _longest_repeat(np.array([]), 1e-8) == 0
    assert _longest_repeat(np.array([3.0]), 1e-8) == 1
    assert _longest_repeat(np.array([5.0, 4.0, 3.0]), 1e-8) == 1
    assert _longest_repeat(np.array([5.0, 5.0 - 1e-9, 4.0, 4.0, 4.0, 1.0]), 1e-8) == 3
    assert _longest_repeat(np.array([5.0, 5.0 - 1e-6, 4.0]), 1e-8) == 1  # 2e-7 relative: distinct
    assert _longest_repeat(np.array([0.02, 0.02 + 1e-12, 0.01]), 1e-8) == 2


@pytest.mark.parametrize("k", [10, 40])  # LAPACK subset (syevr) and all pairs (syevd) branches
@pytest.mark.parametrize("largest", [True, False])
def test_dense_subset_and_all_pairs_branches(k, largest):
    A, B = power_law_pencil(120, seed=4)
    res = generalized_topk(A, B, k, reg=1e-3, method="dense", largest=largest)
    assert res.method == "dense"
    check_result(res, A, reg_M(B, 1e-3), k, largest)


@pytest.mark.parametrize("method", ["auto", *METHODS])
def test_k_equals_d_and_fallback(method):
    A, B = power_law_pencil(40, seed=5)
    res = generalized_topk(A, B, 40, reg=1e-3, method=method)
    check_result(res, A, reg_M(B, 1e-3), 40, True)
    if method in ("lanczos", "lobpcg"):
        assert res.method.startswith("dense (fallback")
    A, B = power_law_pencil(400, seed=5)
    res = generalized_topk(A, B, 120, reg=1e-3, method=method)
    assert res.method.startswith("dense")
    if method in ("lanczos", "lobpcg"):
        assert res.method == "dense (fallback: k close to d)"


@pytest.mark.parametrize("method", ["auto", *METHODS])
@pytest.mark.parametrize("largest", [True, False])
def test_d_equals_one(method, largest):
    res = generalized_topk(
        np.array([[3.0]]), np.array([[2.0]]), 1, reg=0.0, method=method, largest=largest
    )
    np.testing.assert_allclose(res.values, [1.5])
    np.testing.assert_allclose(res.vectors**2 * 2.0, [[1.0]])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("largest", [True, False])
def test_float32(method, largest):
    A, B = power_law_pencil(150, alpha=0.5, seed=6)
    A32, B32 = A.astype(np.float32), B.astype(np.float32)
    res = generalized_topk(A32, B32, 5, reg=1e-2, method=method, largest=largest, seed=0)
    assert res.vectors.dtype == np.float32 and res.values.dtype == np.float32
    M = reg_M(B32.astype(np.float64), 1e-2)
    ref_w, _, all_w = reference(A32.astype(np.float64), M, 5, largest)
    # float32: 1e-4 relative to the largest eigenvalue, residuals at the float32 default tol.
    np.testing.assert_allclose(res.values, ref_w, rtol=0, atol=1e-4 * np.max(np.abs(all_w)))
    assert np.max(res.residuals) <= 1e-5
    V = res.vectors.astype(np.float64)
    assert np.max(np.abs(V.T @ M @ V - np.eye(5))) <= 1e-4


@pytest.mark.parametrize("scale", [1e-170, 1e-150, 1e150, 1e200])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("largest", [True, False])
def test_extreme_scale_of_A(scale, method, largest):
    # Before session 12: values off by 1e-4 (lanczos) and 0.97 (lobpcg) of λ_max at 1e-170 with
    # residuals reported as 0, LinAlgError from lobpcg at 1e155, residuals inf from dense at 1e200.
    A, B = power_law_pencil(200, seed=8)
    M = reg_M(B, 1e-3)
    res = generalized_topk(A * scale, B, 6, reg=1e-3, method=method, largest=largest, seed=0)
    assert res.converged
    ref_w, _, all_w = reference(A, M, 6, largest)
    np.testing.assert_allclose(
        res.values / scale, ref_w, rtol=0, atol=C_EIG * EPS * np.max(np.abs(all_w))
    )
    assert np.all(np.isfinite(res.residuals)) and np.max(res.residuals) <= 1e-10
    assert np.min(res.residuals) > 0  # a real measure, not an underflow to zero
    np.testing.assert_allclose(
        res.residuals,
        pair_residuals(A, M, res.values / scale, res.vectors, reg=0.0),
        rtol=1e-2,
        atol=1e-14,  # both at rounding level for converged pairs
    )


@pytest.mark.parametrize("method", METHODS)
def test_float64_A_with_float32_B_solves_in_float64(method):
    # The working precision is float64 unless both are float32: B is factored in float64 (before
    # session 12 the factor stayed float32, residuals 7e-10 against the 1e-10 default tolerance).
    A, B = power_law_pencil(300, seed=3)
    B32 = B.astype(np.float32)
    res = generalized_topk(A, B32, 4, reg=1e-2, method=method, seed=0)
    assert res.vectors.dtype == np.float64 and res.pencil.dtype == np.float64
    check_result(res, A, reg_M(B32.astype(np.float64), 1e-2), 4, True)
    np.testing.assert_allclose(
        res.residuals, pair_residuals(A, res.pencil, res.values, res.vectors), rtol=1e-3, atol=1e-15
    )


def test_float32_pencil_with_float64_A_is_factored_again():
    A, B = power_law_pencil(300, seed=3)
    P32 = Pencil(B.astype(np.float32), reg=1e-2)
    with pytest.warns(RqcoreWarning, match="float32 but A is float64"):
        res = generalized_topk(A, P32, 4, seed=0)
    assert res.pencil is not P32 and res.pencil.dtype == np.float64
    check_result(res, A, reg_M(B.astype(np.float32).astype(np.float64), 1e-2), 4, True)


@pytest.mark.parametrize("method", METHODS)
def test_pencil_keeps_its_own_B(method):
    # Pencil(B) copies B: changing the caller's array afterwards must not change the pencil (before
    # session 12 the shift-invert path read the new B beside the old factor: 8.5e-2 value error).
    A, B = power_law_pencil(300, seed=9)
    Bw = B.copy()
    P = Pencil(Bw, reg=1e-3)
    Bw[:] = np.eye(300)
    assert not P.B.flags.writeable
    res = generalized_topk(A, P, 4, largest=False, method=method, seed=0)
    check_result(res, A, reg_M(B, 1e-3), 4, False)
    shared = Pencil(Bw, reg=1e-3, copy=False)
    assert shared.B is Bw


@pytest.mark.parametrize("method", ["auto", *METHODS])
@pytest.mark.parametrize("largest", [True, False])
def test_operator_and_sparse_input(method, largest):
    d = 200
    rng = np.random.default_rng(7)
    S = scipy.sparse.random(d, d, density=0.05, random_state=rng)
    S = (S + S.T + scipy.sparse.eye(d) * 3).tocsr()
    _, B = power_law_pencil(d, seed=7)
    Ad = S.toarray()
    op = scipy.sparse.linalg.aslinearoperator(S)
    for A_in in (S, op):
        res = generalized_topk(
            A_in, B, 6, reg=1e-3, method=method, largest=largest, seed=0, maxiter=2000
        )
        check_result(res, Ad, reg_M(B, 1e-3), 6, largest)


def test_sparse_B_warns():
    A, B = power_law_pencil(100, seed=8)
    with pytest.warns(RqcoreWarning, match="sparse"):
        res = generalized_topk(A, scipy.sparse.csr_array(B), 4, reg=1e-3)
    check_result(res, A, reg_M(B, 1e-3), 4, True)


@pytest.mark.parametrize("method", ["auto", *METHODS])
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("kind", ["zeros", "cancelling"])
def test_degenerate_v0(method, largest, kind):
    # A zero v0, or columns that cancel ([x, −x]): the single-vector path summed the columns and
    # ARPACK raised "Starting vector is zero" (before session 12); now every method solves.
    A, B = power_law_pencil(300, seed=9)
    if kind == "zeros":
        v0 = np.zeros((300, 4))
    else:
        x = np.random.default_rng(3).standard_normal(300)
        v0 = np.c_[x, -x]
    res = generalized_topk(A, B, 4, reg=1e-3, method=method, largest=largest, v0=v0, seed=0)
    assert res.converged
    check_result(res, A, reg_M(B, 1e-3), 4, largest)


def test_dense_reports_residuals_above_tol():
    # cond(B) = 1e12, smallest pairs: LAPACK's answer has residuals ~1e-6 (so has SciPy's eigh).
    # `converged` means every pair reached tol for every method (before session 12 dense said True).
    rng = np.random.default_rng(0)
    d = 200
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    B = (Q * np.logspace(0, -12, d)) @ Q.T
    B = (B + B.T) / 2
    X = rng.standard_normal((2 * d, d))
    A = X.T @ X / (2 * d)
    with pytest.warns(ConvergenceWarning, match="too ill-conditioned"):
        res = generalized_topk(A, B, 4, reg=0.0, method="dense", largest=False)
    assert res.converged is False and np.max(res.residuals) > 1e-10
    top = generalized_topk(A, B, 4, reg=0.0, method="dense", largest=True)
    assert top.converged and np.max(top.residuals) <= 1e-10


@pytest.mark.parametrize("method", ["auto", *METHODS])
def test_smallest_pairs_of_an_indefinite_A(method):
    # Before session 12 no shift near the spectrum factored and the far guaranteed shift compressed
    # the spectrum: 1500 block products, residual 6e-10 > tol, ConvergenceWarning.
    rng = np.random.default_rng(0)
    d = 300
    X = rng.standard_normal((d, d))
    A = (X + X.T) / 2
    Y = rng.standard_normal((d, 2 * d))
    B = Y @ Y.T / (2 * d)
    res = generalized_topk(A, B, 4, largest=False, method=method, reg=1e-6, seed=0)
    assert res.converged and res.iterations <= 200
    check_result(res, A, reg_M(B, 1e-6), 4, False)


def test_float32_A_with_identity_is_solved_in_float64_on_the_dense_path():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((120, 60))
    A = X.T @ X / 120
    for B in (None, Pencil(None, dim=60)):
        res = generalized_topk(A.astype(np.float32), B, 4, method="dense", largest=False)
        assert res.values.dtype == np.float64 and res.converged
        check_result(res, A.astype(np.float32).astype(np.float64), np.eye(60), 4, False)


@pytest.mark.parametrize("k", [40, 64])
def test_shift_invert_warm_start_keeps_every_column_of_v0(k):
    # k > 32: only the first 32 previous vectors seeded the block before session 12, and one block
    # product returned values 60 times λ_max off where a Rayleigh-Ritz on v0 alone is 7e-5 off.
    rng = np.random.default_rng(0)
    d = 300
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    A0 = (Q / np.arange(1, d + 1)) @ Q.T
    A0 = (A0 + A0.T) / 2
    Y = rng.standard_normal((d, 2 * d))
    B = Y @ Y.T / (2 * d)
    E = rng.standard_normal((d, d))
    A1 = A0 + 1e-5 * (E + E.T) / np.sqrt(d)
    P = Pencil(B)
    M = B + P.reg_used * np.eye(d)
    previous = generalized_topk(A0, P, k, largest=False, method="lanczos", seed=0)
    exact = scipy.linalg.eigh(A1, M, eigvals_only=True, subset_by_index=[0, k - 1])
    V = previous.vectors
    ritz = scipy.linalg.eigh(V.T @ A1 @ V, V.T @ M @ V, eigvals_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        one = generalized_topk(A1, P, k, largest=False, v0=previous, maxiter=1, method="lanczos")
    scale = np.max(np.abs(exact))
    assert np.max(np.abs(one.values - exact)) <= 10 * np.max(np.abs(ritz - exact)) + 1e-12 * scale
    full = generalized_topk(A1, P, k, largest=False, v0=previous, method="lanczos", seed=0)
    assert full.converged
    np.testing.assert_allclose(full.values, exact, rtol=0, atol=C_EIG * EPS * scale)


def test_results_compare_by_identity():
    A, B = power_law_pencil(80, seed=2)
    r1 = generalized_topk(A, B, 3, reg=1e-3, seed=0)
    r2 = generalized_topk(A, B, 3, reg=1e-3, seed=0)
    assert r1 == r1 and r1 != r2  # raised "truth value of an array is ambiguous" before
    np.testing.assert_array_equal(r1.values, r2.values)


@pytest.mark.parametrize("exact_columns", [2, 4])
def test_block_lanczos_start_with_exact_eigenvectors(exact_columns):
    # Exact eigenvectors in the start block make their residual columns rounding noise. Before
    # session 12 an unpivoted QR orthogonalized the other columns against that noise and the noise was
    # then replaced by random directions, which broke the Lanczos relation: 300 block products
    # without converging, residual estimates far below the true residuals.
    from rqcore._eigen_kernels import residual_thresholds
    from rqcore._lanczos import block_lanczos

    d = 300
    rng = np.random.default_rng(0)
    lam = np.sort(1.0 / np.linspace(0.003, 1.0, d))[::-1]
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    T = (Q * lam) @ Q.T
    T = (T + T.T) / 2
    norm = float(np.abs(T).sum(0).max())
    res = block_lanczos(
        lambda Y: T @ Y,
        d,
        8,
        largest=True,
        block=8,
        maxbasis=40,
        thresholds=lambda th, vn: residual_thresholds(th, 1e-10, norm, 0.0),
        maxiter=300,
        start=Q[:, :exact_columns],
        rng=np.random.default_rng(1),
        dtype=np.dtype(np.float64),
    )
    assert res.converged and res.iterations <= 20
    true = np.linalg.norm(T @ res.Y - res.Y * res.theta, axis=0)
    assert np.max(true) <= 1e-10 * norm
    np.testing.assert_allclose(res.theta, lam[:8], rtol=0, atol=C_EIG * EPS * lam[0])


@pytest.mark.parametrize("method", ["auto", "lanczos"])
def test_warm_start_from_fewer_converged_pairs_smallest(method):
    # A previous result with fewer pairs than k (largest=False: shift-invert block Lanczos); before
    # session 12: 760 block products, residual 3e-5, ConvergenceWarning (the cold solve takes 15).
    A, B = power_law_pencil(300, seed=5)
    previous = generalized_topk(A, B, 4, reg=1e-3, largest=False, seed=0)
    res = generalized_topk(A, previous.pencil, 8, largest=False, v0=previous, method=method, seed=0)
    assert res.converged and res.iterations <= 30
    check_result(res, A, reg_M(B, 1e-3), 8, False)


@pytest.mark.parametrize("method", ["lanczos", "lobpcg"])
def test_warm_start_after_perturbation(method):
    d, k = 300, 10
    A, B = power_law_pencil(d, seed=9)
    cold = generalized_topk(A, B, k, reg=1e-3, method=method, seed=0)
    rng = np.random.default_rng(10)
    X = rng.standard_normal((2 * d, d)) * np.arange(1, d + 1) ** -0.5
    E = X.T @ X / (2 * d) - A
    A2 = A + 0.01 * np.linalg.norm(A) / np.linalg.norm(E) * E
    cholesky_calls = []
    original = scipy.linalg.cholesky

    def spy(*args, **kwargs):
        if np.shape(args[0])[0] == d:  # small Gram-matrix factorizations inside LOBPCG are fine
            cholesky_calls.append(1)
        return original(*args, **kwargs)

    scipy.linalg.cholesky = spy
    try:
        warm = generalized_topk(A2, cold.pencil, k, method=method, v0=cold.vectors, seed=0)
    finally:
        scipy.linalg.cholesky = original
    assert not cholesky_calls  # the pencil's factor is reused
    recold = generalized_topk(A2, cold.pencil, k, method=method, seed=0)
    # At this size the Lanczos default is the single-vector (ARPACK) path, whose warm start (one
    # vector) saves few products; it must not cost more. An explicit maxiter selects the block path,
    # whose warm start (the whole previous subspace) must save products.
    assert warm.iterations <= recold.iterations
    check_result(warm, A2, reg_M(B, 1e-3), k, True)
    np.testing.assert_allclose(warm.values, recold.values, rtol=0, atol=1e3 * EPS * warm.values[0])
    block_warm = generalized_topk(
        A2, cold.pencil, k, method=method, v0=cold.vectors, seed=0, maxiter=10_000
    )
    block_cold = generalized_topk(A2, cold.pencil, k, method=method, seed=0, maxiter=10_000)
    assert block_warm.iterations < block_cold.iterations
    check_result(block_warm, A2, reg_M(B, 1e-3), k, True)
    np.testing.assert_allclose(
        block_warm.values, recold.values, rtol=0, atol=1e3 * EPS * warm.values[0]
    )


def _perturbed(A, seed):
    """A + E, E symmetric from a fresh sample, ‖E‖_F = 1 % ‖A‖_F (as in benchmarks/compare_eigen.py)."""
    d = A.shape[0]
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((2 * d, d)) * np.arange(1, d + 1) ** -0.5
    E = X.T @ X / (2 * d) - A
    return A + 0.01 * np.linalg.norm(A) / np.linalg.norm(E) * E


@pytest.mark.parametrize(
    ("d", "k", "method", "kwargs"),
    [
        (200, 40, "dense", {}),
        (300, 8, "lanczos", {}),  # single-vector path
        (600, 40, "lanczos", {}),  # block Lanczos, exact stop
        (300, 10, "lanczos", {"largest": False}),  # shift-invert, final Rayleigh-Ritz
        (300, 10, "lobpcg", {}),
    ],
)
def test_result_keeps_reduced_coordinates(d, k, method, kwargs):
    """Every path stores Lᵀ·vectors (orthonormal) for a warm start from the result."""
    A, B = power_law_pencil(d, seed=41)
    res = generalized_topk(A, B, k, reg=1e-3, method=method, seed=0, **kwargs)
    assert res.method.startswith(method) and res._reduced is not None
    L = res.pencil.cholesky_factor
    np.testing.assert_allclose(res._reduced, L.T @ res.vectors, rtol=0, atol=1e-10)
    np.testing.assert_allclose(res._reduced.T @ res._reduced, np.eye(k), rtol=0, atol=1e-10)


@pytest.mark.parametrize(("d", "k"), [(600, 40), (300, 10)])  # warm Davidson, single-vector path
def test_warm_start_from_result_object(d, k):
    """v0=previous result: no Lᵀv0 product with the same pencil, same pairs as v0=previous.vectors;
    with another pencil it falls back to the vectors."""
    A, B = power_law_pencil(d, seed=42)
    cold = generalized_topk(A, B, k, reg=1e-3, seed=0)
    A2 = _perturbed(A, 43)
    pencil = cold.pencil
    calls = []
    original = pencil.upper_matmul
    pencil.upper_matmul = lambda X: calls.append(1) or original(X)
    try:
        warm = generalized_topk(A2, pencil, k, v0=cold, seed=0)
    finally:
        del pencil.upper_matmul
    assert not calls
    check_result(warm, A2, reg_M(B, 1e-3), k, True)
    assert warm._reduced is not None
    from_vectors = generalized_topk(A2, pencil, k, v0=cold.vectors, seed=0)
    atol = 1e3 * EPS * warm.values[0]
    np.testing.assert_allclose(warm.values, from_vectors.values, rtol=0, atol=atol)
    assert warm.iterations <= from_vectors.iterations
    other = generalized_topk(A2, Pencil(B, reg=1e-3), k, v0=cold, seed=0)  # same B, new factor
    check_result(other, A2, reg_M(B, 1e-3), k, True)
    np.testing.assert_allclose(other.values, from_vectors.values, rtol=0, atol=atol)


@pytest.mark.parametrize(
    ("d", "k", "kwargs"),
    [
        (600, 40, {}),  # cold block Lanczos, exact stop
        (300, 12, {"maxiter": 10_000}),  # block Lanczos (maxiter skips the single-vector path)
    ],
)
def test_result_keeps_guard_pairs(d, k, kwargs):
    """Block Lanczos and warm Davidson results keep the Ritz vectors just past the k-th: orthonormal
    together with Lᵀ·vectors, their second element is L⁻ᵀ of the first, and their Rayleigh quotients
    lie at or below the k-th value (Ritz values of the largest end approach from below)."""
    from rqcore.generalized import _guard_size

    A, B = power_law_pencil(d, seed=45)
    results = [generalized_topk(A, B, k, reg=1e-3, method="lanczos", seed=0, **kwargs)]
    results.append(generalized_topk(_perturbed(A, 46), results[0].pencil, k, v0=results[0],
                                    seed=0, maxiter=10_000))  # fmt: skip
    L = results[0].pencil.cholesky_factor
    for res in results:
        assert res.method == "lanczos" and res.converged and res._guard is not None
        Yg, Vg = res._guard
        assert Yg.shape == Vg.shape == (d, _guard_size(k))
        both = np.hstack([res._reduced, Yg])
        np.testing.assert_allclose(both.T @ both, np.eye(both.shape[1]), rtol=0, atol=1e-10)
        np.testing.assert_allclose(L.T @ Vg, Yg, rtol=0, atol=1e-10)
    A2 = _perturbed(A, 46)
    Yg = results[1]._guard[0]
    C_g = scipy.linalg.solve_triangular(L, A2 @ results[1]._guard[1], lower=True)
    quotients = np.einsum("ij,ij->j", Yg, C_g)
    assert np.all(quotients <= results[1].values[-1] * (1 + 1e-10))


def test_warm_start_with_guard_pairs():
    """The guard pairs widen the warm Davidson's start block: the same pairs as without them, no
    more steps, and none of it with another pencil, a float32 re-solve or the single-vector path."""
    import dataclasses

    d, k = 600, 40
    A, B = power_law_pencil(d, seed=47)
    cold = generalized_topk(A, B, k, reg=1e-3, method="lanczos", seed=0)  # auto: dense here
    assert cold._guard is not None
    A2 = _perturbed(A, 48)
    with_guard = generalized_topk(A2, cold.pencil, k, v0=cold, seed=0, maxiter=10_000)
    bare = dataclasses.replace(cold, _guard=None)
    without = generalized_topk(A2, cold.pencil, k, v0=bare, seed=0, maxiter=10_000)
    for res in (with_guard, without):
        check_result(res, A2, reg_M(B, 1e-3), k, True)
    atol = 1e3 * EPS * with_guard.values[0]
    np.testing.assert_allclose(with_guard.values, without.values, rtol=0, atol=atol)
    assert with_guard.iterations <= without.iterations
    # A chain of warm re-solves passes the guard on.
    again = generalized_topk(_perturbed(A2, 49), cold.pencil, k, v0=with_guard, seed=0,
                             maxiter=10_000)  # fmt: skip
    check_result(again, _perturbed(A2, 49), reg_M(B, 1e-3), k, True)
    # Another factorization of the same B: the guard (like Lᵀv0) is not reused, the result is right.
    other = generalized_topk(A2, Pencil(B, reg=1e-3), k, v0=cold, seed=0, maxiter=10_000)
    np.testing.assert_allclose(other.values, without.values, rtol=0, atol=atol)
    # The single-vector path keeps no guard; a small basis takes part of it (no crash).
    small = generalized_topk(A, B, 8, reg=1e-3, seed=0)
    assert small._guard is None
    tiny_A, tiny_B = power_law_pencil(100, seed=50)  # Davidson basis 64: 8 of 24 guard columns
    tight = generalized_topk(tiny_A, tiny_B, 24, reg=1e-3, method="lanczos", seed=0, maxiter=500)
    assert tight._guard is not None and tight._guard[0].shape[1] == 24
    re = generalized_topk(_perturbed(tiny_A, 51), tight.pencil, 24, v0=tight, seed=0, maxiter=500)
    check_result(re, _perturbed(tiny_A, 51), reg_M(tiny_B, 1e-3), 24, True)


def test_orthonormal_start_branches():
    """The warm start's orthonormalization: one Cholesky-QR pass for a nearly orthonormal block,
    Householder QR otherwise, None when the triangle is too ill-conditioned to reuse v0."""
    from rqcore.generalized import _orthonormal_start

    rng = np.random.default_rng(44)
    Q, _ = np.linalg.qr(rng.standard_normal((200, 12)))
    near = Q + 1e-4 * rng.standard_normal(Q.shape)
    scaled = Q * np.linspace(1.0, 5.0, 12)
    for Y0 in (near, scaled):
        X0, R = _orthonormal_start(np.asfortranarray(Y0))
        np.testing.assert_allclose(X0.T @ X0, np.eye(12), rtol=0, atol=1e-13)
        np.testing.assert_allclose(X0 @ R, Y0, rtol=0, atol=1e-13)
        assert np.array_equal(R, np.triu(R))
    dependent = Q.copy()
    dependent[:, -1] = dependent[:, 0] + 1e-9 * dependent[:, 1]
    assert _orthonormal_start(np.asfortranarray(dependent)) is None


@pytest.mark.parametrize("k", [40, 64])
def test_warm_davidson_unchanged_A_returns_at_once(k):
    """v0 = converged vectors of the same A: the Rayleigh-Ritz on span(Lᵀv0) is accepted at once."""
    d = 600
    A, B = power_law_pencil(d, seed=31)
    cold = generalized_topk(A, B, k, reg=1e-3, method="lanczos", seed=0)  # auto: dense here
    assert cold.method == "lanczos"
    warm = generalized_topk(A, cold.pencil, k, v0=cold.vectors, seed=1)
    assert warm.converged and warm.iterations == 1
    check_result(warm, A, reg_M(B, 1e-3), k, True)
    np.testing.assert_allclose(
        warm.residuals,
        pair_residuals(A, warm.pencil, warm.values, warm.vectors),
        rtol=1e-6,
        atol=1e-15,
    )


@pytest.mark.parametrize(("d", "k"), [(600, 40), (400, 48)])
def test_block_lanczos_exact_stop_returns_the_tested_pairs(d, k):
    """Cold block Lanczos: the pairs returned at the exact stop (no final Rayleigh-Ritz) are LAPACK's,
    M-orthonormal, and their residuals are the true pair_residuals (just under tol, not over-solved by
    a whole extra block)."""
    A, B = power_law_pencil(d, seed=34)
    tol = 1e-9
    res = generalized_topk(A, B, k, reg=1e-3, method="lanczos", tol=tol, seed=0)
    assert res.method == "lanczos" and res.converged
    check_result(res, A, reg_M(B, 1e-3), k, True, tol=tol)
    true = pair_residuals(A, res.pencil, res.values, res.vectors)
    np.testing.assert_allclose(res.residuals, true, rtol=1e-6, atol=1e-15)
    assert np.max(true) <= 0.9 * tol * (1 + 1e-6)
    # The stop is at the first block that passes 0.9·tol: one block fewer leaves a pair above it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fewer = generalized_topk(A, B, k, reg=1e-3, method="lanczos", tol=tol, seed=0,
                                 maxiter=res.iterations - 1)  # fmt: skip
    assert np.max(fewer.residuals) > 0.9 * tol * (1 - 1e-3)


@pytest.mark.parametrize(("d", "k"), [(600, 64), (400, 40), (300, 10)])
def test_warm_davidson_after_perturbation(d, k):
    """Warm re-solve of A + E (block Davidson from the whole of span(Lᵀv0)): same pairs as
    scipy.linalg.eigh to the stated tolerance, fewer block products than a cold run, pencil reused."""
    A, B = power_law_pencil(d, seed=32)
    cold = generalized_topk(A, B, k, reg=1e-3, method="lanczos", seed=0, maxiter=10_000)
    A2 = _perturbed(A, seed=33)
    # maxiter selects the block iterations (no single-vector path) also for small k.
    warm = generalized_topk(A2, cold.pencil, k, v0=cold.vectors, seed=0, maxiter=10_000)
    recold = generalized_topk(A2, cold.pencil, k, method="lanczos", seed=0, maxiter=10_000)
    assert warm.converged and warm.method == "lanczos"
    assert warm.iterations < recold.iterations
    check_result(warm, A2, reg_M(B, 1e-3), k, True)
    true = pair_residuals(A2, warm.pencil, warm.values, warm.vectors)
    assert np.max(true) <= 1e-10
    np.testing.assert_allclose(warm.residuals, true, rtol=1e-6, atol=1e-15)


def test_warm_davidson_fewer_columns_operator_and_float32():
    """v0 with fewer than k columns (padded at random), an operator A, and float32 input."""
    d, k = 400, 40
    A, B = power_law_pencil(d, seed=34)
    P = Pencil(B, reg=1e-3)
    cold = generalized_topk(A, P, k, seed=0)
    A2 = _perturbed(A, seed=35)
    part = generalized_topk(A2, P, k, v0=cold.vectors[:, :25], seed=0)
    check_result(part, A2, reg_M(B, 1e-3), k, True)
    op = scipy.sparse.linalg.aslinearoperator(A2)
    res_op = generalized_topk(op, P, k, v0=cold.vectors, seed=0)
    check_result(res_op, A2, reg_M(B, 1e-3), k, True)
    A32, B32 = A2.astype(np.float32), B.astype(np.float32)
    P32 = Pencil(B32, reg=1e-3)
    cold32 = generalized_topk(A.astype(np.float32), P32, k, seed=0)
    res32 = generalized_topk(A32, P32, k, v0=cold32.vectors, seed=0)
    assert res32.converged and res32.vectors.dtype == np.float32
    assert np.max(pair_residuals(A32, P32, res32.values, res32.vectors)) <= 1e-5


def test_warm_davidson_not_converged_warns():
    d, k = 400, 40
    A, B = power_law_pencil(d, seed=36)
    cold = generalized_topk(A, B, k, reg=1e-3, seed=0)
    A2 = _perturbed(A, seed=37)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        res = generalized_topk(A2, cold.pencil, k, v0=cold.vectors, maxiter=1, seed=0)
    assert res.converged is False and res.iterations == 1
    assert res.values.shape == (k,) and np.all(np.isfinite(res.values))
    np.testing.assert_allclose(
        res.residuals,
        pair_residuals(A2, res.pencil, res.values, res.vectors),
        rtol=1e-6,
        atol=1e-15,
    )


def test_single_vector_fallback_to_block(monkeypatch):
    """A single-vector (ARPACK) result that fails the true measure is finished by the block path."""
    import rqcore.generalized as gen

    A, B = power_law_pencil(300, alpha=0.5, seed=21)
    monkeypatch.setattr(gen, "_SINGLE_VECTOR_TOL_FACTOR", 1e7)  # ARPACK stops far too early
    res = generalized_topk(A, B, 6, reg=1e-3, method="lanczos", tol=1e-10, seed=0)
    assert res.converged
    check_result(res, A, reg_M(B, 1e-3), 6, True)
    assert np.max(pair_residuals(A, res.pencil, res.values, res.vectors)) <= 1e-10


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("start", [4, 64])  # 4: the record grows by doubling during the run
def test_single_vector_back_transform_from_recorded_products(dtype, start, monkeypatch):
    """The Ritz vectors ARPACK returns lie in the span of the vectors it multiplied: the recorded
    products give ``L⁻ᵀY`` and ``AL⁻ᵀY`` equal to the direct solve and product."""
    import rqcore.generalized as gen

    A, B = power_law_pencil(200, seed=5)
    A, B = A.astype(dtype), B.astype(dtype)
    pencil = Pencil(B, reg=1e-3)
    made = []
    cls = gen._RecordedReducedOperator

    def recorder(*args, **kwargs):
        kwargs["start"] = start
        made.append(cls(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(gen, "_RecordedReducedOperator", recorder)
    tol = 1e-8 if dtype == np.float64 else 1e-4
    Y, products, V, AV, theta = gen._single_vector_lanczos(
        A, pencil, 6, tol, np.random.default_rng(0)
    )
    assert V is not None and AV is not None and products == made[0].count
    assert start == 64 or products > start  # grew
    rtol = 1e-10 if dtype == np.float64 else 1e-4
    np.testing.assert_allclose(V, pencil.solve_upper(Y), rtol=0, atol=rtol * np.abs(V).max())
    np.testing.assert_allclose(AV, A @ V, rtol=0, atol=rtol * np.abs(AV).max())
    np.testing.assert_allclose(Y.T @ Y, np.eye(6), atol=1e-12 if dtype == np.float64 else 1e-5)
    ref = scipy.linalg.eigh(A.astype(np.float64), reg_M(B.astype(np.float64), 1e-3))[0][::-1][:6]
    eigh_calls = []
    eigh = scipy.linalg.eigh
    monkeypatch.setattr(
        scipy.linalg, "eigh", lambda *a, **kw: eigh_calls.append(1) or eigh(*a, **kw)
    )
    res = generalized_topk(A, pencil, 6, tol=tol, method="lanczos", seed=0)
    assert res.converged and res.residuals.max() <= tol
    # ARPACK's vectors are orthonormal to rounding: its Ritz values are returned, no Rayleigh-Ritz.
    assert not eigh_calls
    np.testing.assert_allclose(
        res.values, np.sort(theta)[::-1], rtol=1e-13 if dtype == np.float64 else 1e-5
    )
    M = reg_M(B.astype(np.float64), 1e-3)
    V64 = res.vectors.astype(np.float64)
    gram_tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(V64.T @ M @ V64, np.eye(6), atol=gram_tol)
    np.testing.assert_allclose(res.values, ref, rtol=1e-12 if dtype == np.float64 else 1e-4)


def test_single_vector_back_transform_falls_back():
    """Past its recording limit, or for vectors outside the recorded span, the direct way is taken."""
    import rqcore.generalized as gen

    A, B = power_law_pencil(120, seed=6)
    pencil = Pencil(B, reg=1e-3)
    op = gen._RecordedReducedOperator(A, pencil, limit=5, start=2)
    x = np.random.default_rng(1).standard_normal((120, 7))
    outputs = [op.matvec(x[:, j]) for j in range(7)]
    np.testing.assert_allclose(
        np.column_stack(outputs), pencil.apply_reduced(A, x), rtol=1e-12, atol=1e-12
    )
    assert op.count == 7 and op.recorded() is None  # stopped recording at 5
    # The recorded columns (computed in place) are x, L⁻ᵀx and AL⁻ᵀx.
    op = gen._RecordedReducedOperator(A, pencil, limit=50, start=2)  # grows twice
    outputs = [op.matvec(x[:, j]) for j in range(7)]
    np.testing.assert_allclose(
        np.column_stack(outputs), pencil.apply_reduced(A, x), rtol=1e-12, atol=1e-12
    )
    X, Z, W = op.recorded()
    np.testing.assert_array_equal(X, x)
    np.testing.assert_allclose(Z, pencil.solve_upper(x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(W, A @ Z, rtol=1e-12, atol=1e-12)
    op = gen._RecordedReducedOperator(A, pencil, limit=50, start=8)
    for j in range(7):
        op.matvec(x[:, j])
    recorded = op.recorded()
    assert recorded is not None
    inside = np.linalg.qr(x[:, :3])[0]
    back = gen._back_from_products(inside, recorded, 1e-8)
    assert back is not None
    np.testing.assert_allclose(back[1], pencil.solve_upper(inside), atol=1e-12)
    outside = np.linalg.qr(np.random.default_rng(2).standard_normal((120, 3)))[0]
    assert gen._back_from_products(outside, recorded, 1e-8) is None


def test_auto_rule():
    A, B = power_law_pencil(200, seed=11)
    assert generalized_topk(A, B, 4, reg=1e-3).method == "lanczos"
    assert generalized_topk(A, B, 4, reg=1e-3, largest=False).method == "lanczos (shift-invert)"
    assert generalized_topk(A, B, 80, reg=1e-3).method == "dense"
    P = Pencil(B, reg=1e-3)
    res = generalized_topk(A, B, 4, reg=1e-3, M=P.solve)
    assert res.method == "lobpcg"
    check_result(res, A, reg_M(B, 1e-3), 4, True)


@pytest.mark.parametrize(
    ("d", "k", "warm", "operator", "precond", "expected"),
    [
        (512, 32, False, False, False, "lanczos"),  # single-vector path
        (512, 33, False, False, False, "dense"),  # past it, d ≤ 1024: LAPACK
        (512, 33, True, False, False, "lanczos"),  # warm: block Davidson
        (1024, 40, False, False, False, "dense"),
        (1024, 40, False, True, False, "lanczos"),  # operator A: never materialized by choice
        (1024, 40, False, False, True, "lobpcg"),  # a preconditioner asks for LOBPCG
        (1536, 95, False, False, False, "lanczos"),
        (1536, 96, False, False, False, "dense"),  # k ≥ d/16 for d ≤ 1536
        (2048, 128, False, False, False, "lanczos"),
        (2048, 256, True, False, False, "dense"),  # k ≥ d/8, cold or warm
        (4096, 128, False, False, False, "lanczos"),
    ],
)
def test_auto_rule_table(d, k, warm, operator, precond, expected):
    from rqcore.generalized import _auto_method

    got = _auto_method(d, k, is_operator=operator, warm=warm, precond=precond)
    assert got == expected


def test_auto_takes_dense_past_the_single_vector_path():
    A, B = power_law_pencil(400, seed=12)
    res = generalized_topk(A, B, 40, reg=1e-3, tol=1e-8)
    assert res.method == "dense"
    check_result(res, A, reg_M(B, 1e-3), 40, True)


@pytest.mark.parametrize("largest", [True, False])
def test_lobpcg_preconditioner_forms(largest):
    A, B = power_law_pencil(150, seed=12)
    P = Pencil(B, reg=1e-3)
    Minv = np.linalg.inv(reg_M(B, 1e-3))
    op = scipy.sparse.linalg.aslinearoperator(Minv)
    for pre in (Minv, op, P.solve):
        res = generalized_topk(
            A, P, 4, method="lobpcg", largest=largest, M=pre, seed=0, maxiter=3000
        )
        check_result(res, A, reg_M(B, 1e-3), 4, largest)


@pytest.mark.parametrize(
    ("d", "k", "seed"),
    [
        (80, 20, 1),
        (120, 30, 2),
        (200, 50, 3),
    ],  # k = d/4: the search space [X, W, P] nearly fills R^d
)
def test_lobpcg_almost_complete_search_space(d, k, seed):
    # Before session 12 the implicit images of P carried amplified rounding here: LOBPCG reached the
    # answer, then fell apart (values off by 5 % of λ_max after 200 iterations, ConvergenceWarning).
    A, B = power_law_pencil(d, seed=seed)
    res = generalized_topk(A, B, k, reg=1e-3, method="lobpcg", seed=0)
    assert res.converged
    check_result(res, A, reg_M(B, 1e-3), k, True)


def test_lobpcg_tolerance_below_rounding_keeps_the_best_pairs():
    # A tolerance below what rounding allows: the run must not degrade while it keeps trying
    # (before session 12: values off by 43 % of λ_max after 300 iterations).
    A, B = power_law_pencil(300, seed=3)
    M = reg_M(B, 1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        res = generalized_topk(A, B, 4, reg=1e-2, method="lobpcg", tol=1e-17, seed=0)
    check_result(res, A, M, 4, True, tol=1e-12)
    assert res.converged == bool(np.all(res.residuals <= 1e-17))


def test_lobpcg_repeated_smallest_eigenvalue():
    # Ten copies of the smallest eigenvalue, k = 8 (before session 12: [2.56, 3.85, …, 51.8]).
    lam = np.r_[np.full(10, 1.0), np.linspace(2.0, 100.0, 190)]
    A, M, _ = analytic_pencil(lam, seed=0)
    res = generalized_topk(A, M, 8, reg=0.0, method="lobpcg", largest=False, seed=0)
    assert res.converged
    np.testing.assert_allclose(res.values, np.ones(8), rtol=0, atol=C_EIG * EPS * 100.0)
    gram = res.vectors.T @ M @ res.vectors
    assert np.max(np.abs(gram - np.eye(8))) <= 1e-10


@pytest.mark.parametrize("method", ["lanczos", "lobpcg"])
def test_maxiter_too_small(method):
    A, B = power_law_pencil(300, alpha=0.3, seed=13)
    with pytest.warns(ConvergenceWarning, match=r"did not converge.*iterations.*tol"):
        res = generalized_topk(A, B, 8, reg=1e-3, method=method, maxiter=2, seed=0)
    assert res.converged is False
    assert res.values.shape == (8,) and res.vectors.shape == (300, 8)
    assert np.all(np.isfinite(res.values)) and np.max(res.residuals) > 1e-10
    M = reg_M(B, 1e-3)
    np.testing.assert_allclose(res.vectors.T @ M @ res.vectors, np.eye(8), atol=1e-10)
    np.testing.assert_allclose(
        res.residuals,
        pair_residuals(A, res.pencil, res.values, res.vectors),
        rtol=1e-6,
        atol=1e-14,
    )


def test_result_object():
    A, B = power_law_pencil(100, seed=14)
    res = generalized_topk(A, B, 3, reg=1e-3)
    values, vectors = res
    assert values is res.values and vectors is res.vectors
    assert "GeneralizedEigenResult" in repr(res)
    assert res.reg_used == pytest.approx(1e-3 * np.trace(B) / 100)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"k": 0}, ValueError, "k must satisfy"),
        ({"k": 31}, ValueError, "k must satisfy"),
        ({"k": 2.0}, TypeError, "k must be an integer"),
        ({"method": "arnoldi"}, ValueError, "method must be one of"),
        ({"B": np.eye(29)}, ValueError, "B has shape"),
        ({"A": np.ones((30, 29))}, ValueError, "square"),
        ({"A": np.arange(900).reshape(30, 30)}, TypeError, "dtype"),
        ({"A": np.triu(np.ones((30, 30)))}, ValueError, "not symmetric"),
        ({"B": np.triu(np.ones((30, 30)))}, ValueError, "not symmetric"),
        ({"A": np.full((30, 30), np.nan)}, ValueError, "non-finite"),
        ({"B": np.full((30, 30), np.inf)}, ValueError, "non-finite"),
        ({"B": -np.eye(30), "reg": 0.0}, ValueError, "not positive definite"),
        ({"B": np.zeros((30, 30)), "reg": 0.0}, ValueError, "reg > 0"),
        ({"reg": -1.0}, ValueError, "reg"),
        ({"v0": np.ones((29, 2))}, ValueError, "v0 must have shape"),
        ({"v0": np.ones((30, 5))}, ValueError, "v0 must have shape"),
        ({"v0": np.full((30, 2), np.nan)}, ValueError, "non-finite"),
        ({"tol": -1.0}, ValueError, "tol"),
        ({"tol": "1e-3"}, TypeError, "tol must be a real number"),
        ({"M": np.eye(29), "method": "lobpcg"}, ValueError, "preconditioner M has shape"),
        (
            {"M": scipy.sparse.linalg.aslinearoperator(np.eye(31))},
            ValueError,
            "preconditioner M has shape",
        ),
        ({"maxiter": 0}, ValueError, "maxiter"),
        ({"M": 3, "method": "lobpcg"}, TypeError, "M must be"),
        ({"B": Pencil(np.eye(29), reg=0.0)}, ValueError, "pencil has dimension"),
    ],
)
def test_bad_inputs(kwargs, exc, match):
    A, B = power_law_pencil(30, seed=15)
    args = {"A": A, "B": B, "k": 3, "reg": 1e-3}
    args.update(kwargs)
    if "method" in kwargs and kwargs["method"] == "lobpcg":
        args["A"], args["B"] = power_law_pencil(200, seed=15)
    with pytest.raises(exc, match=match):
        generalized_topk(args.pop("A"), args.pop("B"), args.pop("k"), **args)


@settings(deadline=None, max_examples=8)
@given(
    d=st.integers(70, 140),
    k=st.integers(1, 12),
    method=st.sampled_from(METHODS),
    largest=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_pencils_property(d, k, method, largest, seed):
    A, B = power_law_pencil(d, alpha=1.2, seed=seed)
    res = generalized_topk(A, B, k, reg=1e-3, method=method, largest=largest, seed=seed)
    ref_w, _, all_w = reference(A, reg_M(B, 1e-3), k, largest)
    np.testing.assert_allclose(res.values, ref_w, rtol=0, atol=C_EIG * EPS * np.max(np.abs(all_w)))
    assert np.max(res.residuals) <= 1e-10


def test_compare_script_quick():
    out = run_quick("compare_eigen.py")
    assert "ratio" in out and "eigsh" in out


@pytest.mark.parametrize(
    ("B", "reg"),
    [
        (-np.eye(30), 0.0),  # negative trace: ε = reg
        (np.diag(np.r_[np.ones(29), -0.5]), 1e-3),
        (np.diag(np.r_[np.ones(29), 0.0]), 0.0),  # singular
    ],
)
def test_not_definite_message_names_a_reg_that_works(B, reg):
    import re

    with pytest.raises(ValueError, match="not positive definite") as info:
        Pencil(B, reg=reg)
    suggested = float(re.search(r"(?:pass|e\.g\.) reg=([0-9.e+-]*[0-9])", str(info.value))[1])
    assert suggested > reg
    Pencil(B, reg=suggested)  # factors


# --- norms beyond float64; pair_residuals: shapes and a singular B -----------------------------


@pytest.mark.parametrize("method", ["dense", "lanczos", "lobpcg"])
def test_a_norm_that_overflows_is_a_clear_error_not_zero_residuals(method):
    # Entries ±1e306 are finite but ‖A‖₁ = 3e308 is not: every residual read 0 and wrong values
    # came back with converged=True.
    rng = np.random.default_rng(0)
    S = np.sign(rng.standard_normal((300, 300)))
    A = 1e306 * (np.triu(S) + np.triu(S, 1).T)
    with pytest.raises(ValueError, match="‖A‖₁ overflows float64"):
        generalized_topk(A, None, 4, method=method)
    with pytest.raises(ValueError, match="‖A‖₁ overflows float64"):
        pair_residuals(A, None, np.ones(4), np.eye(300)[:, :4])
    with pytest.raises(ValueError, match="‖B‖₁ or trace"):
        Pencil(A * 0 + 1e306 * np.eye(300) + 1e306, reg=0.0)


def test_pair_residuals_rejects_values_that_do_not_match_the_vectors():
    A = np.diag([3.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="one eigenvalue per column"):
        pair_residuals(A, None, [3.0], np.eye(3))  # read past the end of values before
    with pytest.raises(ValueError, match="vectors has 2 rows"):
        pair_residuals(A, None, [3.0], np.eye(2)[:, :1])


def test_pair_residuals_multiplies_a_singular_b_without_factoring_it():
    A, B = np.diag([3.0, 2.0, 1.0]), np.diag([1.0, 1.0, 0.0])
    np.testing.assert_array_equal(pair_residuals(A, B, [3.0, 2.0], np.eye(3)[:, :2]), [0.0, 0.0])
    # The same measure as through a Pencil where both apply (reg > 0).
    V = np.random.default_rng(1).standard_normal((3, 2))
    np.testing.assert_allclose(
        pair_residuals(A, B, [2.5, 1.5], V, reg=0.1),
        pair_residuals(A, Pencil(B, reg=0.1), [2.5, 1.5], V),
        rtol=1e-14,
    )


@pytest.mark.parametrize("reg", ["0.5", True])
def test_pencil_reg_must_be_a_number(reg):
    with pytest.raises(TypeError, match="reg must be a real number"):
        Pencil(np.eye(3), reg=reg)


@pytest.mark.parametrize("method", ["lanczos", "lobpcg"])
def test_converged_is_false_when_only_some_pairs_converge(method):
    A, B = power_law_pencil(300, alpha=0.3, seed=13)
    with pytest.warns(ConvergenceWarning, match="of 8 pairs converged"):
        res = generalized_topk(A, B, 8, reg=1e-3, method=method, maxiter=20, seed=0)
    assert 0 < int(np.sum(res.residuals <= 1e-10)) < 8  # the setup is really partial
    assert res.converged is False


def test_warm_start_from_a_result_of_another_pencil_maps_its_vectors_again():
    # The result's reduced coordinates Lᵀv belong to its own factor: with another B they are wrong
    # coordinates (a correct but slow solve), so the vectors must be mapped through the new factor.
    A, B = power_law_pencil(600, seed=42)
    cold = generalized_topk(A, B, 40, reg=1e-3, seed=0)
    _, B2 = power_law_pencil(600, seed=99)
    P2 = Pencil(B2, reg=1e-3)
    A2 = _perturbed(A, 43)
    calls = []
    original = P2.upper_matmul
    P2.upper_matmul = lambda X: calls.append(1) or original(X)
    try:
        warm = generalized_topk(A2, P2, 40, v0=cold, seed=0)
    finally:
        del P2.upper_matmul
    assert calls
    from_vectors = generalized_topk(A2, P2, 40, v0=cold.vectors, seed=0)
    assert warm.iterations <= from_vectors.iterations


def test_lobpcg_uses_a_preconditioner_that_is_not_m_inverse():
    # M⁻¹ = (B + εI)⁻¹ is the identity in reduced coordinates: only another preconditioner shows
    # whether M= is applied at all. A shift-and-invert-like one makes the smallest pairs fast.
    A, B = power_law_pencil(300, seed=3)
    Mreg = reg_M(B, 1e-3)
    K = np.linalg.inv(A + 1e-3 * np.trace(A) / 300 * Mreg)
    calls = []

    def precond(X):
        calls.append(1)
        return K @ X

    res = generalized_topk(A, B, 4, reg=1e-3, method="lobpcg", largest=False, M=precond, seed=0)
    assert calls and res.converged and res.iterations <= 20
    check_result(res, A, Mreg, 4, False)


def test_pair_residuals_refuses_an_array_b_whose_norm_overflows():
    B = np.full((3, 3), 1e308)  # finite entries, ‖B‖₁ = 3e308
    with pytest.raises(ValueError, match="‖B‖₁ overflows float64"):
        pair_residuals(np.eye(3), B, [1.0], np.eye(3)[:, :1])


@pytest.mark.parametrize("B", [None, "pencil"])
@pytest.mark.parametrize("reg", ["x", np.True_])
def test_pair_residuals_checks_reg_whatever_b(B, reg):
    B = Pencil(np.eye(3)) if B == "pencil" else None
    with pytest.raises(TypeError, match="reg must be a real number"):
        pair_residuals(np.eye(3), B, [1.0], np.eye(3)[:, :1], reg=reg)
