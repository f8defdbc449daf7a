"""Two-task MLP experiment: pretrain on task P, finetune on task T, measure retention and learning.

Generator (``ToyConfig``): inputs in ``R^d`` (default ``d = 32``) with a full-rank power-law spectrum
``s_i ∝ i^(-alpha)`` (default ``alpha = 1``; total variance ``d``). P's inputs are
``N(0, U_p diag(s) U_pᵀ)`` (random orthogonal ``U_p``). T's eigenvectors are P's, re-ranked: of T's top
``d/2`` directions a fraction ``overlap`` (default 0.5) are P's top directions and the rest P's tail
(smallest-variance) directions; then a random rotation of strength ``rotation`` (default 0.3) mixes
them, so no basis is exactly shared. T's inputs also have a mean of norm ``shift`` (default 3) inside
the span of P's last ``d/4`` directions, so the tasks are compatible: a network can tell them apart
and a solution good at both exists (``--shift 0`` makes them conflict everywhere). Labels come from
two random teacher MLPs (``tanh``, 4 classes).
``--lowrank`` gives P exactly low-rank inputs (rank ``d/2``) instead.

Protocol: the student MLP (``d → 64 → 64 → 4``, ReLU) is pretrained on P (AdamW), then finetuned on T by
each method with the same step budget and a learning rate tuned over the same grid for every method.
Balance = mean of (P accuracy after / before) and (T accuracy / plain AdamW's T accuracy, AdamW tuned
for T); a run whose T accuracy does not get halfway from the pretrained model's to AdamW's is invalid
(so a frozen model never wins). The learning rate of each method maximizes its mean balance over the
seeds among valid ones.

Usage::

    python benchmarks/experiments/toy_two_task.py             # methods table (5 seeds)
    python benchmarks/experiments/toy_two_task.py --ablation  # FoLoRA design ablation (markdown)
    python benchmarks/experiments/toy_two_task.py --quick     # small version of both

The transformer experiment (part 2) plugs in through :func:`finetune` with a ``build`` callback once
``rqcore_torch.preserve`` exists: only the model, data and covariance collection change.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from rqcore import NullspaceProjector
from rqcore_torch.folora import (
    FoLoRAAdam,
    LoRAPencil,
    SpectralLayer,
    folora_layers_from_covariances,
    lora_init_from_basis,
)

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------- generator
@dataclass(frozen=True)
class ToyConfig:
    """Generator and training budget of the toy (see the module docstring)."""

    d: int = 32
    alpha: float = 1.0
    overlap: float = 0.5
    rotation: float = 0.3
    lowrank: bool = False
    shift: float = 3.0
    hidden: int = 64
    classes: int = 4
    n_train: int = 4096
    n_test: int = 2048
    n_calib: int = 1024
    pretrain_steps: int = 800
    steps: int = 200
    batch: int = 128
    lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


def _orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def make_tasks(cfg: ToyConfig, seed: int) -> dict[str, torch.Tensor]:
    """P and T train/test sets (float32) for one seed."""
    rng = np.random.default_rng(seed)
    d = cfg.d
    s = np.arange(1, d + 1, dtype=np.float64) ** (-cfg.alpha)
    s *= d / s.sum()
    U_p = _orthogonal(d, rng)
    s_p = s.copy()
    if cfg.lowrank:
        s_p[d // 2 :] = 0.0
        s_p *= d / s_p.sum()
    n_top = d // 2
    n_shared = round(cfg.overlap * n_top)
    tail = list(range(d - 1, d - 1 - (n_top - n_shared), -1))
    first = list(range(n_shared)) + tail
    order = first + [i for i in range(d) if i not in first]
    skew = rng.standard_normal((d, d))
    skew = (skew - skew.T) * cfg.rotation / math.sqrt(d)
    w, Q = np.linalg.eig(skew)  # expm of a skew matrix, via its (complex) eigendecomposition
    R = np.real(Q @ np.diag(np.exp(w)) @ np.linalg.inv(Q))
    U_t = U_p[:, order] @ R

    def teacher() -> Callable[[np.ndarray], np.ndarray]:
        A = rng.standard_normal((d, 64)) / math.sqrt(d)
        B = rng.standard_normal((64, cfg.classes))
        return lambda x: np.argmax(np.tanh(x @ A) @ B, axis=1)

    t_p, t_t = teacher(), teacher()
    mu = U_p[:, d - d // 4 :] @ rng.standard_normal(d // 4)  # T's mean lies in P's tail
    mu *= cfg.shift / np.linalg.norm(mu)
    out: dict[str, torch.Tensor] = {}
    for task, U, sv, t in (("p", U_p, s_p, t_p), ("t", U_t, s, t_t)):
        for split, n in (("train", cfg.n_train), ("test", cfg.n_test)):
            x = rng.standard_normal((n, d)) * np.sqrt(sv) @ U.T + (mu if task == "t" else 0.0)
            out[f"x_{task}_{split}"] = torch.tensor(x, dtype=torch.float32)
            out[f"y_{task}_{split}"] = torch.tensor(t(x), dtype=torch.long)
    return out


# -------------------------------------------------------------------------------------- models
def make_student(cfg: ToyConfig) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(cfg.d, cfg.hidden),
        nn.ReLU(),
        nn.Linear(cfg.hidden, cfg.hidden),
        nn.ReLU(),
        nn.Linear(cfg.hidden, cfg.classes),
    )


def linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


class LoRALinear(nn.Module):
    """``y = W x + b + s·L_B L_A x`` with the base frozen (PEFT's defaults: ``s = alpha/r``)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, init_A: torch.Tensor | None) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        if init_A is None:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            self.lora_A.data.copy_(init_A)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        self.s = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.s * (x @ self.lora_A.T) @ self.lora_B.T


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def second_moments(
    model: nn.Module, x: torch.Tensor, augment: bool = True
) -> dict[str, torch.Tensor]:
    """Uncentered second moment of each Linear's inputs (augmented with a constant 1), float64."""
    acts: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, n=n: acts.__setitem__(n, inp[0].detach()))
        for n, m in linears(model)
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    out = {}
    for n, a in acts.items():
        a = a.double()
        if augment:
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
        out[n] = a.T @ a / a.shape[0]
    return out


