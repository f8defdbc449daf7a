"""Side by side: rqcore's dense subset eigensolver against SciPy's drivers, interleaved in one process.

The matrices are the reduced matrices ``C = L⁻¹AL⁻ᵀ`` of the power-law pencils of
``compare_eigen.py`` (what ``generalized_topk(method="dense")`` hands to the eigensolver), and ``p``
eigenpairs at the top are wanted. Candidates:

* ``rqcore sytrd+stemr`` — :func:`rqcore._subset_eigh.subset_eigh` (blocked ``sytrd``, ``stemr`` on the
  index range, back-transformation by ``ormqr``);
* ``scipy evr`` / ``scipy evx`` — ``scipy.linalg.eigh(C, subset_by_index=…, driver=…)`` (``syevr`` and
  ``syevx``, which for a subset both run bisection and inverse iteration);
* ``scipy evd (all)`` — all pairs by divide and conquer, the top ``p`` kept.

Prints medians and the ratio to the fastest SciPy driver; checks that every candidate's eigenvalues
agree with ``evd`` to ``1e-12`` relative to the largest.

Run: ``OMP_NUM_THREADS=1 python benchmarks/compare_subset_eigh.py [--sizes …] [--ps …]``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import interleaved_medians
from compare_eigen import REG, power_law_pencil

from rqcore import Pencil
from rqcore._subset_eigh import subset_eigh


def candidates(C: Any, p: int) -> dict[str, Callable[[], tuple[Any, Any]]]:
    n = C.shape[0]
    index = (n - p, n - 1)

    def scipy_driver(driver: str) -> Callable[[], tuple[Any, Any]]:
        def run() -> tuple[Any, Any]:
            w, V = scipy.linalg.eigh(C, subset_by_index=index, driver=driver, check_finite=False)
            return w[::-1], V[:, ::-1]

        return run

    def evd() -> tuple[Any, Any]:
        w, V = scipy.linalg.eigh(C, driver="evd", check_finite=False)
        return w[: n - p - 1 : -1], V[:, : n - p - 1 : -1]

    return {
        "rqcore sytrd+stemr": lambda: subset_eigh(C, p, True),
        "scipy evr": scipy_driver("evr"),
        "scipy evx": scipy_driver("evx"),
        "scipy evd (all)": evd,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--ps", type=int, nargs="+", default=[32, 128, 256])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="a few seconds: n = 256, p = 32")
    args = ap.parse_args(argv)
    sizes, ps, repeat = ([256], [32], 3) if args.quick else (args.sizes, args.ps, args.repeat)
    print(f"BLAS threads: {args.threads}; medians of {repeat} interleaved runs, milliseconds")
    header = f"{'n':>5} {'p':>4} | " + " | ".join(
        f"{name:>18}" for name in candidates(np.eye(2), 1)
    )
    print(header + " | rqcore / fastest SciPy")
    with threadpool_limits(args.threads):
        for n in sizes:
            A, B = power_law_pencil(n)
            C = Pencil(B, reg=REG).reduce(A)
            C = np.tril(C) + np.tril(C, -1).T  # whole matrix, for any driver's triangle
            for p in ps:
                if p > n:
                    continue
                fns = candidates(C, p)
                reference = fns["scipy evd (all)"]()[0]
                for name, fn in fns.items():
                    values = fn()[0]
                    error = float(np.max(np.abs(values - reference)) / abs(reference[0]))
                    if error > 1e-12:
                        raise AssertionError(
                            f"{name} at n={n}, p={p}: eigenvalue error {error:.1e}"
                        )
                t = interleaved_medians(fns, repeat)
                fastest = min(v for name, v in t.items() if name.startswith("scipy"))
                cells = " | ".join(f"{t[name] * 1e3:18.2f}" for name in fns)
                print(f"{n:5d} {p:4d} | {cells} | {t['rqcore sytrd+stemr'] / fastest:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
