"""Tests of rqcore.projection: RayleighBasis, NullspaceProjector and their common protocol."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
from _scripts import run_quick

from rqcore import (
    NullspaceProjector,
    Pencil,
    Projector,
    RayleighBasis,
    gates,
    generalized_topk,
    projector_from_state_dict,
)
from rqcore.projection import default_gains

D = 12
REPO = Path(__file__).resolve().parents[1]


def _covariances(seed: int = 0, d: int = D, n_t: int = 40, n_p: int = 9):
    """Task covariance (full rank) and a rank-deficient proxy covariance (needs reg) from data."""
    rng = np.random.default_rng(seed)
    X_t = rng.standard_normal((n_t, d)) @ np.diag(np.linspace(0.5, 2.0, d))
    X_p = rng.standard_normal((n_p, d))
    return X_t.T @ X_t / n_t, X_p.T @ X_p / n_p, X_p


@pytest.fixture(scope="module")
def pencil_data():
    A, B, X_p = _covariances()
    return A, B, X_p


@pytest.fixture(scope="module")
def full(pencil_data) -> RayleighBasis:
    A, B, _ = pencil_data
    return RayleighBasis.from_pencil(A, B, reg=1e-2)


@pytest.fixture(scope="module")
def topk(pencil_data) -> RayleighBasis:
    A, B, _ = pencil_data
    return RayleighBasis.from_pencil(A, B, k=4, reg=1e-2, method="dense")


def _G(n: int = 5, d: int = D, seed: int = 3, dtype=np.float64) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(dtype)


def _M(basis: RayleighBasis) -> np.ndarray:
    assert basis.B is not None
    return basis.B + basis.reg_used * np.eye(basis.dim)


# ------------------------------------------------------------------------- construction
def test_attributes(full: RayleighBasis, topk: RayleighBasis, pencil_data) -> None:
    A, B, _ = pencil_data
    assert (full.dim, full.rank, topk.rank) == (D, D, 4)
    assert full.A is A and full.B is B  # by reference, not copied
    np.testing.assert_allclose(full.MV, _M(full) @ full.vectors, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(full.vectors.T @ full.MV, np.eye(D), atol=1e-10)
    assert np.all(np.diff(full.values) <= 0)
    assert full.reg_used == pytest.approx(1e-2 * float(np.trace(np.asarray(B))) / D)
    assert isinstance(full.pencil, Pencil)
    assert full.complement == 0.0
    np.testing.assert_array_equal(full.gains, default_gains(full.values))
    np.testing.assert_allclose(topk.values, full.values[:4], rtol=1e-10)


def test_from_pencil_variants(pencil_data) -> None:
    A, B, _ = pencil_data
    P = Pencil(B, reg=1e-2)
    via_pencil = RayleighBasis.from_pencil(A, P, k=3)
    assert via_pencil.pencil is P and via_pencil.reg_used == P.reg_used
    standard = RayleighBasis.from_pencil(A, None)
    assert standard.B is None and standard.reg_used == 0.0
    np.testing.assert_allclose(standard.MV, standard.vectors)
    G = _G()
    np.testing.assert_allclose(standard.penalty(G).per_row, np.sum(G**2, axis=1))
    res = generalized_topk(A, B, 3, reg=1e-2)
    from_res = RayleighBasis.from_result(res, A=A)
    np.testing.assert_array_equal(from_res.vectors, res.vectors)
    with pytest.raises(TypeError):
        RayleighBasis.from_result((res.values, res.vectors))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- gate algebra
@pytest.mark.parametrize("which", ["full", "topk"])
def test_gate_identity_zero_and_projection(which: str, request) -> None:
    basis: RayleighBasis = request.getfixturevalue(which)
    G = _G(7)
    np.testing.assert_allclose(basis.gate(G, 1.0, complement=1.0), G, rtol=1e-12, atol=1e-12)
    assert np.all(basis.gate(G, 0.0, complement=0.0) == 0.0)
    P = basis.gate(G, np.ones(basis.rank), complement=0.0)
    np.testing.assert_allclose(basis.gate(P, 1.0, complement=0.0), P, rtol=1e-10, atol=1e-12)
    residual = G - P  # M-orthogonal to span(V): residual · M · V = 0
    scale = np.abs(G @ basis.MV).max()
    np.testing.assert_allclose(residual @ basis.MV, 0.0, atol=1e-10 * scale)


def test_gate_matches_definition(topk: RayleighBasis) -> None:
    G = _G(6)
    g = np.array([0.9, 0.5, 0.2, 0.0])
    expected = 0.3 * G + (G @ topk.MV) @ np.diag(g - 0.3) @ topk.vectors.T
    np.testing.assert_allclose(topk.gate(G, g, complement=0.3), expected, rtol=1e-12, atol=1e-13)
    # A callable gain is evaluated on the eigenvalues.
    rule = lambda lam: gates.ratio(lam, 1.0)  # noqa: E731
    np.testing.assert_array_equal(topk.gate(G, rule), topk.gate(G, gates.ratio(topk.values, 1.0)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_basis_penalty_and_utility_identities(seed: int) -> None:
    A, B, _ = _covariances(seed)
    basis = RayleighBasis.from_pencil(A, B, reg=1e-2)
    G = _G(6, seed=seed + 10)
    c = basis.coordinates(G)
    g = gates.ratio(basis.values, float(np.median(basis.values)))
    H = basis.gate(G, g, complement=0.7)  # complement irrelevant for a full basis
    pen = basis.penalty(H)
    predicted = np.sum(g**2 * c**2, axis=1)
    regularized = pen.per_row + basis.reg_used * np.sum(H**2, axis=1)
    np.testing.assert_allclose(regularized, predicted, rtol=1e-10)
    assert pen.total == pytest.approx(float(pen.per_row.sum()), rel=1e-14)
    util = basis.utility(H)
    np.testing.assert_allclose(util.per_row, np.sum(g**2 * basis.values * c**2, axis=1), rtol=1e-10)
    # ... and the exact monitors agree with brute force.
    np.testing.assert_allclose(pen.per_row, np.einsum("ij,jk,ik->i", H, B, H), rtol=1e-12)
    np.testing.assert_allclose(util.per_row, np.einsum("ij,jk,ik->i", H, A, H), rtol=1e-12)


def test_hard_gate_penalty_on_calibration_data(pencil_data) -> None:
    A, _, X_p = pencil_data
    C_p = X_p.T @ X_p / X_p.shape[0]  # the calibration data's (uncentered) covariance
    basis = RayleighBasis.from_pencil(A, C_p, reg=1e-2)
    r = 5
    G = _G(8)
    g = gates.hard(basis.values, r)
    dW = basis.gate(G, g, complement=0.0)
    measured = float(np.mean(np.sum((X_p @ dW.T) ** 2, axis=1)))  # mean ‖ΔW x‖² over x in X_p
    c = basis.coordinates(G)
    predicted = float(np.sum(c[:, :r] ** 2)) - basis.reg_used * float(np.sum(dW**2))
    assert measured == pytest.approx(predicted, rel=1e-10)
    assert basis.penalty(dW).total == pytest.approx(measured, rel=1e-10)


def test_coordinate_maps(full: RayleighBasis) -> None:
    G = _G(4)
    np.testing.assert_allclose(full.reconstruct(full.coordinates(G)), G, rtol=1e-10, atol=1e-12)
    # Chain rule: <G, Z Vᵀ> = <G V, Z> for every Z, so ∂<G, ΔW>/∂Z = G V.
    Z = _G(4, d=D, seed=9)
    lhs = float(np.sum(G * full.reconstruct(Z)))
    rhs = float(np.sum(full.gradient_coordinates(G) * Z))
    assert lhs == pytest.approx(rhs, rel=1e-12)
    assert full.coordinates(G[0]).shape == (D,)
    assert full.reconstruct(Z[0]).shape == (D,)


def test_penalty_estimate_bounds(topk: RayleighBasis, full: RayleighBasis) -> None:
    G = _G(6)
    exact = topk.penalty(G).per_row
    est = topk.penalty_estimate(G)
    assert np.all(est.lower <= exact + 1e-12) and np.all(exact <= est.upper + 1e-12)
    assert est.total_lower <= float(exact.sum()) <= est.total_upper
    np.testing.assert_allclose(est.in_span, np.sum(topk.coordinates(G) ** 2, axis=1))
    est_full = full.penalty_estimate(G)
    np.testing.assert_allclose(est_full.lower, full.penalty(G).per_row, rtol=1e-9)
    np.testing.assert_allclose(est_full.upper, est_full.lower, rtol=1e-9)


def test_utility_with_sparse_A(pencil_data) -> None:
    A, B, _ = pencil_data
    basis = RayleighBasis.from_pencil(scipy.sparse.csr_array(A), B, reg=1e-2)
    G = _G()
    np.testing.assert_allclose(basis.utility(G).per_row, np.einsum("ij,jk,ik->i", G, A, G))


# ------------------------------------------------------------------- dtypes, layouts, shapes
@pytest.mark.parametrize("which", ["full", "topk"])
def test_float32_agrees_with_float64(which: str, request) -> None:
    basis: RayleighBasis = request.getfixturevalue(which)
    G = _G(9)
    g = np.linspace(1.0, 0.0, basis.rank)
    ref = basis.gate(G, g, complement=0.4)
    out32 = basis.gate(G.astype(np.float32), g, complement=0.4)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, ref, atol=1e-4 * np.abs(ref).max())
    c32 = basis.coordinates(G.astype(np.float32))
    assert c32.dtype == np.float32
    np.testing.assert_allclose(c32, basis.coordinates(G), rtol=1e-4, atol=1e-4)
    assert set(basis._cast_cache) == {np.dtype(np.float32), np.dtype(np.float64)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_out_and_in_place_equal_allocating(topk: RayleighBasis, dtype) -> None:
    G = _G(5, dtype=dtype)
    g = np.array([1.0, 0.6, 0.3, 0.1])
    for comp in (0.0, 0.25, 1.0):
        ref = topk.gate(G, g, complement=comp)
        out = np.empty_like(G)
        res = topk.gate(G, g, complement=comp, out=out)
        assert res is out
        np.testing.assert_array_equal(out, ref)
        work = G.copy()
        res = topk.gate(work, g, complement=comp, out=work)
        assert res is work
        np.testing.assert_allclose(work, ref, rtol=1e-6, atol=1e-6)
        # Fortran-ordered G and out, and a strided out, give the same numbers.
        GF = np.asfortranarray(G)
        resF = topk.gate(GF, g, complement=comp)
        assert resF.flags.f_contiguous
        np.testing.assert_allclose(resF, ref, rtol=1e-6, atol=1e-6)
        wide = np.zeros((5, 2 * D), dtype=dtype)
        topk.gate(G, g, complement=comp, out=wide[:, ::2])
        np.testing.assert_allclose(wide[:, ::2], ref, rtol=1e-6, atol=1e-6)
        row = G[2].copy()
        topk.gate(row, g, complement=comp, out=row)
        np.testing.assert_allclose(row, ref[2], rtol=1e-6, atol=1e-6)


def test_shapes(full: RayleighBasis) -> None:
    assert full.gate(_G(1), full.gains).shape == (1, D)
    assert full.apply(_G(1)[0]).shape == (D,)
    assert full.gate(np.zeros((0, D)), full.gains).shape == (0, D)
    one = RayleighBasis.from_pencil(np.array([[2.0]]), np.array([[4.0]]), reg=0.0)  # d = k = 1
    assert (one.dim, one.rank) == (1, 1)
    assert one.values[0] == pytest.approx(0.5)
    np.testing.assert_allclose(one.gate(np.array([[3.0], [1.0]]), [0.5]), [[1.5], [0.5]])
    assert one.penalty(np.array([3.0])).total == pytest.approx(36.0)


def test_bad_input(topk: RayleighBasis) -> None:
    G = _G()
    with pytest.raises(ValueError, match="columns"):
        topk.gate(G[:, :-1], topk.gains)
    with pytest.raises(ValueError):
        topk.gate(G[None], topk.gains)
    with pytest.raises(TypeError):
        topk.gate(G.astype(np.int64), topk.gains)
    with pytest.raises(TypeError):
        topk.gate(G.astype(np.float16), topk.gains)
    with pytest.raises(ValueError, match="gains"):
        topk.gate(G, np.ones(topk.rank + 1))
    with pytest.raises(ValueError):
        topk.gate(G, np.full(topk.rank, np.nan))
    with pytest.raises(TypeError, match="dtype"):
        topk.gate(G, topk.gains, out=np.empty_like(G, dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        topk.gate(G, topk.gains, out=np.empty((2, D)))
    for bad in (np.nan, np.inf):
        Gbad = G.copy()
        Gbad[1, 3] = bad
        before = Gbad.copy()
        with pytest.raises(ValueError, match="NaN"):
            topk.gate(Gbad, topk.gains, complement=0.5, out=Gbad)
        np.testing.assert_array_equal(Gbad, before)  # a failed in-place call leaves G intact
        for method in (topk.coordinates, topk.gradient_coordinates, topk.penalty, topk.utility):
            with pytest.raises(ValueError):
                method(Gbad)
    with pytest.raises(ValueError):
        topk.reconstruct(np.ones((2, topk.rank + 1)))


# ------------------------------------------------------------------- configure, update, state
def test_configure_and_apply(pencil_data) -> None:
    A, B, _ = pencil_data
    basis = RayleighBasis.from_pencil(A, B, k=5, reg=1e-2)
    G = _G()
    np.testing.assert_array_equal(basis.apply(G), basis.gate(G, basis.gains, complement=0.0))
    basis.configure(gains=lambda lam: gates.hard(lam, 2), complement=0.5)
    np.testing.assert_array_equal(basis.gains, [1, 1, 0, 0, 0])
    np.testing.assert_array_equal(basis.apply(G), basis.gate(G, basis.gains, complement=0.5))
    other = basis.with_gains(1.0, complement=1.0)
    np.testing.assert_allclose(other.apply(G), G, rtol=1e-12, atol=1e-12)
    assert basis.complement == 0.5  # the original is unchanged
    with pytest.raises(ValueError):
        basis.configure(complement=float("nan"))


def test_update(pencil_data) -> None:
    A, B, _ = pencil_data
    basis = RayleighBasis.from_pencil(A, B, k=4, reg=1e-2)
    A2 = A + np.eye(D)
    res = generalized_topk(A2, basis.pencil, 6)
    basis.update(res, A=A2)
    assert basis.rank == 6 and basis.A is A2
    np.testing.assert_array_equal(basis.gains, default_gains(res.values))  # rule re-evaluated
    np.testing.assert_allclose(basis.MV, _M(basis) @ basis.vectors, atol=1e-12)
    basis.configure(gains=np.linspace(1, 0, 6))
    with pytest.raises(ValueError, match="fixed gains"):
        basis.update(generalized_topk(A, B, 3, reg=1e-2))
    basis.update(generalized_topk(A, B, 6, reg=1e-2))
    np.testing.assert_array_equal(basis.gains, np.linspace(1, 0, 6))
    A3, B3, _ = _covariances(d=D + 1)
    with pytest.raises(ValueError, match="dimension"):
        basis.update(generalized_topk(A3, B3, 3, reg=1e-2))


def _assert_same_basis(a: RayleighBasis, b: RayleighBasis) -> None:
    for name in ("values", "vectors", "MV", "gains"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert (a.reg_used, a.complement, a.dim, a.rank) == (b.reg_used, b.complement, b.dim, b.rank)


def test_state_dict_round_trips(pencil_data) -> None:
    A, B, _ = pencil_data
    basis = RayleighBasis.from_pencil(A, B, k=5, reg=1e-2, complement=0.25)
    G = _G()
    state = basis.state_dict()
    assert state["gains_rule"] == "default" and state["B"] is B
    again = RayleighBasis.from_state_dict(state)
    _assert_same_basis(basis, again)
    np.testing.assert_array_equal(again.apply(G), basis.apply(G))
    assert again.penalty(G).total == basis.penalty(G).total
    assert again.utility(G).total == basis.utility(G).total
    again2 = projector_from_state_dict(again.state_dict())
    assert isinstance(again2, RayleighBasis)
    _assert_same_basis(basis, again2)
    # Fixed and callable gains: the values are stored.
    basis.configure(gains=lambda lam: gates.threshold(lam, 1.0))
    state = basis.state_dict(covariances=False)
    assert state["gains_rule"] == "callable" and "B" not in state and "A" not in state
    lean = RayleighBasis.from_state_dict(state)
    _assert_same_basis(basis, lean)
    np.testing.assert_array_equal(lean.penalty_estimate(G).upper, basis.penalty_estimate(G).upper)
    with pytest.raises(ValueError, match="not available"):
        lean.penalty(G)
    with pytest.raises(ValueError):
        lean.utility(G)
    with pytest.raises(ValueError):
        RayleighBasis.from_state_dict({"kind": "NullspaceProjector"})


# ------------------------------------------------------------------------ NullspaceProjector
def _spd(seed: int = 0, d: int = D) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((3 * d, d)) @ np.diag(np.geomspace(10.0, 0.01, d))
    return X.T @ X / (3 * d)


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_nullspace_projector(energy: float) -> None:
    C = _spd()
    P = NullspaceProjector(C, energy=energy)
    lam = np.linalg.eigvalsh(C)[::-1]
    cum = np.cumsum(lam)
    r = int(np.argmax(cum >= energy * cum[-1])) + 1  # smallest r reaching the energy
    assert P.rank == r and P.C is C
    assert P.captured_energy >= energy
    G = _G(6)
    W = P.apply(G)
    np.testing.assert_allclose(W @ P.basis, 0.0, atol=1e-12 * np.abs(G).max())
    norms = np.sum(W**2, axis=1)
    quad = P.penalty(W).per_row
    assert np.all(quad <= lam[r] * norms * (1 + 1e-10) + 1e-14)
    assert np.all(lam[r] <= (1 - energy) * np.trace(C) + 1e-12)
    np.testing.assert_allclose(quad, np.einsum("ij,jk,ik->i", W, C, W), rtol=1e-10)
    np.testing.assert_allclose(P.apply(W), W, atol=1e-12)  # idempotent


def test_nullspace_rank_dtype_inplace_and_state() -> None:
    C = _spd(1)
    P = NullspaceProjector(C, rank=3)
    assert P.rank == 3 and isinstance(P, Projector)
    G = _G(4)
    ref = G - (G @ P.basis) @ P.basis.T
    np.testing.assert_allclose(P.apply(G), ref, rtol=1e-12, atol=1e-12)
    work = G.copy()
    assert P.apply(work, out=work) is work
    np.testing.assert_allclose(work, ref, rtol=1e-12, atol=1e-12)
    out32 = P.apply(G.astype(np.float32))
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, ref, atol=1e-5)
    assert P.apply(G[0]).shape == (D,)
    zero = NullspaceProjector(C, rank=0)
    np.testing.assert_array_equal(zero.apply(G), G)
    out = np.empty_like(G)
    assert zero.apply(G, out=out) is out
    np.testing.assert_array_equal(out, G)
    Q = projector_from_state_dict(P.state_dict())
    assert isinstance(Q, NullspaceProjector)
    np.testing.assert_array_equal(Q.basis, P.basis)
    np.testing.assert_array_equal(Q.apply(G), P.apply(G))
    assert Q.penalty(G).total == P.penalty(G).total
    lean = NullspaceProjector.from_state_dict(P.state_dict(covariances=False))
    with pytest.raises(ValueError):
        lean.penalty(G)
    one = NullspaceProjector(np.array([[2.0]]), energy=0.5)  # d = 1
    np.testing.assert_array_equal(one.apply(np.array([[3.0]])), [[0.0]])


def test_nullspace_bad_input() -> None:
    C = _spd()
    for kwargs in ({"energy": 0.0}, {"energy": 1.5}, {"rank": D + 1}, {"rank": -1}):
        with pytest.raises(ValueError):
            NullspaceProjector(C, **kwargs)
    with pytest.raises(TypeError):
        NullspaceProjector(C, rank=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        NullspaceProjector(C + np.triu(np.ones((D, D)), 1))
    with pytest.raises(TypeError):
        NullspaceProjector(C.astype(np.int64))
    P = NullspaceProjector(C, rank=2)
    with pytest.raises(ValueError):
        P.apply(_G(d=D - 1))
    Gbad = _G()
    Gbad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        P.apply(Gbad)
    with pytest.raises(ValueError, match="unknown"):
        projector_from_state_dict({"kind": "nope"})


def test_protocol(full: RayleighBasis) -> None:
    for obj in (full, NullspaceProjector(_spd(), rank=2)):
        assert isinstance(obj, Projector)
        G = _G()
        assert obj.apply(G).shape == G.shape
        assert obj.penalty(G).per_row.shape == (5,)
        assert type(obj).from_state_dict(obj.state_dict()).dim == obj.dim


# ------------------------------------------------------------------------------ benchmarks
def test_compare_script_quick_runs() -> None:
    out = run_quick("compare_projection.py")
    assert "overall:" in out and "gate" in out


# --- session 12: defects found by a black-box review -------------------------------------------


def test_non_finite_B_is_rejected_at_construction():
    B = np.eye(3)
    B[0, 1] = np.nan
    with pytest.raises(ValueError, match="B contains 1 non-finite"):
        RayleighBasis([2.0, 1.0], np.eye(3)[:, :2], B=B)
    B[0, 1] = np.inf
    with pytest.raises(ValueError, match="B contains 1 non-finite"):
        RayleighBasis([2.0, 1.0], np.eye(3)[:, :2], dual=np.eye(3)[:, :2], B=B)


def test_penalty_estimate_without_cp_has_no_finite_upper_bound():
    basis = RayleighBasis([2.0, 1.0], np.eye(3)[:, :2], dual=np.eye(3)[:, :2], cp_known=False)
    est = basis.penalty_estimate(np.array([[1.0, 1.0, 1.0], [1.0, 2.0, 0.0]]))
    assert est.upper[0] == np.inf  # a complement part: rᵀMr unknown (was NaN)
    assert est.upper[1] == est.lower[1] == 5.0  # in the span: exact


def test_gains_beyond_float32_are_an_error_for_float32_G():
    basis = RayleighBasis([2.0, 1.0], np.eye(3)[:, :2])
    with pytest.raises(ValueError, match="overflow G's dtype float32"):
        basis.gate(np.ones((1, 3), np.float32), [1e39, 1.0])
    out = basis.gate(np.ones((1, 3)), [1e39, 1.0])  # float64 G: fine
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: RayleighBasis([2.0], np.eye(2)[:, :1], reg_used="x"), "reg_used must be a real"),
        (lambda: NullspaceProjector(np.eye(3), energy="a"), "energy must be a real"),
    ],
)
def test_string_parameters_raise_type_errors_naming_them(build, match):
    with pytest.raises(TypeError, match=match):
        build()


def test_nullspace_state_dict_is_validated():
    P = NullspaceProjector(np.diag([3.0, 2.0, 1.0]), rank=1)
    state = P.state_dict()
    bad = dict(state, C=np.eye(4))
    with pytest.raises(ValueError, match="state is inconsistent"):
        NullspaceProjector.from_state_dict(bad)
    basis = np.array(state["basis"], copy=True)
    basis[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        NullspaceProjector.from_state_dict(dict(state, basis=basis))


def test_update_that_the_gain_rule_rejects_leaves_the_basis_unchanged():
    A = np.diag([4.0, 3.0, 2.0, 1.0])

    def two_only(lam):
        if lam.size != 2:
            raise ValueError("rule expects 2 eigenvalues")
        return np.array([1.0, 0.5])

    basis = RayleighBasis.from_pencil(A, None, k=2, gains=two_only)
    before = (basis.values.copy(), basis.vectors.copy(), basis.gains.copy(), basis.rank)
    with pytest.raises(ValueError, match="rule expects 2"):
        basis.update(generalized_topk(A, None, k=3))
    np.testing.assert_array_equal(basis.values, before[0])
    np.testing.assert_array_equal(basis.vectors, before[1])
    np.testing.assert_array_equal(basis.gains, before[2])
    assert basis.rank == before[3]
    np.testing.assert_allclose(basis.apply(np.ones(4)), [1.0, 0.5, 0.0, 0.0], atol=1e-15)


def test_basis_arrays_are_read_only_so_cached_casts_cannot_go_stale():
    result = generalized_topk(np.diag([3.0, 2.0, 1.0]), None, k=2)
    basis = RayleighBasis.from_result(result)
    basis.coordinates(np.ones(3, dtype=np.float32))  # caches the float32 cast
    for name in ("values", "vectors", "MV"):
        with pytest.raises(ValueError, match="read-only"):
            getattr(basis, name)[...] = 0.0
        with pytest.raises(AttributeError):
            setattr(basis, name, getattr(basis, name) * 2.0)
    assert result.vectors.flags.writeable  # the result stays the caller's
    assert np.shares_memory(basis.vectors, result.vectors)  # no second d×k array (documented)
    V, values = np.eye(3)[:, :2], np.array([3.0, 2.0])
    own = RayleighBasis(values, V, B=None)  # arrays passed by the caller are copied
    V[...] = 0.0
    assert np.abs(own.vectors).max() == 1.0
    proj = NullspaceProjector(np.diag([3.0, 2.0, 1e-9]), energy=0.9)
    with pytest.raises(ValueError, match="read-only"):
        proj.basis[...] = 0.0


@pytest.mark.parametrize("complement", ["0.25", True])
def test_complement_must_be_a_number(complement):
    basis = RayleighBasis.from_pencil(np.diag([3.0, 1.0]), None)
    with pytest.raises(TypeError, match="complement must be a real number"):
        basis.configure(complement=complement)
    with pytest.raises(TypeError, match="complement must be a real number"):
        basis.gate(np.ones(2), 1.0, complement=complement)


def test_out_is_returned_itself_for_one_row():
    basis = RayleighBasis.from_pencil(np.diag([3.0, 2.0, 1.0]), None, k=2)
    proj = NullspaceProjector(np.diag([3.0, 2.0, 1e-9]), energy=0.9)
    G = np.array([1.0, 2.0, 3.0])
    for call in (
        lambda out: basis.gate(G, [0.5, 1.0], out=out),
        lambda out: basis.apply(G, out=out),
        lambda out: proj.apply(G, out=out),
    ):
        out = np.empty(3)
        res = call(out)
        assert res is out
        np.testing.assert_array_equal(res, call(None))


def test_pickled_bases_stay_read_only():
    import copy
    import pickle

    basis = RayleighBasis.from_pencil(np.diag([3.0, 2.0, 1.0]), None, k=2)
    basis.apply(np.ones((2, 3), dtype=np.float32))  # fills the float32 cast cache
    proj = NullspaceProjector(np.diag([3.0, 2.0, 1e-9]), energy=0.9)
    for obj, name in ((basis, "vectors"), (basis, "MV"), (basis, "values"), (proj, "basis")):
        for again in (pickle.loads(pickle.dumps(obj)), copy.deepcopy(obj)):
            with pytest.raises(ValueError, match="read-only"):
                getattr(again, name)[...] = 0.0
