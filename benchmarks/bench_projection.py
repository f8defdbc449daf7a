"""asv benchmarks of rqcore.projection and rqcore.gates: ``gate``, ``coordinates``, null space, gains.

``setup`` builds the data and runs each method once, so numba compilation and the per-dtype casts of
the basis are not timed. BLAS runs on one thread for stable numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from rqcore import NullspaceProjector, RayleighBasis, gates

_SHAPES = [(1024, 1024, 32), (4096, 4096, 64)]  # (n, d, k)
_DTYPES = ["float32", "float64"]


def _basis(d: int, k: int, dtype: np.dtype[Any]) -> RayleighBasis:
    """A valid M-orthonormal basis without an O(d³) solve: M diagonal, V = M^{-1/2} Q."""
    rng = np.random.default_rng(0)
    m = rng.uniform(0.5, 2.0, d)
    Q, _ = np.linalg.qr(rng.standard_normal((d, k)))
    V = (Q / np.sqrt(m)[:, None]).astype(dtype)
    values = np.sort(rng.uniform(0.0, 10.0, k))[::-1]
    return RayleighBasis(values, V, dual=(m[:, None] * V).astype(dtype), cp_known=False)


class _Base:
    params = (_SHAPES, _DTYPES)
    param_names = ("n_d_k", "dtype")
    timeout = 240

    def setup(self, shape: tuple[int, int, int], dtype: str) -> None:
        n, d, k = shape
        dt = np.dtype(dtype)
        self._limits = threadpool_limits(limits=1)
        rng = np.random.default_rng(1)
        self.G = rng.standard_normal((n, d)).astype(dt)
        self.out = np.empty_like(self.G)
        self.basis = _basis(d, k, dt)
        self.gains = np.linspace(1.0, 0.1, k)
        U = np.linalg.qr(rng.standard_normal((d, k)))[0].astype(dt)
        self.projector = NullspaceProjector.from_state_dict(
            {"kind": "NullspaceProjector", "values": np.ones(d), "basis": U, "energy": 0.99}
        )
        # Warm-up: numba compilation, per-dtype casts, BLAS buffers.
        self.basis.gate(self.G, self.gains, complement=0.5, out=self.out)
        self.basis.coordinates(self.G)
        self.projector.apply(self.G, out=self.out)

    def teardown(self, shape: tuple[int, int, int], dtype: str) -> None:
        self._limits.restore_original_limits()


class TimeGate(_Base):
    """``gate`` with a non-zero complement gain (the costlier case), allocating and with ``out=``."""

    def time_gate(self, shape: tuple[int, int, int], dtype: str) -> None:
        self.basis.gate(self.G, self.gains, complement=0.5)

    def time_gate_out(self, shape: tuple[int, int, int], dtype: str) -> None:
        self.basis.gate(self.G, self.gains, complement=0.5, out=self.out)

    def time_numpy_reference(self, shape: tuple[int, int, int], dtype: str) -> None:
        (self.G @ self.basis.MV) @ self.basis.vectors.T


class TimeCoordinates(_Base):
    """``coordinates`` (one GEMM, G·MV)."""

    def time_coordinates(self, shape: tuple[int, int, int], dtype: str) -> None:
        self.basis.coordinates(self.G)


class TimeNullspaceApply(_Base):
    """``NullspaceProjector.apply`` (G − (G·U)·Uᵀ)."""

    def time_apply(self, shape: tuple[int, int, int], dtype: str) -> None:
        self.projector.apply(self.G)

    def time_apply_out(self, shape: tuple[int, int, int], dtype: str) -> None:
        self.projector.apply(self.G, out=self.out)


class TimeGains:
    """Gain functions and the choice of τ on a power-law spectrum (what a refresh computes per layer)."""

    params = ([1024, 4096],)
    param_names = ("d",)

    def setup(self, d: int) -> None:
        rng = np.random.default_rng(2)
        self.values = np.sort(np.arange(1, d + 1) ** -1.0 * rng.uniform(0.5, 2.0, d))[::-1]
        self.coords = rng.standard_normal(d)
        self.tau = float(np.median(self.values))

    def time_ratio(self, d: int) -> None:
        gates.ratio(self.values, tau=self.tau)

    def time_sigmoid(self, d: int) -> None:
        gates.sigmoid(self.values, tau=self.tau, temperature=0.5)

    def time_tau_for_utility_fraction(self, d: int) -> None:
        gates.tau_for_utility_fraction(self.values, 0.3)

    def time_tau_for_penalty_budget(self, d: int) -> None:
        gates.tau_for_penalty_budget(self.values, self.coords, 0.25)
