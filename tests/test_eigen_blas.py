"""The drivers' own dense kernels: rqcore._blas.gemm and the projected eigenproblem's solver."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

from rqcore._blas import gemm
from rqcore._lanczos import _wanted_eigh


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 1e-4)])
@pytest.mark.parametrize("trans_a", [False, True])
def test_gemm_matches_numpy(dtype, rtol, trans_a):
    rng = np.random.default_rng(0)
    # op(a) is (70, 50) either way; a is Fortran-ordered as the drivers pass it.
    a = np.asfortranarray(rng.standard_normal((50, 70) if trans_a else (70, 50)).astype(dtype))
    b = rng.standard_normal((50, 9)).astype(dtype)
    ref = (a.T if trans_a else a).astype(np.float64) @ b.astype(np.float64)
    out = gemm(a, b, trans_a=trans_a)
    assert out.dtype == dtype and out.shape == ref.shape and out.flags.f_contiguous
    np.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


def test_gemm_accumulates_in_place():
    rng = np.random.default_rng(1)
    a = np.asfortranarray(rng.standard_normal((40, 30)))
    b = rng.standard_normal((30, 5))
    c = np.asfortranarray(rng.standard_normal((40, 5)))
    expected = 2.0 * c - 0.5 * (a @ b)
    out = gemm(a, b, alpha=-0.5, beta=2.0, c=c)
    assert out is c
    np.testing.assert_allclose(c, expected, rtol=1e-12, atol=1e-12)


def test_gemm_with_empty_inner_dimension():
    a = np.zeros((6, 0), order="F")
    b = np.zeros((0, 3))
    assert np.array_equal(gemm(a, b), np.zeros((6, 3)))
    c = np.asfortranarray(np.ones((6, 3)))
    assert np.array_equal(gemm(a, b, beta=0.5, c=c), np.full((6, 3), 0.5))


@pytest.mark.parametrize("n, p", [(40, 4), (40, 20), (200, 8), (200, 128), (7, 7)])
@pytest.mark.parametrize("largest", [True, False])
def test_wanted_eigh_matches_lapack(n, p, largest):
    """Both branches (``sytrd`` + ``stemr`` for few pairs, all pairs by ``syevd`` for many) agree."""
    rng = np.random.default_rng(n + p)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.sort(rng.standard_normal(n)) * np.arange(1, n + 1)  # distinct
    H = (Q * lam) @ Q.T
    H = (H + H.T) / 2
    vals, S = _wanted_eigh(H, p, largest)
    ref_vals, ref_S = scipy.linalg.eigh(H)
    idx = np.arange(n - 1, n - p - 1, -1) if largest else np.arange(p)
    np.testing.assert_allclose(vals, ref_vals[idx], rtol=0, atol=1e-12 * np.abs(lam).max())
    assert S.shape == (n, p)
    # same vectors up to sign: |Sᵀ S_ref| = I
    np.testing.assert_allclose(np.abs(S.T @ ref_S[:, idx]), np.eye(p), atol=1e-8)


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-11), (np.float32, 2e-4)])
def test_pencil_apply_reduced_is_exact_for_any_layout(order, dtype, rtol):
    """``L⁻¹ A L⁻ᵀ X``, also for a non-symmetric ``A`` and a 1-D ``X``."""
    from rqcore import Pencil

    rng = np.random.default_rng(3)
    d = 60
    X = rng.standard_normal((2 * d, d))
    P = Pencil((X.T @ X / (2 * d)).astype(dtype), reg=1e-3)
    A = np.array(rng.standard_normal((d, d)), dtype=dtype, order=order)
    Z = rng.standard_normal((d, 4)).astype(dtype)
    L = P.cholesky_factor.astype(np.float64)
    ref = np.linalg.solve(L, A.astype(np.float64) @ np.linalg.solve(L.T, Z.astype(np.float64)))
    scale = np.abs(ref).max()
    np.testing.assert_allclose(P.apply_reduced(A, Z), ref, rtol=0, atol=rtol * scale)
    np.testing.assert_allclose(P.apply_reduced(A, Z[:, 1]), ref[:, 1], rtol=0, atol=rtol * scale)
    # Two columns take the column-by-column triangular solves.
    np.testing.assert_allclose(P.apply_reduced(A, Z[:, :2]), ref[:, :2], rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("ncols", [1, 2, 3, 4, 9])
@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_times_symmetric_matches_numpy(order, ncols, dtype, rtol):
    """The block operator's product with ``A``: ``symv`` per column up to three columns (one
    triangle read), ``gemm`` beyond; both equal ``A @ Z``."""
    import scipy.linalg.blas

    from rqcore.generalized import _SYMV_MAX_COLUMNS, _times_symmetric

    rng = np.random.default_rng(ncols)
    A = rng.standard_normal((90, 90))
    A = np.array(A + A.T, dtype=dtype, order=order)
    A_f = A if A.flags.f_contiguous else A.T
    (gemm,) = scipy.linalg.blas.get_blas_funcs(("gemm",), (A_f,))
    Z = np.asfortranarray(rng.standard_normal((90, ncols)).astype(dtype))
    out = _times_symmetric(A_f, Z, gemm)
    ref = A.astype(np.float64) @ Z.astype(np.float64)
    assert out.shape == (90, ncols) and out.dtype == dtype and out.flags.f_contiguous
    np.testing.assert_allclose(out, ref, rtol=0, atol=rtol * np.abs(ref).max())
    assert _SYMV_MAX_COLUMNS == 3  # the parametrization covers both sides of the switch


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("ncols", [1, 5])
@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_symmetric_product_matches_numpy(order, ncols, dtype, rtol):
    """``A @ V`` of the solvers' certificate (gemv for one column, gemm otherwise)."""
    from rqcore.generalized import _apply_symmetric

    rng = np.random.default_rng(ncols)
    A = rng.standard_normal((80, 80))
    A = np.array(A + A.T, dtype=dtype, order=order)
    V = rng.standard_normal((80, ncols)).astype(dtype)
    out = _apply_symmetric(A, V)
    ref = A.astype(np.float64) @ V.astype(np.float64)
    assert out.shape == (80, ncols) and out.dtype == dtype
    np.testing.assert_allclose(out, ref, rtol=0, atol=rtol * np.abs(ref).max())


