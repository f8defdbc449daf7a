"""The dense subset eigensolver (``sytrd`` + ``stemr`` + ``ormqr``) against LAPACK's drivers."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from _scripts import run_quick
from hypothesis import given, settings
from hypothesis import strategies as st

from rqcore import _subset_eigh
from rqcore._subset_eigh import subset_eigh


def _symmetric(n: int, eigenvalues: np.ndarray, seed: int) -> np.ndarray:
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    H = (Q * eigenvalues) @ Q.T
    return (H + H.T) / 2


def _check(H: np.ndarray, p: int, largest: bool, vals, S, atol_values: float, atol_vectors: float):
    """Values equal LAPACK's; S orthonormal, spans LAPACK's invariant subspace, small residuals."""
    n = H.shape[0]
    ref_vals = scipy.linalg.eigh(H.astype(np.float64), eigvals_only=True)
    idx = np.arange(n - 1, n - p - 1, -1) if largest else np.arange(p)
    scale = float(np.abs(ref_vals).max())
    assert vals.shape == (p,) and S.shape == (n, p)
    np.testing.assert_allclose(vals, ref_vals[idx], rtol=0, atol=atol_values * scale)
    S64 = S.astype(np.float64)
    np.testing.assert_allclose(S64.T @ S64, np.eye(p), atol=atol_vectors)
    residual = np.linalg.norm(H @ S64 - S64 * vals, axis=0)
    assert residual.max() <= atol_values * scale * np.sqrt(n)


@pytest.mark.parametrize(
    "n, p", [(40, 4), (64, 16), (200, 8), (200, 50), (300, 1), (33, 33), (7, 3), (2, 1), (1, 1)]
)
@pytest.mark.parametrize("largest", [True, False])
def test_subset_eigh_matches_lapack(n, p, largest):
    rng = np.random.default_rng(n + p)
    lam = np.sort(rng.standard_normal(n)) * np.arange(1, n + 1)
    H = np.asfortranarray(_symmetric(n, lam, seed=n))
    before = H.copy()
    vals, S = subset_eigh(H, p, largest)
    _check(H, p, largest, vals, S, 1e-13, 1e-12)
    assert np.array_equal(H, before)  # overwrite=False leaves the input alone
    assert S.flags.f_contiguous
    # Same pairs as LAPACK's: the sign of each vector aside (eigenvalues are distinct).
    ref_S = scipy.linalg.eigh(H)[1]
    idx = np.arange(n - 1, n - p - 1, -1) if largest else np.arange(p)
    np.testing.assert_allclose(np.abs(S.T @ ref_S[:, idx]), np.eye(p), atol=1e-8)


def test_subset_eigh_reads_the_lower_triangle_only_in_any_layout():
    n, p = 120, 10
    H = _symmetric(n, np.linspace(1.0, 50.0, n), seed=3)
    lower = np.tril(H) + np.triu(np.full((n, n), np.nan), 1)  # garbage above the diagonal
    for layout in (np.ascontiguousarray(lower), np.asfortranarray(lower)):
        vals, S = subset_eigh(layout, p, True)
        _check(H, p, True, vals, S, 1e-13, 1e-12)
    # A view into a larger buffer (as the Lanczos driver passes H[:n, :n]).
    big = np.zeros((n + 7, n + 7), order="F")
    big[:n, :n] = H
    vals, S = subset_eigh(big[:n, :n], p, False)
    _check(H, p, False, vals, S, 1e-13, 1e-12)


def test_subset_eigh_overwrite_destroys_a_fortran_input_only():
    n, p = 100, 5
    H = np.asfortranarray(_symmetric(n, np.arange(1.0, n + 1), seed=5))
    reference = H.copy()
    vals, S = subset_eigh(H, p, True, overwrite=True)
    _check(reference, p, True, vals, S, 1e-13, 1e-12)
    assert not np.array_equal(H, reference)  # reused as sytrd's workspace
    C = np.ascontiguousarray(reference)
    subset_eigh(C, p, True, overwrite=True)
    assert np.array_equal(C, reference)  # a C-ordered input is copied regardless


def test_subset_eigh_float32():
    n, p = 150, 12
    H = _symmetric(n, np.linspace(-3.0, 20.0, n), seed=7).astype(np.float32)
    vals, S = subset_eigh(H, p, True)
    assert vals.dtype == np.float32 and S.dtype == np.float32
    _check(H, p, True, vals, S, 1e-5, 1e-5)


def test_subset_eigh_repeated_eigenvalues_give_the_invariant_subspace():
    # Top eigenvalue 5 with multiplicity 6, then a cluster 1 ± 1e-12; ask for the top 8.
    n, p = 90, 8
    lam = np.concatenate(
        [np.full(6, 5.0), 1.0 + 1e-12 * np.arange(4), np.linspace(-1, 0.5, n - 10)]
    )
    H = _symmetric(n, lam, seed=11)
    vals, S = subset_eigh(H, p, True)
    _check(H, p, True, vals, S, 1e-13, 1e-12)
    ref_S = scipy.linalg.eigh(H)[1]
    top = ref_S[:, -6:]  # the 6-fold eigenspace: S's first six columns span it
    assert np.linalg.norm(S[:, :6] - top @ (top.T @ S[:, :6])) < 1e-10


@pytest.mark.parametrize("largest", [True, False])
def test_subset_eigh_bisection_fallback(monkeypatch, largest):
    """When ``stemr`` reports a failure, ``stebz`` + ``stein`` give the same pairs."""
    monkeypatch.setattr(_subset_eigh, "_mrrr", lambda *args: None)
    n, p = 80, 9
    lam = np.concatenate([np.full(3, 2.0), np.linspace(-4.0, 1.0, n - 3)])
    H = _symmetric(n, lam, seed=13)
    vals, S = subset_eigh(H, p, largest)
    _check(H, p, largest, vals, S, 1e-13, 1e-12)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=90),
    fraction=st.floats(min_value=0.01, max_value=1.0),
    largest=st.booleans(),
    repeats=st.integers(min_value=1, max_value=5),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_subset_eigh_property(n, fraction, largest, repeats, seed):
    """Random spectra with a repeated eigenvalue at either end: LAPACK's values, orthonormal vectors."""
    rng = np.random.default_rng(seed)
    lam = rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3, n)
    lam[:repeats] = lam.max() + 1.0
    lam[repeats : 2 * repeats] = lam.min() - 1.0
    p = max(1, int(fraction * n))
    H = _symmetric(n, lam, seed=seed)
    vals, S = subset_eigh(H, p, largest)
    _check(H, p, largest, vals, S, 1e-13, 1e-11)


