"""The one-call entry point: :func:`preserve`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
from rqcore_torch.targets import TargetSpec, resolve_targets

__all__ = ["preserve"]


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
    task_loader : iterable, optional
        Task batches for a ``C_t`` pre-pass (eval mode, like calibration).
    forward : callable, optional
        ``forward(model, batch)`` overriding how batches are fed.
    max_batches, token_fraction, progress, seed
        Bounds and subsampling of the passes; see :func:`~rqcore_torch.calibrate`.
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
        On a bad configuration (before any forward pass), no matching layer, or the calibration
        errors of :func:`~rqcore_torch.calibrate`. No hook stays attached after an error.

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
    resolved = resolve_targets(model, targets)
    if isinstance(calib_loader, CalibrationStatistics):
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
        task = CalibrationStatistics()
        # Same grouping as C_p, so each group's pencil pairs matching statistics.
        task.layers = {n: _LayerEntry(e.group, e.dim) for n, e in stats.layers.items()}
        task = calibrate(
            model,
            task_loader,
            targets=[t for t in resolved if t.name in stats.layers],
            forward=forward,
            max_batches=config.max_batches,
            token_fraction=config.token_fraction,
            share_inputs=config.share_inputs,
            progress=config.progress,
            seed=config.seed,
            statistics=task,
            skip_batches=0,
        )
    return PreservationHandle(model, config, resolved, stats, task_statistics=task)
