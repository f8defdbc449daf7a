"""The one-call entry point: :func:`preserve`."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from torch import nn

from rqcore_torch.calibration import (
    CalibrationStatistics,
    ForwardFn,
    _LayerEntry,
    calibrate,
)
from rqcore_torch.config import PreserveConfig
from rqcore_torch.handle import PreservationHandle
from rqcore_torch.targets import Target, TargetSpec, resolve_targets

__all__ = ["LORA_KEYS", "preserve"]

#: Keys of ``preserve(..., lora={...})``.
LORA_KEYS = ("r", "alpha", "target_modules", "dropout")


def _check_lora(lora: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``preserve``'s ``lora=`` dict (before any forward pass); defaults filled in."""
    if not isinstance(lora, Mapping):
        raise TypeError(
            f"lora must be a dict such as dict(r=8, alpha=16), got {type(lora).__name__}."
        )
    bad = sorted(set(lora) - set(LORA_KEYS))
    if bad:
        raise ValueError(
            f"unknown lora keys {bad}; lora= accepts {list(LORA_KEYS)} "
            "(e.g. lora=dict(r=8, alpha=16, target_modules=['query', 'value']))."
        )
    r = lora.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
        raise ValueError(f"lora['r'] must be a positive integer, got {r!r}.")
    alpha = lora.get("alpha", 2 * int(r))
    try:
        alpha_f = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"lora['alpha'] must be a positive number, got {alpha!r}.") from None
    if not (np.isfinite(alpha_f) and alpha_f > 0):
        raise ValueError(f"lora['alpha'] must be a positive number, got {alpha!r}.")
    dropout = lora.get("dropout", 0.0)
    try:
        dropout_f = float(dropout)
    except (TypeError, ValueError):
        raise ValueError(f"lora['dropout'] must be a number in [0, 1), got {dropout!r}.") from None
    if not 0.0 <= dropout_f < 1.0:
        raise ValueError(f"lora['dropout'] must be a number in [0, 1), got {dropout!r}.")
    modules = lora.get("target_modules")
    if modules is not None:
        modules = [modules] if isinstance(modules, str) else list(modules)
        if not modules or not all(isinstance(m, str) and m for m in modules):
            raise ValueError(
                f"lora['target_modules'] must be a module name or a non-empty list of names, "
                f"got {lora.get('target_modules')!r}."
            )
    return {"r": int(r), "alpha": alpha_f, "dropout": dropout_f, "target_modules": modules}


def _inject_lora(model: nn.Module, spec: dict[str, Any], resolved: list[Target]) -> list[str]:
    """Add PEFT LoRA adapters to ``model`` in place; the names of the preserved LoRA layers.

    ``target_modules`` defaults to exactly the ``nn.Linear`` targets (by full name; a user list keeps
    PEFT's suffix matching). ``peft.inject_adapter_in_model`` keeps
    the model object (same class and forward; PEFT freezes every non-LoRA parameter).
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as exc:
        raise ImportError("preserve(..., lora=...) needs peft: pip install peft") from exc
    if any(t.kind == "lora" for t in resolved):
        raise ValueError(
            "the model already has PEFT LoRA layers; drop lora= (preserve gates existing adapters)."
        )
    names = [t.name for t in resolved]
    modules: str | list[str] | None = spec["target_modules"]
    if modules is None:
        linear = [t.name for t in resolved if t.kind == "linear"]
        if not linear:
            raise ValueError(
                "lora=: none of the preserved layers is an nn.Linear; pass lora['target_modules']."
            )
        # PEFT matches a list entry as a name *suffix* ("1" also selects "0.1", which would train
        # ungated), but a str with re.fullmatch: anchor the exact names.
        modules = "^(" + "|".join(map(re.escape, linear)) + ")$"
    config = LoraConfig(
        r=spec["r"],
        lora_alpha=spec["alpha"],
        lora_dropout=spec["dropout"],
        target_modules=modules,
    )
    try:
        inject_adapter_in_model(config, model)
    except ValueError as exc:
        raise ValueError(f"lora=: PEFT could not add adapters ({exc}).") from exc
    wrapped = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    chosen = [n for n in names if n in wrapped]
    if not chosen:
        raise ValueError(
            f"lora['target_modules']={modules!r} wraps none of the preserved layers {names}; "
            "make targets= and target_modules overlap."
        )
    return chosen


def _check_statistics(stats: CalibrationStatistics, resolved: list[Target]) -> None:
    """Statistics passed to :func:`preserve` must hold data and fit the model's target layers."""
    if stats.batches == 0 or not stats.layers:
        raise ValueError(
            "the calibration statistics are empty (no batch, no layer); pass a calibration loader, "
            "or statistics from calibrate(model, loader)."
        )
    matched = [t for t in resolved if t.name in stats.layers]
    if not matched:
        raise ValueError(
            f"the calibration statistics cover none of the model's target layers (statistics: "
            f"{sorted(stats.layers)[:5]}…, targets: {[t.name for t in resolved][:5]}…); were they "
            "computed on this model?"
        )
    for target in matched:
        dim = stats.layers[target.name].dim
        if dim != target.dim:
            raise ValueError(
                f"layer {target.name!r}: the statistics have dimension {dim} but the layer needs "
                f"{target.dim} ({target.d_in} inputs{' + bias' if target.augmented else ''}); "
                "recompute them with calibrate(model, loader) on this model."
            )


