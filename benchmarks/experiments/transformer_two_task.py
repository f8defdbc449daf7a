"""Two-task experiment on a small transformer: does FoLoRA keep task P while learning task T?

A tiny BERT encoder (``transformers.BertConfig``: hidden 64, 2 layers, 2 heads, intermediate 128) is
pretrained on task P, then finetuned on task T with the same step budget by each method: plain AdamW,
LoRA (PEFT, attention + FFN linears), null-space (``preserve(method="nullspace", energy=e)``), FoLoRA
(``preserve(method="folora")``, defaults) and FoLoRA on the same LoRA adapters
(``preserve(method="folora", lora=dict(...))``; ``--lora`` compares its choices). Each method's learning
rate is chosen from the same grid on validation splits; the table reports test accuracies
(``docs/folora.md`` §3, §9).

Tasks (synthetic token sequences, vocabulary 64, length 24, mean-pooled encoder output, one linear head
per task; the P head is kept from pretraining and not trained during finetuning):

* P: which of two random unigram distributions (over tokens 1–39, mixed with uniform noise) produced the
  sequence.
* T: ``[#tokens of set a ≥ 2] XOR [#tokens of set b ≥ 2]``, tokens uniform over 24–63: set ``a`` lies in the
  part of P's vocabulary that T shares (24–39), set ``b`` in T's own (40–63), so T's informative inputs
  partly overlap P's.

Embeddings are frozen for every method (the preservation methods act on linear layers; the comparison is
about those). Calibration data for ``preserve`` = P-task inputs (the pretraining proxy).

Balance = mean of (P acc after / P acc before) and (T acc / plain AdamW's T acc); a run whose mean T acc
does not get halfway from the pretrained model's T acc to AdamW's is invalid.

Run ``python benchmarks/experiments/transformer_two_task.py`` (``--quick`` for a smoke run, ``--lora`` for
the LoRA choices).
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "ExpConfig",
    "Task",
    "evaluate",
    "lora_methods",
    "main",
    "quick_config",
    "test_config",
    "test_methods",
]

ENCODER_TARGETS = "encoder.encoder.layer.*"  # every Linear of the transformer blocks
LORA_MODULES = ["query", "key", "value", "dense"]  # attention + FFN linears of BERT


@dataclass(frozen=True)
class ExpConfig:
    """Sizes, budgets and grids of the experiment."""

    vocab: int = 64
    seq: int = 24
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    intermediate: int = 128
    pretrain_steps: int = 300
    finetune_steps: int = 200
    batch: int = 32
    n_val: int = 512
    n_test: int = 1024
    n_calib: int = 512
    lrs: tuple[float, ...] = (1e-3, 3e-3, 6e-3, 1e-2)
    lora_r: int = 8
    energies: tuple[float, ...] = (0.9, 0.99, 0.999)
    p_noise: float = 0.6
    t_rule: str = "xor"


def quick_config() -> ExpConfig:
    """A smoke-sized run (``--quick``)."""
    return replace(ExpConfig(), finetune_steps=120, lrs=(3e-3, 1e-2))


def test_config() -> ExpConfig:
    """The reduced run of ``tests/test_torch_folora_preserve.py``: smaller splits, same model and budget.

    The test also fixes each method's lr to the one the full run selects (see :func:`test_methods`).
    """
    return replace(ExpConfig(), n_val=256, n_test=512, n_calib=256)


def test_methods() -> list[Method]:
    """Methods of the reduced run at the full run's selected lrs (AdamW: two, for its T reference)."""
    return [
        Method("AdamW", "adamw", lrs=(1e-3, 3e-3)),
        Method("LoRA r=8", "lora", lrs=(1e-3,)),
        Method("null-space e=0.9", "nullspace", (("energy", 0.9),), lrs=(6e-3,)),
        Method("FoLoRA (defaults)", "folora", lrs=(6e-3,)),
    ]