@pytest.mark.parametrize("d", [1, 2, 17, 100, 2050])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mirror_lower_triangle(d, threads, dtype):
    """The upper triangle becomes the transpose of the lower one; the lower triangle is untouched."""
    from rqcore._eigen_kernels import mirror_lower_triangle

    rng = np.random.default_rng(d)
    F = np.asfortranarray(rng.standard_normal((d, d)).astype(dtype))
    lower = np.tril(F)
    mirror_lower_triangle(F, threads=threads)
    np.testing.assert_array_equal(np.tril(F), lower)
    np.testing.assert_array_equal(F, F.T)


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 1e-4)])
@pytest.mark.parametrize("x_dtype", [np.float32, np.float64])
def test_pencil_triangular_operations(dtype, rtol, x_dtype):
    """Solves and products with ``L`` and ``Lᵀ`` from the mirrored storage, against NumPy with the
    factor itself; ``cholesky_factor`` is lower-triangular with ``L Lᵀ = M``."""
    from rqcore import Pencil

    rng = np.random.default_rng(5)
    d = 70
    X = rng.standard_normal((d // 2, d))
    B = (X.T @ X / d).astype(dtype)  # rank-deficient: needs the shift
    P = Pencil(B, reg=1e-2)
    L = P.cholesky_factor
    assert L.dtype == dtype and np.array_equal(L, np.tril(L))
    M = B.astype(np.float64) + P.reg_used * np.eye(d)
    L64 = L.astype(np.float64)
    np.testing.assert_allclose(L64 @ L64.T, M, rtol=0, atol=10 * rtol * np.abs(M).max())
    Y = rng.standard_normal((d, 3)).astype(x_dtype)
    Y64 = Y.astype(np.float64)
    refs = {
        "solve_lower": np.linalg.solve(L64, Y64),
        "solve_upper": np.linalg.solve(L64.T, Y64),
        "lower_matmul": L64 @ Y64,
        "upper_matmul": L64.T @ Y64,
        "solve": np.linalg.solve(L64 @ L64.T, Y64),
    }
    # The drivers' block solve works in the block's precision (the factor is cast to it).
    trsm_rtol = max(rtol, 1e-4 if x_dtype == np.float32 else 0.0)
    # Before and after the first block solve with Lᵀ has copied Lᵀ onto the upper triangle.
    for mirrored in (False, True):
        assert P._mirrored is mirrored
        for name, ref in refs.items():
            scale = np.abs(ref).max()
            # 1 and 2 columns go through trsv / trmv column by column, 3 through trsm / trmm.
            for cols in (3, 2, 1):
                out = getattr(P, name)(Y[:, :cols])
                assert out.shape == (d, cols)
                np.testing.assert_allclose(
                    out, ref[:, :cols], rtol=0, atol=rtol * scale, err_msg=f"{name}, {cols}"
                )
            np.testing.assert_allclose(  # one vector
                getattr(P, name)(Y[:, 0]), ref[:, 0], rtol=0, atol=rtol * scale, err_msg=name
            )
        for trans, ref in ((False, refs["solve_lower"]), (True, refs["solve_upper"])):
            for cols in (3, 2, 1):
                block = np.asfortranarray(Y[:, :cols])
                out = P._trsm(block, trans=trans)
                assert out.dtype == x_dtype and not np.shares_memory(out, Y)
                atol = trsm_rtol * np.abs(ref).max()
                np.testing.assert_allclose(out, ref[:, :cols], rtol=0, atol=atol)
                in_place = P._trsm(block, trans=trans, overwrite=True)
                assert np.shares_memory(in_place, block)
                np.testing.assert_allclose(in_place, ref[:, :cols], rtol=0, atol=atol)
        np.testing.assert_array_equal(P.cholesky_factor, L)


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_solve_right_upper_in_place(dtype, rtol):
    """``X R⁻¹`` by a right-side ``trsm``, in place on a Fortran-ordered block."""
    from rqcore._blas import solve_right_upper

    rng = np.random.default_rng(6)
    R = np.triu(rng.standard_normal((7, 7))) + 4 * np.eye(7)
    X = np.asfortranarray(rng.standard_normal((50, 7)).astype(dtype))
    ref = X.astype(np.float64) @ np.linalg.inv(R)
    out = solve_right_upper(R, X)
    assert out.dtype == dtype and np.shares_memory(out, X)
    np.testing.assert_allclose(out, ref, rtol=0, atol=rtol * np.abs(ref).max())


@pytest.mark.parametrize("n, cols, leaf", [(1, 1, 1), (37, 5, 8), (100, 3, 16), (257, 12, 64)])
@pytest.mark.parametrize("upper", [False, True])
@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-13), (np.float32, 1e-5)])
def test_split_triangular_solve(n, cols, leaf, upper, dtype, rtol):
    """The split solve (diagonal blocks by ``trsm``, off-diagonal blocks by ``gemm``, on sub-blocks in
    place through ``cython_blas``) equals the triangular solve, reads only its own triangle, and
    leaves the factor unchanged."""
    from rqcore._blas import split_triangular_solve

    rng = np.random.default_rng(n + cols)
    F = rng.standard_normal((n, n)) + 2 * np.sqrt(n) * np.eye(n)  # both triangles well-conditioned
    F = np.asfortranarray(F.astype(dtype))
    before = F.copy()
    T = (np.triu(F) if upper else np.tril(F)).astype(np.float64)
    X = np.asfortranarray(rng.standard_normal((n, cols)).astype(dtype))
    ref = np.linalg.solve(T, X.astype(np.float64))
    out = split_triangular_solve(F, X, upper=upper, leaf=leaf)
    assert out is X and out.dtype == dtype
    np.testing.assert_allclose(out, ref, rtol=0, atol=rtol * np.abs(ref).max())
    np.testing.assert_array_equal(F, before)