def _undo_lora(
    model: nn.Module, trainable: list[tuple[nn.Parameter, bool]], had_config: bool
) -> None:
    """Take out the adapters that :func:`_inject_lora` added and restore ``requires_grad`` flags."""
    for name, module in list(model.named_modules()):
        if hasattr(module, "lora_A") and isinstance(getattr(module, "base_layer", None), nn.Module):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.base_layer)
    for param, flag in trainable:
        param.requires_grad_(flag)
    if not had_config and hasattr(model, "peft_config"):
        del model.peft_config


def preserve(
    model: nn.Module,
    calib_loader: Iterable[Any] | CalibrationStatistics,
    *,
    targets: TargetSpec = None,
    method: str = "folora",
    rank: int | None = None,
    gate: str | Callable[[np.ndarray], Any] = "ratio",
    tau: str | float = "auto",
    complement: float = 0.0,
    reg: float | None = None,
    refresh_every: int | None = None,
    task_loader: Iterable[Any] | None = None,
    forward: ForwardFn | None = None,
    max_batches: int | None = None,
    token_fraction: float = 1.0,
    progress: bool = True,
    seed: int | None = None,
    lora: Mapping[str, Any] | None = None,
    **options: Any,
) -> PreservationHandle:
    """Calibrate ``model`` on data it should not forget and return a handle that gates finetuning.

    Parameters
    ----------
    model : nn.Module
        The model about to be finetuned (any device, float32/bfloat16/float16).
    calib_loader : iterable of batches, CalibrationMix, or CalibrationStatistics
        Data representative of what to preserve (see :func:`~rqcore_torch.calibrate`), or statistics
        already computed (then no pass is run).
    targets : None, str, sequence of str or callable
        Layers to preserve; see :func:`~rqcore_torch.targets.resolve_targets`.
    method : {"folora", "gate", "nullspace", "none"}, default "folora"
        See :class:`~rqcore_torch.PreserveConfig`. ``"folora"`` builds its own optimizer
        (:meth:`~PreservationHandle.optimizer`); ``"gate"``/``"nullspace"`` can also wrap one.
    rank, gate, tau, complement, reg, refresh_every
        See :class:`~rqcore_torch.PreserveConfig`.
    task_loader : iterable or CalibrationMix, optional
        Task batches for a ``C_t`` pre-pass (eval mode, like calibration); a
        :func:`~rqcore_torch.mix` of task sources gives ``C_t = Σ_s w_s C_s``.
    forward : callable, optional
        ``forward(model, batch)`` overriding how batches are fed.
    max_batches, token_fraction, progress, seed
        Bounds and subsampling of the passes; see :func:`~rqcore_torch.calibrate`.
    lora : dict, optional
        Add PEFT LoRA adapters first: ``dict(r=8, alpha=2r, target_modules=None, dropout=0.0)``
        (``target_modules`` defaults to the ``nn.Linear`` layers among ``targets``). The adapters are
        injected **in place** (``peft.inject_adapter_in_model``): ``model`` keeps its class and forward,
        every non-LoRA parameter is frozen (unfreeze a new head yourself before
        ``handle.optimizer``), and ``handle.model`` is ``model``, the object to train. The preserved
        layers are then the LoRA layers among ``targets``; with ``method="folora"`` their ``lora_A``
        start in the pencil's top eigenvectors and are gated, ``lora_B`` trains on plain Adam or, with
        ``lora_b="pencil"``, gated in its r-dim pencil (``lora_init``, ``lora_b``, ``lora_b_tau``,
        ``lora_refresh_every``; ``docs/folora.md`` §3).
    **options
        Other :class:`~rqcore_torch.PreserveConfig` fields (``energy``, ``gate_options``,
        ``tau_fraction``, ``task_token_fraction``, ``task_warmup``, ``task_window``,
        ``share_inputs``).

    Returns
    -------
    PreservationHandle

    Raises
    ------
    ValueError
        On a bad configuration or ``lora`` dict (before any forward pass; unknown ``lora`` keys are
        named), no matching layer, or the calibration errors of :func:`~rqcore_torch.calibrate`. No
        hook stays attached after an error.

    Notes
    -----
    Calibration happens here, before the optimizer and the LR scheduler exist: no warm-up step is
    spent on it, and the schedule starts when training does.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2))
    >>> calib = [torch.randn(16, 8) for _ in range(4)]
    >>> handle = preserve(model, calib, method="gate", progress=False)
    >>> opt = handle.optimizer(torch.optim.AdamW, lr=1e-3)
    >>> handle.remove()
    """
    if isinstance(options.get("config"), PreserveConfig):
        config = options.pop("config")
    else:
        config = PreserveConfig(
            method=method,
            rank=rank,
            gate=gate,
            tau=tau,
            complement=complement,
            reg=reg,
            refresh_every=refresh_every,
            max_batches=max_batches,
            token_fraction=token_fraction,
            progress=progress,
            seed=seed,
            **options,
        )
    lora_spec = None if lora is None else _check_lora(lora)
    resolved = resolve_targets(model, targets)
    if lora_spec is None:
        return _preserve_resolved(model, calib_loader, config, resolved, forward, task_loader)
    # lora=: the adapters go in first (calibration needs the wrapped layers); any error after that
    # takes them out again, so a failed call leaves the model as it was.
    trainable = [(param, param.requires_grad) for param in model.parameters()]
    had_config = hasattr(model, "peft_config")
    try:
        chosen = set(_inject_lora(model, lora_spec, resolved))
        resolved = resolve_targets(model, lambda name, _module: name in chosen)
        return _preserve_resolved(model, calib_loader, config, resolved, forward, task_loader)
    except BaseException:
        _undo_lora(model, trainable, had_config)
        raise


