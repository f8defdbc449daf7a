"""Overhead of the calibration pass against a plain forward plus a bare ``syrk`` of the activations.

Run ``python benchmarks/compare_calibration.py`` (MiniLM-sized BERT: hidden 384, 6 layers, 12 heads,
intermediate 1536; batch 32x128 tokens; about a minute) or ``--quick`` (a tiny BERT; a few seconds; used
by the test suite). Torch runs on ``--threads`` threads (default 1). Candidates are timed interleaved in one
process and medians compared, since the machine may be shared.

Goal: ``calibrate(token_fraction=1) <= 1.15 x (forward + a bare BLAS ssyrk of each distinct layer
input)``; torch's own ``X.T @ X`` is shown too (it is a general product: twice the flops of ``syrk``).
The statistics' memory is measured with ``tracemalloc`` (memory still held after the pass) and compared
with the formula ``Σ_groups 8·(D² + 2D) + 32`` bytes of totals (``D = d_in + 1`` for a layer with a
bias) plus the ``4·D²``-byte float32 product buffer each CPU accumulator keeps between updates.
"""

from __future__ import annotations

import argparse
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.linalg import blas
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from benchmarks._timing import interleaved_medians
from rqcore_torch import calibrate
from rqcore_torch.targets import resolve_targets


def run(quick: bool, threads: int, repeats: int) -> dict[str, Any]:
    from transformers import BertConfig, BertModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if quick:
        cfg = BertConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            vocab_size=100,
        )
        B, T = 4, 32
    else:
        cfg = BertConfig(
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=12,
            intermediate_size=1536,
            vocab_size=1000,
        )
        B, T = 32, 128
    model = BertModel(cfg).eval()
    batch = {"input_ids": torch.randint(0, cfg.vocab_size, (B, T))}
    targets = resolve_targets(model)

    def forward() -> None:
        with torch.no_grad():
            model(**batch)

    def forward_with(product: Callable[[torch.Tensor], Any]) -> Callable[[], None]:
        def run_once() -> None:
            seen: dict[int, torch.Tensor] = {}  # holding x keeps its id from being reused

            def hook(module: Any, args: tuple[Any, ...]) -> None:
                x = args[0]
                if id(x) in seen:  # q/k/v share one product, as in calibrate
                    return
                seen[id(x)] = x
                product(x.reshape(-1, x.shape[-1]).float())

            hs = [t.hook_module.register_forward_pre_hook(hook) for t in targets]
            try:
                forward()
            finally:
                for h in hs:
                    h.remove()

        return run_once

    def bare_syrk(X: torch.Tensor) -> None:
        blas.ssyrk(1.0, np.asarray(X.numpy()).T, trans=0)

    def torch_gram(X: torch.Tensor) -> None:
        X.T @ X

    fns = {
        "forward": forward,
        "forward + syrk": forward_with(bare_syrk),
        "forward + X.T@X": forward_with(torch_gram),
        "calibrate (tf=1.0)": lambda: calibrate(model, [batch], targets=targets, progress=False),
        "calibrate (tf=0.25)": lambda: calibrate(
            model, [batch], targets=targets, progress=False, token_fraction=0.25, seed=0
        ),
    }
    med = interleaved_medians(fns, repeats)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    stats = calibrate(model, [batch], targets=targets, progress=False)
    measured = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    buffers = sum(4 * acc.dim * acc.dim for acc in stats.groups.values())
    return {
        "config": f"hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, batch {B}x{T}",
        "threads": threads,
        "medians": med,
        "ratio": med["calibrate (tf=1.0)"] / med["forward + syrk"],
        "ratio_tf025": med["calibrate (tf=0.25)"] / med["forward + syrk"],
        "memory": measured,
        "formula": stats.nbytes() + buffers,
        "groups": len(stats.groups),
        "layers": len(stats.layers),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    # BLAS (used by the statistics and by the syrk baseline) gets the same thread count as torch.
    with threadpool_limits(args.threads):
        out = run(args.quick, args.threads, args.repeats or (3 if args.quick else 7))
    print(f"{out['config']}; torch threads = {out['threads']}")
    print(f"{'candidate':<22} {'median s':>10} {'vs forward+syrk':>18}")
    base = out["medians"]["forward + syrk"]
    for name, t in out["medians"].items():
        print(f"{name:<22} {t:>10.4f} {t / base:>17.3f}x")
    print(
        f"goal: calibrate(tf=1.0) <= 1.15x -> {out['ratio']:.3f}x "
        f"({'met' if out['ratio'] <= 1.15 else 'NOT met'})"
    )
    print(
        f"statistics memory: {out['memory']} B measured (tracemalloc), {out['formula']} B by "
        "formula (totals + float32 product buffers) "
        f"({out['groups']} accumulators for {out['layers']} layers)"
    )
    return out


if __name__ == "__main__":
    main()
