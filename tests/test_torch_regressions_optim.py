"""Regression tests of the optimizers, each named after the defect it pins.

FoLoRAAdam's extra param groups and atomic ``load_state_dict``, the weights of TorchCovariance under
``check_finite=False``, and GatedOptimizer under a base step that rebinds ``p.data``. Each test
failed on the code before its fix.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch

from rqcore import NullspaceProjector, RayleighBasis
from rqcore_torch import GatedOptimizer, LayerGate, TorchCovariance, preserve, to_torch
from rqcore_torch.folora import FoLoRAAdam, SpectralLayer

torch.set_num_threads(1)


def _spectral_layer(name: str = "l", d_in: int = 5, out: int = 3, seed: int = 0) -> SpectralLayer:
    rng = np.random.default_rng(seed)
    d = d_in + 1
    Ct = np.cov(rng.standard_normal((d, 4 * d))) + 1e-3 * np.eye(d)
    Cp = np.cov(rng.standard_normal((d, 4 * d))) + 1e-3 * np.eye(d)
    basis = RayleighBasis.from_pencil(Ct, Cp, d, reg=1e-2)
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(out, d_in, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(out, dtype=torch.float64))
    return SpectralLayer.from_basis(name, w, b, basis)


def _set_grads(params: list[torch.Tensor], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def _snapshot(opt: torch.optim.Optimizer) -> dict[str, Any]:
    return copy.deepcopy(opt.state_dict())


def _assert_same_state(a: Any, b: Any) -> None:
    """Equal nested state dicts (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            _assert_same_state(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same_state(x, y)
    else:
        assert a == b


# ------------------------------------------------------------------ FoLoRAAdam.add_param_group
def test_folora_add_param_group_without_layer_trains_with_plain_adamw() -> None:
    layer = _spectral_layer()
    twin = _spectral_layer()
    opt = FoLoRAAdam([layer], lr=0.05, weight_decay=0.01)
    ref_opt = FoLoRAAdam([twin], lr=0.05, weight_decay=0.01)
    extra = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 4, dtype=torch.float64))
    extra_ref = torch.nn.Parameter(extra.detach().clone())
    adamw = torch.optim.AdamW([extra_ref], lr=0.1, weight_decay=0.02)
    group = {"params": [extra], "lr": 0.1, "weight_decay": 0.02}
    opt.add_param_group(group)
    assert opt.param_groups[-1]["layer"] is None and group["layer"] is None
    for t in range(3):
        _set_grads([layer.weight, layer.bias, extra], t)  # type: ignore[list-item]
        _set_grads([twin.weight, twin.bias, extra_ref], t)  # type: ignore[list-item]
        opt.step()  # raised KeyError: 'layer'
        ref_opt.step()
        adamw.step()
    torch.testing.assert_close(extra, extra_ref, rtol=1e-12, atol=1e-14)
    assert torch.equal(layer.weight, twin.weight) and torch.equal(layer.bias, twin.bias)  # type: ignore[arg-type]
    # the added group travels with the state dict
    fresh = FoLoRAAdam([_spectral_layer()], lr=0.05, weight_decay=0.01)
    fresh.add_param_group({"params": [torch.nn.Parameter(extra.detach().clone())]})
    fresh.load_state_dict(_snapshot(opt))
    assert fresh.param_groups[-1]["lr"] == 0.1 and fresh.param_groups[-1]["layer"] is None


def test_folora_add_param_group_rejects_gated_layers_after_construction() -> None:
    layer = _spectral_layer()
    opt = FoLoRAAdam([layer], lr=0.05)
    before = _snapshot(opt)
    other = _spectral_layer("m", seed=1)
    for name in ("l", "m"):
        with pytest.raises(ValueError, match=r"fixed at construction.*'layer': None"):
            opt.add_param_group({"params": [other.weight, other.bias], "layer": name})
    _assert_same_state(opt.state_dict(), before)
    assert len(opt.param_groups) == 1


# ------------------------------------------------------------------ FoLoRAAdam.load_state_dict
def _trained_folora(
    names: tuple[str, ...] = ("a", "b"), d_in: int = 5, steps: int = 3
) -> FoLoRAAdam:
    layers = [_spectral_layer(n, d_in=d_in, seed=i) for i, n in enumerate(names)]
    opt = FoLoRAAdam(layers, lr=0.05)
    params = [p for lay in layers for p in (lay.weight, lay.bias)]
    for t in range(steps):
        _set_grads(params, t)  # type: ignore[arg-type]
        opt.step()
    return opt


