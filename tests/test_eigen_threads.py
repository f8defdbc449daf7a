"""BLAS thread counts around the iterative eigensolvers (rqcore._threads).

The drivers run their small BLAS/LAPACK calls on one thread and give the operator's large products the
caller's thread count; the caller's setting must come back after every call, also after an error and
when solves run concurrently.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import scipy.linalg.blas
import scipy.sparse.linalg
from threadpoolctl import ThreadpoolController, threadpool_limits

import rqcore._threads
from rqcore import Pencil, generalized_topk, pair_residuals


def blas_threads() -> set[int]:
    return {
        lib["num_threads"] for lib in ThreadpoolController().info() if lib["user_api"] == "blas"
    }


def pencil(d: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = np.arange(1, d + 1) ** -0.5
    X = rng.standard_normal((2 * d, d)) * s
    Y = rng.standard_normal((2 * d, d)) * s[rng.permutation(d)]
    return X.T @ X / (2 * d), Y.T @ Y / (2 * d)


class RecordingOperator(scipy.sparse.linalg.LinearOperator):
    """``A`` as an operator that records the BLAS thread count seen by each product."""

    def __init__(self, A: np.ndarray, fail_after: int | None = None) -> None:
        super().__init__(dtype=A.dtype, shape=A.shape)
        self.A = A
        self.seen: list[set[int]] = []
        self.fail_after = fail_after

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        self.seen.append(blas_threads())
        if self.fail_after is not None and len(self.seen) > self.fail_after:
            raise RuntimeError("operator failed")
        return self.A @ X

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._matmat(x.reshape(-1, 1)).ravel()

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)


@pytest.fixture
def two_threads():
    with threadpool_limits(2, user_api="blas"):
        if blas_threads() != {2}:
            pytest.skip("the BLAS here cannot run 2 threads")
        yield


@pytest.mark.parametrize("method", ["lanczos", "lobpcg"])
def test_large_products_get_the_callers_threads_and_the_setting_comes_back(
    two_threads, method, monkeypatch
):
    # Widening starts at d = WIDE_MIN_DIM (512); lowered here to keep the test small.
    monkeypatch.setattr(rqcore._threads, "WIDE_MIN_DIM", 256)
    A, B = pencil()
    op = RecordingOperator(A)
    result = generalized_topk(op, B, 6, reg=1e-3, method=method, tol=1e-9, seed=0)
    assert result.converged
    assert op.seen and all(seen == {2} for seen in op.seen)
    assert blas_threads() == {2}
    assert np.all(pair_residuals(A, result.pencil, result.values, result.vectors) <= 1e-9)


def test_small_problems_stay_on_one_thread(two_threads):
    # Below WIDE_MIN_DIM two threads were slower than one even for the products.
    A, B = pencil()
    op = RecordingOperator(A)
    generalized_topk(op, B, 6, reg=1e-3, method="lanczos", tol=1e-9, seed=0)
    assert op.seen and all(seen == {1} for seen in op.seen)
    assert blas_threads() == {2}


def test_dense_A_paths_restore_the_setting(two_threads):
    A, B = pencil(400)
    cold = generalized_topk(A, B, 20, reg=1e-3, method="lanczos", tol=1e-9, seed=0)
    warm = generalized_topk(1.01 * A, cold.pencil, 20, v0=cold.vectors, tol=1e-9, seed=0)
    small = generalized_topk(A, cold.pencil, 12, largest=False, method="lanczos", tol=1e-9, seed=0)
    assert cold.converged and warm.converged and small.converged
    assert blas_threads() == {2}


def test_setting_comes_back_after_an_error(two_threads):
    A, B = pencil()
    op = RecordingOperator(A, fail_after=3)
    with pytest.raises(RuntimeError, match="operator failed"):
        generalized_topk(op, B, 6, reg=1e-3, method="lanczos", seed=0)
    assert blas_threads() == {2}


def test_single_thread_caller_stays_single_threaded():
    A, B = pencil()
    with threadpool_limits(1, user_api="blas"):
        op = RecordingOperator(A)
        generalized_topk(op, B, 6, reg=1e-3, method="lanczos", seed=0)
        assert all(seen == {1} for seen in op.seen)
        assert blas_threads() == {1}


def test_concurrent_solves_leave_the_setting_unchanged(two_threads):
    A, B = pencil()
    P = Pencil(B, reg=1e-3)
    errors: list[BaseException] = []
    results = []

    def solve(seed: int) -> None:
        try:
            for _ in range(3):
                results.append(
                    generalized_topk(A, P, 8, method="lanczos", tol=1e-9, seed=seed, maxiter=500)
                )
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=solve, args=(seed,)) for seed in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 9 and all(r.converged for r in results)
    assert blas_threads() == {2}


def test_two_thread_symmetry_check_matches_the_serial_pass():
    """asymmetry_and_norm(threads=2) splits the tiles over two threads at d ≥ 2048: same verdicts."""
    from rqcore._eigen_kernels import asymmetry_and_norm

    rng = np.random.default_rng(0)
    d = 2049  # a partial last row block
    G = rng.standard_normal((d, d))
    A = G + G.T
    serial = asymmetry_and_norm(A)
    split = asymmetry_and_norm(A, threads=2)
    assert serial[0] == split[0] == 0.0 and serial[1] == split[1] and serial[2] and split[2]
    np.testing.assert_allclose(split[3], np.abs(A).sum(axis=0).max(), rtol=1e-12)
    for i, j in [(3, 5), (d - 1, 2), (1500, 1499)]:  # entries in both halves of the tiles
        B = A.copy()
        B[i, j] += 1.0
        assert asymmetry_and_norm(B, threads=2)[0] == pytest.approx(1.0)
        B[i, j] = np.nan
        assert not asymmetry_and_norm(B, threads=2)[2]


def test_wide_is_reentrant(two_threads):
    # An inner ``wide`` (e.g. rqcore._blas.gemm inside a widened block) must not narrow the outer one.
    with rqcore._threads.driver_threads(4096):
        assert blas_threads() == {1}
        with rqcore._threads.wide():
            assert blas_threads() == {2}
            with rqcore._threads.wide():
                assert blas_threads() == {2}
            assert blas_threads() == {2}
        assert blas_threads() == {1}
    assert blas_threads() == {2}


def test_driver_products_are_widened_through_scipy_blas(two_threads, monkeypatch):
    """The drivers' large (d, n) × (n, c) products see the caller's 2 threads; small ones stay on 1."""
    import rqcore._blas

    seen: list[tuple[float, set[int]]] = []
    real = scipy.linalg.blas.get_blas_funcs

    def recording(names, arrays):
        if tuple(names) != ("gemm",):  # trsm, trmm, gemv: not this helper's calls
            return real(names, arrays)
        (f,) = real(names, arrays)

        def call(alpha, a, b, **kw):
            m = a.shape[1] if kw.get("trans_a") else a.shape[0]
            seen.append((2.0 * m * b.shape[0] * b.shape[1], blas_threads()))
            return f(alpha, a, b, **kw)

        call.dtype = f.dtype
        return (call,)

    monkeypatch.setattr(rqcore._blas.scipy.linalg.blas, "get_blas_funcs", recording)
    A, B = pencil(600)
    cold = generalized_topk(A, B, 40, reg=1e-3, method="lanczos", tol=1e-9, maxiter=200, seed=0)
    assert cold.converged
    large = [t for flops, t in seen if flops >= rqcore._blas.WIDE_MIN_FLOPS]
    small = [t for flops, t in seen if flops < rqcore._blas.WIDE_MIN_FLOPS]
    assert large and all(t == {2} for t in large)
    assert small and all(t == {1} for t in small)
    assert blas_threads() == {2}


def _pencil_300(seed=31):
    rng = np.random.default_rng(seed)
    s = np.arange(1, 301) ** -0.5
    X = rng.standard_normal((600, 300)) * s
    Y = rng.standard_normal((600, 300)) * s[rng.permutation(300)]
    return X.T @ X / 600, Y.T @ Y / 600


@pytest.mark.parametrize(
    ("bad_A", "bad_B", "match"),
    [
        ("asymmetric", None, "A is not symmetric"),
        ("nan", None, "A contains"),
        (None, "asymmetric", "B is not symmetric"),
        (None, "indefinite", "not positive definite"),
        ("asymmetric", "indefinite", "A is not symmetric"),  # A's error first, as on one thread
        ("nan", "asymmetric", "A contains"),
    ],
)
def test_input_errors_on_two_threads(bad_A, bad_B, match):
    """On two threads the checks of A and B give the same errors, in the same order of precedence,
    as on one thread (d = 300: single-threaded check kernels, two-thread factorization)."""
    A, B = _pencil_300()
    if bad_A == "asymmetric":
        A = A.copy()
        A[5, 200] += 1e-3
    elif bad_A == "nan":
        A = A.copy()
        A[250, 3] = np.nan
    if bad_B == "asymmetric":
        B = B.copy()
        B[7, 100] += 1e-3
    elif bad_B == "indefinite":
        B = -B
    for threads in (1, 2):
        with threadpool_limits(threads), pytest.raises(ValueError, match=match):
            generalized_topk(A, B, 4, reg=0.0 if bad_B == "indefinite" else 1e-3)


def test_two_threads_give_the_one_thread_result():
    A, B = _pencil_300()
    with threadpool_limits(1):
        one = generalized_topk(A, B, 6, reg=1e-3, seed=0)
    with threadpool_limits(2):
        assert rqcore._threads.caller_threads() == 2
        two = generalized_topk(A, B, 6, reg=1e-3, seed=0)
    np.testing.assert_allclose(two.values, one.values, rtol=1e-13)
    assert two.converged and two.residuals.max() <= 1e-10
