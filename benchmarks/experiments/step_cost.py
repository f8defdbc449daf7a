"""Cost of a FoLoRAAdam step vs plain AdamW on a MiniLM-sized BERT stack, and how the gate scales.

Model: ``BertConfig(hidden_size=384, num_hidden_layers=6, intermediate_size=1536, num_attention_heads=12)``
(no pretrained weights needed). Every encoder ``Linear`` is gated (augmented with its bias, full basis by
default: the FoLoRA defaults); embeddings and LayerNorms go to ``other_params`` (plain AdamW). Bases are
random M-orthonormal stand-ins (the cost does not depend on their values). One thread.

Usage::

    python benchmarks/experiments/step_cost.py            # batch 8 × 128 tokens
    python benchmarks/experiments/step_cost.py --quick    # batch 2 × 64, fewer repeats
    python benchmarks/experiments/step_cost.py --batch 32 --seq 128
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from rqcore_torch.folora import FoLoRAAdam, SpectralLayer

torch.set_num_threads(1)


def _median_time(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _random_layer(name: str, lin: torch.nn.Linear, rank: int | None, seed: int) -> SpectralLayer:
    d = lin.in_features + 1
    k = d if rank is None else min(rank, d)
    g = torch.Generator().manual_seed(seed)
    V = torch.linalg.qr(torch.randn(d, k, generator=g))[0]
    return SpectralLayer(
        name, lin.weight, lin.bias, torch.rand(k, generator=g).sort(descending=True)[0], V, V
    )


def bert_step_cost(batch: int, seq: int, rank: int | None, repeats: int) -> dict[str, float]:
    """Median seconds of fwd+bwd+step for AdamW and FoLoRAAdam, and of the two optimizer steps alone."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        hidden_size=384,
        num_hidden_layers=6,
        intermediate_size=1536,
        num_attention_heads=12,
        vocab_size=30522,
    )
    torch.manual_seed(0)
    model = BertModel(cfg)
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    lins = [(n, m) for n, m in model.encoder.named_modules() if isinstance(m, torch.nn.Linear)]
    gated = {id(p) for _, m in lins for p in m.parameters()}
    others = [p for p in model.parameters() if id(p) not in gated]
    layers = [_random_layer(n, m, rank, i) for i, (n, m) in enumerate(lins)]
    opts = {
        "AdamW": torch.optim.AdamW(model.parameters(), lr=1e-6),
        "FoLoRAAdam": FoLoRAAdam(layers, others, lr=1e-6),
    }

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=False)
        model(ids).last_hidden_state.pow(2).mean().backward()

    out: dict[str, float] = {"fwd+bwd": _median_time(fwd_bwd, repeats)}
    for name, opt in opts.items():
        out[f"{name} step"] = _median_time(opt.step, repeats)
    for name in opts:
        out[f"{name} total"] = out["fwd+bwd"] + out[f"{name} step"]
    out["ratio"] = out["FoLoRAAdam total"] / out["AdamW total"]
    return out


def layer_step_cost(d_in: int, out: int, rank: int | None, repeats: int) -> tuple[float, float]:
    """Median seconds of one layer's FoLoRAAdam step and torch AdamW step."""
    lin = torch.nn.Linear(d_in, out)
    lin.weight.grad = torch.randn_like(lin.weight)
    lin.bias.grad = torch.randn_like(lin.bias)
    fo = FoLoRAAdam([_random_layer("l", lin, rank, 0)], lr=1e-6)
    ad = torch.optim.AdamW(lin.parameters(), lr=1e-6)
    return _median_time(fo.step, repeats), _median_time(ad.step, repeats)


def linear_fwd_bwd(d_in: int, out: int, tokens: int, repeats: int) -> float:
    lin = torch.nn.Linear(d_in, out)
    x = torch.randn(tokens, d_in, requires_grad=True)

    def f() -> None:
        lin.zero_grad()
        lin(x).sum().backward()

    return _median_time(f, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.batch, a.seq, a.repeats = 2, 64, 3
    tokens = a.batch * a.seq
    print(
        f"BERT 384/6/1536, batch {a.batch} × {a.seq} = {tokens} tokens, 1 thread, medians of {a.repeats}\n"
    )
    print(
        "| basis | fwd+bwd (ms) | AdamW step (ms) | FoLoRA step (ms) | AdamW total | FoLoRA total | ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for rank in (None, 64):
        r = bert_step_cost(a.batch, a.seq, rank, a.repeats)
        label = "full (k = d)" if rank is None else f"k = {rank}"
        print(
            f"| {label} | {1e3 * r['fwd+bwd']:.0f} | {1e3 * r['AdamW step']:.1f} | {1e3 * r['FoLoRAAdam step']:.1f} | "
            f"{1e3 * r['AdamW total']:.0f} | {1e3 * r['FoLoRAAdam total']:.0f} | {r['ratio']:.2f} |"
        )
    print(
        "\nOne layer (out = 384): optimizer step vs the layer's own fwd+bwd at a given token count\n"
    )
    print(
        "| d_in | rank | FoLoRA step (ms) | AdamW step (ms) | layer fwd+bwd, 1024 tok (ms) | 4096 tok (ms) |"
    )
    print("|---:|---|---:|---:|---:|---:|")
    for d_in in (384, 1536):
        fb1 = linear_fwd_bwd(d_in, 384, 1024, a.repeats)
        fb4 = linear_fwd_bwd(d_in, 384, 4096, a.repeats)
        for rank in (None, 256, 64):
            fo, ad = layer_step_cost(d_in, 384, rank, a.repeats)
            print(
                f"| {d_in} | {'full' if rank is None else rank} | {1e3 * fo:.2f} | {1e3 * ad:.2f} | "
                f"{1e3 * fb1:.1f} | {1e3 * fb4:.1f} |"
            )


if __name__ == "__main__":
    main()