def test_pencil_block_solves_take_the_split_solve_on_threads(monkeypatch):
    """With several BLAS threads and a large enough factor, ``Pencil``'s block solves use the split
    solve, and agree with the plain ``trsm`` to rounding (both ``L⁻¹`` and ``L⁻ᵀ``, in place or not)."""
    from threadpoolctl import threadpool_limits

    import rqcore._blas
    import rqcore.pencil
    from rqcore import Pencil

    rng = np.random.default_rng(8)
    d = 300
    X = rng.standard_normal((2 * d, d))
    P = Pencil(X.T @ X / (2 * d), reg=1e-3)
    Y = np.asfortranarray(rng.standard_normal((d, 9)))
    plain = {trans: P._trsm(Y, trans=trans) for trans in (False, True)}
    calls = []
    real = rqcore._blas.split_triangular_solve

    def spy(*args, **kwargs):
        calls.append(kwargs["upper"])
        return real(*args, **kwargs)

    monkeypatch.setattr(rqcore.pencil, "SPLIT_SOLVE_MIN_DIM", 256)
    monkeypatch.setattr(rqcore.pencil, "split_triangular_solve", spy)
    with threadpool_limits(2):
        for trans in (False, True):
            out = P._trsm(Y, trans=trans)
            assert not np.shares_memory(out, Y)
            np.testing.assert_allclose(out, plain[trans], rtol=0, atol=1e-12 * np.abs(out).max())
            block = Y.copy(order="F")
            assert np.shares_memory(P._trsm(block, trans=trans, overwrite=True), block)
    assert calls == [
        False,
        False,
        True,
        True,
    ]  # L⁻¹ on the lower triangle, L⁻ᵀ on the mirrored upper
    with threadpool_limits(1):
        P._trsm(Y, trans=False)
    assert len(calls) == 4  # one thread: plain trsm


