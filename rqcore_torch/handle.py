"""The object :func:`rqcore_torch.preserve` returns: bases, gates, monitoring, refresh and cleanup.

A :class:`PreservationHandle` owns everything preservation needs — the calibration statistics,
the ``W₀`` snapshots, one factored pencil and one projector per distinct layer input, and the hooks
of online task tracking — so nothing is stored on the user's modules, and
:meth:`PreservationHandle.remove` (or leaving a ``with`` block) detaches every hook.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from rqcore import (
    GeneralizedEigenResult,
    NullspaceProjector,
    Pencil,
    RayleighBasis,
    gates,
    generalized_topk,
)
from rqcore_torch._linalg import dense_generalized_topk
from rqcore_torch.calibration import CalibrationStatistics, _InputCollector, _LayerEntry
from rqcore_torch.config import PreserveConfig
from rqcore_torch.projectors import LayerGate, TorchGate, to_torch
from rqcore_torch.targets import Target

if TYPE_CHECKING:
    from rqcore_torch.folora import FoLoRAAdam, LoRAPencil, SpectralLayer

__all__ = ["LayerReport", "PenaltyReport", "PreservationHandle", "Report"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PenaltyReport:
    """The forgetting meter: ``tr(ΔW C_p ΔWᵀ) / tr(W₀ C_p W₀ᵀ)`` per layer and in total.

    Attributes
    ----------
    per_layer : dict of str to float
    total : float
        ``Σ_l tr(ΔW_l C_l ΔW_lᵀ) / Σ_l tr(W₀_l C_l W₀_lᵀ)``.
    """

    per_layer: dict[str, float]
    total: float


@dataclass(frozen=True)
class LayerReport:
    """One row of :meth:`PreservationHandle.report`.

    Attributes
    ----------
    layer : str
    d_in : int
    rank : int
        Basis vectors (gate) or blocked directions (nullspace); 0 when nothing is gated.
    top_lambda : float
        Largest generalized eigenvalue (gate) or largest ``C_p`` eigenvalue (nullspace).
    mean_gain : float
        Mean gain over the ``d`` directions of the augmented input space.
    penalty : float
        This layer's forgetting penalty.
    """

    layer: str
    d_in: int
    rank: int
    top_lambda: float
    mean_gain: float
    penalty: float


class Report(list[LayerReport]):
    """A list of :class:`LayerReport` that prints as a table."""

    def __str__(self) -> str:
        header = (
            f"{'layer':<48} {'d_in':>6} {'rank':>6} {'top λ':>10} {'mean gain':>9} {'penalty':>10}"
        )
        lines = [header, "-" * len(header)]
        for r in self:
            lines.append(
                f"{r.layer[-48:]:<48} {r.d_in:>6} {r.rank:>6} {r.top_lambda:>10.4g} "
                f"{r.mean_gain:>9.3f} {r.penalty:>10.3g}"
            )
        return "\n".join(lines)


def _gain_rule(config: PreserveConfig) -> Callable[[np.ndarray], Any]:
    """Gains as a function of the eigenvalues (re-evaluated at every refresh).

    The gains come from :func:`rqcore_torch.folora.resolve_gains`, the dispatcher
    :class:`~rqcore_torch.FoLoRAAdam` uses too: the handle's bases (``report``, ``plot``, a wrapped
    optimizer) and FoLoRA's optimizer apply the same gains, ``gate_options`` (e.g. the sigmoid's
    ``temperature``, default ``folora.SIGMOID_TEMPERATURE``) included.
    """
    from rqcore_torch.folora import resolve_gains

    gate, opts = config.gate, dict(config.gate_options)
    fraction = config.tau_fraction
    assert fraction is not None  # PreserveConfig.__post_init__ fills it
    scaled = not callable(gate) and gate in ("ratio", "threshold", "sigmoid")

    def rule(lam: np.ndarray) -> Any:
        tau = 1.0  # not read by the gates without a scale (hard with a rank, power, callables)
        if scaled:
            if config.tau == "auto":
                if not (np.asarray(lam) > 0).any():
                    return np.zeros(len(lam))  # no direction buys any utility
                tau = gates.tau_for_utility_fraction(lam, fraction)
            else:
                tau = float(config.tau)
        return resolve_gains(lam, gate, tau, options=opts)

    return rule


def _ratio(num: float, den: float) -> float:
    """``num / den`` for the penalty meter; for ``den <= 0``: 0 if ``num == 0``, else ``inf``."""
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


def penalty_terms(W: torch.Tensor, W0: torch.Tensor, C: torch.Tensor) -> tuple[float, float]:
    """``(tr((W−W₀) C (W−W₀)ᵀ), tr(W₀ C W₀ᵀ))`` for rows ``[W | b]`` and input second moments ``C``.

    Columns beyond ``C``'s size are dropped (a LoRA layer's effective weight sees the plain input).
    """
    if W.shape[1] != C.shape[0]:
        W, W0 = W[:, : C.shape[0]], W0[:, : C.shape[0]]
    D = W - W0
    return float(((D @ C) * D).sum()), float(((W0 @ C) * W0).sum())


class PreservationHandle:
    """Preservation state of one model: statistics, bases and gates, meters; see :func:`preserve`.

    Parameters
    ----------
    model : nn.Module
    config : PreserveConfig
    targets : sequence of Target
        The preserved layers; those without statistics are reported, not gated.
    statistics : CalibrationStatistics
        ``C_p``, from :func:`~rqcore_torch.calibrate`.
    task_statistics : CalibrationStatistics, optional
        ``C_t`` from a task pre-pass.
    w0 : dict of str to Tensor, optional
        ``[W₀ | b₀]`` snapshots (default: the current weights).
    step : int, default 0
        Optimizer steps already taken (restored by :func:`~rqcore_torch.load`).
    bases : dict of str to dict of Tensor, optional
        A restored handle (what :func:`~rqcore_torch.load` passes): per group, the basis to install
        instead of the first solve, as saved (``values``, ``vectors``, ``dual`` = ``M V``, ``A`` =
        the ``C_t`` it was solved with). Groups it lacks are solved as usual; later refreshes solve
        from the task statistics. A restored handle keeps LoRA adapters as they are
        (no ``lora_init``).

    Notes
    -----
    Without task statistics the initial ``C_t`` is isotropic, ``(tr C_p / d)·I``: the first basis
    then favours the directions the pretraining data uses least. Online tracking (``refresh_every``;
    for ``"folora"`` also the first ``task_warmup`` steps) replaces it with the statistics of the
    training batches seen since the previous refresh.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from rqcore_torch import preserve
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    >>> with preserve(model, [torch.randn(16, 4)], method="nullspace", progress=False) as handle:
    ...     opt = handle.optimizer(torch.optim.SGD, lr=0.1)
    ...     model(torch.randn(8, 4)).pow(2).mean().backward()
    ...     _ = opt.step()
    ...     print(handle.penalty().total < 1e-3)
    True
    """

    def __init__(
        self,
        model: nn.Module,
        config: PreserveConfig,
        targets: Sequence[Target],
        statistics: CalibrationStatistics,
        *,
        task_statistics: CalibrationStatistics | None = None,
        w0: dict[str, torch.Tensor] | None = None,
        step: int = 0,
        bases: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.all_targets = list(targets)
        self.targets = [t for t in targets if t.name in statistics.layers]
        self.unreached = [t.name for t in targets if t.name not in statistics.layers]
        self.statistics = statistics
        self.task_statistics = task_statistics
        self.step = int(step)
        self._w0 = w0 if w0 is not None else {t.name: t.effective_weight() for t in self.targets}
        self._pencils: dict[str, Pencil] = {}
        # The last solve per group: a warm start that also reuses its reduced coordinates.
        self._results: dict[str, GeneralizedEigenResult] = {}
        self._projectors: dict[str, RayleighBasis | NullspaceProjector] = {}
        self._torch_gates: dict[tuple[str, torch.device, torch.dtype], TorchGate] = {}
        self._hooks: list[Any] = []
        self._online: _InputCollector | None = None
        self._online_stats: CalibrationStatistics | None = None
        self._removed = False
        # C_t each group's current basis was solved with (the LoRA pencils of lora_B reuse it).
        self._task_cov: dict[str, torch.Tensor] = {}
        # lora_B layer name -> (group, pencil) of the FoLoRAAdam built by optimizer() ("folora").
        self._lora_pencils: dict[str, tuple[str, LoRAPencil]] = {}
        # Read by the first solve only: a loaded handle's bases are the saved ones, and its
        # refreshes then track (and fall back) exactly as the saved handle's would.
        self._restored_bases = dict(bases or {})
        if config.method != "none":
            self._solve_all()
        self._restored_bases = {}
        if config.method == "folora" and config.lora_init == "basis" and bases is None:
            self._init_lora_from_basis()  # not on a restore: lora_A holds the saved training
        if config.method == "gate" and config.refresh_every is not None:
            self._attach_online()
        elif config.method == "folora" and (
            config.refresh_every is not None or self._warmup_pending
        ):
            self._attach_online()

    # ------------------------------------------------------------------ solves
    @property
    def groups(self) -> list[str]:
        """Distinct inputs (accumulator groups) of the preserved layers, in layer order."""
        seen: dict[str, None] = {}
        for t in self.targets:
            seen.setdefault(self.statistics.layers[t.name].group, None)
        return list(seen)

    def _task_covariance(self, group: str, Cp: torch.Tensor) -> torch.Tensor:
        for stats in (self._online_stats, self.task_statistics):
            if stats is not None and group in stats.groups:
                acc = stats.groups[group]
                if float(acc.total_weight) > 0:
                    return acc.covariance().to(Cp.device)
        d = Cp.shape[0]
        return torch.eye(d, dtype=Cp.dtype, device=Cp.device) * (torch.trace(Cp) / d)

    def _solve(self, group: str) -> None:
        cfg = self.config
        Cp = self.statistics.groups[group].covariance()
        Cp_np = Cp.detach().cpu().numpy()
        if cfg.method == "nullspace":
            self._projectors[group] = NullspaceProjector(Cp_np, energy=cfg.energy)
            return
        d = Cp.shape[0]
        k = min(cfg.rank or d, d)
        saved = self._restored_bases.get(group)
        if saved is not None:
            Ct = saved["A"].to(device=Cp.device, dtype=torch.float64)
        else:
            Ct = self._task_covariance(group, Cp)
        if cfg.lora_b == "pencil" and any(t.kind == "lora" for t in self.targets):
            self._task_cov[group] = Ct  # lora_B pencils re-solve with it (one d×d per group)
        rule = _gain_rule(cfg)
        if saved is not None:  # a restored handle: the saved basis, bit for bit, and no solve
            self._projectors[group] = RayleighBasis(
                saved["values"].numpy(),
                saved["vectors"].numpy(),
                dual=saved["dual"].numpy(),
                B=Cp_np,
                reg_used=float(saved["reg_used"]),
                A=saved["A"].numpy(),
                gains=rule,
                complement=cfg.complement,
            )
            return
        reg = cfg.reg
        assert reg is not None  # PreserveConfig.__post_init__ fills it
        if Cp.device.type == "cuda":
            # Dense solve on the device; the core basis is built from host copies (detached: a
            # NumPy view of a tensor that requires grad raises).
            values, vectors, reg_used = dense_generalized_topk(Ct, Cp, k, reg=reg)
            basis = RayleighBasis(
                values.detach().cpu().numpy(),
                vectors.detach().cpu().numpy(),
                B=Cp_np,
                reg_used=float(reg_used),
                A=Ct.detach().cpu().numpy(),
                gains=rule,
                complement=cfg.complement,
            )
        else:
            pencil = self._pencils.get(group)
            if pencil is None:  # factor C_p once per group; refreshes reuse it
                pencil = self._pencils[group] = Pencil(Cp_np, reg=reg)
            prev = self._projectors.get(group)
            last = self._results.get(group)
            v0: Any = None
            if last is not None and last.pencil is pencil and last.values.size == k:
                v0 = last
            elif isinstance(prev, RayleighBasis) and prev.rank == k:
                v0 = prev.vectors
            Ct_np = Ct.detach().cpu().numpy()
            # The config's seed: iterative solves start from a random block, and two runs with the
            # same seed must give the same bases (and so the same training run).
            result = self._results[group] = generalized_topk(Ct_np, pencil, k, v0=v0, seed=cfg.seed)
            basis = RayleighBasis.from_result(
                result, A=Ct_np, gains=rule, complement=cfg.complement
            )
        self._projectors[group] = basis

    def _solve_all(self) -> None:
        for group in self.groups:
            self._solve(group)
        self._torch_gates.clear()

    def refresh(self) -> None:
        """Re-solve every pencil from the latest task statistics (warm-started, ``C_p`` reused).

        Called every ``refresh_every`` optimizer steps by the wrapped optimizer; the task statistics
        tracked online are then reset, so each refresh reflects the steps since the previous one.
        """
        if self.config.method not in ("gate", "folora"):
            return
        import torch.distributed as dist

        if self._online_stats is not None and dist.is_available() and dist.is_initialized():
            # Every rank must solve the same pencils, or data-parallel replicas drift apart.
            self._online_stats.all_reduce_()
        if self._online_stats is not None and not any(
            float(acc.total_weight) > 0 for acc in self._online_stats.groups.values()
        ):
            # Tracking runs only in train mode with grad enabled: a run that trains in eval() mode
            # (dropout off) re-solves from the pre-pass or placeholder C_t; say so, once per refresh.
            logger.warning(
                "refresh at step %d: no task statistics were tracked since the last one (tracking "
                "runs only with model.train() and grad enabled); the bases are re-solved from %s.",
                self.step,
                "the task_loader statistics"
                if self.task_statistics is not None
                else "the isotropic placeholder C_t",
            )
        self._solve_all()
        if self._online_stats is not None:
            layout = dict(self._online_stats.layers)
            self._online_stats = CalibrationStatistics()
            self._online_stats.layers = layout
            if self._online is not None:
                self._online.stats = self._online_stats
        logger.info("refreshed %d pencils at step %d", len(self._projectors), self.step)

    def projector(self, name: str) -> RayleighBasis | NullspaceProjector:
        """The core projector of layer ``name`` (shared by layers with the same input).

        Parameters
        ----------
        name : str
            A preserved layer's name.

        Returns
        -------
        rqcore.RayleighBasis or rqcore.NullspaceProjector
            The group's current projector itself (``"nullspace"``: a NullspaceProjector; ``"gate"``
            and ``"folora"``: a RayleighBasis), replaced by each :meth:`refresh`.

        Raises
        ------
        KeyError
            If the layer is not gated (no statistics, or ``method="none"``).
        """
        if name not in self.statistics.layers or not self._projectors:
            raise KeyError(f"layer {name!r} has no projector (method={self.config.method!r}).")
        return self._projectors[self.statistics.layers[name].group]

    # ------------------------------------------------------------------ online task statistics
    @property
    def _warmup_pending(self) -> bool:
        """FoLoRA without task statistics, in the first ``task_warmup`` steps (``C_t`` online)."""
        cfg = self.config
        return (
            cfg.method == "folora"
            and cfg.task_warmup is not None
            and self.task_statistics is None
            and self.step < cfg.task_warmup
        )

    def _tracking_active(self) -> bool:
        if not (self.model.training and torch.is_grad_enabled()):
            return False  # evaluation loops must not pollute C_t
        if self._warmup_pending:
            return True
        window, every = self.config.task_window, self.config.refresh_every
        if every is None:
            return (
                self.config.method == "gate"
            )  # folora after its warm-up refresh: nothing to track
        if window is None:
            return True
        return self.step % every >= every - window

    def _attach_online(self) -> None:
        stats = CalibrationStatistics()
        stats.layers = {n: _LayerEntry(e.group, e.dim) for n, e in self.statistics.layers.items()}
        self._online_stats = stats
        collector = _InputCollector(
            self.targets,
            stats,
            token_fraction=self.config.task_token_fraction,
            seed=self.config.seed,
            share_inputs=self.config.share_inputs,
            active=self._tracking_active,
        )
        collector.attach()
        self._online = collector

        def root_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self._tracking_active():
                mask = kwargs.get("attention_mask")
                ok = isinstance(mask, torch.Tensor) and mask.ndim == 2
                collector.begin_batch(mask.bool() if ok else None, self.step)  # type: ignore[union-attr]

        # Run eagerly under torch.compile (a graph break), like the collector's layer hooks.
        hook = torch.compiler.disable(root_hook)
        self._hooks.append(self.model.register_forward_pre_hook(hook, with_kwargs=True))

    # ------------------------------------------------------------------ optimizer side
    def _gate_for(self, group: str, device: torch.device, dtype: torch.dtype) -> TorchGate:
        key = (group, device, dtype)
        gate = self._torch_gates.get(key)
        if gate is None:
            gate = self._torch_gates[key] = to_torch(
                self._projectors[group], device=device, dtype=dtype
            )
        return gate

    def layer_gates(self) -> list[LayerGate]:
        """One :class:`~rqcore_torch.projectors.LayerGate` per trainable gated parameter.

        Returns
        -------
        list of LayerGate
            Empty for ``method="none"``. A frozen parameter is left out (not in the optimizer).
        """
        if self.config.method == "none":
            return []
        return [
            LayerGate(pname, w, b, self._gate_for(group, w.device, w.dtype), transposed)
            for _, group, pname, w, b, transposed in self._trainable_gated()
        ]

    def _trainable_gated(self) -> Iterator[tuple[Target, str, str, Any, Any, bool]]:
        """(target, group, name, weight, bias, transposed) of every trainable gated weight.

        A frozen weight is skipped (a trainable bias beside it is left ungated, with a warning: the
        gate acts on the rows ``[W, b]`` together); so is a trainable weight whose bias is frozen,
        because its statistics are augmented with the bias column (a warning says so).
        """
        for t in self.targets:
            group = self.statistics.layers[t.name].group
            for pname, w, b, transposed in t.gated:
                if not w.requires_grad:
                    if b is not None and b.requires_grad:
                        logger.warning(
                            "%s: the weight is frozen but the bias is not; the bias is not gated "
                            "(it trains unconstrained).",
                            pname,
                        )
                    continue
                if b is not None and not b.requires_grad:
                    logger.warning(
                        "%s: the bias is frozen but the weight is not; not gated.", pname
                    )
                    continue
                yield t, group, pname, w, b, transposed

    # ------------------------------------------------------------------ LoRA (method "folora")
    def _lora_adapters(self) -> Iterator[tuple[Target, str, str, Any, Any]]:
        """(target, group, adapter, lora_A weight, lora_B weight) of every PEFT LoRA adapter."""
        for t in self.targets:
            if t.kind != "lora":
                continue
            group = self.statistics.layers[t.name].group
            mod: Any = t.module
            for adapter in mod.lora_A:
                if adapter in mod.lora_B:
                    yield t, group, adapter, mod.lora_A[adapter].weight, mod.lora_B[adapter].weight

    def _init_lora_from_basis(self) -> None:
        """Start each trainable ``lora_A`` in its layer's top-``r`` generalized eigenvectors.

        Rows are rescaled to the RMS row norm of the current (PEFT) init, so ``lora_B``'s effective
        learning rate is unchanged. Runs once, at construction: an adapter whose ``lora_B`` is
        nonzero (already trained, so ``lora_A`` carries the model's function) is kept, with a
        warning.
        """
        from rqcore_torch.folora import lora_init_from_basis

        for t, group, adapter, A, B in self._lora_adapters():
            if not A.requires_grad:
                continue
            basis = self._projectors.get(group)
            if not isinstance(basis, RayleighBasis):
                continue
            r = A.shape[0]
            if bool((B.detach() != 0).any()):
                logger.warning(
                    "%s: lora_B of adapter %r is nonzero (a trained adapter); lora_A is kept "
                    "(lora_init='basis' only re-initializes fresh adapters).",
                    t.name,
                    adapter,
                )
                continue
            if r > basis.rank:
                logger.warning(
                    "%s: LoRA rank %d exceeds the basis rank %d; lora_A is kept.",
                    t.name,
                    r,
                    basis.rank,
                )
                continue
            with torch.no_grad():
                rms = float(A.detach().double().pow(2).sum(1).mean().sqrt())
                scale = rms if rms > 0 and math.isfinite(rms) else None
                A.copy_(lora_init_from_basis(basis, r, scale=scale, dtype=A.dtype, device=A.device))

    def _lora_b_layers(self) -> list[tuple[SpectralLayer, str, LoRAPencil]]:
        """``lora_B`` of every trainable adapter as a layer gated in its r-dim pencil.

        Each layer gets a placeholder basis; the real one is solved by
        :class:`~rqcore_torch.FoLoRAAdam` from the pencil at construction.
        """
        from rqcore_torch.folora import LoRAPencil, SpectralLayer

        out = []
        for t, group, adapter, A, B in self._lora_adapters():
            if not B.requires_grad:
                continue
            Cp = self.statistics.groups[group].covariance()
            Ct = self._task_cov.get(group)
            if Ct is None:
                Ct = self._task_covariance(group, Cp)
            r = B.shape[1]
            eye = torch.eye(r, dtype=B.dtype, device=B.device)
            ones = torch.ones(r, dtype=B.dtype, device=B.device)
            layer = SpectralLayer(f"{t.name}.lora_B.{adapter}", B, None, ones, eye, eye, scale=1.0)
            # ε of the layer's own metric M = C_p + εI: the r-dim metric is L_A M L_Aᵀ exactly.
            reg = self.config.reg
            assert reg is not None  # PreserveConfig.__post_init__ fills it
            eps = reg * float(torch.trace(Cp)) / Cp.shape[0]
            pencil = LoRAPencil(A, Ct, Cp, reg=reg, eps=eps, tau=self._layer_tau(group))
            out.append((layer, group, pencil))
        return out

    def _layer_tau(self, group: str) -> float | None:
        """The group's full-pencil ``τ`` (its ``lora_A``'s) if ``lora_b_tau="layer"``, else None."""
        cfg = self.config
        basis = self._projectors.get(group)
        if cfg.lora_b_tau != "layer" or not isinstance(basis, RayleighBasis):
            return None
        from rqcore_torch.folora import resolve_tau

        if cfg.tau != "auto":
            return float(cfg.tau)
        return resolve_tau(np.asarray(basis.values), "utility", cfg.tau_fraction)

    def spectral_layers(self) -> list[SpectralLayer]:
        """One :class:`~rqcore_torch.folora.SpectralLayer` per trainable gated weight ("folora").

        Layers sharing an input share its basis. A frozen weight is left out, and so is a trainable
        weight whose bias is frozen (its statistics are augmented with the bias column): it is then
        trained by the plain-Adam part of :class:`~rqcore_torch.FoLoRAAdam`, with a warning.

        Returns
        -------
        list of SpectralLayer
        """
        from rqcore_torch.folora import SpectralLayer

        out = []
        for t, group, pname, w, b, transposed in self._trainable_gated():
            basis = self._projectors[group]
            if not isinstance(basis, RayleighBasis):
                raise RuntimeError(
                    f"layer {t.name!r} has no spectral basis (method={self.config.method!r})."
                )

            out.append(SpectralLayer.from_basis(pname, w, b, basis, transposed=transposed))
        return out

    def _refresh_due(self) -> bool:
        every = self.config.refresh_every
        if every is not None and self.step % every == 0:
            return True
        cfg = self.config
        return (
            cfg.method == "folora"
            and cfg.task_warmup is not None
            and self.task_statistics is None
            and self.step == cfg.task_warmup
        )

    def _on_folora_step(self, optimizer: FoLoRAAdam) -> None:
        self.step += 1
        if self._removed:  # see _on_step: no refresh from statistics nothing tracks any more
            return
        if self._refresh_due():
            self.refresh()
            for layer in self.spectral_layers():  # moments are transported by set_basis
                optimizer.set_basis(
                    layer.name, layer.values, layer.vectors, layer.dual, scale=layer.scale
                )
            if self._lora_pencils:  # lora_B: the r-dim pencils see the new C_t through L_A
                for group, pencil in self._lora_pencils.values():
                    pencil.C_t = self._task_cov[group]
                    pencil.tau = self._layer_tau(group)
                optimizer.refresh_lora_pencils(self._lora_pencils)

    def _online_state(self) -> dict[str, dict[str, torch.Tensor]]:
        if self._online_stats is None:
            return {}
        return {
            g: {k: torch.as_tensor(np.asarray(v)) for k, v in acc.state_dict().items()}
            for g, acc in self._online_stats.groups.items()
        }

    def _load_online_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        from rqcore_torch.statistics import TorchCovariance

        if self._online_stats is None:
            return
        self._online_stats.groups.clear()
        # Online statistics live where the training activations are: the group's weights' device
        # (calibration statistics may sit elsewhere, e.g. loaded on the CPU for a CUDA model).
        devices = {
            self.statistics.layers[t.name].group: t.gated[0][1].device
            for t in self.targets
            if t.gated
        }
        for g, st in state.items():
            host = {k: v.cpu().numpy() for k, v in st.items()}
            self._online_stats.groups[g] = TorchCovariance.from_state_dict(
                host, device=devices.get(g)
            )

    def _folora_optimizer(self, cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]) -> Any:
        from rqcore_torch.folora import FoLoRAAdam

        defaults = {
            k: p.default
            for k, p in inspect.signature(cls).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
        opts = dict(kwargs)
        hyper = {k: opts.pop(k, defaults.get(k)) for k in ("lr", "betas", "eps", "weight_decay")}
        for flag in ("amsgrad", "maximize"):
            if opts.pop(flag, False):
                raise ValueError(
                    f'method="folora" does not support {flag}=True; use method="gate".'
                )
        # Adam's weight decay is an L2 term in the gradient unless decoupled_weight_decay=True;
        # FoLoRA decays decoupled (AdamW): refuse a coupled decay rather than change its meaning.
        decoupled = opts.pop("decoupled_weight_decay", defaults.get("decoupled_weight_decay", True))
        if float(hyper["weight_decay"] or 0.0) != 0.0 and not decoupled:
            raise ValueError(
                f"{cls.__name__} with weight_decay={hyper['weight_decay']} adds an L2 term to the "
                'gradient, but method="folora" decays decoupled (as AdamW): pass torch.optim.AdamW '
                "(or Adam with decoupled_weight_decay=True), or weight_decay=0."
            )
        for k in ("foreach", "fused", "capturable", "differentiable"):
            opts.pop(k, None)  # implementation switches of torch's Adam: no meaning here
        if opts:
            raise TypeError(f'unexpected optimizer arguments for method="folora": {sorted(opts)}.')
        lr = hyper["lr"]
        cfg = self.config
        layers = self.spectral_layers()
        self._lora_pencils = {}
        if cfg.lora_b == "pencil":
            for layer, group, pencil in self._lora_b_layers():
                layers.append(layer)
                self._lora_pencils[layer.name] = (group, pencil)
        gated = {id(p) for lay in layers for p in (lay.weight, lay.bias) if p is not None}
        others = [p for p in self.model.parameters() if p.requires_grad and id(p) not in gated]
        optimizer = FoLoRAAdam(
            layers,
            others,
            lr=float(lr.item() if isinstance(lr, torch.Tensor) else lr),
            betas=tuple(hyper["betas"]),
            eps=float(hyper["eps"]),
            weight_decay=float(hyper["weight_decay"]),
            gate=cfg.gate,
            # "auto" is the utility-fraction rule with the config's fraction (0.3 by default).
            tau="utility" if cfg.tau == "auto" else float(cfg.tau),
            tau_param=cfg.tau_fraction,
            gate_options=cfg.gate_options,  # the handle's bases use the same options (_gain_rule)
            complement=cfg.complement,
            lora_pencils={name: pencil for name, (_, pencil) in self._lora_pencils.items()},
            refresh_every=cfg.lora_refresh_every or 0,
            on_step=self._on_folora_step,
        )

        self._attach_resume_hooks(optimizer, gated=None)
        return optimizer

    def _attach_resume_hooks(self, optimizer: Any, gated: Any) -> None:
        """Let the handle's schedule travel with ``optimizer.state_dict()``.

        The step counter, the task statistics since the last refresh and the subsampling generator
        are saved, so a resumed run (e.g. ``Trainer(resume_from_checkpoint=...)``) refreshes at the
        same steps with the same ``C_t``. For a wrapped optimizer (``gated``) the current bases are
        saved too: its gates are not optimizer state (FoLoRA keeps its bases in its own state).
        """

        def save_hook(opt: Any, sd: dict[str, Any]) -> dict[str, Any]:
            extra: dict[str, Any] = {"step": self.step, "online": self._online_state()}
            if self._online is not None:  # the token subsample's draws continue after a resume
                extra["generator"] = self._online.generator.get_state()
            if gated is not None:
                extra["bases"] = self._bases_state()
            if self._lora_pencils:  # the C_t (and τ) the lora_B pencils are re-solved with
                extra["lora_task"] = {
                    group: pencil.C_t.detach().cpu().clone()
                    for group, pencil in self._lora_pencils.values()
                }
                extra["lora_tau"] = {
                    name: pencil.tau for name, (_, pencil) in self._lora_pencils.items()
                }
            sd["preserve"] = extra
            return sd

        pending: list[dict[str, Any]] = []

        def load_pre_hook(opt: Any, sd: dict[str, Any]) -> dict[str, Any]:
            # Only set aside here: the handle changes after torch has accepted the state dict.
            sd = dict(sd)
            pending.clear()
            extra = sd.pop("preserve", None)
            if extra is not None:
                pending.append(extra)
            return sd

        def load_post_hook(opt: Any) -> None:
            if not pending:
                return
            extra = pending.pop()
            self.step = int(extra["step"])
            self._load_online_state(extra["online"])
            if self._online is not None:
                self._online.stats = self._online_stats  # type: ignore[assignment]
                if "generator" in extra:
                    self._online.generator.set_state(extra["generator"])
            if gated is not None and extra.get("bases"):
                self._load_bases_state(extra["bases"])
                gated.set_layers(self.layer_gates())
            for group, Ct in extra.get("lora_task", {}).items():
                if group in self._task_cov:
                    Ct = Ct.to(
                        device=self._task_cov[group].device, dtype=self._task_cov[group].dtype
                    )
                    self._task_cov[group] = Ct
                for g, pencil in self._lora_pencils.values():
                    if g == group:
                        pencil.C_t = Ct
            for name, tau in extra.get("lora_tau", {}).items():
                if name in self._lora_pencils:
                    self._lora_pencils[name][1].tau = tau

        optimizer.register_state_dict_post_hook(save_hook)
        optimizer.register_load_state_dict_pre_hook(load_pre_hook)
        optimizer.register_load_state_dict_post_hook(load_post_hook)

    def _bases_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Each group's refreshable Rayleigh-basis part, as tensors (for ``weights_only`` loads)."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for group, proj in self._projectors.items():
            if isinstance(proj, RayleighBasis):
                entry = {
                    "values": torch.from_numpy(proj.values.copy()),
                    "vectors": torch.from_numpy(proj.vectors.copy()),
                    "dual": torch.from_numpy(proj.MV.copy()),
                    "reg_used": torch.tensor(proj.reg_used, dtype=torch.float64),
                }
                if isinstance(proj.A, np.ndarray):
                    entry["A"] = torch.from_numpy(proj.A.copy())
                out[group] = entry
        return out

    def _load_bases_state(self, saved: dict[str, dict[str, torch.Tensor]]) -> None:
        rule = _gain_rule(self.config)
        for group, entry in saved.items():
            current = self._projectors.get(group)
            if not isinstance(current, RayleighBasis):
                raise ValueError(
                    f"the checkpoint has a basis for {group!r}, which is not gated here."
                )
            state = current.state_dict(covariances=True)
            state.update(
                values=entry["values"].numpy(),
                vectors=entry["vectors"].numpy(),
                dual=entry["dual"].numpy(),
            )
            if "A" in entry:
                state["A"] = entry["A"].numpy()
            self._projectors[group] = RayleighBasis.from_state_dict(state, gains=rule)
            self._results.pop(group, None)  # the next refresh starts from the loaded basis
        self._torch_gates.clear()

    def _on_step(self, optimizer: Any) -> None:
        self.step += 1
        # A removed handle tracks nothing any more: a refresh would re-solve from stale (or, once
        # reset, placeholder) task statistics and change the gates of an optimizer left running.
        if self._removed:
            return
        if self.config.method in ("gate", "folora") and self._refresh_due():
            self.refresh()
            optimizer.set_layers(self.layer_gates())

    def wrap(self, optimizer: torch.optim.Optimizer) -> Any:
        """Gate ``optimizer``'s steps: ``GatedOptimizer(optimizer, layer_gates(), on_step=...)``.

        Parameters
        ----------
        optimizer : torch.optim.Optimizer
            Must hold the trainable gated parameters.

        Returns
        -------
        rqcore_torch.optim.GatedOptimizer
            For ``method="none"`` it gates nothing but still counts steps (monitoring only).

        Raises
        ------
        TypeError
            For ``method="folora"``: FoLoRA keeps Adam's moments in each layer's spectral basis, so
            it replaces the optimizer instead of wrapping one; use :meth:`optimizer`.
        """
        from rqcore_torch.optim import GatedOptimizer

        if self.config.method == "folora":
            raise TypeError(
                'method="folora" replaces the optimizer (its Adam moments live in each layer\'s '
                "spectral basis), so it cannot wrap an existing one: build it with "
                "handle.optimizer(torch.optim.AdamW, lr=..., weight_decay=...), or use "
                'preserve(..., method="gate") to gate any optimizer.'
            )
        self._check_alive()
        gated = GatedOptimizer(optimizer, self.layer_gates(), on_step=self._on_step)
        self._attach_resume_hooks(gated, gated=gated)
        return gated

    def optimizer(self, cls: type[torch.optim.Optimizer], **kwargs: Any) -> Any:
        """The optimizer of the run: FoLoRA's gated Adam, or ``cls`` wrapped by :meth:`wrap`.

        Parameters
        ----------
        cls : type
            For ``method="folora"``: ``torch.optim.AdamW`` (or ``Adam``), whose ``lr``, ``betas``,
            ``eps`` and ``weight_decay`` (decoupled, as AdamW's; ``Adam`` with a coupled
            ``weight_decay > 0`` is refused; the class's defaults when omitted) configure a
            :class:`~rqcore_torch.FoLoRAAdam` over the target layers (one per trainable gated
            weight, with its bias), every other trainable parameter going to its plain-AdamW group;
            the bases are re-solved and installed with ``set_basis`` after ``task_warmup`` steps (no
            task statistics) and every ``refresh_every`` steps. PEFT LoRA targets: ``lora_A`` is
            gated in the layer's pencil; ``lora_B`` is in the plain-AdamW group, or
            (``lora_b="pencil"``) gated in the r-dim pencil through the current ``lora_A``,
            re-solved every ``lora_refresh_every`` steps and at each of the handle's refreshes (new
            ``C_t``). Any other class (and any class for the other methods) is built over the
            trainable parameters and wrapped (:meth:`wrap`); with ``"folora"`` its step is then
            gated in the same bases (for plain SGD that is FoLoRA).
        **kwargs
            Arguments of ``cls``.

        Returns
        -------
        FoLoRAAdam or GatedOptimizer
            A :class:`~rqcore_torch.FoLoRAAdam` for ``method="folora"`` with Adam/AdamW, else a
            :class:`~rqcore_torch.GatedOptimizer` around ``cls`` (for ``method="none"`` it gates
            nothing but counts steps). Either way its steps advance the handle's step count (and,
            for ``"gate"`` and ``"folora"``, re-solve the bases on schedule), and its state dict
            carries the handle's step and online statistics.

        Raises
        ------
        RuntimeError
            If the handle was removed.
        TypeError
            For ``method="folora"`` with Adam/AdamW and arguments FoLoRA does not know.
        ValueError
            For ``method="folora"`` with Adam/AdamW: ``amsgrad=True`` or ``maximize=True``, a
            coupled ``weight_decay > 0`` (``Adam`` without ``decoupled_weight_decay=True``),
            hyperparameters :class:`~rqcore_torch.FoLoRAAdam` rejects (e.g. a negative ``lr``), or
            ``gate_options`` the gate does not take. :func:`~rqcore_torch.preserve` usually rejects
            those options first, when it solves the bases; they reach this method when no solve
            evaluated the gate (e.g. ``tau="auto"`` and no eigenvalue ``> 0``).

        Examples
        --------
        >>> import torch
        >>> from torch import nn
        >>> from rqcore_torch import preserve
        >>> model = nn.Linear(3, 2)
        >>> handle = preserve(model, [torch.randn(8, 3)], method="gate", progress=False)
        >>> type(handle.optimizer(torch.optim.AdamW, lr=1e-3)).__name__
        'GatedOptimizer'
        >>> handle = preserve(model, [torch.randn(8, 3)], progress=False)  # method="folora"
        >>> type(handle.optimizer(torch.optim.AdamW, lr=1e-3)).__name__
        'FoLoRAAdam'
        """
        self._check_alive()
        is_adam = isinstance(cls, type) and issubclass(cls, (torch.optim.Adam, torch.optim.AdamW))
        if self.config.method == "folora" and is_adam:
            return self._folora_optimizer(cls, kwargs)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.config.method == "folora":
            # FoLoRA's per-direction moments are Adam's; for another optimizer the analogue is its
            # step gated in the same bases (exactly FoLoRA for plain SGD, whose step is linear in
            # G).
            logger.info("method='folora' with %s: gating its step in the spectral bases.", cls)
            from rqcore_torch.optim import GatedOptimizer

            gated = GatedOptimizer(cls(params, **kwargs), self.layer_gates(), on_step=self._on_step)
            self._attach_resume_hooks(gated, gated=gated)
            return gated
        return self.wrap(cls(params, **kwargs))

    # ------------------------------------------------------------------ monitoring
    def penalty(self) -> PenaltyReport:
        """The forgetting meter ``tr((W−W₀) C_p (W−W₀)ᵀ) / tr(W₀ C_p W₀ᵀ)``, with ``[W | b]``.

        Returns
        -------
        PenaltyReport

        Notes
        -----
        Both traces are ``≥ 0`` in exact arithmetic, but ``C_p`` summed from float32 products can
        be indefinite by rounding (eigenvalues of ``-1e-7·‖C_p‖``), and a gate moves weights exactly
        along its near-null directions: a negative rounding result is reported as 0. A layer whose
        reference ``W₀`` has no penalty (``tr(W₀ C_p W₀ᵀ) = 0``, e.g. zero-initialized) reports
        ``inf`` once it moves, and so does the total when every layer is like that.
        """
        per: dict[str, float] = {}
        num_total = den_total = 0.0
        with torch.no_grad():
            for t in self.targets:
                C = self.statistics.covariance(t.name)
                W = t.effective_weight().to(device=C.device, dtype=torch.float64)
                W0 = self._w0[t.name].to(device=C.device, dtype=torch.float64)
                num, den = (max(value, 0.0) for value in penalty_terms(W, W0, C))
                per[t.name] = _ratio(num, den)
                num_total += num
                den_total += den
        return PenaltyReport(per, _ratio(num_total, den_total))

    def report(self) -> Report:
        """Per layer: input size, rank, top eigenvalue, mean gain and penalty (a printable table).

        Returns
        -------
        Report
            One :class:`LayerReport` per preserved layer, in order; ``penalty`` is the layer's
            entry of :meth:`penalty`. For a Rayleigh basis: ``rank = k``, the largest ``λ`` and the
            mean of the ``k`` gains and ``d − k`` complement gains; for a null-space projector: the
            blocked directions, the largest ``C_p`` eigenvalue and ``1 − rank/d``; for
            ``method="none"``: ``0``, NaN and ``1.0``.
        """
        pen = self.penalty().per_layer
        rows = Report()
        for t in self.targets:
            proj = self._projectors.get(self.statistics.layers[t.name].group)
            d = t.dim
            if isinstance(proj, RayleighBasis):
                gains = np.concatenate([proj.gains, np.full(d - proj.rank, proj.complement)])
                rank, top, mean = proj.rank, float(proj.values[0]), float(gains.mean())
            elif isinstance(proj, NullspaceProjector):
                rank, top, mean = proj.rank, float(proj.values[0]), 1.0 - proj.rank / d
            else:
                rank, top, mean = 0, float("nan"), 1.0
            rows.append(LayerReport(t.name, t.d_in, rank, top, mean, pen[t.name]))
        return rows

    def plot(self, path: str | Path) -> None:
        """Save a PNG of each layer's spectrum and gains.

        One curve per input group: the eigenvalues on a log scale (clipped at ``1e-30``) on the
        left, the gain of each direction on the right (a null-space projector: 0 for the blocked
        directions, 1 for the others); a legend when there are at most 12 groups. Drawn without
        pyplot, so the caller's matplotlib backend is untouched.

        Parameters
        ----------
        path : str or Path
            The image file, written by matplotlib's ``savefig`` at 100 dpi (the format follows
            the extension).

        Raises
        ------
        ImportError
            If matplotlib is missing (``pip install matplotlib``).
        """
        try:
            # The object-oriented API draws without pyplot, so the caller's backend stays as it is.
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise ImportError("handle.plot needs matplotlib: pip install matplotlib") from exc
        fig = Figure(figsize=(11, 4))
        ax1, ax2 = fig.subplots(1, 2)
        for group in self.groups:
            proj = self._projectors.get(group)
            if proj is None:
                continue
            values = np.maximum(np.asarray(proj.values, dtype=np.float64), 1e-30)
            ax1.semilogy(values, label=group[-30:])
            if isinstance(proj, RayleighBasis):
                ax2.plot(proj.gains, label=group[-30:])
            else:
                g = np.ones(proj.dim)
                g[: proj.rank] = 0.0
                ax2.plot(g, label=group[-30:])
        ax1.set_title("spectrum per input (λ)")
        ax1.set_xlabel("direction")
        ax2.set_title("gain per direction")
        ax2.set_xlabel("direction")
        if len(self.groups) <= 12:
            ax2.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(str(path), dpi=100)

    # ------------------------------------------------------------------ persistence & cleanup
    def save(self, path: str | Path) -> None:
        """Write statistics, ``W₀`` and configuration to a safetensors file (see :func:`load`).

        The file holds the calibration statistics, the task statistics of a pre-pass, the ``C_t``
        each current basis was solved with, the online window tracked since the last refresh (and
        its generator), the ``W₀`` snapshots, the configuration (a callable gate as
        ``"<callable>"``), the layers' shapes and the step count; no optimizer state.
        :func:`~rqcore_torch.load` rebuilds the handle and
        :meth:`CalibrationStatistics.load` reads its calibration statistics.

        Parameters
        ----------
        path : str or Path
            The file to write.
        """
        from rqcore_torch.persistence import save_handle

        save_handle(self, path)

    def _check_alive(self) -> None:
        if self._removed:
            raise RuntimeError("this handle was removed; call rqcore_torch.preserve(...) again.")

    def remove(self) -> None:
        """Detach every hook this handle attached.

        The model then runs as without ``preserve()``, with its parameters as trained. An optimizer
        the handle built or wrapped keeps its current gates but no longer refreshes them. Adapters
        that ``preserve(..., lora=...)`` added stay in the model, because they hold the finetuning:
        merge or unload them with PEFT (e.g. ``peft.tuners.lora`` layers' ``merge()``), or save
        them first.
        """
        if self._online is not None:
            self._online.remove()
            self._online = None
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._removed = True

    def __enter__(self) -> PreservationHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"PreservationHandle(method={self.config.method!r}, layers={len(self.targets)}, "
            f"groups={len(self.groups)}, step={self.step})"
        )