def _preserve_resolved(
    model: nn.Module,
    calib_loader: Any,
    config: PreserveConfig,
    resolved: list[Target],
    forward: Any,
    task_loader: Any,
) -> PreservationHandle:
    """:func:`preserve` once the targets are resolved: calibration, task statistics, the handle."""
    if isinstance(calib_loader, CalibrationStatistics):
        _check_statistics(calib_loader, resolved)
        stats = calib_loader
    else:
        stats = calibrate(
            model,
            calib_loader,
            targets=resolved,
            forward=forward,
            max_batches=config.max_batches,
            token_fraction=config.token_fraction,
            share_inputs=config.share_inputs,
            progress=config.progress,
            seed=config.seed,
        )
    task = None
    if task_loader is not None and config.method in ("gate", "folora"):
        task = _task_statistics(model, task_loader, config, resolved, stats, forward)
    return PreservationHandle(model, config, resolved, stats, task_statistics=task)


def _task_statistics(
    model: nn.Module,
    task_loader: Any,
    config: PreserveConfig,
    resolved: list[Target],
    stats: CalibrationStatistics,
    forward: Any,
) -> CalibrationStatistics:
    """``C_t`` over ``task_loader`` (a loader or a :func:`~rqcore_torch.mix`), grouped as ``stats``.

    Each pass starts from statistics whose layers are pre-grouped as ``C_p``'s, so each group's pencil
    pairs matching statistics. ``calibrate`` cannot continue pre-filled statistics over a mix, so a
    mix is run here source by source (seeds ``seed + i``, as ``calibrate`` does) and merged as
    ``Σ_s w_s C_s``.
    """
    targets = [t for t in resolved if t.name in stats.layers]

    def run(loader: Any, seed: int | None) -> CalibrationStatistics:
        fresh = CalibrationStatistics()
        fresh.layers = {n: _LayerEntry(e.group, e.dim) for n, e in stats.layers.items()}
        return calibrate(
            model,
            loader,
            targets=targets,
            forward=forward,
            max_batches=config.max_batches,
            token_fraction=config.token_fraction,
            share_inputs=config.share_inputs,
            progress=config.progress,
            seed=seed,
            statistics=fresh,
            skip_batches=0,
        )

    if not hasattr(task_loader, "sources"):
        return run(task_loader, config.seed)
    seed = config.seed
    parts = [
        (run(source, None if seed is None else seed + i), weight)
        for i, (source, weight) in enumerate(task_loader.sources)
    ]
    groups = {frozenset(part.groups) for part, _ in parts}
    if len(groups) > 1:
        # weighted_merge needs every group in every source.
        raise ValueError(
            "task_loader: the sources of the mix reached different layers; give every source "
            "batches that run the same model path, or drop the sources that skip layers."
        )
    return CalibrationStatistics.weighted_merge(parts)
