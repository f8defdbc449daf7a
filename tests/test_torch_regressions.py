"""Regression tests, each named after the defect it pins (found in review)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rqcore_torch import preserve


def _mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _calib(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 6, generator=g).to(dtype) for _ in range(3)]  # rank-deficient C_p


def _step(model: nn.Module, opt: torch.optim.Optimizer, dtype: torch.dtype = torch.float32) -> None:
    model(torch.randn(5, 6).to(dtype)).square().sum().backward()
    opt.step()
    opt.zero_grad()


def test_folora_optimizer_builds_and_steps_on_a_bfloat16_model() -> None:
    model = _mlp(torch.bfloat16)
    handle = preserve(model, _calib(torch.bfloat16), progress=False)  # method="folora"
    opt = handle.optimizer(torch.optim.AdamW, lr=1e-3)
    _step(model, opt, torch.bfloat16)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_gate_follows_parameters_whose_data_was_replaced() -> None:
    model = _mlp()
    handle = preserve(model, _calib(), method="nullspace", energy=0.999999, progress=False)
    opt = handle.optimizer(torch.optim.SGD, lr=0.1)
    for p in model.parameters():  # what model.to(...) or accelerate.prepare do to param.data
        p.data = p.data.clone()
    _step(model, opt)
    assert handle.penalty().total < 1e-10  # the real parameters were gated, not stale copies


def test_gate_refuses_a_model_cast_after_the_optimizer_was_built() -> None:
    model = _mlp()
    handle = preserve(model, _calib(), method="nullspace", progress=False)
    opt = handle.optimizer(torch.optim.SGD, lr=0.1)
    model.double()
    model(torch.randn(5, 6, dtype=torch.float64)).sum().backward()
    with pytest.raises(ValueError, match="rebuild the optimizer"):
        opt.step()


def test_online_task_statistics_skip_a_non_finite_batch_instead_of_raising() -> None:
    model = _mlp()
    handle = preserve(model, _calib(), method="gate", refresh_every=1, progress=False)
    model.train()
    bad = torch.randn(5, 6)
    bad[0, 0] = float("inf")
    with torch.enable_grad():
        model(bad)  # the forward hook must not raise during training
    handle.remove()


def test_folora_with_a_non_adam_optimizer_keeps_the_schedule_in_its_state_dict() -> None:
    model = _mlp()
    handle = preserve(model, _calib(), progress=False)
    opt = handle.optimizer(torch.optim.SGD, lr=0.1)
    _step(model, opt)
    assert opt.state_dict()["preserve"]["step"] == 1


def test_a_rejected_state_dict_leaves_the_handle_unchanged() -> None:
    model = _mlp()
    handle = preserve(model, _calib(), method="gate", progress=False)
    opt = handle.optimizer(torch.optim.AdamW, lr=1e-3)
    for _ in range(3):
        _step(model, opt)
    saved = opt.state_dict()  # at step 3
    _step(model, opt)
    _step(model, opt)
    saved["param_groups"] = saved["param_groups"] * 2  # torch rejects this
    with pytest.raises(ValueError):
        opt.load_state_dict(saved)
    assert handle.step == 5


def test_folora_refuses_gate_options_it_cannot_honour() -> None:
    # An option the gate does not take would be ignored silently: refused before any pass.
    with pytest.raises(ValueError, match="not supported"):
        preserve(_mlp(), _calib(), gate="sigmoid", gate_options={"alpha": 2.0}, progress=False)