@settings(max_examples=60, deadline=None)
@given(
    d=st.integers(1, 600),
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from([np.float32, np.float64]),
    layout=st.sampled_from(["C", "F"]),
)
def test_asymmetry_and_norm_matches_numpy(d, seed, dtype, layout):
    """The one-pass check (8-row tiles, any d) gives NumPy's max |A − Aᵀ|, max |A| and ‖A‖₁."""
    from rqcore._eigen_kernels import asymmetry_and_norm

    rng = np.random.default_rng(seed)
    A = np.array(
        rng.standard_normal((d, d)) * 10.0 ** rng.uniform(-3, 3), dtype=dtype, order=layout
    )
    asym, scale, finite, norm = asymmetry_and_norm(A)
    A64 = A.astype(np.float64)
    assert finite
    assert asym == pytest.approx(
        np.abs(A64 - A64.T).max(), rel=1e-6 if dtype == np.float32 else 1e-12
    )
    assert scale == np.abs(A64).max()
    assert norm == pytest.approx(np.abs(A64).sum(axis=0).max(), rel=1e-12)


@pytest.mark.parametrize("d", [1, 9, 64, 301, 600])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("layout", ["C", "F"])  # C up to 2 MiB: the row-order kernel
def test_asymmetry_and_norm_flags_non_finite_anywhere(d, bad, layout):
    """A NaN or Inf in either triangle or on the diagonal makes the pass report non-finite (the test
    reads the column sums, which every entry reaches)."""
    from rqcore._eigen_kernels import asymmetry_and_norm

    rng = np.random.default_rng(d)
    S = rng.standard_normal((d, d))
    S = S + S.T
    for i, j in {(0, 0), (d - 1, 0), (0, d - 1), (d // 2, d // 3), (d - 1, d - 1)}:
        A = np.array(S, order=layout)
        A[i, j] = bad
        assert not asymmetry_and_norm(A)[2], (i, j)
    assert asymmetry_and_norm(S)[2]


@pytest.mark.parametrize("scale", [1e-300, 1e-200, 1e-160, 1.0, 1e160, 1e200, 1e300])
def test_norms_free_of_under_and_overflow(scale):
    from rqcore._eigen_kernels import column_norms, pair_residual_norms

    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 3))
    expected = np.linalg.norm(X, axis=0) * scale
    for block in (X * scale, np.asfortranarray(X * scale)):
        np.testing.assert_allclose(column_norms(block), expected, rtol=1e-13)
    AV, MV, lam = X * scale, np.zeros_like(X), np.ones(3)
    np.testing.assert_allclose(pair_residual_norms(AV, MV, lam), expected, rtol=1e-13)
    assert np.all(column_norms(np.zeros((5, 2))) == 0)
