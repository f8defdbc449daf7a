"""asv benchmarks of rqcore.generalized_topk (cold and warm-started) on power-law pencils."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_eigen import REG, TOL, perturbed, power_law_pencil

from rqcore import Pencil, generalized_topk


class GeneralizedTopK:
    """Cold solves (Cholesky of B included) for each method."""

    params: ClassVar[Any] = (
        [512, 2048],
        [8, 32, 128],
        ["auto", "dense", "lanczos", "lobpcg"],
    )
    param_names: ClassVar[list[str]] = ["d", "k", "method"]
    timeout = 300

    def setup(self, d: int, k: int, method: str) -> None:
        self.A, self.B = power_law_pencil(d)
        generalized_topk(*power_law_pencil(128), 4, reg=REG, method="lanczos")  # warm numba

    def time_cold(self, d: int, k: int, method: str) -> None:
        generalized_topk(self.A, self.B, k, reg=REG, tol=TOL, method=method, seed=0)


class GeneralizedTopKWarm:
    """Re-solve after A + E (‖E‖_F = 1%‖A‖_F) from the previous vectors, pencil reused."""

    params: ClassVar[Any] = ((512, 2048), (8, 32, 128))
    param_names: ClassVar[list[str]] = ["d", "k"]
    timeout = 300

    def setup(self, d: int, k: int) -> None:
        A, B = power_law_pencil(d)
        self.P = Pencil(B, reg=REG)
        self.previous: Any = generalized_topk(A, self.P, k, tol=TOL, seed=0)
        self.v0: Any = self.previous.vectors
        self.A2 = perturbed(A, d, seed=d + k)

    def time_warm(self, d: int, k: int) -> None:
        generalized_topk(self.A2, self.P, k, v0=self.v0, tol=TOL, seed=0)

    def time_warm_from_result(self, d: int, k: int) -> None:
        # v0 = the previous result (reuses its reduced coordinates); fails on commits before it.
        generalized_topk(self.A2, self.P, k, v0=self.previous, tol=TOL, seed=0)


class GeneralizedTopKWarmChain:
    """A training loop's re-solve: the second of two warm re-solves (A + E, then + E'), each from
    the result before it (so from a warm result, with its guard pairs where the path keeps them)."""

    params: ClassVar[Any] = ((2048,), (8, 32, 128))
    param_names: ClassVar[list[str]] = ["d", "k"]
    timeout = 300

    def setup(self, d: int, k: int) -> None:
        A, B = power_law_pencil(d)
        self.P = Pencil(B, reg=REG)
        cold = generalized_topk(A, self.P, k, tol=TOL, seed=0)
        A2 = perturbed(A, d, seed=d + k)
        self.previous: Any = generalized_topk(A2, self.P, k, v0=cold, tol=TOL, seed=0)
        self.A3 = perturbed(A2, d, seed=d + k + 1)

    def time_second_warm(self, d: int, k: int) -> None:
        generalized_topk(self.A3, self.P, k, v0=self.previous, tol=TOL, seed=0)


class GeneralizedTopKThreads:
    """Cold and warm block solves with 1 and 2 BLAS threads (the drivers' own calls stay on one)."""

    params: ClassVar[Any] = ((1, 2),)
    param_names: ClassVar[list[str]] = ["threads"]
    timeout = 300

    def setup(self, threads: int) -> None:
        d, self.k = 2048, 32
        self.A, B = power_law_pencil(d)
        self.P = Pencil(B, reg=REG)
        self.v0: Any = generalized_topk(self.A, self.P, self.k, tol=TOL, seed=0).vectors
        self.A2 = perturbed(self.A, d, seed=d + self.k)

    def time_cold(self, threads: int) -> None:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(threads, user_api="blas"):
            generalized_topk(self.A, self.P, self.k, tol=TOL, seed=0)

    def time_warm(self, threads: int) -> None:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(threads, user_api="blas"):
            generalized_topk(self.A2, self.P, self.k, v0=self.v0, tol=TOL, seed=0)


class PencilOperator:
    """``Pencil``'s reduced operator ``L⁻¹AL⁻ᵀ`` on one vector (what a hand-built ``eigsh`` operator
    calls per product) and on blocks of 2, 16 and 128 columns; the one-vector case tracks the
    ``trsv`` path (``trsm`` on one column was 2-4× slower and went unnoticed for a session)."""

    params: ClassVar[Any] = ((512, 4096), (1, 2, 16, 128))
    param_names: ClassVar[list[str]] = ["d", "columns"]

    def setup(self, d: int, columns: int) -> None:
        self.A, B = power_law_pencil(d)
        self.P = Pencil(B, reg=REG)
        rng = np.random.default_rng(0)
        self.X = rng.standard_normal(d) if columns == 1 else rng.standard_normal((d, columns))

    def time_apply_reduced(self, d: int, columns: int) -> None:
        self.P.apply_reduced(self.A, self.X)

    def time_solve_upper(self, d: int, columns: int) -> None:
        self.P.solve_upper(self.X)


class Kernels:
    """The numba bookkeeping kernels on a (4096, 128) block; the symmetry/finiteness/norm pass over a
    4096 × 4096 matrix on one and two threads."""

    def setup(self) -> None:
        rng = np.random.default_rng(0)
        self.X = rng.standard_normal((4096, 128))
        G = rng.standard_normal((4096, 4096))
        self.S = G + G.T
        from rqcore._eigen_kernels import asymmetry_and_norm

        self.asymmetry_and_norm = asymmetry_and_norm
        asymmetry_and_norm(self.S[:64, :64])
        self.lam = rng.standard_normal(128)
        from rqcore._eigen_kernels import column_norms, pair_residual_norms

        self.column_norms = column_norms
        self.pair_residual_norms = pair_residual_norms
        column_norms(self.X)
        pair_residual_norms(self.X, self.X, self.lam)

    def time_column_norms(self) -> None:
        self.column_norms(self.X)

    def time_pair_residual_norms(self) -> None:
        self.pair_residual_norms(self.X, self.X, self.lam)

    def time_symmetry_check_1_thread(self) -> None:
        self.asymmetry_and_norm(self.S, threads=1)

    def time_symmetry_check_2_threads(self) -> None:
        self.asymmetry_and_norm(self.S, threads=2)


class SymmetryCheck:
    """The symmetry/finiteness/norm pass at the sizes of the single-vector path, on one thread: a
    C-ordered matrix up to 2 MiB takes the row-order kernel, an F-ordered one (``Pencil``'s copy of
    ``B``) the tiled one."""

    params: ClassVar[Any] = ((512, 1024), ("C", "F"))
    param_names: ClassVar[list[str]] = ["d", "order"]

    def setup(self, d: int, order: str) -> None:
        from rqcore._eigen_kernels import asymmetry_and_norm

        G = np.random.default_rng(0).standard_normal((d, d))
        self.S = np.array(G + G.T, order=order)
        self.asymmetry_and_norm = asymmetry_and_norm
        asymmetry_and_norm(np.array(self.S[:64, :64], order=order))  # compile outside the timing

    def time_symmetry_check(self, d: int, order: str) -> None:
        self.asymmetry_and_norm(self.S, threads=1)


class SubsetEigh:
    """The dense path's eigensolver on a reduced matrix ``L⁻¹AL⁻ᵀ``: rqcore's ``sytrd`` + ``stemr``
    against SciPy's ``syevr`` subset driver (bisection and inverse iteration for a subset)."""

    params: ClassVar[Any] = ((512, 1024), (32, 128))
    param_names: ClassVar[list[str]] = ["n", "p"]

    def setup(self, n: int, p: int) -> None:
        A, B = power_law_pencil(n)
        C = Pencil(B, reg=REG).reduce(A)
        self.C = np.tril(C) + np.tril(C, -1).T

    def time_rqcore(self, n: int, p: int) -> None:
        from rqcore._subset_eigh import subset_eigh

        subset_eigh(self.C, p, True)

    def time_scipy_evr(self, n: int, p: int) -> None:
        import scipy.linalg

        scipy.linalg.eigh(self.C, subset_by_index=(n - p, n - 1), driver="evr", check_finite=False)
