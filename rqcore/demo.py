"""End-to-end run of rqcore's core on synthetic activations (``make demo`` / ``python -m rqcore.demo``).

It plays one linear layer of a finetuning run without a model: two streams of activations — a
pretraining proxy and a downstream task whose dominant input directions partly overlap the proxy's —
are accumulated in chunks by :class:`~rqcore.StreamingCovariance`; the pencil ``(C_t, C_p + εI)`` is
solved by :func:`~rqcore.generalized_topk` and checked against LAPACK; a random update is then gated
in the spectral coordinates and its forgetting penalty and task utility are printed before and after.
A warm-started re-solve after the task covariance drifts shows what a training loop pays per refresh.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator, Sequence

import numpy as np
import scipy.linalg

import rqcore
from rqcore import gates


def _power_law_stream(
    rng: np.random.Generator, basis: np.ndarray, exponent: float, rows: int, chunk: int
) -> Iterator[np.ndarray]:
    """Yield float32 chunks of rows whose covariance has eigenvalues j^(-exponent) along ``basis``."""
    d = basis.shape[0]
    scales = np.arange(1, d + 1, dtype=np.float64) ** (-exponent / 2)
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        yield ((rng.standard_normal((n, d)) * scales) @ basis.T).astype(np.float32)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m rqcore.demo", description=__doc__)
    parser.add_argument("--dim", type=int, default=768, help="layer input dimension d")
    parser.add_argument("--rows", type=int, default=40_000, help="activation rows per stream")
    parser.add_argument("--k", type=int, default=32, help="eigenpairs to compute")
    parser.add_argument("--reg", type=float, default=1e-3, help="relative regularization of C_p")
    parser.add_argument(
        "--tau", type=float, default=None, help="gain threshold (default: median λ)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    d = args.dim

    # The task's leading directions: half are the proxy's own leading directions, half are new.
    proxy_basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    mixing = np.linalg.qr(rng.standard_normal((d, d)))[0]
    task_basis = proxy_basis.copy()
    task_basis[:, d // 8 :] = proxy_basis @ mixing[:, d // 8 :]
    task_basis = np.linalg.qr(task_basis)[0]

    print(f"rqcore {rqcore.__version__} demo: one layer, d={d}, {args.rows} rows per stream")
    covariances = {}
    for name, directions, exponent in (("proxy", proxy_basis, 1.2), ("task", task_basis, 1.0)):
        acc = rqcore.StreamingCovariance(d)
        start = time.perf_counter()
        for chunk in _power_law_stream(rng, directions, exponent, args.rows, 4096):
            acc.update(chunk)
        elapsed = time.perf_counter() - start
        covariances[name] = acc.covariance()
        print(
            f"  {name:5s} covariance: {acc.count} rows (float32 chunks, float64 totals) "
            f"in {elapsed:.2f} s, trace {np.trace(covariances[name]):.4f}"
        )
    C_p, C_t = covariances["proxy"], covariances["task"]

    pencil = rqcore.Pencil(C_p, reg=args.reg)
    start = time.perf_counter()
    result = rqcore.generalized_topk(C_t, pencil, args.k)
    cold = time.perf_counter() - start
    reference = scipy.linalg.eigh(
        C_t,
        C_p + pencil.reg_used * np.eye(d),
        eigvals_only=True,
        subset_by_index=(d - args.k, d - 1),
    )[::-1]
    error = float(np.max(np.abs(result.values - reference)) / reference[0])
    orth = float(np.max(np.abs(result.vectors.T @ pencil.matvec(result.vectors) - np.eye(args.k))))
    print(f"\nTop-{args.k} of C_t v = λ (C_p + εI) v, ε = {pencil.reg_used:.3g}: {result!r}")
    print(
        f"  solve time {cold:.3f} s; max |λ - LAPACK| / λ_max = {error:.1e}; ‖VᵀMV - I‖ = {orth:.1e}"
    )
    print("  j   λ_j (utility per unit penalty)   residual")
    for j in range(min(args.k, 8)):
        print(f"  {j:<3d} {result.values[j]:>12.4f}                     {result.residuals[j]:.1e}")

    tau = float(np.median(result.values)) if args.tau is None else args.tau
    basis = rqcore.RayleighBasis.from_result(result, A=C_t)
    update = rng.standard_normal((64, d))
    gated = basis.gate(update, gates.ratio(basis.values, tau), complement=0.0)
    before, after = basis.penalty(update), basis.penalty(gated)
    useful_before, useful_after = basis.utility(update), basis.utility(gated)
    print(f"\nGating a random 64×{d} update with ratio gains λ/(λ+τ), τ = {tau:.3g}, complement 0:")
    print(f"  forgetting penalty tr(ΔW C_p ΔWᵀ): {before.total:.4g} -> {after.total:.4g}")
    print(
        f"  task utility       tr(ΔW C_t ΔWᵀ): {useful_before.total:.4g} -> {useful_after.total:.4g}"
    )
    print(
        f"  utility per unit penalty: {useful_before.total / before.total:.3g} -> "
        f"{useful_after.total / after.total:.3g}"
    )

    drift = rng.standard_normal((2048, d)) @ task_basis.T
    E = drift.T @ drift / 2048
    E *= 0.01 * np.linalg.norm(C_t) / np.linalg.norm(E)
    start = time.perf_counter()
    warm = rqcore.generalized_topk(C_t + E, pencil, args.k, v0=result.vectors)
    elapsed = time.perf_counter() - start
    print(
        f"\nRe-solve after a 1% drift of C_t, warm-started, C_p's factor reused: {elapsed:.3f} s "
        f"({warm.method}, {warm.iterations} iterations, max residual {warm.residuals.max():.1e})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
