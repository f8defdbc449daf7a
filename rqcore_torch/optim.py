"""An optimizer wrapper that gates the parameter update of chosen layers.

:class:`GatedOptimizer` runs any ``torch.optim.Optimizer`` and replaces the step it applies to each gated
layer by the gated step: ``W ← W_old + P(W_new − W_old)`` row by row, with the layer's
:class:`~rqcore_torch.projectors.TorchGate` ``P``. Gating the *delta* (not the gradient) keeps what the
base optimizer does (moments, weight decay, learning rate) and constrains only the change of the
weights. See ``docs/optimizer.md``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rqcore_torch.projectors import LayerGate

__all__ = ["GatedOptimizer"]


class _Slot:
    """The preallocated buffers of one gated layer: the snapshot rows and the coordinates."""

    __slots__ = ("coords", "layer", "rows", "rows_b", "rows_w")

    def __init__(self, layer: LayerGate, rows: torch.Tensor | None) -> None:
        self.layer = layer
        d_out, d_in, dim = layer.d_out, layer.d_in, layer.gate.dim
        w = layer.weight
        if rows is None or rows.shape != (d_out, dim) or rows.dtype != w.dtype:
            rows = torch.empty((d_out, dim), device=w.device, dtype=w.dtype)
        self.rows = rows
        self.rows_w = rows[:, :d_in]
        self.rows_b = rows[:, d_in] if layer.bias is not None else None
        self.coords = torch.empty((d_out, layer.gate.rank), device=w.device, dtype=w.dtype)

    def views(self, after_step: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight's rows and the bias, read from the parameters.

        Taken afresh before and again after every base step: ``model.to(...)``, ``.double()`` or
        ``accelerate.prepare`` replace a parameter's data between steps, and an optimizer that assigns
        ``p.data = ...`` replaces it during one; views captured earlier would gate an orphaned tensor.
        """
        w = self.layer.weight
        if w.device != self.rows.device or w.dtype != self.rows.dtype:  # metadata only: no sync
            if after_step:
                raise ValueError(
                    f"layer {self.layer.name!r}: the base optimizer's step replaced the weight by a "
                    f"{w.dtype} tensor on {w.device}, so its change cannot be gated (this step was "
                    "applied ungated); the base step must keep the parameters' dtype and device."
                )
            raise ValueError(
                f"layer {self.layer.name!r}: the weight is now {w.dtype} on {w.device} but the gate "
                f"was built for {self.rows.dtype} on {self.rows.device}; rebuild the optimizer (or "
                "call set_layers) after moving or casting the model."
            )
        rows = w.detach().T if self.layer.transposed else w.detach()  # Conv1D stores (d_in, d_out)
        bias = self.layer.bias.detach() if self.layer.bias is not None else None
        return rows, bias

    def unmoved(self, weight_rows: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """Whether the parameters still hold the storage of the views taken before the base step.

        The views keep that storage alive, so a tensor bound during the step cannot reuse its address:
        an equal pointer means the same memory (about 70 ns per pointer, against ~2 µs for new views).
        """
        b = self.layer.bias
        return self.layer.weight.data_ptr() == weight_rows.data_ptr() and (
            b is None or b.data_ptr() == bias.data_ptr()  # type: ignore[union-attr]
        )


class GatedOptimizer(torch.optim.Optimizer):
    r"""Wrap an optimizer so that each gated layer moves by the gated version of its step.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        The base optimizer; it must already hold every gated parameter.
    layers : sequence of LayerGate
        The gated layers (parameters not listed here step as the base optimizer says).
    on_step : callable, optional
        ``on_step(self)`` after every applied step (not after a step that ``GradScaler`` skips):
        a place to count steps and refresh the gates with :meth:`set_layers`.

    Attributes
    ----------
    optimizer : torch.optim.Optimizer
        The base (read-only).
    layers : tuple of LayerGate
    param_groups, state, defaults
        The base's own objects, by reference (so LR schedulers, ``GradScaler``, ``accelerate`` and the
        Hugging Face ``Trainer`` act on the real ones).

    Raises
    ------
    TypeError
        If ``optimizer`` is not a ``torch.optim.Optimizer``.
    ValueError
        If a gated parameter is not in the base optimizer, or appears in two layers.

    Notes
    -----
    A step: copy each gated layer's rows ``[W | b]`` into a preallocated buffer, run the base step, then
    add ``(P − I)(W_new − W_old)`` to the parameters, which leaves them at ``W_old + P(W_new − W_old)``
    (for ``P(D) = c·D + (D·A)·B`` that is one subtraction, one ``(n, k)`` product, a scaled add that
    vanishes for a null-space gate, and one ``addmm``). Memory: one copy of each gated parameter plus
    ``(d_out, k)`` coordinates per layer, allocated once. No host synchronization: nothing reads a
    tensor value, so the step is safe under ``torch.cuda.set_sync_debug_mode("error")``.

    ``W_new`` is read from the parameter after the base step, whatever tensor it then holds: a base
    optimizer that rebinds ``p.data = ...`` instead of updating in place is gated like one that
    updates in place (the gated result is written into the newly bound tensor). A base step that
    changes a gated parameter's dtype or device raises ValueError (its step is then applied
    ungated).

    Gradient clipping acts on the gradient before the base step; the gate acts after it on the parameter
    delta. ``GradScaler.step(gated)`` unscales the real gradients (``param_groups`` are shared) and skips
    the whole step (base step, gate, ``on_step``) on inf/NaN. ``state_dict``/``load_state_dict`` are the
    base's: the gates are not optimizer state (rebuild them from their projectors).

    Examples
    --------
    >>> import numpy as np, torch
    >>> from rqcore import NullspaceProjector
    >>> from rqcore_torch.projectors import LayerGate, to_torch
    >>> _ = torch.manual_seed(0)
    >>> layer = torch.nn.Linear(3, 2)
    >>> gate = to_torch(NullspaceProjector(np.diag([1.0, 0, 0, 0]), rank=1))   # freeze input 0
    >>> opt = GatedOptimizer(torch.optim.SGD(layer.parameters(), lr=0.1),
    ...                      [LayerGate("fc", layer.weight, layer.bias, gate)])
    >>> before = layer.weight[:, 0].clone()
    >>> layer(torch.randn(4, 3)).sum().backward()
    >>> _ = opt.step()
    >>> bool((layer.weight[:, 0] - before).abs().max() < 1e-6)   # frozen up to float32 rounding
    True
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        layers: Sequence[LayerGate],
        *,
        on_step: Callable[[GatedOptimizer], None] | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}."
            )
        # Optimizer.__init__ is not called: it would build a second param_groups/state. What it sets
        # up besides them (the hook dicts that torch and accelerate read, the patched step) is set here.
        self._optimizer = optimizer
        self._optimizer_step_pre_hooks: OrderedDict[int, Any] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Any] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Any] = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Any] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Any] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Any] = OrderedDict()
        self._warned_capturable_if_run_uncaptured = True
        self._patch_step_function()
        self.on_step = on_step
        self._slots: list[_Slot] = []
        self.set_layers(layers)

    # ------------------------------------------------------------------ shared state
    # Properties, not attributes: the base's load_state_dict replaces its param_groups and state objects.
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The base optimizer's parameter groups."""
        return self._optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._optimizer.param_groups = value

    @property
    def state(self) -> Any:
        """The base optimizer's state."""
        return self._optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self._optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        """The base optimizer's defaults."""
        return self._optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self._optimizer.defaults = value

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The wrapped base optimizer."""
        return self._optimizer

    @property
    def layers(self) -> tuple[LayerGate, ...]:
        """The gated layers, in order."""
        return tuple(slot.layer for slot in self._slots)

    # ------------------------------------------------------------------ gates
    def set_layers(self, layers: Sequence[LayerGate]) -> None:
        """Replace the gated layers (after a refresh of the bases), reusing the buffers that fit.

        Parameters
        ----------
        layers : sequence of LayerGate

        Raises
        ------
        ValueError
            If a parameter is not held by the base optimizer or appears twice.
        """
        layers = list(layers)
        held = {id(p) for group in self._optimizer.param_groups for p in group["params"]}
        seen: set[int] = set()
        for layer in layers:
            if not isinstance(layer, LayerGate):
                raise ValueError(f"layers must hold LayerGate objects, got {type(layer).__name__}.")
            for kind, p in (("weight", layer.weight), ("bias", layer.bias)):
                if p is None:
                    continue
                if id(p) not in held:
                    raise ValueError(
                        f"{layer.name}: the {kind} is not in the wrapped optimizer; add it to the "
                        "base optimizer (or its param_groups) before wrapping."
                    )
                if id(p) in seen:
                    raise ValueError(f"{layer.name}: the {kind} is gated by two layers.")
                seen.add(id(p))
        old = {id(slot.layer.weight): slot.rows for slot in self._slots}
        self._slots = [_Slot(layer, old.get(id(layer.weight))) for layer in layers]

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Run the base step, then gate the change of every gated layer.

        Parameters
        ----------
        closure : callable, optional
            Passed to the base step (which re-enables gradients around it).

        Returns
        -------
        loss : float or None
            What the base step returns (the closure's loss, or None).

        Notes
        -----
        Parameters outside the gated layers move exactly as the base optimizer moves them. A skipped
        step (``GradScaler`` on inf/NaN) never reaches this method, so it neither gates nor calls
        ``on_step``.
        """
        slots = self._slots
        views = [s.views() for s in slots]
        for s, (weight_rows, bias) in zip(slots, views, strict=True):
            s.rows_w.copy_(weight_rows)
            if s.rows_b is not None:
                s.rows_b.copy_(bias)  # type: ignore[arg-type]
        loss = self._optimizer.step(closure) if closure is not None else self._optimizer.step()
        # A base step that rebinds ``p.data`` leaves the views above on the old tensor, and gating them
        # would let the real step through: take them again then (the pointers are metadata, no sync).
        views = [
            v if s.unmoved(*v) else s.views(after_step=True)
            for s, v in zip(slots, views, strict=True)
        ]
        for s, (weight_rows, bias) in zip(slots, views, strict=True):
            # rows ← old − new = −δ; then new + (P − I)δ = new + (1 − c)·rows − (rows·A)·B.
            s.rows_w.sub_(weight_rows)
            if s.rows_b is not None:
                s.rows_b.sub_(bias)  # type: ignore[arg-type]
            c, A, B = s.layer.gate.factors
            d_in = s.rows_w.shape[1]
            if c != 1.0:  # host-side Python float: no synchronization
                weight_rows.add_(s.rows_w, alpha=1.0 - c)
                if bias is not None:
                    bias.add_(s.rows_b, alpha=1.0 - c)  # type: ignore[arg-type]
            if A.shape[1]:
                torch.mm(s.rows, A, out=s.coords)
                weight_rows.addmm_(s.coords, B[:, :d_in], alpha=-1.0)
                if bias is not None:
                    bias.addmv_(s.coords, B[:, d_in], alpha=-1.0)
        if self.on_step is not None:
            self.on_step(self)
        return loss

    # ------------------------------------------------------------------ delegation
    def zero_grad(self, set_to_none: bool = True) -> None:
        """The base optimizer's ``zero_grad``.

        Delegated: the base's own ``zero_grad`` runs (with its defaults and any override it has),
        not torch's implementation on the wrapper.

        Parameters
        ----------
        set_to_none : bool, default True
            Set the gradients to None instead of zeroing them, as in torch.
        """
        self._optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer; its parameters step ungated until :meth:`set_layers`.

        The group goes into the base's ``param_groups``, which the wrapper shares, so it is
        stepped by the base like any other group.

        Parameters
        ----------
        param_group : dict
            As for :meth:`torch.optim.Optimizer.add_param_group` of the base optimizer.

        Raises
        ------
        TypeError
            From the base's ``add_param_group``: not a dict, parameters in a set, or a non-tensor.
        ValueError
            From the base's ``add_param_group``: e.g. a parameter already in a group, or a
            non-leaf tensor.
        """
        self._optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (the gates are not optimizer state).

        Returns
        -------
        dict
            The base's :meth:`torch.optim.Optimizer.state_dict`, after the state-dict hooks
            registered on the wrapper (which live on the base) ran.
        """
        return self._optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the base optimizer; the gates and buffers are unchanged.

        The base replaces its ``param_groups`` and ``state``, which the wrapper then reads. The
        gates are not in the state dict: after loading one saved with other bases, pass the
        matching gates to :meth:`set_layers` (an optimizer built by
        :class:`~rqcore_torch.PreservationHandle` does it in its load hook).

        Parameters
        ----------
        state_dict : dict
            From :meth:`state_dict` (of this wrapper or of a base optimizer of the same kind over
            the same parameter groups).

        Raises
        ------
        ValueError
            What the base's ``load_state_dict`` raises, e.g. for another number of parameter groups
            or of parameters in a group.
        """
        self._optimizer.load_state_dict(state_dict)

    # State-dict hooks registered on the wrapper go to the base, whose state_dict runs them.
    def register_state_dict_pre_hook(self, hook: Any, prepend: bool = False) -> Any:
        """Register on the base optimizer (see ``torch.optim.Optimizer``).

        The base's ``state_dict`` runs the hook, so the hook's ``optimizer`` argument is the
        base optimizer, not the wrapper.

        Parameters
        ----------
        hook : callable
            ``hook(optimizer) -> None``, called before the base builds its state dict.
        prepend : bool, default False
            Run it before the hooks already registered (on the base) instead of after them.

        Returns
        -------
        torch.utils.hooks.RemovableHandle
            ``handle.remove()`` unregisters the hook.
        """
        return self._optimizer.register_state_dict_pre_hook(hook, prepend=prepend)

    def register_state_dict_post_hook(self, hook: Any, prepend: bool = False) -> Any:
        """Register on the base optimizer (see ``torch.optim.Optimizer``).

        The base's ``state_dict`` runs the hook, so the hook's ``optimizer`` argument is the
        base optimizer, not the wrapper.

        Parameters
        ----------
        hook : callable
            ``hook(optimizer, state_dict) -> state_dict or None``, called on the state dict
            the base built; it may change it in place or return a new one.
        prepend : bool, default False
            Run it before the hooks already registered (on the base) instead of after them.

        Returns
        -------
        torch.utils.hooks.RemovableHandle
            ``handle.remove()`` unregisters the hook.
        """
        return self._optimizer.register_state_dict_post_hook(hook, prepend=prepend)

    def register_load_state_dict_pre_hook(self, hook: Any, prepend: bool = False) -> Any:
        """Register on the base optimizer (see ``torch.optim.Optimizer``).

        The base's ``load_state_dict`` runs the hook, so the hook's ``optimizer`` argument is the
        base optimizer, not the wrapper.

        Parameters
        ----------
        hook : callable
            ``hook(optimizer, state_dict) -> state_dict or None``, called with a shallow
            copy of the state dict before the base loads it; it may change it or return a new one.
        prepend : bool, default False
            Run it before the hooks already registered (on the base) instead of after them.

        Returns
        -------
        torch.utils.hooks.RemovableHandle
            ``handle.remove()`` unregisters the hook.
        """
        return self._optimizer.register_load_state_dict_pre_hook(hook, prepend=prepend)

    def register_load_state_dict_post_hook(self, hook: Any, prepend: bool = False) -> Any:
        """Register on the base optimizer (see ``torch.optim.Optimizer``).

        The base's ``load_state_dict`` runs the hook, so the hook's ``optimizer`` argument is the
        base optimizer, not the wrapper.

        Parameters
        ----------
        hook : callable
            ``hook(optimizer) -> None``, called after the base loaded a state dict.
        prepend : bool, default False
            Run it before the hooks already registered (on the base) instead of after them.

        Returns
        -------
        torch.utils.hooks.RemovableHandle
            ``handle.remove()`` unregisters the hook.
        """
        return self._optimizer.register_load_state_dict_post_hook(hook, prepend=prepend)

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    def __repr__(self) -> str:
        names = ", ".join(f"{s.layer.name}: {s.layer.gate!r}" for s in self._slots)
        base = repr(self._optimizer).replace("\n", "\n    ")
        return f"GatedOptimizer(\n    {base},\n    layers=[{names}]\n)"