# ------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """A finetuning method: ``kind`` and its options (FoLoRAAdam keywords in ``opts``)."""

    label: str
    kind: str  # adamw | nullspace | lora | folora | folora_lora
    opts: dict[str, Any] = field(default_factory=dict)


FOLORA_DEFAULT = Method("FoLoRA (defaults)", "folora", {})


@dataclass
class Pretrained:
    cfg: ToyConfig
    data: dict[str, torch.Tensor]
    state: dict[str, torch.Tensor]
    p_before: float
    t_before: float
    C_p: dict[str, torch.Tensor]
    C_t: dict[str, torch.Tensor]


def pretrain(cfg: ToyConfig, seed: int) -> Pretrained:
    data = make_tasks(cfg, seed)
    torch.manual_seed(seed)
    model = make_student(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    x, y = data["x_p_train"], data["y_p_train"]
    for _ in range(cfg.pretrain_steps):
        idx = torch.randint(0, x.shape[0], (cfg.batch,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    calib_p = data["x_p_train"][: cfg.n_calib]
    calib_t = data["x_t_train"][: cfg.n_calib]
    return Pretrained(
        cfg,
        data,
        {k: v.clone() for k, v in model.state_dict().items()},
        accuracy(model, data["x_p_test"], data["y_p_test"]),
        accuracy(model, data["x_t_test"], data["y_t_test"]),
        second_moments(model, calib_p),
        second_moments(model, calib_t),
    )


def _strip(C: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: c[:-1, :-1] for n, c in C.items()}  # drop the constant: LoRA has no bias


def finetune(pre: Pretrained, method: Method, lr: float, seed: int) -> tuple[float, float]:
    """Finetune a copy of the pretrained student on T; returns (P accuracy, T accuracy) on test."""
    cfg = pre.cfg
    torch.manual_seed(seed + 1000)
    model = make_student(cfg)
    model.load_state_dict(pre.state)
    opts = dict(method.opts)
    post: Callable[[], None] | None = None
    refresh_every = int(opts.pop("refresh_basis_every", 0))
    reg = float(opts.pop("reg", 1e-2))
    rank_frac = opts.pop("rank_frac", None)
    lin = linears(model)
    if method.kind == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    elif method.kind == "nullspace":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        projs = {n: NullspaceProjector(pre.C_p[n].numpy(), energy=opts["energy"]) for n, _ in lin}
        bases = {n: torch.tensor(p.basis, dtype=torch.float32) for n, p in projs.items()}
        before: dict[str, torch.Tensor] = {}

        def post() -> None:  # project the AdamW step (Adam-NSCL projects the update)
            with torch.no_grad():
                for n, m in lin:
                    rows = torch.cat([m.weight, m.bias[:, None]], 1)
                    delta = rows - before[n]
                    U = bases[n]
                    delta -= (delta @ U) @ U.T
                    new = before[n] + delta
                    m.weight.copy_(new[:, :-1])
                    m.bias.copy_(new[:, -1])

    elif method.kind in ("lora", "folora_lora"):
        r = int(opts.pop("r", 4))
        init = opts.pop("init", "kaiming")
        gate_A = bool(opts.pop("gate_A", False))
        gate_B = bool(opts.pop("gate_B", False))
        Ct, Cp = _strip(pre.C_t), _strip(pre.C_p)
        modules: dict[str, LoRALinear] = {}
        for n, m in lin:
            init_A = None
            if init == "basis":
                layer = folora_layers_from_covariances(
                    [(n, m.weight)], {n: Ct[n]}, {n: Cp[n]}, reg=reg
                )
                init_A = lora_init_from_basis(layer[0], r)
            modules[n] = LoRALinear(m, r, 2.0 * r, init_A)
            _set_module(model, n, modules[n])
        if method.kind == "lora":
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        else:
            layers: list[SpectralLayer] = []
            others: list[nn.Parameter] = []
            pencils: dict[str, LoRAPencil] = {}
            for n, lm in modules.items():
                if gate_A:
                    layers += folora_layers_from_covariances(
                        [(n + ".A", lm.lora_A)], {n + ".A": Ct[n]}, {n + ".A": Cp[n]}, reg=reg
                    )
                else:
                    others.append(lm.lora_A)
                if gate_B:
                    eye = torch.eye(r, dtype=lm.lora_B.dtype)
                    layers.append(SpectralLayer(n + ".B", lm.lora_B, None, torch.ones(r), eye, eye))
                    pencils[n + ".B"] = LoRAPencil(lm.lora_A, Ct[n], Cp[n], reg=reg)
                else:
                    others.append(lm.lora_B)
            opt = FoLoRAAdam(layers, others, lr=lr, lora_pencils=pencils, **opts)
    elif method.kind == "folora":
        if rank_frac is None:
            layers = folora_layers_from_covariances(lin, pre.C_t, pre.C_p, reg=reg)
        else:  # per-layer rank: the same fraction of each layer's d
            layers = [
                folora_layers_from_covariances(
                    [(n, m)],
                    pre.C_t,
                    pre.C_p,
                    reg=reg,
                    rank=max(1, int(rank_frac * pre.C_t[n].shape[0])),
                )[0]
                for n, m in lin
            ]
        opt = FoLoRAAdam(layers, lr=lr, **opts)
        if refresh_every:
            calib_p = pre.data["x_p_train"][: cfg.n_calib]
            calib_t = pre.data["x_t_train"][: cfg.n_calib]
            folora_opt = opt
            count = [0]

            def post() -> None:  # re-estimate both covariances at the current weights
                count[0] += 1
                if count[0] % refresh_every:
                    return
                Cp, Ct = second_moments(model, calib_p), second_moments(model, calib_t)
                for n, m in lin:
                    k = folora_opt._lstate(n)["vectors"].shape[1]
                    new = folora_layers_from_covariances([(n, m)], Ct, Cp, reg=reg, rank=k)[0]
                    folora_opt.set_basis(n, new.values, new.vectors, new.dual, new.scale)

    else:
        raise ValueError(method.kind)

    g = torch.Generator().manual_seed(seed + 2000)
    x, y = pre.data["x_t_train"], pre.data["y_t_train"]
    for _ in range(cfg.steps):
        idx = torch.randint(0, x.shape[0], (cfg.batch,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        if method.kind == "nullspace":
            with torch.no_grad():
                before = {n: torch.cat([m.weight, m.bias[:, None]], 1).clone() for n, m in lin}
        opt.step()
        if post is not None:
            post()
    d = pre.data
    return accuracy(model, d["x_p_test"], d["y_p_test"]), accuracy(
        model, d["x_t_test"], d["y_t_test"]
    )


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


# ------------------------------------------------------------------------------------ scoring
@dataclass
class Result:
    label: str
    lr: float
    balance: np.ndarray  # per seed
    p_ratio: np.ndarray
    t_acc: np.ndarray
    valid: bool

    def row(self, ref: Result | None = None) -> str:
        b = self.balance
        margin = ""
        if ref is not None:
            diff = ref.balance - b
            margin = f"{diff.mean():+.3f} (min {diff.min():+.3f})"
        return (
            f"| {self.label} | {self.lr:g} | {b.mean():.3f} ± {b.std(ddof=1) if b.size > 1 else 0:.3f} | "
            f"{self.p_ratio.mean():.3f} | {self.t_acc.mean():.3f} | {'yes' if self.valid else 'no'} | "
            f"{margin} |"
        )


def evaluate(
    methods: Sequence[Method],
    cfg: ToyConfig,
    seeds: Sequence[int],
    log: Callable[[str], None] = lambda s: None,
) -> tuple[dict[str, Result], dict[str, float]]:
    """Tune each method's lr over ``cfg.lrs`` (max mean balance among valid) and score it."""
    pres = [pretrain(cfg, s) for s in seeds]
    raw: dict[tuple[str, float], np.ndarray] = {}
    all_methods = [Method("AdamW", "adamw"), *[m for m in methods if m.kind != "adamw"]]
    for m in all_methods:
        for lr in cfg.lrs:
            t0 = time.perf_counter()
            raw[(m.label, lr)] = np.array(
                [finetune(p, m, lr, s) for p, s in zip(pres, seeds, strict=True)]
            )
            log(
                f"  {m.label} lr={lr:g}: {raw[(m.label, lr)].mean(0).round(3)} ({time.perf_counter() - t0:.1f}s)"
            )
    p0 = np.array([p.p_before for p in pres])
    t0_ = np.array([p.t_before for p in pres])
    t_ref = np.max(np.stack([raw[("AdamW", lr)][:, 1] for lr in cfg.lrs]), axis=0)
    out: dict[str, Result] = {}
    for m in all_methods:
        best: Result | None = None
        for lr in cfg.lrs:
            pa, ta = raw[(m.label, lr)].T
            bal = 0.5 * (pa / p0 + ta / t_ref)
            valid = bool(np.mean(ta) >= np.mean(t0_ + 0.5 * (t_ref - t0_)))
            res = Result(m.label, lr, bal, pa / p0, ta, valid)
            if best is None or (res.valid, bal.mean()) > (best.valid, best.balance.mean()):
                best = res
        assert best is not None
        out[m.label] = best
    info = {
        "p_before": float(p0.mean()),
        "t_before": float(t0_.mean()),
        "t_adamw": float(t_ref.mean()),
    }
    return out, info


HEADER = (
    "| method | lr | balance (mean ± std) | P after/before | T acc | valid | FoLoRA margin (mean, min over seeds) |\n"
    "|---|---:|---:|---:|---:|---|---|"
)


def baselines() -> list[Method]:
    return [
        Method("AdamW", "adamw"),
        Method("LoRA r=4", "lora", {"r": 4}),
        *[Method(f"null-space e={e}", "nullspace", {"energy": e}) for e in (0.9, 0.99, 0.999)],
    ]


def ablation_methods() -> list[Method]:
    F = "folora"
    return [
        FOLORA_DEFAULT,
        # gate position
        Method("gate on the AdamW step (ratio, full)", F, {"gate_position": "step"}),
        Method("moments per direction, no gate", F, {"gate": "none"}),
        # gain function
        Method("gain threshold 1[λ≥τ]", F, {"gate": "threshold"}),
        Method("gain sigmoid T=0.5", F, {"gate": "sigmoid"}),
        Method("gain power (λ/λmax)", F, {"gate": "power"}),
        # tau rule
        Method("τ median λ", F, {"tau": "median"}),
        Method("τ mean λ", F, {"tau": "mean"}),
        Method("τ utility p=0.2", F, {"tau": "utility", "tau_param": 0.2}),
        Method("τ utility p=0.5", F, {"tau": "utility", "tau_param": 0.5}),
        Method("τ utility p=0.7", F, {"tau": "utility", "tau_param": 0.7}),
        Method("τ utility p=0.9", F, {"tau": "utility", "tau_param": 0.9}),
        Method("τ penalty budget q=0.1", F, {"tau": "budget", "tau_param": 0.1}),
        Method("τ penalty budget q=0.25", F, {"tau": "budget", "tau_param": 0.25}),
        Method("τ utility p=0.3, global", F, {"tau_scope": "global"}),
        # basis size / complement / eps
        Method("k=d/4, g⊥=0", F, {"rank_frac": 0.25}),
        Method("k=d/4, g⊥=0.1", F, {"rank_frac": 0.25, "complement": 0.1}),
        Method("k=d/2, g⊥=0", F, {"rank_frac": 0.5}),
        Method("ε reg=1e-3", F, {"reg": 1e-3}),
        Method("ε reg=1e-1", F, {"reg": 1e-1}),
        # refresh policy (bases re-solved at the current weights every 25 steps)
        Method("refresh/25, transport", F, {"refresh_basis_every": 25}),
        Method("refresh/25, reset", F, {"refresh_basis_every": 25, "refresh_moments": "reset"}),
        Method("refresh/25, keep", F, {"refresh_basis_every": 25, "refresh_moments": "keep"}),
        # LoRA
        Method("LoRA, L_A init from basis", "folora_lora", {"init": "basis", "gate": "none"}),
        Method("LoRA, L_B gated (r-pencil)", "folora_lora", {"gate_B": True, "refresh_every": 25}),
        Method(
            "LoRA, basis init + L_B gated",
            "folora_lora",
            {"init": "basis", "gate_B": True, "refresh_every": 25},
        ),
        Method(
            "LoRA, basis init + L_A and L_B gated",
            "folora_lora",
            {"init": "basis", "gate_A": True, "gate_B": True, "refresh_every": 25},
        ),
    ]


def quick_config(cfg: ToyConfig) -> ToyConfig:
    return replace(
        cfg,
        n_train=2048,
        n_test=1024,
        n_calib=512,
        pretrain_steps=400,
        steps=120,
        lrs=(1e-3, 3e-3, 1e-2, 3e-2),
    )


def test_config() -> ToyConfig:
    """The reduced run of ``tests/test_torch_folora.py`` (3 seeds, well under a minute)."""
    return replace(
        ToyConfig(),
        n_train=1024,
        n_test=1024,
        n_calib=512,
        pretrain_steps=300,
        steps=80,
        lrs=(1e-3, 3e-3, 1e-2, 3e-2),
    )


def run(methods: Sequence[Method], cfg: ToyConfig, seeds: Sequence[int], verbose: bool) -> str:
    log = (lambda s: print(s, file=sys.stderr)) if verbose else (lambda s: None)
    res, info = evaluate(methods, cfg, seeds, log)
    ref = res[FOLORA_DEFAULT.label]
    lines = [
        f"Toy: d={cfg.d}, alpha={cfg.alpha}, overlap={cfg.overlap}, rotation={cfg.rotation}, "
        f"lowrank={cfg.lowrank}, {cfg.steps} steps × batch {cfg.batch}, lr grid {list(cfg.lrs)}, "
        f"seeds {list(seeds)}. Pretrained: P acc {info['p_before']:.3f}, T acc {info['t_before']:.3f}; "
        f"AdamW (best T) T acc {info['t_adamw']:.3f}.",
        "",
        HEADER,
    ]
    for label, r in res.items():
        lines.append(r.row(None if label == ref.label else ref))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ablation", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--lowrank", action="store_true")
    ap.add_argument("--shift", type=float, default=None)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    cfg = ToyConfig(lowrank=a.lowrank)
    if a.shift is not None:
        cfg = replace(cfg, shift=a.shift)
    if a.quick:
        cfg = quick_config(cfg)
    seeds = list(range(a.seeds if a.seeds else (3 if a.quick or a.ablation else 5)))
    methods = (
        ([*baselines()[1:], *ablation_methods()])
        if a.ablation
        else [*baselines()[1:], FOLORA_DEFAULT]
    )
    print(run(methods, cfg, seeds, a.verbose))


if __name__ == "__main__":
    main()
