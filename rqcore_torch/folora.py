r"""FoLoRA: Adam with its moments kept per spectral direction of each layer's pencil, gated by ``λ``.

For one linear layer with input covariances ``C_t`` (task) and ``C_p`` (pretraining proxy), the pencil
``C_t v = λ M v`` (``M = C_p + εI``, ``Vᵀ M V = I``) gives coordinates in which the penalty of a step
(``wᵀMw``) is the plain squared norm and its utility (``wᵀC_t w``) is ``Σ λ_j c_j²``
(``docs/concepts.md``). :class:`FoLoRAAdam` parametrizes each layer's step as ``ΔW = s·Z Vᵀ``, keeps
Adam's moments on the gradient's coordinates ``G V`` (one pair per output row and spectral direction),
scales direction ``j``'s Adam step by a gain ``g_j = λ_j/(λ_j+τ)`` and maps it back with ``Vᵀ``. The
M-orthogonal complement of a top-k basis gets elementwise Adam moments of its own and one gain
``g⊥``. Decoupled weight decay is gated the same way (it moves the outputs too).

LoRA factors are handled by :func:`lora_init_from_basis` (start ``L_A`` inside the gated subspace) and
by the ``lora_pencils`` option of :class:`FoLoRAAdam` (gate ``L_B`` in the r-dimensional pencil
``(L_A C_t L_Aᵀ, L_A C_p L_Aᵀ)``, re-solved as ``L_A`` moves). Design choices and their measured
effect: ``docs/folora.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rqcore import gates
from rqcore.projection import RayleighBasis
from rqcore_torch._linalg import dense_generalized_topk

__all__ = [
    "FoLoRAAdam",
    "LoRAPencil",
    "SpectralLayer",
    "folora_layers_from_covariances",
    "lora_init_from_basis",
    "resolve_gains",
]

GateSpec = str | Callable[[np.ndarray], Any]
TauSpec = float | str

#: τ rules accepted by ``tau=``; "auto" is the default rule settled by the ablation (docs/folora.md).
TAU_RULES = ("auto", "median", "mean", "utility", "budget")
AUTO_TAU_RULE = "utility"
#: Utility fraction ``p`` of the "utility"/"auto" rule when ``tau_param`` is not given (ablation's winner).
AUTO_UTILITY_FRACTION = 0.3
REFRESH_POLICIES = ("transport", "reset", "keep")
#: Default temperature ``T`` of ``gate="sigmoid"`` (``σ(log(λ/τ)/T)``) in the bridge, for FoLoRA and
#: ``method="gate"`` alike: the setting of the ablation (docs/folora.md). ``T = 1`` (the default of
#: :func:`rqcore.gates.sigmoid`) would make it the ``"ratio"`` gain; pass ``{"temperature": t}``.
SIGMOID_TEMPERATURE = 0.5
#: Options each named gate takes (``gate_options`` of :class:`~rqcore_torch.PreserveConfig`).
GATE_OPTIONS: dict[str, tuple[str, ...]] = {
    "hard": ("rank",),
    "sigmoid": ("temperature",),
    "power": ("alpha",),
}


# ----------------------------------------------------------------------------------------- layers
@dataclass
class SpectralLayer:
    """One gated linear layer and its spectral basis.

    Parameters
    ----------
    name : str
        Identifier (used by :meth:`FoLoRAAdam.set_basis`).
    weight : torch.nn.Parameter
        ``(out, d_in)``, or ``(d_in, out)`` when ``transposed`` (HF ``Conv1D``).
    bias : torch.nn.Parameter or None
        When given, each row is ``[W_i | b_i]`` and the pencil is over augmented inputs ``[x, 1]``
        (``d = d_in + 1``): a bias step moves every output, so it is gated too.
    values : (k,) Tensor
        Generalized eigenvalues ``λ`` (descending).
    vectors : (d, k) Tensor
        ``V`` with ``Vᵀ M V = I``.
    dual : (d, k) Tensor
        ``M V``.
    transposed : bool, default False
    scale : float, optional
        ``s`` in ``ΔW = s·Z Vᵀ``: converts an Adam step of size ``lr`` in M-units into weight units, so
        ``lr`` means what it means for AdamW. Default ``sqrt(tr(M)/d)`` (exact when ``M = μI``), which
        :meth:`from_basis` knows; otherwise estimated as ``‖MV‖_F/√k`` (equal to it for a full basis).
    """

    name: str
    weight: torch.Tensor  # a Parameter (a leaf tensor with .grad)
    bias: torch.Tensor | None
    values: torch.Tensor
    vectors: torch.Tensor
    dual: torch.Tensor
    transposed: bool = False
    scale: float | None = None

    def __post_init__(self) -> None:
        out, d_in = self.shape_out_in
        d = d_in + (self.bias is not None)
        if self.vectors.ndim != 2 or self.vectors.shape[0] != d:
            raise ValueError(
                f"layer {self.name!r}: vectors must be (d, k) with d = {d}, got {tuple(self.vectors.shape)}."
            )
        k = self.vectors.shape[1]
        if tuple(self.dual.shape) != (d, k) or tuple(self.values.shape) != (k,):
            raise ValueError(
                f"layer {self.name!r}: values/dual must be ({k},)/({d}, {k}), got "
                f"{tuple(self.values.shape)}/{tuple(self.dual.shape)}."
            )
        if self.bias is not None and tuple(self.bias.shape) != (out,):
            raise ValueError(f"layer {self.name!r}: bias must have shape ({out},).")
        if self.scale is None:
            self.scale = float(torch.linalg.norm(self.dual.double()) / math.sqrt(k))

    @property
    def shape_out_in(self) -> tuple[int, int]:
        """``(out, d_in)`` of the layer, whatever the storage layout."""
        a, b = self.weight.shape
        return (b, a) if self.transposed else (a, b)

    @classmethod
    def from_basis(
        cls,
        name: str,
        weight: torch.nn.Parameter,
        bias: torch.nn.Parameter | None,
        basis: RayleighBasis,
        *,
        transposed: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> SpectralLayer:
        """Build from a :class:`rqcore.RayleighBasis` (its ``values``, ``vectors``, ``MV``).

        ``device``/``dtype`` default to the weight's. The step scale is ``sqrt(tr(M)/d)`` when the
        basis holds ``C_p`` (``B``), ``1`` for the standard problem (``M = I``).

        Parameters
        ----------
        name : str
            Identifier of the layer.
        weight : torch.nn.Parameter
            ``(out, d_in)``, or ``(d_in, out)`` when ``transposed``.
        bias : torch.nn.Parameter or None
            With a bias, ``basis`` must be over the augmented inputs (``d = d_in + 1``).
        basis : rqcore.RayleighBasis
            The layer's basis; its arrays are copied.
        transposed : bool, default False
            Weight stored ``(d_in, out)`` (HF ``Conv1D``).
        device : torch.device or str, optional
            Device of the basis tensors (default: the weight's).
        dtype : torch.dtype, optional
            Their dtype (default: the weight's).

        Returns
        -------
        SpectralLayer
            Its ``scale`` is ``sqrt(tr(B)/d + ε)`` when the basis holds ``B``, ``1`` for the
            standard problem, otherwise (``C_p`` not known) estimated from ``MV``.

        Raises
        ------
        ValueError
            If the basis does not fit the layer (``d`` other than ``d_in`` plus the bias column).
        """
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype

        def conv(a: np.ndarray) -> torch.Tensor:
            # A copy: the basis's arrays may be read-only, which a tensor sharing them cannot be.
            return torch.as_tensor(np.array(a, order="C", copy=True), dtype=dtype, device=device)

        if basis.B is not None:
            scale = math.sqrt(max(float(np.trace(basis.B)) / basis.dim + basis.reg_used, 1e-30))
        elif basis._cp_known:  # standard problem: M = I
            scale = 1.0
        else:
            scale = None
        return cls(
            name=name,
            weight=weight,
            bias=bias,
            values=conv(basis.values),
            vectors=conv(basis.vectors),
            dual=conv(basis.MV),
            transposed=transposed,
            scale=scale,
        )


def folora_layers_from_covariances(
    layers: Iterable[tuple[str, torch.nn.Module | torch.Tensor]],
    C_t: Mapping[str, torch.Tensor],
    C_p: Mapping[str, torch.Tensor],
    *,
    rank: int | None = None,
    reg: float = 1e-2,
) -> list[SpectralLayer]:
    """Solve each layer's pencil (dense, on the covariances' device) and return its :class:`SpectralLayer`.

    Parameters
    ----------
    layers : iterable of (name, module)
        ``torch.nn.Linear`` modules (rows ``[W | b]`` when the module has a bias), or HF ``Conv1D``
        (detected by a ``nf`` attribute: weight stored ``(d_in, out)``), or a bare weight parameter.
    C_t, C_p : mapping name → (d, d) Tensor
        Second moments of the layer's inputs on task / proxy data, augmented with a constant 1
        (``d = d_in + 1``) for layers with a bias.
    rank : int, optional
        Basis size ``k``; default the full basis (``k = d``), the setting the ablation favours.
    reg : float, default 1e-2
        Relative shift: ``ε = reg·tr(C_p)/d`` (the ablation's default, docs/folora.md).

    Returns
    -------
    list of SpectralLayer
    """
    out: list[SpectralLayer] = []
    for name, mod in layers:
        if isinstance(mod, torch.Tensor):
            weight, bias, transposed = mod, None, False
        else:
            weight = mod.weight  # type: ignore[assignment]
            bias = getattr(mod, "bias", None)
            transposed = hasattr(mod, "nf")
        A, B = C_t[name], C_p[name]
        d = A.shape[0]
        k = d if rank is None else min(rank, d)
        values, vectors, eps = dense_generalized_topk(A, B, k, reg=reg)
        dual = B @ vectors + eps * vectors
        scale = math.sqrt(float(torch.diagonal(B).sum()) / d + float(eps))
        out.append(
            SpectralLayer(
                name=name,
                weight=weight,
                bias=bias,
                values=values.to(weight.dtype),
                vectors=vectors.to(weight.dtype),
                dual=dual.to(weight.dtype),
                transposed=transposed,
                scale=scale,
            )
        )
    return out


# ------------------------------------------------------------------------------------------ LoRA
def lora_init_from_basis(
    basis: RayleighBasis | SpectralLayer | torch.Tensor | np.ndarray,
    r: int,
    *,
    scale: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """An ``L_A`` initialization (``r × d``) whose rows are the top-``r`` generalized eigenvectors.

    With ``ΔW = s·L_B L_A`` and ``L_B = 0`` at the start, every early step of ``L_B`` moves ``ΔW``
    along ``L_A``'s rows: random rows spend penalty on whatever directions they happen to hit, the
    top eigenvectors are the directions with the most task utility per unit of penalty.

    Parameters
    ----------
    basis : RayleighBasis, SpectralLayer or (d, k) array
        The basis (``vectors``, ``V``); columns are taken in order (largest ``λ`` first). For a layer
        with a bias the pencil is augmented; pass the non-augmented basis (LoRA has no bias).
    r : int
        LoRA rank, ``1 ≤ r ≤ k``.
    scale : float, optional
        Euclidean norm of each row. Default ``1/√3``: the expected row norm of PEFT's
        ``kaiming_uniform_(a=√5)`` init (entries ``U(−1/√d, 1/√d)``), so the scale of ``L_A`` — and hence
        the effective learning rate of ``L_B`` — matches the usual init.
    dtype, device : optional

    Returns
    -------
    (r, d) Tensor
    """
    if isinstance(basis, RayleighBasis):
        # A copy: the basis's arrays may be read-only, which a tensor sharing them cannot be.
        V = torch.as_tensor(np.array(basis.vectors, dtype=np.float64))
    elif isinstance(basis, SpectralLayer):
        V = basis.vectors.detach().to(torch.float64, copy=True).cpu()
    else:
        V = torch.as_tensor(np.asarray(basis) if isinstance(basis, np.ndarray) else basis)
        V = V.detach().to(torch.float64).cpu()
    if V.ndim != 2 or not 1 <= r <= V.shape[1]:
        raise ValueError(f"r must satisfy 1 <= r <= k = {V.shape[-1]}, got {r}.")
    rows = V[:, :r].T.clone()
    norm = 1.0 / math.sqrt(3.0) if scale is None else float(scale)
    rows *= norm / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return rows.to(dtype=dtype, device=device)


@dataclass
class LoRAPencil:
    """Statistics to gate a LoRA ``L_B`` in the r-dimensional pencil ``(L_A C_t L_Aᵀ, L_A C_p L_Aᵀ)``.

    ``L_B``'s inputs are ``L_A x``, so its pencil is the layer's pencil seen through ``L_A``; it is
    re-solved from the current ``L_A`` every ``refresh_every`` steps of :class:`FoLoRAAdam`.

    Parameters
    ----------
    lora_A : Tensor
        ``(r, d)``, the current ``L_A`` (a parameter, read when the pencil is solved).
    C_t, C_p : (d, d) Tensor
        The layer's input second moments (not augmented: LoRA has no bias).
    reg : float, default 1e-2
        Relative shift of the r-dim metric, ``ε_r = reg·tr(L_A C_p L_Aᵀ)/r`` (when ``eps`` is None).
    eps : float, optional
        Absolute shift ``ε`` of the *layer's* metric ``M = C_p + εI``: the r-dim metric is then exactly
        ``L_A M L_Aᵀ`` (the layer's penalty of ``ΔW = ΔL_B L_A``), which stays positive definite when
        ``L_A``'s rows lie where ``C_p`` has no energy (``reg`` is then only a 1e-9 numerical guard).
        :class:`~rqcore_torch.PreservationHandle` passes the ``ε`` of the layer's own basis.
    tau : float, optional
        ``τ`` of ``L_B``'s gate. The r-dim pencil's ``λ`` is the layer's Rayleigh quotient at
        ``w = L_Aᵀu``, so the layer's own ``τ`` gives a direction the same gain whether it is reached
        through ``L_A`` or ``L_B``; None: the optimizer's ``tau`` rule on the ``r`` values (which, with
        ``L_A`` already in the top eigenvectors, gates the best directions a second time).
    """

    lora_A: torch.Tensor
    C_t: torch.Tensor
    C_p: torch.Tensor
    reg: float = 1e-2
    eps: float | None = None
    tau: float | None = None

    def solve(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """``(values, vectors, dual, scale)`` of the r-dim pencil at the current ``L_A`` (float64).

        Solves ``(L_A C_t L_Aᵀ) u = λ M_r u`` densely on ``lora_A``'s device, with
        ``M_r = L_A C_p L_Aᵀ + ε_r I``, or ``L_A (C_p + εI) L_Aᵀ + ε_r I`` when :attr:`eps` is
        given (``ε_r = reg·tr(·)/r``, or ``1e-9·tr(·)/r`` with :attr:`eps`).

        Returns
        -------
        values : (r,) Tensor
            Generalized eigenvalues, descending.
        vectors : (r, r) Tensor
            ``V`` with ``Vᵀ M_r V = I``.
        dual : (r, r) Tensor
            ``M_r V``.
        scale : float
            ``sqrt(tr(M_r)/r)``, the step scale of :class:`SpectralLayer`.

        Raises
        ------
        ValueError
            If the r-dim metric is not positive definite even after the shift.
        """
        LA = self.lora_A.detach().to(torch.float64)
        A = LA @ self.C_t.to(LA) @ LA.T
        B = LA @ self.C_p.to(LA) @ LA.T
        reg = self.reg
        if self.eps is not None:
            B = B + float(self.eps) * (LA @ LA.T)
            reg = 1e-9
        r = A.shape[0]
        values, vectors, eps = dense_generalized_topk((A + A.T) / 2, (B + B.T) / 2, r, reg=reg)
        dual = B @ vectors + eps * vectors
        scale = math.sqrt(max(float(torch.diagonal(B).sum()) / r + float(eps), 1e-30))
        return values, vectors, dual, scale


# ------------------------------------------------------------------------------------------ gains
def _global_or_layer_values(values: np.ndarray) -> np.ndarray:
    return np.maximum(np.asarray(values, dtype=np.float64), 0.0)


def resolve_tau(values: np.ndarray, rule: TauSpec, param: float | None = None) -> float:
    """The threshold ``τ`` of a gate from a rule on the spectrum.

    Parameters
    ----------
    values : (k,) array
        Eigenvalues (one layer's, or several layers' pooled for a global ``τ``).
    rule : float or str
        A number is used as is. ``"median"``: median of ``λ⁺`` (half the directions keep at least half
        their step; rqcore's default); ``"mean"``: mean of ``λ⁺``; ``"utility"``:
        :func:`rqcore.gates.tau_for_utility_fraction` with ``p = param`` (default
        ``AUTO_UTILITY_FRACTION`` = 0.3); ``"auto"``: the rule named by ``AUTO_TAU_RULE`` ("utility", the
        ablation's winner). ``"budget"`` needs the step's
        coordinates and is resolved by the optimizer.
    param : float, optional
    """
    if not isinstance(rule, str):
        tau = float(rule)
        if not math.isfinite(tau) or tau < 0:
            raise ValueError(f"tau must be a finite number >= 0, got {rule!r}.")
        return tau
    if rule == "auto":
        rule = AUTO_TAU_RULE
    lam = _global_or_layer_values(values)
    pos = lam[lam > 0]
    if pos.size == 0:
        return 1.0  # nothing passes anyway (all gains 0 for λ ≤ 0)
    if rule == "median":
        med = float(np.median(lam))
        return med if med > 0 else float(pos.mean())
    if rule == "mean":
        return float(pos.mean())
    if rule == "utility":
        return gates.tau_for_utility_fraction(
            lam, AUTO_UTILITY_FRACTION if param is None else param
        )
    raise ValueError(f"unknown tau rule {rule!r}; expected a number or one of {TAU_RULES}.")


def _check_gate_options(gate: GateSpec, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` as a dict, after checking that ``gate`` takes each of them.

    Raises
    ------
    ValueError
        Naming the options ``gate`` does not take (a callable takes none): an option silently
        ignored would gate with other gains than the ones asked for.
    """
    opts = dict(options or {})
    allowed = () if callable(gate) else GATE_OPTIONS.get(str(gate), ())
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        name = "a callable gate" if callable(gate) else f"gate {gate!r}"
        takes = f"only {list(allowed)}" if allowed else "none"
        raise ValueError(
            f"gate_options {unknown} are not supported by {name} (it takes {takes}); drop them."
        )
    return opts


def resolve_gains(
    values: np.ndarray,
    gate: GateSpec,
    tau: float,
    rank: int | None = None,
    *,
    options: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """Gains ``g_j`` of the spectral directions for a gate name (or callable) and a resolved ``τ``.

    The one gate dispatcher of the bridge: :class:`FoLoRAAdam` and the bases of
    :class:`~rqcore_torch.PreservationHandle` both compute their gains here, so they agree.

    Parameters
    ----------
    values : (k,) array
        Generalized eigenvalues ``λ``.
    gate : str or callable
        ``"ratio"``: ``λ/(λ+τ)``; ``"threshold"``: ``1[λ ≥ τ]``; ``"sigmoid"``: ``σ(log(λ/τ)/T)``
        with ``T = options["temperature"]`` (default :data:`SIGMOID_TEMPERATURE` = 0.5); ``"hard"``:
        1 for the top ``rank`` (``options["rank"]``, else ``rank``, else the count of ``λ ≥ τ``), else
        0; ``"power"``: ``(λ/λ_max)^α`` with ``α = options["alpha"]`` (default 1); ``"none"``: all 1
        (plain Adam in spectral coordinates); a callable gets the values.
    tau : float
        The resolved ``τ`` (unused by ``"power"``, ``"none"``, callables and a ranked ``"hard"``).
    rank : int, optional
        Directions passed by ``"hard"`` when ``options`` has no ``"rank"``.
    options : mapping, optional
        Per-gate options, see :data:`GATE_OPTIONS` (``gate_options`` of the configuration).

    Returns
    -------
    (k,) ndarray of float64

    Raises
    ------
    ValueError
        On an unknown gate, options the gate does not take, or gains that are not finite with one
        value per eigenvalue.
    """
    opts = _check_gate_options(gate, options)
    lam = np.asarray(values, dtype=np.float64)
    if callable(gate):
        g = np.asarray(gate(lam), dtype=np.float64)
    elif gate == "ratio":
        g = gates.ratio(lam, max(tau, 1e-300))
    elif gate == "threshold":
        g = gates.threshold(lam, max(tau, 1e-300))
    elif gate == "sigmoid":
        g = gates.sigmoid(lam, max(tau, 1e-300), opts.get("temperature", SIGMOID_TEMPERATURE))
    elif gate == "hard":
        rank = opts.get("rank", rank)
        r = int(np.sum(lam >= tau)) if rank is None else int(rank)
        g = gates.hard(lam, min(max(r, 0), lam.size))
    elif gate == "power":
        g = gates.power(lam, opts.get("alpha", 1.0))
    elif gate == "none":
        g = np.ones_like(lam)
    else:
        raise ValueError(f"unknown gate {gate!r}.")
    if g.shape != lam.shape or not np.all(np.isfinite(g)):
        raise ValueError("gains must be finite with one value per eigenvalue.")
    return g


# ------------------------------------------------------------------------------------- optimizer
class FoLoRAAdam(torch.optim.Optimizer):
    r"""Adam with per-direction moments in each layer's spectral coordinates, gated by ``λ``.

    Parameters
    ----------
    layers : sequence of SpectralLayer
        The gated layers (one parameter group each; their ``weight``/``bias`` must not be in
        ``other_params``). They are fixed at construction: a layer's basis lives in the optimizer's
        state from the start, so a gated layer cannot be added later with :meth:`add_param_group`.
    other_params : iterable of Parameter
        Trained with plain AdamW (one group). :meth:`add_param_group` adds more plain AdamW groups.
    lr, betas, eps, weight_decay : as :class:`torch.optim.AdamW`
        ``lr`` is in weight units for the gated layers too (see ``SpectralLayer.scale``).
    gate : str or callable, default "ratio"
        Gain function of the eigenvalues (:func:`resolve_gains`).
    gate_options : mapping, optional
        Options of ``gate`` (:data:`GATE_OPTIONS`): ``{"temperature": t}`` for ``"sigmoid"`` (default
        :data:`SIGMOID_TEMPERATURE`), ``{"alpha": a}`` for ``"power"``, ``{"rank": r}`` for ``"hard"``
        (overrides ``rank``). Options the gate does not take raise ValueError.
    tau : float or str, default "auto"
        ``τ`` of the gate: a number, or a rule ``"auto"`` (= ``AUTO_TAU_RULE``), ``"median"``,
        ``"mean"``, ``"utility"`` (utility fraction ``tau_param``, default 0.3), ``"budget"`` (the gated
        step spends a fraction ``tau_param`` (default 0.25) of the ungated Adam step's penalty; resolved on
        the first step after each basis is set, one host synchronization per refresh).
    tau_param : float, optional
        Parameter of the ``"utility"``/``"budget"`` rules.
    tau_scope : {"layer", "global"}, default "layer"
        ``"global"`` pools the eigenvalues of all layers for a spectral rule (``λ`` is a dimensionless
        utility-per-penalty ratio, comparable across layers). Not with ``"budget"``.
    rank : int, optional
        For ``gate="hard"``: number of directions passed.
    complement : float, default 0.0
        Gain ``g⊥`` of the M-orthogonal complement of a top-k basis (ignored for a full basis). The
        complement has elementwise Adam moments of its own (on the complement part of the gradient),
        kept only when ``complement > 0``.
    refresh_moments : {"transport", "reset", "keep"}, default "transport"
        What :meth:`set_basis` does with the moments of a layer: ``"transport"`` maps the first moment
        exactly (``m_Z' = m_Z (MV_old)ᵀ V_new``, exact for full bases: ``m_Z (MV)ᵀ`` recovers the
        first moment of ``G``) and the second with the independence approximation
        ``v' = v·(T∘T)``, ``T = (MV_old)ᵀ V_new`` (second moments do not transport: cross terms
        ``E[z_i z_j]`` are not kept); ``"reset"`` zeroes both and restarts bias correction; ``"keep"``
        leaves them as they are (only meaningful for an unchanged size; an ablation baseline).
    gate_position : {"moments", "step"}, default "moments"
        ``"moments"``: the method above. ``"step"``: plain AdamW moments in weight coordinates and the
        spectral gate applied to the AdamW step (``out = g⊥u + (u·MV)(g−g⊥)Vᵀ``): the ablation's baseline.
    lora_pencils : mapping name → LoRAPencil, optional
        Layers that are LoRA ``L_B`` factors: their basis is the r-dim pencil through the current ``L_A``,
        solved at construction and every ``refresh_every`` steps (the layer's given basis is replaced).
    refresh_every : int, default 0
        Period (in steps) of the ``lora_pencils`` refresh; 0 = solve once.
    on_step : callable, optional
        ``on_step(self)`` after every step (``GradScaler`` skips ``step`` on inf/NaN, so skipped steps
        are not counted); :meth:`rqcore_torch.PreservationHandle.optimizer` refreshes bases with it.

    Notes
    -----
    Per layer with augmented rows ``W̃ = [W | b]`` (``n × d``), gradient ``G``, basis ``V`` (``d × k``):
    ``z = G V``; ``m, v`` ← Adam moments of ``z``; ``u = m̂/(√v̂ + eps)``;
    ``ΔW̃ = −lr·(s·(u·diag(g)) Vᵀ + g⊥·P⊥(u⊥))`` with ``u⊥`` the Adam step of the complement gradient
    ``G − z (MV)ᵀ`` and ``P⊥(x) = x − (x·MV)Vᵀ``. Since the coordinates of ``Z Vᵀ`` are ``Z``
    (``VᵀMV = I``), the penalty of the spectral part of the step is ``s²·lr²·Σ g_j² u_j²``: Adam spends
    about the same penalty on each direction and the gain rations it by ``λ``. Decoupled weight decay:
    ``W̃ ← W̃ − lr·wd·(g⊥W̃ + (W̃·MV)·diag(g−g⊥)·Vᵀ)``. Cost per layer and step: two ``n·d·k`` products
    (four with a complement, two more with weight decay).

    Each parameter group carries a ``"layer"`` key: a gated layer's name, or None for a plain AdamW
    group. :meth:`state_dict` saves the bases, gains and step counter with the moments;
    :meth:`load_state_dict` checks that a state dict was saved over the same layers before changing
    anything.
    """

    def __init__(
        self,
        layers: Sequence[SpectralLayer],
        other_params: Iterable[torch.nn.Parameter] = (),
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        gate: GateSpec = "ratio",
        gate_options: Mapping[str, Any] | None = None,
        tau: TauSpec = "auto",
        tau_param: float | None = None,
        tau_scope: str = "layer",
        rank: int | None = None,
        complement: float = 0.0,
        refresh_moments: str = "transport",
        gate_position: str = "moments",
        lora_pencils: Mapping[str, LoRAPencil] | None = None,
        refresh_every: int = 0,
        on_step: Callable[[FoLoRAAdam], None] | None = None,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError("lr, eps and weight_decay must be >= 0.")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}.")
        if refresh_moments not in REFRESH_POLICIES:
            raise ValueError(f"refresh_moments must be one of {REFRESH_POLICIES}.")
        if gate_position not in ("moments", "step"):
            raise ValueError("gate_position must be 'moments' or 'step'.")
        if tau_scope not in ("layer", "global"):
            raise ValueError("tau_scope must be 'layer' or 'global'.")
        if isinstance(tau, str) and tau not in TAU_RULES:
            raise ValueError(f"unknown tau rule {tau!r}; expected a number or one of {TAU_RULES}.")
        if tau_scope == "global" and tau == "budget":
            raise ValueError("tau='budget' is resolved per layer; use tau_scope='layer'.")
        if not 0.0 <= complement <= 1.0:
            raise ValueError(f"complement must lie in [0, 1], got {complement}.")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        groups: list[dict[str, Any]] = []
        self._layers: dict[str, SpectralLayer] = {}
        for layer in layers:
            if layer.name in self._layers:
                raise ValueError(f"duplicate layer name {layer.name!r}.")
            self._layers[layer.name] = layer
            params = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
            groups.append({"params": params, "layer": layer.name})
        others = list(other_params)
        if others:
            groups.append({"params": others, "layer": None})
        super().__init__(groups, defaults)
        self.gate = gate
        # Checked now: with tau="budget" the gains are first resolved at the first step.
        self.gate_options = _check_gate_options(gate, gate_options)
        self.tau = tau
        self.tau_param = tau_param
        self.tau_scope = tau_scope
        self.rank = rank
        self.complement = float(complement)
        self.refresh_moments = refresh_moments
        self.gate_position = gate_position
        self.lora_pencils = dict(lora_pencils or {})
        self.refresh_every = int(refresh_every)
        self.on_step = on_step
        self._global_step = 0
        self._scales: dict[str, float] = {}
        for layer in self._layers.values():
            self._install(layer.name, layer.values, layer.vectors, layer.dual, layer.scale)
        for name, pencil in self.lora_pencils.items():
            if name not in self._layers:
                raise ValueError(f"lora_pencils names unknown layer {name!r}.")
            self._solve_lora(name, pencil, initial=True)
        self._resolve_all_gains()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group; after construction only plain AdamW groups can be added.

        Parameters
        ----------
        param_group : dict
            As for :meth:`torch.optim.Optimizer.add_param_group` (``"params"`` plus optional
            ``lr``, ``betas``, ``eps``, ``weight_decay``). Without a ``"layer"`` key (or with
            ``"layer": None``) its parameters are trained with plain AdamW, like ``other_params``;
            the key is then set to None.

        Raises
        ------
        ValueError
            If the group names a gated layer that is unknown or already has its group: gated layers
            are fixed at construction (their bases live in the optimizer's state). The optimizer is
            then unchanged.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}.")
        name = param_group.get("layer")
        if name is not None:
            self._check_layer_group(name)
        super().add_param_group(param_group)
        # Set after torch accepted the group (a rejected group leaves the caller's dict as it was).
        param_group.setdefault("layer", None)

    def _check_layer_group(self, name: Any) -> None:
        """Gated layer ``name`` gets its group once, from ``__init__`` (which builds it from the layer)."""
        hint = (
            "gated layers are fixed at construction: pass a SpectralLayer in `layers` of a new "
            "FoLoRAAdam, or add the group without 'layer' (or with 'layer': None) to train its "
            "parameters with plain AdamW."
        )
        layer = self._layers.get(name) if isinstance(name, str) else None
        if layer is None:
            raise ValueError(f"param group names unknown gated layer {name!r}; {hint}")
        if any(g.get("layer") == name for g in self.param_groups):
            raise ValueError(f"gated layer {name!r} already has its param group; {hint}")

    # -------------------------------------------------------------------------------- basis state
    def _lstate(self, name: str) -> dict[str, Any]:
        return self.state[self._layers[name].weight]

    def _install(
        self,
        name: str,
        values: torch.Tensor,
        vectors: torch.Tensor,
        dual: torch.Tensor,
        scale: float | None,
    ) -> None:
        layer = self._layers[name]
        p = layer.weight
        st = self.state[p]
        # Everything in the parameter's dtype: torch's load_state_dict casts state to it, and an exact
        # resume needs the restored values to be the ones used.
        st["values"] = values.detach().to(device=p.device, dtype=p.dtype).clone()
        st["vectors"] = vectors.detach().to(device=p.device, dtype=p.dtype).clone()
        st["dual"] = dual.detach().to(device=p.device, dtype=p.dtype).clone()
        k = vectors.shape[1]
        if scale is None:
            scale = float(torch.linalg.norm(dual.double()) / math.sqrt(k))
        st["scale"] = torch.tensor(float(scale), dtype=p.dtype, device=p.device)
        self._scales[name] = float(
            st["scale"]
        )  # host copy: reading a device scalar per step would sync
        st["tau"] = torch.tensor(float("nan"), dtype=p.dtype, device=p.device)

    def _resolve_all_gains(self) -> None:
        names = list(self._layers)
        pooled = None
        if self.tau_scope == "global" and isinstance(self.tau, str):
            pooled = np.concatenate(
                [self._lstate(n)["values"].to(torch.float64).cpu().numpy() for n in names]
            )
        for n in names:
            self._resolve_gains(n, pooled)

    def _resolve_gains(self, name: str, pooled: np.ndarray | None = None) -> None:
        pencil = self.lora_pencils.get(name) if hasattr(self, "lora_pencils") else None
        if pencil is not None and pencil.tau is not None:
            self._set_gains(name, float(pencil.tau))  # the layer's τ (see LoRAPencil)
            return
        st = self._lstate(name)
        lam = st["values"].to(torch.float64).cpu().numpy()
        if self.tau == "budget":
            st["gains"] = torch.ones_like(st["values"])  # placeholder until the first step
            st["budget_pending"] = True
            return
        if pooled is None and self.tau_scope == "global" and isinstance(self.tau, str):
            pooled = np.concatenate(
                [self._lstate(n)["values"].to(torch.float64).cpu().numpy() for n in self._layers]
            )
        tau = resolve_tau(lam if pooled is None else pooled, self.tau, self.tau_param)
        self._set_gains(name, tau)

    def _set_gains(self, name: str, tau: float) -> None:
        st = self._lstate(name)
        g = resolve_gains(
            st["values"].to(torch.float64).cpu().numpy(),
            self.gate,
            tau,
            self.rank,
            options=self.gate_options,
        )
        gains = torch.as_tensor(g, dtype=st["values"].dtype, device=st["values"].device)
        if not bool(torch.isfinite(gains).all()):  # once per solve: a host sync here is fine
            raise ValueError(
                f"layer {name!r}: the gains (max |g| = {float(np.max(np.abs(g))):.3g}) overflow the "
                f"weights' dtype {gains.dtype}; use a gate whose gains stay in [0, 1] or a wider dtype."
            )
        st["tau"] = torch.tensor(tau, dtype=st["values"].dtype, device=st["values"].device)
        st["gains"] = gains
        st["budget_pending"] = False

    def gains(self, name: str) -> torch.Tensor:
        """The current gains ``g`` of layer ``name`` (in the weight's dtype).

        Parameters
        ----------
        name : str
            A gated layer's :attr:`SpectralLayer.name`.

        Returns
        -------
        (k,) Tensor
            The gains of the layer's current basis, on the weight's device: the optimizer's state
            tensor itself, not a copy. With ``tau="budget"`` they are all 1 until the first step
            after each basis is set.

        Raises
        ------
        KeyError
            If ``name`` is not a gated layer.
        """
        return self._lstate(name)["gains"]

    def set_basis(
        self,
        name: str,
        values: torch.Tensor | np.ndarray,
        vectors: torch.Tensor | np.ndarray,
        dual: torch.Tensor | np.ndarray,
        scale: float | None = None,
    ) -> None:
        """Replace layer ``name``'s basis and handle its moments by ``refresh_moments``.

        ``scale`` defaults to the layer's current one (``tr(M)/d`` does not change much between
        refreshes; pass it when ``C_p`` was re-estimated).

        The basis is stored in the weight's device and dtype, and the layer's ``τ`` and gains are
        resolved anew for it (with ``tau="budget"``: at the next step). Moments exist only once the
        layer has stepped; with ``gate_position="step"`` they are left as they are.

        Parameters
        ----------
        name : str
            A gated layer's :attr:`SpectralLayer.name`.
        values : (k,) Tensor or ndarray
            Generalized eigenvalues, descending.
        vectors : (d, k) Tensor or ndarray
            ``V`` with ``Vᵀ M V = I``; ``d`` as in the current basis, ``k`` may change (then
            ``refresh_moments="keep"`` resets the moments).
        dual : (d, k) Tensor or ndarray
            ``M V``.
        scale : float, optional
            Step scale ``s`` (see :class:`SpectralLayer`).

        Raises
        ------
        KeyError
            If ``name`` is not a gated layer.
        ValueError
            If ``vectors`` has another ``d`` than the current basis or ``dual`` another shape than
            ``vectors``.
        """
        st = self._lstate(name)
        p = self._layers[name].weight
        values_t = torch.as_tensor(values).to(device=p.device, dtype=p.dtype)
        V_new = torch.as_tensor(vectors).to(device=p.device, dtype=p.dtype)
        MV_new = torch.as_tensor(dual).to(device=p.device, dtype=p.dtype)
        d, k_new = V_new.shape
        if d != st["vectors"].shape[0] or tuple(MV_new.shape) != (d, k_new):
            raise ValueError(f"layer {name!r}: new basis must be ({st['vectors'].shape[0]}, k).")
        old_MV, old_k = st["dual"], st["vectors"].shape[1]
        if scale is None:
            scale = self._scales[name]
        if "exp_avg" in st:
            self._refresh_moments(st, old_MV, V_new, MV_new, old_k, k_new)
        self._install(name, values_t, V_new, MV_new, scale)
        self._resolve_gains(name)

    def _refresh_moments(
        self,
        st: dict[str, Any],
        old_MV: torch.Tensor,
        V_new: torch.Tensor,
        MV_new: torch.Tensor,
        old_k: int,
        k_new: int,
    ) -> None:
        policy = self.refresh_moments
        if self.gate_position == "step":
            return  # moments live in weight coordinates: nothing to do
        if policy == "keep" and old_k != k_new:
            policy = "reset"
        if policy == "reset":
            st["exp_avg"] = st["exp_avg"].new_zeros(st["exp_avg"].shape[0], k_new)
            st["exp_avg_sq"] = torch.zeros_like(st["exp_avg"])
            st["step"] = torch.zeros_like(st["step"])
            for key in ("comp_exp_avg", "comp_exp_avg_sq"):
                if key in st:
                    st[key].zero_()
            return
        if policy == "keep":
            return
        # transport: the first moment is a linear functional of G; reconstruct it and re-project.
        m_G = st["exp_avg"] @ old_MV.T  # (n, d): exact for a full basis (V MVᵀ = I)
        if "comp_exp_avg" in st:
            m_G = m_G + st["comp_exp_avg"]
        z_new = m_G @ V_new
        T = old_MV.T @ V_new  # (k_old, k_new): z_new = z_old T for the in-span part
        st["exp_avg_sq"] = st["exp_avg_sq"] @ (T * T)  # independence approximation
        st["exp_avg"] = z_new
        if "comp_exp_avg" in st:
            st["comp_exp_avg"] = m_G - z_new @ MV_new.T  # complement part under the new basis

    def refresh_lora_pencils(self, names: Iterable[str] | None = None) -> None:
        """Re-solve the ``lora_pencils`` (all, or ``names``) now, from the current ``L_A``.

        Each pencil is solved with :meth:`LoRAPencil.solve` (its ``C_t``/``C_p``) and installed with
        :meth:`set_basis`, so the moments follow ``refresh_moments``.
        :class:`~rqcore_torch.PreservationHandle` calls it after replacing the pencils' ``C_t`` (its
        warm-up and periodic refreshes).

        Parameters
        ----------
        names : iterable of str, optional
            Keys of ``lora_pencils`` to re-solve (default: all of them).

        Raises
        ------
        KeyError
            If a name is not a key of ``lora_pencils``.
        """
        for name in self.lora_pencils if names is None else names:
            self._solve_lora(name, self.lora_pencils[name])

    def _solve_lora(self, name: str, pencil: LoRAPencil, initial: bool = False) -> None:
        values, vectors, dual, scale = pencil.solve()
        if initial:
            self._install(name, values, vectors, dual, scale)
        else:
            self.set_basis(name, values, vectors, dual, scale)

    # --------------------------------------------------------------------------------------- step
    @staticmethod
    def _rows(layer: SpectralLayer, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        W = w.T if layer.transposed else w
        return W if b is None else torch.cat([W, b.unsqueeze(1)], dim=1)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimization step (see the class notes).

        Unlike a torch optimizer's ``step``, it first re-solves the ``lora_pencils`` when a
        ``refresh_every`` period has ended (before steps ``refresh_every + 1``,
        ``2·refresh_every + 1``, ...), then gives every gated group its spectral step and every
        other group an AdamW step, and finally calls ``on_step(self)``.

        Parameters
        ----------
        closure : callable, optional
            Re-evaluates the model and returns the loss; called first, with gradients enabled.

        Returns
        -------
        loss : object or None
            What ``closure`` returned, or None without a closure.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._global_step += 1
        if self.lora_pencils and self.refresh_every > 0 and self._global_step > 1:
            if (self._global_step - 1) % self.refresh_every == 0:
                for name, pencil in self.lora_pencils.items():
                    self._solve_lora(name, pencil)
        for group in self.param_groups:
            if group.get("layer") is None:
                self._adamw(group)
            else:
                self._spectral(group)
        if self.on_step is not None:
            self.on_step(self)  # e.g. the preserve() handle's basis refresh (set_basis)
        return loss

    def _adamw(self, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            st = self.state[p]
            if "step" not in st:
                st["step"] = torch.zeros((), dtype=torch.float64)
                st["exp_avg"] = torch.zeros_like(p)
                st["exp_avg_sq"] = torch.zeros_like(p)
            st["step"] += 1
            t = float(st["step"])
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            st["exp_avg"].lerp_(p.grad, 1 - beta1)
            st["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (st["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(group["eps"])
            p.addcdiv_(st["exp_avg"], denom, value=-group["lr"] / (1 - beta1**t))

    def _spectral(self, group: dict[str, Any]) -> None:
        layer = self._layers[group["layer"]]
        w, b = layer.weight, layer.bias
        if w.grad is None and (b is None or b.grad is None):
            return
        st = self.state[w]
        gw = w.grad if w.grad is not None else torch.zeros_like(w)
        gb = None if b is None else (b.grad if b.grad is not None else torch.zeros_like(b))
        G = self._rows(layer, gw, gb)
        V, MV, g = st["vectors"], st["dual"], st["gains"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        n, d = G.shape
        k = V.shape[1]
        full = k == d
        use_comp = not full and self.complement > 0
        if "step" not in st:
            st["step"] = torch.zeros((), dtype=torch.float64)
            shape = (n, d) if self.gate_position == "step" else (n, k)
            st["exp_avg"] = G.new_zeros(shape)
            st["exp_avg_sq"] = G.new_zeros(shape)
        if use_comp and self.gate_position == "moments" and "comp_exp_avg" not in st:
            st["comp_exp_avg"] = G.new_zeros(n, d)
            st["comp_exp_avg_sq"] = G.new_zeros(n, d)
        st["step"] += 1
        t = float(st["step"])
        bc1, bc2 = 1 - beta1**t, 1 - beta2**t
        gc = self.complement if not full else 0.0
        scale = self._scales[layer.name]
        if self.gate_position == "step":
            m, v = st["exp_avg"], st["exp_avg_sq"]
            m.lerp_(G, 1 - beta1)
            v.mul_(beta2).addcmul_(G, G, value=1 - beta2)
            u = (m / bc1) / ((v / bc2).sqrt_().add_(eps))
            if st.get("budget_pending"):
                self._budget_tau(layer.name, u @ MV)
                g = st["gains"]
            coef = (g.to(u.dtype) - gc) * -lr
            step = torch.addmm(u * (-lr * gc), u @ MV, coef.unsqueeze(1) * V.T) if gc else None
            if step is None:
                step = (u @ MV) @ (coef.unsqueeze(1) * V.T)
        else:
            z = G @ V
            m, v = st["exp_avg"], st["exp_avg_sq"]
            m.lerp_(z, 1 - beta1)
            v.mul_(beta2).addcmul_(z, z, value=1 - beta2)
            u = (m / bc1) / ((v / bc2).sqrt_().add_(eps))
            if st.get("budget_pending"):
                self._budget_tau(layer.name, u)
                g = st["gains"]
            # gain and step size folded into the (k, d) right factor: one product for the step.
            step = u @ ((g.to(u.dtype) * (-lr * scale)).unsqueeze(1) * V.T)
            if use_comp:
                gp = G - z @ MV.T  # complement part of the gradient (annihilates V)
                cm, cv = st["comp_exp_avg"], st["comp_exp_avg_sq"]
                cm.lerp_(gp, 1 - beta1)
                cv.mul_(beta2).addcmul_(gp, gp, value=1 - beta2)
                uc = (cm / bc1) / ((cv / bc2).sqrt_().add_(eps))
                uc = uc - (uc @ MV) @ V.T  # M-orthogonal projection onto the complement
                step.add_(uc, alpha=-lr * gc)
        if wd:
            Wt = self._rows(layer, w, b)
            decay = (Wt @ MV) @ ((g.to(Wt.dtype) - gc).unsqueeze(1) * V.T)
            if gc:
                decay.add_(Wt, alpha=gc)
            step.add_(decay, alpha=-lr * wd)
        self._apply_rows(layer, step)

    def _budget_tau(self, name: str, coords: torch.Tensor) -> None:
        q = 0.25 if self.tau_param is None else self.tau_param
        lam = self._lstate(name)["values"].to(torch.float64).cpu().numpy()
        c = coords.detach().double().cpu().numpy()
        try:
            tau = gates.tau_for_penalty_budget(lam, c, q)
        except ValueError:  # budget cannot bind (or zero step): fall back to the spectral rule
            tau = resolve_tau(lam, AUTO_TAU_RULE)
        self._set_gains(name, tau)

    @staticmethod
    def _apply_rows(layer: SpectralLayer, step: torch.Tensor) -> None:
        d_in = layer.shape_out_in[1]
        sw = step[:, :d_in]
        layer.weight.add_(sw.T if layer.transposed else sw)
        if layer.bias is not None:
            layer.bias.add_(step[:, d_in])

    # ------------------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Torch's optimizer state plus the step counter (bases, gains and ``τ`` live in the state).

        Returns
        -------
        dict
            :meth:`torch.optim.Optimizer.state_dict` (its ``"param_groups"`` carry each group's
            ``"layer"``; the ``"state"`` of a gated layer's weight holds its ``values``,
            ``vectors``, ``dual``, ``scale``, ``tau`` and ``gains`` beside the moments) and
            ``"folora_global_step"``, the number of :meth:`step` calls, added after torch's
            state-dict post-hooks ran. :meth:`load_state_dict` restores it.
        """
        sd = super().state_dict()
        sd["folora_global_step"] = self._global_step
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore, bases included, so a resumed run continues exactly.

        Parameters
        ----------
        state_dict : dict
            From :meth:`state_dict` of a FoLoRAAdam over the same layers, in the same order.

        Raises
        ------
        ValueError
            If the state dict was saved over other layers (group count or sizes, layer names, basis
            shapes) or its step counter is not an integer >= 0. Everything is checked before anything
            changes: a rejected state dict leaves the optimizer (and what its load hooks update, such
            as the :func:`~rqcore_torch.preserve` handle's step) as it was.
        """
        sd = dict(state_dict)
        raw_step = sd.pop("folora_global_step", 0)
        if (
            isinstance(raw_step, bool)
            or not isinstance(raw_step, (int, np.integer))
            or raw_step < 0
        ):
            raise ValueError(
                f"folora_global_step must be an integer >= 0, got {raw_step!r}; pass a state dict "
                "saved by FoLoRAAdam.state_dict()."
            )
        step = int(raw_step)

        def apply(opt: torch.optim.Optimizer) -> None:
            # Runs only once torch has accepted the dict, first among the post-hooks (which then see
            # the loaded step counter and scales).
            self._global_step = step
            for name, layer in self._layers.items():
                self._scales[name] = float(self.state[layer.weight]["scale"])

        # The check runs last among the pre-hooks (after any that adapt the dict), before torch's own
        # checks and before any state is replaced.
        hooks = (
            self.register_load_state_dict_pre_hook(self._check_loadable),
            self.register_load_state_dict_post_hook(apply, prepend=True),
        )
        try:
            super().load_state_dict(sd)
        finally:
            for hook in hooks:
                hook.remove()

    def _check_loadable(self, opt: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
        """Raise unless ``sd`` holds, group by group, the same layers and bases of matching shapes."""
        saved_groups, saved_state = sd.get("param_groups"), sd.get("state")
        if not isinstance(saved_groups, list) or not isinstance(saved_state, dict):
            return  # torch rejects it with its own message
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"])
            for s, g in zip(saved_groups, self.param_groups, strict=True)
        ):
            return  # torch rejects it with its own message
        fix = "load a state dict saved by a FoLoRAAdam over the same layers, in the same order."
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            name = group.get("layer")
            if saved.get("layer") != name:
                raise ValueError(
                    f"param group {i} of the state dict is for layer {saved.get('layer')!r} but this "
                    f"optimizer's group {i} is {'plain AdamW' if name is None else repr(name)}; {fix}"
                )
            if name is None:
                continue
            layer = self._layers[name]
            st = saved_state.get(saved["params"][0], {})
            missing = [k for k in ("values", "vectors", "dual", "scale", "gains") if k not in st]
            if missing:
                raise ValueError(
                    f"the state dict has no basis for layer {name!r} (no {missing}); {fix}"
                )
            n, d_in = layer.shape_out_in
            d = d_in + (layer.bias is not None)
            shapes = {key: tuple(getattr(value, "shape", ())) for key, value in st.items()}
            k = shapes["vectors"][1] if len(shapes["vectors"]) == 2 else -1  # the saved basis size
            moments = (n, d) if self.gate_position == "step" else (n, k)
            expected = {"vectors": (d, k), "dual": (d, k), "values": (k,), "gains": (k,)}
            expected.update(exp_avg=moments, exp_avg_sq=moments)
            expected.update(comp_exp_avg=(n, d), comp_exp_avg_sq=(n, d))
            for key, shape in expected.items():
                if key in shapes and shapes[key] != shape:
                    raise ValueError(
                        f"layer {name!r}: the state dict's {key} has shape {shapes[key]}, expected "
                        f"{shape} (rows {n}, d = {d}); {fix}"
                    )
