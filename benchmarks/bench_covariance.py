"""asv benchmarks of rqcore.StreamingCovariance (data and Numba compilation in ``setup``)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from scipy.linalg import blas

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - threadpoolctl is a bench dependency
    threadpool_limits = None

from rqcore import StreamingCovariance

N_ROWS = 4096


class _OneThread:
    """Pin BLAS to one thread so that the numbers are per-core and comparable across machines."""

    def _pin(self) -> None:
        self._limiter = threadpool_limits(limits=1) if threadpool_limits is not None else None

    def teardown(self, *args: Any) -> None:
        if getattr(self, "_limiter", None) is not None:
            self._limiter.unregister()


class TimeUpdate(_OneThread):
    """One ``update`` of n = 4096 rows, against the bare ``?syrk`` it wraps."""

    params: ClassVar[Any] = (
        [256, 1024, 2048],
        ["float64", "float32"],
        [False, True],
        [False, True],
    )
    param_names: ClassVar[list[str]] = ["dim", "dtype", "centered", "weighted"]
    timeout = 300

    def setup(self, dim: int, dtype: str, centered: bool, weighted: bool) -> None:
        self._pin()
        rng = np.random.default_rng(0)
        self.X = rng.standard_normal((N_ROWS, dim)).astype(dtype)
        self.w = rng.uniform(0.5, 2.0, N_ROWS) if weighted else None
        self.acc = StreamingCovariance(dim, centered=centered)
        self.acc.update(self.X, self.w)  # compiles the kernels and allocates the buffers
        self.c = np.zeros((dim, dim), dtype=dtype, order="F")
        self.syrk = blas.dsyrk if dtype == "float64" else blas.ssyrk

    def time_update(self, dim: int, dtype: str, centered: bool, weighted: bool) -> None:
        self.acc.update(self.X, self.w)

    def time_bare_syrk(self, dim: int, dtype: str, centered: bool, weighted: bool) -> None:
        self.syrk(1.0, self.X.T, beta=1.0, c=self.c, trans=0, overwrite_c=1)


class TimeEstimates(_OneThread):
    """Reading the estimate (symmetrize + shrinkage) and merging two accumulators."""

    params: ClassVar[Any] = ([256, 1024], [None, "ledoit-wolf", "oas"])
    param_names: ClassVar[list[str]] = ["dim", "shrinkage"]

    def setup(self, dim: int, shrinkage: str | None) -> None:
        self._pin()
        rng = np.random.default_rng(1)
        X = rng.standard_normal((2 * dim, dim))
        self.a = StreamingCovariance(dim, centered=True).update(X[:dim])
        self.b = StreamingCovariance(dim, centered=True).update(X[dim:])
        self.a.covariance(shrinkage=shrinkage)
        self.a.copy().merge(self.b)

    def time_covariance(self, dim: int, shrinkage: str | None) -> None:
        self.a.covariance(shrinkage=shrinkage)

    def time_merge(self, dim: int, shrinkage: str | None) -> None:
        self.a.merge(self.b)


class TrackFloat32Error:
    """Relative Frobenius error of float32 streaming against a float64 total (lower is better)."""

    params: ClassVar[list[int]] = [1024]
    param_names: ClassVar[list[str]] = ["dim"]
    unit = "relative error"

    def track_float32_error(self, dim: int) -> float:
        rng = np.random.default_rng(2)
        acc = StreamingCovariance(dim)
        exact = np.zeros((dim, dim), order="F")
        for _ in range(16):
            x = rng.standard_normal((N_ROWS, dim), dtype=np.float32)
            acc.update(x)
            blas.dsyrk(1.0, x.astype(np.float64).T, beta=1.0, c=exact, trans=0, overwrite_c=1)
        want = np.triu(exact) + np.triu(exact, 1).T
        got = acc.covariance() * acc.total_weight
        return float(np.linalg.norm(got - want) / np.linalg.norm(want))
