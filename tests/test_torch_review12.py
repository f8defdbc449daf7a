"""Regressions for the defects a black-box review of the bridge found in session 12.

Each test failed on the code before the fix (persistence, preserve, calibration, config, handle).
"""

from __future__ import annotations

import collections
import copy
import logging

import pytest
import torch
from _tiny_bert import calibration_batches, tiny_bert_classifier
from torch import nn

from rqcore_torch import CalibrationStatistics, calibrate, load, preserve


def _mlp(seed: int = 0, d: int = 6) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 2))


def _data(n: int = 4, d: int = 6, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, d, generator=g) for _ in range(n)]


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        model(torch.randn(8, 6, generator=g)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()


def test_load_mid_warmup_resumes_exactly(tmp_path):
    # FoLoRA without task statistics tracks C_t online for task_warmup = 10 steps, then refreshes.
    # Saved at step 3, the online statistics came back as *task* statistics: no tracking, no refresh.
    model = _mlp()
    handle = preserve(model, _data(), progress=False, seed=0)
    opt = handle.optimizer(torch.optim.AdamW, lr=1e-2)
    _train(model, opt, 3, seed=1)
    path = tmp_path / "h.safetensors"
    handle.save(path)
    opt_state = copy.deepcopy(opt.state_dict())
    weights = copy.deepcopy(model.state_dict())
    _train(model, opt, 10, seed=2)  # crosses the warm-up refresh at step 10
    reference = model.state_dict()

    resumed = _mlp(seed=5)
    resumed.load_state_dict(weights)
    loaded = load(path, resumed)
    assert loaded._warmup_pending and loaded._online is not None
    assert loaded.task_statistics is None
    opt2 = loaded.optimizer(torch.optim.AdamW, lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt_state))  # torch shares the loaded tensors: a fresh copy
    _train(resumed, opt2, 10, seed=2)
    for key, value in resumed.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)


def test_preserve_with_lora_leaves_the_model_unchanged_on_failure():
    model = tiny_bert_classifier(dropout=0.0)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError, match="yielded no batch"):
        preserve(model, [], lora=dict(r=2), progress=False)
    assert [n for n, _ in model.named_modules()] == modules
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not hasattr(model, "peft_config")
    handle = preserve(model, calibration_batches(), lora=dict(r=2), progress=False)  # a retry works
    assert any(hasattr(m, "lora_A") for m in model.modules())
    handle.remove()


def test_failed_resume_of_calibrate_leaves_statistics_unchanged():
    model = _mlp()
    data = _data()
    stats = calibrate(model, data[:1], progress=False)
    before = {g: acc.state_dict() for g, acc in stats.groups.items()}
    bad = data[2].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        calibrate(model, [data[0], data[1], bad], statistics=stats, progress=False)
    assert stats.batches == 1
    for g, acc in stats.groups.items():
        after = acc.state_dict()
        assert all((after[k] == before[g][k]).all() for k in after)
    # Resuming with the fixed loader counts every batch once.
    calibrate(model, data[:3], statistics=stats, progress=False)
    single = calibrate(model, data[:3], progress=False)
    assert stats.batches == 3
    for g in single.groups:
        assert float(stats.groups[g].total_weight) == float(single.groups[g].total_weight)


def test_load_with_another_method_takes_its_defaults(tmp_path):
    model = _mlp()
    path = tmp_path / "h.safetensors"
    preserve(model, _data(), progress=False).save(path)  # folora: reg 0.1, tau_fraction 0.3
    gate = load(path, model, method="gate")
    fresh = preserve(model, _data(), method="gate", progress=False)
    assert (gate.config.reg, gate.config.tau_fraction) == (
        fresh.config.reg,
        fresh.config.tau_fraction,
    )
    kept = load(path, model, method="gate", reg=0.1)  # passed again: kept
    assert kept.config.reg == 0.1 and kept.config.tau_fraction == fresh.config.tau_fraction


def test_preserve_checks_statistics_against_the_model():
    stats = calibrate(_mlp(d=6), _data(d=6), progress=False)
    with pytest.raises(ValueError, match="statistics have dimension 7 but the layer needs 9"):
        preserve(_mlp(d=8), stats, method="none", progress=False)
    with pytest.raises(ValueError, match="statistics are empty"):
        preserve(_mlp(), CalibrationStatistics(), progress=False)


def test_namedtuple_batches_are_passed_as_fields():
    Batch = collections.namedtuple("Batch", "x")
    stats = calibrate(_mlp(), [Batch(x) for x in _data()], progress=False)
    assert stats.batches == 4 and set(stats.layers) == {"0", "2"}


def test_input_changed_in_place_between_layers_is_not_shared():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 3)
            self.b = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            y = self.a(x)
            x.relu_()  # b sees another input than a, in the same memory
            return y + self.b(x)

    net = Net()
    data = [torch.randn(32, 4, generator=torch.Generator().manual_seed(0))]
    shared = calibrate(net, data, progress=False)
    separate = calibrate(net, data, progress=False, share_inputs=False)
    assert shared.layers["b"].group == "b"
    torch.testing.assert_close(shared.covariance("b"), separate.covariance("b"))


def test_frozen_weight_with_trainable_bias_warns(caplog):
    model = _mlp()
    model[0].weight.requires_grad_(False)
    with caplog.at_level(logging.WARNING, logger="rqcore_torch"):
        handle = preserve(model, _data(), method="nullspace", progress=False)
        names = [g.name for g in handle.layer_gates()]
    assert "0.weight" not in names
    assert any("the weight is frozen but the bias is not" in r.getMessage() for r in caplog.records)