# ------------------------------------------------------------------------------------------ data
class Task:
    """The two token tasks of one seed (fixed generators; sampling is seeded per call)."""

    def __init__(self, cfg: ExpConfig, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.cfg = cfg
        self.p_vocab = np.arange(1, 40)
        self.p_dists = rng.dirichlet(np.full(self.p_vocab.size, 0.3), size=2)
        self.t_vocab = np.arange(24, cfg.vocab)
        self.set_a = rng.choice(np.arange(24, 40), 4, replace=False)
        self.set_b = rng.choice(np.arange(40, cfg.vocab), 4, replace=False)
        self.w_t = rng.choice([-1.0, 1.0], size=cfg.vocab)  # T's token weights (used on 24..63)

    def sample_p(self, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` P sequences and labels."""
        y = rng.integers(0, 2, n)
        noise = np.full(self.p_vocab.size, 1.0 / self.p_vocab.size)
        x = np.empty((n, self.cfg.seq), dtype=np.int64)
        for c in (0, 1):
            idx = np.flatnonzero(y == c)
            probs = (1 - self.cfg.p_noise) * self.p_dists[c] + self.cfg.p_noise * noise
            x[idx] = rng.choice(self.p_vocab, size=(idx.size, self.cfg.seq), p=probs)
        return torch.from_numpy(x), torch.from_numpy(y)

    def sample_t(self, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` T sequences and labels."""
        x = rng.choice(self.t_vocab, size=(n, self.cfg.seq))
        if self.cfg.t_rule == "xor":
            a = np.isin(x, self.set_a).sum(1) >= 2
            b = np.isin(x, self.set_b).sum(1) >= 2
            return torch.from_numpy(x), torch.from_numpy((a ^ b).astype(np.int64))
        # "linear": half the positions come from P's generator (a nuisance for T), the label is
        # the sign of T's token weights summed over the T-vocabulary tokens.
        xp, _ = self.sample_p(n, rng)
        mix = rng.random((n, self.cfg.seq)) < 0.5
        x = np.where(mix, xp.numpy(), x)
        score = np.where(x >= 24, self.w_t[x], 0.0).sum(1) + 0.5 * rng.standard_normal(n)
        return torch.from_numpy(x), torch.from_numpy((score > 0).astype(np.int64))


# ----------------------------------------------------------------------------------------- model
class Net(nn.Module):
    """BERT encoder, mean pooling, one linear head per task."""

    def __init__(self, cfg: ExpConfig) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        bc = BertConfig(
            vocab_size=cfg.vocab,
            hidden_size=cfg.hidden,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            intermediate_size=cfg.intermediate,
            max_position_embeddings=cfg.seq,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            type_vocab_size=1,
        )
        self.encoder = BertModel(bc, add_pooling_layer=False)
        self.head_p = nn.Linear(cfg.hidden, 2)
        self.head_t = nn.Linear(cfg.hidden, 2)
        self.task = "p"

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids).last_hidden_state.mean(1)
        return self.head_p(h) if self.task == "p" else self.head_t(h)


def accuracy(model: Net, x: torch.Tensor, y: torch.Tensor, task: str) -> float:
    """Accuracy of ``model`` on ``(x, y)`` with the head of ``task``."""
    model.eval()
    model.task = task
    with torch.no_grad():
        out = torch.cat([model(x[i : i + 512]) for i in range(0, len(x), 512)])
    return float((out.argmax(1) == y).float().mean())


@dataclass
class Pretrained:
    """One seed's pretrained model, data splits and reference accuracies."""

    seed: int
    task: Task
    model: Net
    val: dict[str, tuple[torch.Tensor, torch.Tensor]]
    test: dict[str, tuple[torch.Tensor, torch.Tensor]]
    calib: list[dict[str, torch.Tensor]]
    before: dict[str, float]  # "p_val", "p_test", "t_val", "t_test"


def pretrain(cfg: ExpConfig, seed: int) -> Pretrained:
    """Pretrain the encoder and the P head on P (AdamW, lr 3e-3)."""
    torch.manual_seed(seed)
    task = Task(cfg, seed)
    rng = np.random.default_rng(seed + 1000)
    model = Net(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.task = "p"
    for _ in range(cfg.pretrain_steps):
        model.train()
        x, y = task.sample_p(64, rng)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    val = {"p": task.sample_p(cfg.n_val, rng), "t": task.sample_t(cfg.n_val, rng)}
    test = {"p": task.sample_p(cfg.n_test, rng), "t": task.sample_t(cfg.n_test, rng)}
    xc, _ = task.sample_p(cfg.n_calib, rng)
    calib = [{"input_ids": xc[i : i + 64]} for i in range(0, len(xc), 64)]
    before = {
        f"{k}_{split}": accuracy(model, *data[k], k)
        for split, data in (("val", val), ("test", test))
        for k in ("p", "t")
    }
    return Pretrained(seed, task, model, val, test, calib, before)


# -------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """A finetuning method: ``kind`` in adamw/lora/nullspace/folora/folora_lora, with its options."""

    label: str
    kind: str
    options: tuple[tuple[str, Any], ...] = ()
    lrs: tuple[float, ...] | None = None  # overrides the grid (reduced runs only)


def baselines(cfg: ExpConfig) -> list[Method]:
    """AdamW, LoRA, null-space at each energy."""
    return [
        Method("AdamW", "adamw"),
        Method(f"LoRA r={cfg.lora_r}", "lora"),
        *[Method(f"null-space e={e:g}", "nullspace", (("energy", e),)) for e in cfg.energies],
    ]


def finetune(pre: Pretrained, method: Method, lr: float, cfg: ExpConfig) -> dict[str, float]:
    """Finetune a copy of the pretrained model on T; accuracies on the val and test splits."""
    from rqcore_torch import preserve

    torch.manual_seed(pre.seed + 7)
    model = copy.deepcopy(pre.model)
    for p in model.encoder.embeddings.parameters():
        p.requires_grad_(False)
    opts = dict(method.options)
    handle = None
    if method.kind == "folora_lora":
        # preserve() adds the same PEFT adapters itself (lora=...), starts lora_A in the pencil's top
        # eigenvectors and gates lora_A (d-pencil) and lora_B (r-pencil); options: lora_init, lora_b.
        model.task = "p"
        task_loader = None
        if opts.pop("task_loader", False):  # a C_t pre-pass on T inputs (no warm-up refresh)
            xt, _ = pre.task.sample_t(cfg.n_calib, np.random.default_rng(pre.seed + 3000))
            task_loader = [{"input_ids": xt[i : i + 64]} for i in range(0, len(xt), 64)]
        handle = preserve(
            model,
            pre.calib,
            targets=ENCODER_TARGETS,
            method="folora",
            task_loader=task_loader,
            lora=dict(r=cfg.lora_r, alpha=2 * cfg.lora_r, target_modules=LORA_MODULES),
            progress=False,
            seed=pre.seed,
            **opts,
        )
        for head in (model.head_p, model.head_t):  # as for LoRA: the heads are trained fully
            head.requires_grad_(True)
        opt = handle.optimizer(torch.optim.AdamW, lr=lr, weight_decay=0.0)
    elif method.kind == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, target_modules=LORA_MODULES)
        inject_adapter_in_model(lcfg, model.encoder)
        for n, p in model.encoder.named_parameters():
            p.requires_grad_("lora_" in n)
        opt: Any = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0
        )
    elif method.kind == "adamw":
        opt = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0
        )
    else:
        model.task = "p"
        handle = preserve(
            model,
            pre.calib,
            targets=ENCODER_TARGETS,
            method=method.kind,
            progress=False,
            seed=pre.seed,
            **opts,
        )
        opt = handle.optimizer(torch.optim.AdamW, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(pre.seed + 2000)
    model.task = "t"
    for _ in range(cfg.finetune_steps):
        model.train()
        x, y = pre.task.sample_t(cfg.batch, rng)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if handle is not None:
        handle.remove()
    return {
        f"{k}_{split}": accuracy(model, *data[k], k)
        for split, data in (("val", pre.val), ("test", pre.test))
        for k in ("p", "t")
    }


# ------------------------------------------------------------------------------------ evaluation
@dataclass
class Result:
    """A method at its selected learning rate (test-split numbers per seed)."""

    label: str
    lr: float
    balance: np.ndarray
    p_ratio: np.ndarray
    t_acc: np.ndarray
    valid: bool

    def row(self, ref: Result | None) -> str:
        """One markdown table row (margin = ``ref``'s balance minus this one's)."""
        margin = ""
        if ref is not None and ref is not self:
            diff = ref.balance - self.balance
            margin = f"{diff.mean():+.3f} (min {diff.min():+.3f})"
        return (
            f"| {self.label} | {self.lr:g} | {self.balance.mean():.3f} ± {self.balance.std():.3f} | "
            f"{self.p_ratio.mean():.3f} | {self.t_acc.mean():.3f} | "
            f"{'yes' if self.valid else 'no'} | {margin} |"
        )


def _score(
    runs: list[dict[str, float]], pres: Sequence[Pretrained], t_ref: np.ndarray, split: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    p0 = np.array([p.before[f"p_{split}"] for p in pres])
    t0 = np.array([p.before[f"t_{split}"] for p in pres])
    pa = np.array([r[f"p_{split}"] for r in runs])
    ta = np.array([r[f"t_{split}"] for r in runs])
    bal = 0.5 * (pa / p0 + ta / t_ref)
    valid = bool(ta.mean() >= (t0 + 0.5 * (t_ref - t0)).mean())
    return bal, pa / p0, ta, valid


def evaluate(
    methods: Sequence[Method],
    cfg: ExpConfig,
    seeds: Sequence[int],
    log: Callable[[str], None] = lambda s: None,
) -> tuple[dict[str, Result], dict[str, float]]:
    """Run every method at every lr and seed; pick each method's lr on the validation split."""
    pres = [pretrain(cfg, s) for s in seeds]
    log(
        "pretrained: "
        + ", ".join(f"{k} {np.mean([p.before[k] for p in pres]):.3f}" for k in pres[0].before)
    )
    raw: dict[tuple[str, float], list[dict[str, float]]] = {}
    for m in methods:
        for lr in m.lrs or cfg.lrs:
            t0 = time.perf_counter()
            raw[(m.label, lr)] = [finetune(p, m, lr, cfg) for p in pres]
            mean = {k: np.mean([r[k] for r in raw[(m.label, lr)]]) for k in raw[(m.label, lr)][0]}
            log(
                f"  {m.label} lr={lr:g}: "
                + " ".join(f"{k}={v:.3f}" for k, v in mean.items())
                + f" ({time.perf_counter() - t0:.1f}s)"
            )
    adamw = methods[0].label
    # T reference per seed: plain AdamW's best T accuracy over the grid (per split).
    t_ref = {
        s: np.max(
            np.stack([[r[f"t_{s}"] for r in raw[(adamw, lr)]] for lr in methods[0].lrs or cfg.lrs]),
            axis=0,
        )
        for s in ("val", "test")
    }
    out: dict[str, Result] = {}
    for m in methods:
        best_key: tuple[bool, float] | None = None
        grid = m.lrs or cfg.lrs
        best_lr = grid[0]
        for lr in grid:
            bal, _, _, valid = _score(raw[(m.label, lr)], pres, t_ref["val"], "val")
            key = (valid, float(bal.mean()))
            if best_key is None or key > best_key:
                best_key, best_lr = key, lr
        bal, pr, ta, valid = _score(raw[(m.label, best_lr)], pres, t_ref["test"], "test")
        out[m.label] = Result(m.label, best_lr, bal, pr, ta, valid)
    info = {
        "p_before": float(np.mean([p.before["p_test"] for p in pres])),
        "t_before": float(np.mean([p.before["t_test"] for p in pres])),
        "t_adamw": float(t_ref["test"].mean()),
    }
    return out, info


HEADER = (
    "| method | lr | balance (mean ± std) | P after/before | T acc | valid | FoLoRA margin (mean, min over seeds) |\n"
    "|---|---:|---:|---:|---:|---|---|"
)


def table(
    results: dict[str, Result], info: dict[str, float], cfg: ExpConfig, seeds: Sequence[int]
) -> str:
    """The markdown report."""
    ref = results.get("FoLoRA (defaults)")
    lines = [
        f"Transformer: BERT {cfg.hidden}/{cfg.layers}L/{cfg.heads}H/{cfg.intermediate}, "
        f"pretrain {cfg.pretrain_steps} steps, finetune {cfg.finetune_steps} steps × batch {cfg.batch}, "
        f"lr grid {list(cfg.lrs)}, seeds {list(seeds)}. Pretrained (test): P acc "
        f"{info['p_before']:.3f}, T acc {info['t_before']:.3f}; AdamW (best T) T acc "
        f"{info['t_adamw']:.3f}.",
        "",
        HEADER,
    ]
    lines += [r.row(ref) for r in results.values()]
    return "\n".join(lines)


def default_methods(cfg: ExpConfig) -> list[Method]:
    """Baselines, then FoLoRA with its defaults and FoLoRA on LoRA adapters (``preserve(lora=...)``)."""
    return [
        *baselines(cfg),
        Method("FoLoRA (defaults)", "folora"),
        Method(f"FoLoRA-LoRA r={cfg.lora_r} (defaults)", "folora_lora"),
    ]


def lora_methods(cfg: ExpConfig) -> list[Method]:
    """The LoRA choices of ``preserve(lora=...)``, one changed at a time (``--lora``).

    Defaults: ``lora_init="basis"``, ``lora_b="adam"`` (``lora_A`` gated in the layer's pencil).
    """
    r = cfg.lora_r
    fl = "folora_lora"
    pencil = ("lora_b", "pencil")
    keep = ("lora_init", "keep")
    return [
        Method("AdamW", "adamw"),
        Method(f"LoRA r={r}", "lora"),
        Method("FoLoRA (defaults)", "folora"),
        Method(f"FoLoRA-LoRA r={r} (defaults: basis init, L_B plain Adam)", fl),
        Method("  basis init, L_B r-pencil (r-value τ)", fl, (pencil,)),
        Method("  basis init, L_B r-pencil (layer τ)", fl, (pencil, ("lora_b_tau", "layer"))),
        Method("  PEFT init, L_B plain Adam (L_A gated only)", fl, (keep,)),
        Method("  PEFT init, L_B r-pencil (r-value τ)", fl, (keep, pencil)),
        Method("  PEFT init, L_B r-pencil (layer τ)", fl, (keep, pencil, ("lora_b_tau", "layer"))),
        Method("  task_loader, basis init, L_B r-pencil", fl, (("task_loader", True), pencil)),
        Method("  task_loader, PEFT init, L_B r-pencil", fl, (("task_loader", True), keep, pencil)),
    ]


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller budget (smoke run)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--lora", action="store_true", help="the LoRA choices of preserve(lora=...)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("rqcore_torch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    cfg = quick_config() if args.quick else ExpConfig()
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    methods = lora_methods(cfg) if args.lora else default_methods(cfg)
    results, info = evaluate(methods, cfg, seeds, log=(lambda s: None) if args.quiet else print)
    print(table(results, info, cfg, seeds))
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
