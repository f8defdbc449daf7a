"""Which layers of a model are preserved, and which of their parameters are gated.

A *target* is a layer whose input statistics are collected and whose trainable parameters are gated:

* ``torch.nn.Linear``: rows of ``[W | b]`` (the input is augmented with a constant 1 when ``b`` exists);
* Hugging Face ``Conv1D`` (GPT-2): the same with the transposed weight (``(d_in, d_out)``);
* PEFT ``lora.Linear`` (over an ``nn.Linear`` or a ``Conv1D``): the input of its ``base_layer`` is
  hooked; the gated parameters are the ``lora_A`` factors (their rows live in the input space), one
  per adapter. ``lora_B``'s rows live in the rank-``r`` space, not the input space: it is not a
  target parameter, but ``method="folora"`` gates it in the r-dimensional pencil
  ``(L_A C_t L_Aᵀ, L_A C_p L_Aᵀ)`` (the handle builds it); the base weight is frozen by PEFT.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Target", "TargetSpec", "resolve_targets"]

TargetSpec = str | Sequence[str] | Callable[[str, nn.Module], bool] | None


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return None
    return Conv1D


def _lora_linear_type() -> type | None:
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:  # peft is optional
        return None
    return LoraLinear


@dataclass
class Target:
    """One preserved layer.

    Attributes
    ----------
    name : str
        Qualified module name in the model.
    module : nn.Module
        The layer (for LoRA, the ``lora.Linear`` wrapper).
    hook_module : nn.Module
        The module whose input is hooked (``base_layer`` for LoRA, else ``module``).
    kind : {"linear", "conv1d", "lora"}
    d_in : int
        Input features.
    augmented : bool
        Whether the statistics carry an appended constant-1 column (the layer's bias is gated).
    gated : list of (name, weight, bias, transposed)
        Parameters gated row by row; ``bias`` may be None.
    """

    name: str
    module: nn.Module
    hook_module: nn.Module
    kind: str
    d_in: int
    augmented: bool
    gated: list[tuple[str, Any, Any, bool]] = field(default_factory=list)

    @property
    def dim(self) -> int:
        """Statistics dimension: ``d_in + 1`` when augmented, else ``d_in``."""
        return self.d_in + int(self.augmented)

    @property
    def trainable(self) -> bool:
        """Whether any gated parameter requires grad."""
        return any(
            w.requires_grad or (b is not None and b.requires_grad) for _, w, b, _ in self.gated
        )

    def effective_weight(self) -> torch.Tensor:
        """The weight the layer's forward applies, detached, ``(d_out, dim)``.

        ``[W | b]`` for a linear or Conv1D layer. For a PEFT LoRA layer, ``W`` (no bias column) as
        its forward computes it: the base weight, in ``(d_out, d_in)`` layout whatever its storage
        (``fan_in_fan_out``, e.g. a Conv1D base), plus ``scale·B·A`` of each active adapter that is
        not merged; with the adapters disabled, the base weight less any merged adapter.

        Returns
        -------
        torch.Tensor
            A fresh tensor in the layer's dtype and device.
        """
        mod: Any = self.module
        with torch.no_grad():
            if self.kind == "lora":
                W = mod.base_layer.weight.detach()
                # PEFT's fan_in_fan_out: the base stores (d_in, d_out), as a Conv1D does.
                W = (W.t() if getattr(mod, "fan_in_fan_out", False) else W).clone()
                merged = [a for a in getattr(mod, "merged_adapters", []) if a in mod.lora_A]
                if getattr(mod, "disable_adapters", False):
                    # PEFT's forward unmerges a disabled layer's adapters: it computes W₀.
                    adapters, sign = merged, -1.0
                elif merged:
                    # Merged adapters are inside the base weight already, and PEFT's forward of a
                    # merged layer is the base layer alone (unmerged active adapters are skipped).
                    adapters, sign = [], 1.0
                else:
                    adapters = [a for a in mod.active_adapters if a in mod.lora_A]
                    sign = 1.0
                for adapter in adapters:
                    A = mod.lora_A[adapter].weight
                    B = mod.lora_B[adapter].weight
                    scale = sign * mod.scaling[adapter]
                    W = W + scale * (B.to(W.dtype) @ A.to(W.dtype))  # (d_out, d_in)
                return W
            _, w, b, transposed = self.gated[0]
            W = (w.t() if transposed else w).detach()
            if b is not None:
                W = torch.cat([W, b.detach()[:, None]], dim=1)
            return W.clone()


def _linear_like(module: nn.Module) -> str | None:
    conv1d = _conv1d_type()
    if isinstance(module, nn.Linear):
        return "linear"
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    return None


def _embedding_weights(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def _make_target(name: str, module: Any) -> Target:
    lora = _lora_linear_type()
    if lora is not None and isinstance(module, lora):
        wrapper: Any = module
        base = wrapper.base_layer
        # PEFT sets in_features on the wrapper for every base it wraps; a Conv1D base has none.
        d_in = int(wrapper.in_features)
        gated = [
            (f"{name}.lora_A.{a}", wrapper.lora_A[a].weight, None, False) for a in wrapper.lora_A
        ]
        return Target(name, wrapper, base, "lora", d_in, False, gated)
    kind = _linear_like(module)
    if kind == "linear":
        bias = module.bias if isinstance(module.bias, nn.Parameter) else None
        w = module.weight
        return Target(
            name, module, module, "linear", w.shape[1], bias is not None, [(name, w, bias, False)]
        )
    if kind == "conv1d":
        w = module.weight  # (d_in, d_out)
        bias = module.bias if isinstance(module.bias, nn.Parameter) else None
        return Target(
            name, module, module, "conv1d", w.shape[0], bias is not None, [(name, w, bias, True)]
        )
    raise ValueError(
        f"module {name!r} is a {type(module).__name__}; only nn.Linear, transformers Conv1D and PEFT "
        "lora.Linear layers can be preserved."
    )


def _candidates(model: nn.Module) -> list[tuple[str, Any]]:
    """Linear-like layers, with PEFT LoRA wrappers standing for their inner linears."""
    lora = _lora_linear_type()
    out: list[tuple[str, Any]] = []
    inside_lora: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside_lora):
            continue  # base_layer / lora_A / lora_B of a LoRA layer: the wrapper is the target
        if lora is not None and isinstance(module, lora):
            inside_lora.append(name)
            out.append((name, module))
        elif _linear_like(module) is not None:
            out.append((name, module))
    return out


def functional_children(model: nn.Module) -> list[str]:
    """Names of linears that ``nn.MultiheadAttention`` uses functionally (their forward never runs)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            for child_name, child in module.named_children():
                if isinstance(child, nn.Linear):
                    names.append(f"{name}.{child_name}" if name else child_name)
    return names


def resolve_targets(model: nn.Module, targets: TargetSpec = None) -> list[Target]:
    """Select the preserved layers of ``model``.

    Parameters
    ----------
    model : nn.Module
    targets : None, str, sequence of str, or callable
        None: every trainable linear-like layer (see the module docstring) except output heads whose
        weight *is* an embedding's weight (tied heads). A string or strings: ``fnmatch`` patterns on
        module names. A callable ``(name, module) -> bool``.

    Returns
    -------
    list of Target
        In module order.

    Raises
    ------
    ValueError
        If nothing matches (the message lists the linear layers), or a matched module is not linear.

    Examples
    --------
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2, bias=False))
    >>> [(t.name, t.dim) for t in resolve_targets(model)]
    [('0', 5), ('2', 3)]
    >>> [t.name for t in resolve_targets(model, "2")]
    ['2']
    """
    candidates = _candidates(model)
    tied = _embedding_weights(model)
    modules = dict(model.named_modules())
    chosen: list[tuple[str, nn.Module]]
    if targets is None:
        chosen = [
            (n, m) for n, m in candidates if not (hasattr(m, "weight") and id(m.weight) in tied)
        ]
        found = [_make_target(n, m) for n, m in chosen]
        found = [t for t in found if t.trainable]
    else:
        if callable(targets):
            predicate = targets
            chosen = [(n, m) for n, m in modules.items() if predicate(n, m)]
        else:
            patterns: Iterable[str] = [targets] if isinstance(targets, str) else list(targets)
            pats = list(patterns)
            chosen = [(n, m) for n, m in candidates if any(fnmatch.fnmatchcase(n, p) for p in pats)]
        found = [_make_target(n, m) for n, m in chosen]
    if not found:
        listing = ", ".join(n for n, _ in candidates) or "(none)"
        raise ValueError(
            f"no layer matches targets={targets!r}. The model's linear layers are: {listing}. "
            "Pass fnmatch patterns over these names (e.g. '*.attention.*'), a predicate "
            "(name, module) -> bool, or None for all trainable ones."
        )
    return found
