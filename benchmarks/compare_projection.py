"""Compare ``RayleighBasis.gate`` and ``NullspaceProjector.apply`` with the bare NumPy products.

Goal (the issue): ``gate`` on G of shape 4096×4096 with k = 64 runs within 1.3× of ``(G @ MV) @ V.T``
in the same dtype and memory layout. Candidates are timed interleaved in one process (round-robin, so
that load from other processes hits all of them alike) and the medians are compared.

Usage::

    python benchmarks/compare_projection.py            # the full 4096×4096 comparison
    python benchmarks/compare_projection.py --quick    # a <10 s smoke run (small sizes, not judged)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from benchmarks._timing import interleaved_medians
from rqcore import NullspaceProjector, RayleighBasis

GOAL = 1.3


def synthetic_basis(d: int, k: int, dtype: type, seed: int = 0) -> RayleighBasis:
    """A valid M-orthonormal top-k basis without an O(d³) solve: M diagonal, V = M^{-1/2} Q."""
    rng = np.random.default_rng(seed)
    m = rng.uniform(0.5, 2.0, d)
    Q, _ = np.linalg.qr(rng.standard_normal((d, k)))
    V: np.ndarray = (Q / np.sqrt(m)[:, None]).astype(dtype)
    values = np.sort(rng.uniform(0.0, 10.0, k))[::-1]
    return RayleighBasis(values, V, dual=(m[:, None] * V).astype(dtype), B=None, cp_known=False)


def _row(name: str, case: str, base: float, t: float, judged: bool | None) -> bool:
    """Print one table row; return whether it meets the goal (always True when not judged)."""
    ratio = t / base
    if judged is None:
        verdict = "(not judged)"
    elif judged:
        verdict = "PASS" if ratio <= GOAL else "FAIL"
    else:
        verdict = "(quick: not judged)"
    print(f"{name:8} {case:30} {base * 1e3:9.1f} {t * 1e3:10.1f} {ratio:6.2f}  {verdict}")
    return ratio <= GOAL or not judged


def run_dtype(dtype: type, n: int, d: int, k: int, reps: int, judged: bool) -> bool:
    """Time every candidate for one dtype, print its rows; return True if the judged rows pass."""
    rng = np.random.default_rng(1)
    basis = synthetic_basis(d, k, dtype)
    V, MV = basis.vectors, basis.MV
    G: np.ndarray = rng.standard_normal((n, d)).astype(dtype)
    buf = np.empty_like(G)
    work = G.copy()
    gains = np.linspace(1.0, 0.1, k)
    U: np.ndarray = np.ascontiguousarray(np.linalg.qr(rng.standard_normal((d, k)))[0].astype(dtype))
    P = NullspaceProjector.from_state_dict(
        {"kind": "NullspaceProjector", "values": np.ones(d), "basis": U, "energy": 0.99}
    )

    def inplace() -> object:
        np.copyto(work, G)  # restore G; the copy's own time is measured apart and subtracted
        return basis.gate(work, gains, complement=0.5, out=work)

    def copy_only() -> object:
        np.copyto(work, G)
        return work

    cands: dict[str, Callable[[], object]] = {
        "numpy": lambda: (G @ MV) @ V.T,
        "gate g⊥=0.5": lambda: basis.gate(G, gains, complement=0.5),
        "gate g⊥=0": lambda: basis.gate(G, gains, complement=0.0),
        "gate g⊥=0.5 out=buf": lambda: basis.gate(G, gains, complement=0.5, out=buf),
        "inplace+copy": inplace,
        "copy": copy_only,
        "numpy nullspace": lambda: G - (G @ U) @ U.T,
        "NullspaceProjector.apply": lambda: P.apply(G),
    }
    med = interleaved_medians(cands, reps)
    base = med["numpy"]
    name = np.dtype(dtype).name
    ok = True
    for case in ("gate g⊥=0.5", "gate g⊥=0", "gate g⊥=0.5 out=buf"):
        ok &= _row(name, case, base, med[case], judged)
    ok &= _row(
        name, "gate g⊥=0.5 out=G (in place)", base, med["inplace+copy"] - med["copy"], judged
    )
    _row(
        name,
        "NullspaceProjector.apply [a]",
        med["numpy nullspace"],
        med["NullspaceProjector.apply"],
        None,
    )
    return ok


def run(n: int, d: int, k: int, reps: int, judged: bool) -> bool:
    """Print the table; return True if every judged row passes."""
    print(f"G: {n}x{d}, k={k}, C order, medians of {reps} interleaved runs, goal <= {GOAL}x")
    header = f"{'dtype':8} {'case':30} {'numpy ms':>9} {'rqcore ms':>10} {'ratio':>6}  verdict"
    print(header)
    print("-" * len(header))
    ok = True
    for dtype in (np.float32, np.float64):
        ok &= run_dtype(dtype, n, d, k, reps, judged)
    print("numpy baseline: (G @ MV) @ V.T; [a] baseline G - (G @ U) @ U.T")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, a few seconds, not judged"
    )
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per candidate")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--k", type=int, default=64)
    args = parser.parse_args(argv)
    if args.quick:
        n, d, k, reps = 256, 256, 16, args.reps or 5
    else:
        n, d, k, reps = args.n, args.d, args.k, args.reps or 15
    with threadpool_limits(limits=args.threads):
        print(f"BLAS threads: {args.threads}")
        ok = run(n, d, k, reps, judged=not args.quick)
    print("overall:", "PASS" if ok else "FAIL")
    return 0 if ok or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
