"""Tests of rqcore.gates: range, monotonicity, meaning of each gain, and the τ helpers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rqcore import gates
from rqcore.projection import default_gains

# Eigenvalues as the solvers produce them: mostly positive over many decades, a few rounding negatives.
eigenvalues = st.lists(
    st.one_of(
        st.floats(min_value=1e-8, max_value=1e8),
        st.floats(min_value=-1e-10, max_value=0.0),
        st.just(0.0),
    ),
    min_size=1,
    max_size=40,
)
taus = st.floats(min_value=1e-6, max_value=1e6)

GAIN_FUNCTIONS = {
    "ratio": lambda lam, t: gates.ratio(lam, t),
    "threshold": lambda lam, t: gates.threshold(lam, t),
    "sigmoid": lambda lam, t: gates.sigmoid(lam, t, temperature=0.3),
    "power": lambda lam, t: gates.power(lam, alpha=min(t, 50.0)),
    "hard": lambda lam, t: gates.hard(lam, rank=len(lam) // 2),
    "default": lambda lam, t: default_gains(lam),
}


def _assert_monotone(lam: np.ndarray, g: np.ndarray) -> None:
    order = np.argsort(lam, kind="stable")
    lam_s, g_s = lam[order], g[order]
    strictly_larger = np.diff(lam_s) > 0
    # Where λ increases the gain must not decrease (up to one rounding of a division).
    assert np.all(np.diff(g_s)[strictly_larger] >= -4 * np.finfo(np.float64).eps)


@pytest.mark.parametrize("name", sorted(GAIN_FUNCTIONS))
@given(values=eigenvalues, tau=taus)
def test_gains_in_unit_interval_and_monotone(name: str, values: list[float], tau: float) -> None:
    lam = np.array(values)
    g = GAIN_FUNCTIONS[name](lam, tau)
    assert g.shape == lam.shape and g.dtype == np.float64
    assert np.all((g >= 0) & (g <= 1))
    _assert_monotone(lam, g)


def test_ratio_values_and_clipping() -> None:
    np.testing.assert_allclose(gates.ratio([3.0, 1.0, 0.0, -1.0], 1.0), [0.75, 0.5, 0.0, 0.0])


def test_hard_ties_broken_by_index() -> None:
    np.testing.assert_array_equal(gates.hard([2.0, 2.0, 2.0, 1.0], 2), [1, 1, 0, 0])
    np.testing.assert_array_equal(gates.hard([1.0, 2.0], 0), [0, 0])
    np.testing.assert_array_equal(gates.hard([1.0, 2.0], 2), [1, 1])


def test_threshold_inclusive() -> None:
    np.testing.assert_array_equal(gates.threshold([1.0, 0.999, 2.0], 1.0), [1, 0, 1])


def test_sigmoid_temperature_one_is_ratio_and_small_temperature_is_threshold() -> None:
    lam = np.array([1e-3, 0.1, 0.5, 2.0, 30.0, -1e-12])
    np.testing.assert_allclose(
        gates.sigmoid(lam, 0.7), gates.ratio(lam, 0.7), rtol=1e-12, atol=1e-15
    )
    sharp = gates.sigmoid(lam, 0.7, temperature=1e-3)
    np.testing.assert_allclose(sharp, gates.threshold(lam, 0.7), atol=1e-12)


def test_power_normalized() -> None:
    g = gates.power([4.0, 1.0, 0.0], alpha=2.0)
    np.testing.assert_allclose(g, [1.0, 1 / 16, 0.0])
    np.testing.assert_array_equal(gates.power([0.0, -1.0], alpha=1.0), [0.0, 0.0])
    np.testing.assert_array_equal(gates.power([3.0, 1.0], alpha=0.0), [1.0, 1.0])


@pytest.mark.parametrize(
    ("call", "exc"),
    [
        (lambda: gates.ratio([1.0], 0.0), ValueError),
        (lambda: gates.ratio([1.0], -1.0), ValueError),
        (lambda: gates.ratio([1.0], float("nan")), ValueError),
        (lambda: gates.ratio([np.nan], 1.0), ValueError),
        (lambda: gates.ratio(np.ones((2, 2)), 1.0), ValueError),
        (lambda: gates.ratio(np.array([1, 2]), 1.0), TypeError),
        (lambda: gates.hard([1.0, 2.0], 3), ValueError),
        (lambda: gates.hard([1.0, 2.0], -1), ValueError),
        (lambda: gates.hard([1.0, 2.0], 1.5), TypeError),  # type: ignore[arg-type]
        (lambda: gates.threshold([1.0], float("inf")), ValueError),
        (lambda: gates.sigmoid([1.0], 1.0, temperature=0.0), ValueError),
        (lambda: gates.power([1.0], alpha=-1.0), ValueError),
    ],
)
def test_invalid_arguments(call, exc) -> None:
    with pytest.raises(exc):
        call()


@given(
    values=st.lists(st.floats(min_value=1e-6, max_value=1e6), min_size=1, max_size=30),
    p=st.floats(min_value=0.01, max_value=0.99),
)
def test_tau_for_utility_fraction_hits_target(values: list[float], p: float) -> None:
    lam = np.array(values)
    tau = gates.tau_for_utility_fraction(lam, p)
    kept = float(lam @ gates.ratio(lam, tau) / lam.sum())
    assert kept >= p - 1e-12  # met, never missed
    assert kept == pytest.approx(p, rel=1e-9, abs=1e-12)


def test_tau_for_utility_fraction_is_monotone_and_scales() -> None:
    lam = np.array([5.0, 3.0, 1.0, 0.2, 0.0, -1e-12])
    taus = [gates.tau_for_utility_fraction(lam, p) for p in (0.2, 0.5, 0.8)]
    assert taus[0] > taus[1] > taus[2]  # keeping more needs a smaller τ
    assert gates.tau_for_utility_fraction(1e3 * lam, 0.5) == pytest.approx(1e3 * taus[1], rel=1e-10)


@given(
    values=st.lists(st.floats(min_value=1e-6, max_value=1e6), min_size=1, max_size=20),
    q=st.floats(min_value=0.01, max_value=0.99),
    seed=st.integers(0, 2**16),
)
def test_tau_for_penalty_budget_hits_target(values: list[float], q: float, seed: int) -> None:
    lam = np.array(values)
    c = np.random.default_rng(seed).standard_normal((3, lam.size)) + 0.1
    tau = gates.tau_for_penalty_budget(lam, c, q)
    g = gates.ratio(lam, tau)
    spent = float(np.sum(g**2 * c**2) / np.sum(c**2))
    assert spent <= q + 1e-12  # respected, never exceeded
    assert spent == pytest.approx(q, rel=1e-9, abs=1e-12)


def test_tau_helpers_reject_invalid_targets() -> None:
    lam = np.array([2.0, 1.0, 0.0])
    for p in (0.0, 1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            gates.tau_for_utility_fraction(lam, p)
        with pytest.raises(ValueError):
            gates.tau_for_penalty_budget(lam, [1.0, 1.0, 1.0], p)
    with pytest.raises(ValueError, match="positive"):
        gates.tau_for_utility_fraction([0.0, -1.0], 0.5)
    with pytest.raises(ValueError, match="zero"):
        gates.tau_for_penalty_budget(lam, [0.0, 0.0, 0.0], 0.5)
    with pytest.raises(ValueError, match="cannot bind"):  # half the penalty sits on λ = 0
        gates.tau_for_penalty_budget(lam, [1.0, 0.0, 1.0], 0.6)
    with pytest.raises(ValueError, match="shape"):
        gates.tau_for_penalty_budget(lam, [1.0, 1.0], 0.5)


def test_default_gains_median_tau() -> None:
    np.testing.assert_allclose(default_gains([4.0, 2.0, 1.0]), [2 / 3, 1 / 2, 1 / 3])
    # Median 0 (most λ vanish): τ falls back to the mean of the positive ones.
    np.testing.assert_allclose(default_gains([3.0, 0.0, 0.0]), [0.5, 0.0, 0.0])
    np.testing.assert_array_equal(default_gains([0.0, -1e-15]), [0.0, 0.0])
    # Scale-free.
    np.testing.assert_allclose(default_gains([4e6, 2e6, 1e6]), default_gains([4.0, 2.0, 1.0]))


# --- session 12: defects found by a black-box review -------------------------------------------


@pytest.mark.parametrize("scale", [1e-300, 1e-150, 1.0, 1e150, 1e200])
def test_tau_for_utility_fraction_at_extreme_scales(scale):
    lam = np.array([1.0, 1e-2, 3e-4]) * scale
    tau = gates.tau_for_utility_fraction(lam, 0.5)
    assert tau > 0
    g = gates.ratio(lam, tau)
    kept = float(np.sum((lam / lam.max()) * g) / np.sum(lam / lam.max()))
    assert 0.5 <= kept <= 0.5 + 1e-9
    np.testing.assert_allclose(tau / scale, gates.tau_for_utility_fraction(lam / scale, 0.5))


def test_tau_for_penalty_budget_with_huge_coordinates():
    tau = gates.tau_for_penalty_budget([1.0, 2.0], [1e200, 1.0], 0.25)
    assert np.isfinite(tau)
    np.testing.assert_allclose(tau, 1.0, rtol=1e-9)  # g₁ = 1/(1 + τ) = 1/2


def test_ratio_monotone_near_overflow():
    g = gates.ratio([1.0, 1.7e308], 1e308)
    assert np.all(np.diff(g) >= 0) and g[1] == pytest.approx(1.7 / 2.7)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: gates.threshold([1.0], None), "tau must be a real number"),
        (lambda: gates.threshold([1.0], "a"), "tau must be a real number"),
        (lambda: gates.tau_for_utility_fraction([1.0], "0.5"), "p must be a real number"),
        (lambda: gates.tau_for_penalty_budget([1.0], [1.0], "q"), "q must be a real number"),
    ],
)
def test_non_numeric_parameters_raise_type_errors(call, match):
    with pytest.raises(TypeError, match=match):
        call()


def test_hard_breaks_ties_by_index_for_long_inputs():
    # NumPy's default sort is stable only for short arrays: ties must go to the lowest indices.
    lam = np.random.default_rng(0).permutation(np.r_[np.full(50, 1.0), np.full(50, 2.0)])
    g = gates.hard(lam, 60)
    assert np.all(g[lam == 2.0] == 1.0)
    ones = np.flatnonzero(lam == 1.0)
    np.testing.assert_array_equal(g[ones], np.r_[np.ones(10), np.zeros(40)])