def test_compare_script_quick():
    out = run_quick("compare_subset_eigh.py")
    assert "rqcore / fastest SciPy" in out and "scipy evr" in out


@pytest.mark.parametrize("largest", [True, False])
def test_subset_eigh_split_tridiagonal(largest):
    """Matrices whose tridiagonal form splits: diagonal, and block diagonal with equal blocks (every
    eigenvalue repeated, with eigenvectors spread over the blocks)."""
    n = 96
    diagonal = np.diag(np.linspace(-2.0, 7.0, n))
    block = _symmetric(n // 3, np.linspace(0.5, 4.0, n // 3), seed=17)
    blocks = scipy.linalg.block_diag(block, block, block)
    for H in (diagonal, blocks):
        vals, S = subset_eigh(H, 10, largest)
        _check(H, 10, largest, vals, S, 1e-13, 1e-12)


@pytest.mark.parametrize("largest", [True, False])
def test_bisection_fallback_orders_the_values_of_a_split_matrix(monkeypatch, largest):
    """Two diagonal blocks with interleaved spectra: the tridiagonal splits, and the fallback's
    per-block values must be merged in order (not returned block by block)."""
    monkeypatch.setattr(_subset_eigh, "_mrrr", lambda *args: None)
    H = scipy.linalg.block_diag(
        _symmetric(30, np.linspace(0.0, 3.0, 30), seed=1),
        _symmetric(30, np.linspace(0.05, 3.05, 30), seed=2),
    )
    vals, S = subset_eigh(H, 10, largest)
    _check(H, 10, largest, vals, S, 1e-13, 1e-12)