@pytest.mark.parametrize(
    ("source", "match"),
    [
        (lambda: _trained_folora(("a",), steps=5).state_dict(), "number of parameter groups"),
        (lambda: _trained_folora(("a", "c"), steps=5).state_dict(), "for layer 'c'"),
        (lambda: _trained_folora(d_in=7, steps=5).state_dict(), "shape"),
        (lambda: {**_trained_folora().state_dict(), "folora_global_step": -1}, "integer >= 0"),
    ],
    ids=["group-count", "layer-name", "basis-shape", "step-counter"],
)
def test_folora_rejected_load_state_dict_leaves_the_optimizer_unchanged(
    source: Any, match: str
) -> None:
    opt = _trained_folora()
    before = _snapshot(opt)
    assert before["folora_global_step"] == 3
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(source())
    _assert_same_state(opt.state_dict(), before)
    assert opt._scales == {
        n: float(opt.state[lay.weight]["scale"]) for n, lay in opt._layers.items()
    }


def test_preserve_optimizer_rejected_load_leaves_handle_and_optimizer_unchanged() -> None:
    """A state dict torch would accept (same group sizes) but of another model: checked first."""

    def trained(d: int) -> tuple[Any, FoLoRAAdam]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(d, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        handle = preserve(model, [torch.randn(16, d) for _ in range(2)], progress=False)
        opt = handle.optimizer(torch.optim.AdamW, lr=1e-2)
        for _ in range(3):
            model(torch.randn(4, d)).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
        return handle, opt

    handle, opt = trained(6)
    _, other = trained(9)
    for _ in range(2):
        other.step()  # the other handle's step counter differs too
    before, step = _snapshot(opt), handle.step
    with pytest.raises(ValueError, match="expected"):
        opt.load_state_dict(other.state_dict())
    assert handle.step == step == 3
    _assert_same_state(opt.state_dict(), before)


# ------------------------------------------------------------------ TorchCovariance weights
@pytest.mark.parametrize("backend", ["core", "torch"])
@pytest.mark.parametrize("check_finite", [True, False])
@pytest.mark.parametrize("bad", [-3.0, float("-inf")])
def test_negative_weights_raise_on_both_backends_whatever_check_finite(
    backend: str, check_finite: bool, bad: float
) -> None:
    acc = TorchCovariance(3, backend=backend)
    acc.update(torch.ones(4, 3))
    before = acc.state_dict()
    with pytest.raises(ValueError, match=r"non-negative.*weights\[1\]"):
        acc.update(torch.ones(2, 3), torch.tensor([1.0, bad]), check_finite=check_finite)
    after = acc.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert int(acc.skipped_batches) == 0
    # NaN/Inf keep their documented meaning: raise with check_finite, else skip and count.
    for w in (float("nan"), float("inf")):
        if check_finite:
            with pytest.raises(ValueError, match="NaN or Inf"):
                acc.update(torch.ones(2, 3), torch.tensor([1.0, w]))
        else:
            acc.update(torch.ones(2, 3), torch.tensor([1.0, w]), check_finite=False)
    assert int(acc.skipped_batches) == (0 if check_finite else 2)
    assert float(acc.total_weight) == 4.0


# ------------------------------------------------------------------ GatedOptimizer and p.data
class _RebindSGD(torch.optim.Optimizer):
    """SGD that assigns ``p.data = ...`` (a new tensor) instead of updating in place."""

    def __init__(self, params: Any, lr: float, dtype: torch.dtype | None = None) -> None:
        super().__init__(params, {"lr": lr})
        self.dtype = dtype

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    new = p.data - group["lr"] * p.grad
                    p.data = new if self.dtype is None else new.to(self.dtype)


def _gated_linear(base: type[torch.optim.Optimizer], **kw: Any) -> tuple[Any, GatedOptimizer]:
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    gate = to_torch(NullspaceProjector(np.diag([1.0, 0, 0, 0]), rank=1))  # freezes input 0
    opt = GatedOptimizer(
        base(lin.parameters(), lr=0.1, **kw), [LayerGate("fc", lin.weight, lin.bias, gate)]
    )
    return lin, opt


def test_gated_optimizer_gates_a_base_step_that_rebinds_p_data() -> None:
    lin, opt = _gated_linear(_RebindSGD)
    ref, ref_opt = _gated_linear(torch.optim.SGD)  # in place: the gate's reference behaviour
    x = torch.randn(4, 3)
    w0 = lin.weight.detach().clone()
    for _ in range(3):
        for model, o in ((lin, opt), (ref, ref_opt)):
            o.zero_grad()
            model(x).pow(2).sum().backward()
            o.step()
    torch.testing.assert_close(lin.weight, ref.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(lin.bias, ref.bias, rtol=0, atol=1e-6)
    torch.testing.assert_close(lin.weight[:, 0], w0[:, 0], rtol=0, atol=1e-6)  # frozen column
    assert (lin.weight - w0).abs().max() > 1e-3  # the free columns train


def test_gated_optimizer_names_a_base_step_that_changes_the_dtype() -> None:
    lin, opt = _gated_linear(_RebindSGD, dtype=torch.float64)
    lin(torch.randn(4, 3)).sum().backward()
    with pytest.raises(ValueError, match="base optimizer's step replaced the weight"):
        opt.step()
