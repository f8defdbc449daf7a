"""preserve() end to end: exactness of the gated steps, refresh, monitoring, cleanup."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny_bert import anisotropic_mlp_setup
from torch import nn

from rqcore import RayleighBasis
from rqcore_torch import PreserveConfig, preserve


def _train(model, opt, task, steps=30):
    for i in range(steps):
        x, y = task[i % len(task)]
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _out_change(model, w0, b0, calib):
    X = torch.cat(calib)
    lin = model[0]
    with torch.no_grad():
        return float(((X @ (lin.weight - w0).T + (lin.bias - b0)) ** 2).mean())


def test_nullspace_and_plain_adamw():
    model, calib, task = anisotropic_mlp_setup()
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    handle = preserve(model, calib, method="nullspace", energy=0.999, progress=False)
    _train(model, handle.optimizer(torch.optim.AdamW, lr=1e-2), task)
    gated = _out_change(model, w0, b0, calib)
    pen = handle.penalty()
    handle.remove()
    model2, calib2, _ = anisotropic_mlp_setup()
    _train(model2, torch.optim.AdamW(model2.parameters(), lr=1e-2), task)
    plain = _out_change(model2, w0, b0, calib2)
    assert model[0].weight.sub(w0).abs().max() > 1e-3  # it did train
    assert gated < 1e-2 * plain, (gated, plain)
    assert pen.total < 1e-2 and set(pen.per_layer) == {"0", "2"}


def test_hard_gate_blocks_gated_off_directions_exactly():
    model, calib, task = anisotropic_mlp_setup()
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    handle = preserve(
        model,
        calib,
        method="gate",
        gate="hard",
        gate_options={"rank": 2},
        complement=0.0,
        task_loader=[x for x, _ in task],
        progress=False,
    )
    basis = handle.projector("0")
    assert isinstance(basis, RayleighBasis) and basis.rank == 7  # full augmented basis
    np.testing.assert_array_equal(basis.gains, [1, 1, 0, 0, 0, 0, 0])
    _train(model, handle.optimizer(torch.optim.AdamW, lr=1e-2), task)
    delta = torch.cat([model[0].weight - w0, (model[0].bias - b0)[:, None]], 1).detach().double()
    coords = delta.numpy() @ basis.MV  # c = Vᵀ M w per row
    assert np.abs(coords[:, 2:]).max() < 1e-3 * np.abs(coords[:, :2]).max()
    # Predicted output change on the calibration inputs: with δ = V c on the open directions,
    # δᵀ C_p δ = δᵀ M δ − ε‖δ‖² = Σ c² − ε‖δ‖².
    X = torch.cat([torch.cat(calib), torch.ones(256, 1)], 1).double()
    measured = float(((X @ delta.T) ** 2).mean(0).sum())
    predicted = float((coords[:, :2] ** 2).sum() - basis.reg_used * (delta**2).sum())
    assert measured == pytest.approx(predicted, rel=1e-2)
    handle.remove()


def test_refresh_warm_started_and_eval_does_not_track(monkeypatch):
    import rqcore_torch.handle as handle_module

    starts = []
    solve = handle_module.generalized_topk

    def spy(A, B, k, **kwargs):
        starts.append(kwargs.get("v0"))
        return solve(A, B, k, **kwargs)

    monkeypatch.setattr(handle_module, "generalized_topk", spy)
    model, calib, task = anisotropic_mlp_setup()
    handle = preserve(
        model,
        calib,
        method="gate",
        refresh_every=5,
        task_token_fraction=0.5,
        seed=0,
        progress=False,
    )
    first = handle.projector("0")
    pencil = handle._pencils[handle.statistics.layers["0"].group]
    opt = handle.optimizer(torch.optim.SGD, lr=1e-2)
    model.eval()
    with torch.no_grad():
        model(torch.randn(8, 6))
    assert not handle._online_stats.groups  # evaluation does not pollute C_t
    model.train()
    _train(model, opt, task, steps=5)
    assert handle.step == 5 and handle.projector("0") is not first
    assert handle._pencils[handle.statistics.layers["0"].group] is pencil  # C_p not refactored
    assert opt.layers[0].gate is handle.layer_gates()[0].gate
    # Every refresh starts from the last result of its group
    # (its reduced coordinates are reused with the same pencil).
    group = handle.statistics.layers["0"].group
    last = handle._results[group]
    assert last.pencil is pencil
    from rqcore import GeneralizedEigenResult

    n = len(handle.groups)
    assert starts[:n] == [None] * n  # the solves at preserve()
    assert all(isinstance(v0, GeneralizedEigenResult) for v0 in starts[n:])
    _train(model, opt, task, steps=5)
    assert handle.step == 10 and sum(v0 is last for v0 in starts[-len(handle.groups) :]) == 1


def test_report_plot_and_remove(tmp_path):
    model, calib, task = anisotropic_mlp_setup()
    before = {n: dict(m.__dict__) for n, m in model.named_modules()}
    with preserve(model, calib, refresh_every=2, progress=False) as handle:
        _train(model, handle.optimizer(torch.optim.AdamW, lr=1e-3), task, steps=2)
        rows = handle.report()
        assert [r.layer for r in rows] == ["0", "2"] and "mean gain" in str(rows)
        handle.plot(tmp_path / "spectra.png")
        assert (tmp_path / "spectra.png").stat().st_size > 0
    for n, m in model.named_modules():
        assert not m._forward_pre_hooks and not m._forward_hooks
        assert set(m.__dict__) == set(before[n])


def test_method_none_and_folora():
    model, calib, task = anisotropic_mlp_setup()
    handle = preserve(model, calib, method="none", progress=False)
    opt = handle.optimizer(torch.optim.SGD, lr=0.1)
    _train(model, opt, task, steps=2)
    assert handle.step == 2 and handle.penalty().total > 0
    folora = preserve(model, calib, method="folora", progress=False)
    with pytest.raises(TypeError, match='method="gate"'):
        folora.wrap(torch.optim.AdamW(model.parameters()))  # FoLoRA replaces the optimizer
    assert type(folora.optimizer(torch.optim.AdamW)).__name__ == "FoLoRAAdam"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "adam"}, "method must be one of"),
        ({"gate": "hard"}, "gate_options"),
        ({"token_fraction": 0.0}, "token_fraction"),
        ({"refresh_every": 2, "task_window": 5}, "task_window"),
        ({"gate": "hard", "gate_options": {"rank": 0}}, "rank"),
    ],
)
def test_bad_config_raises_before_any_pass(kwargs, match):
    model, calib, _ = anisotropic_mlp_setup()
    with pytest.raises(ValueError, match=match):
        preserve(model, calib, progress=False, **kwargs)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_config_dataclass_validates():
    with pytest.raises(ValueError, match="energy"):
        PreserveConfig(energy=1.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gate_matches_cpu():
    model, calib, _ = anisotropic_mlp_setup()
    h_cpu = preserve(model, calib, method="gate", progress=False)
    h_gpu = preserve(model.cuda(), calib, method="gate", progress=False)
    np.testing.assert_allclose(h_gpu.projector("0").values, h_cpu.projector("0").values, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"complement": "x"},
        {"reg": "1e-3"},
        {"tau": True},
        {"tau_fraction": "0.5"},
        {"energy": "0.9"},
        {"rank": 2.0},
        {"refresh_every": "10"},
        {"seed": 1.5},
        {"share_inputs": "yes"},
        {"progress": None},
        {"method": 5},
        {"gate_options": "abc"},
        {"gate_options": {"rank": "3"}},
    ],
)
def test_config_wrong_types_are_type_errors_naming_the_field(kwargs):
    (name,) = kwargs
    with pytest.raises(TypeError, match=name):
        PreserveConfig(**kwargs)


def test_config_takes_numpy_scalars_as_plain_numbers(tmp_path):
    # A numpy seed was accepted, then json.dumps failed in save(), after the training.
    config = PreserveConfig(
        method="gate", gate="hard", gate_options={"rank": np.int64(3)}, seed=np.int64(1)
    )
    assert type(config.seed) is int and type(config.gate_options["rank"]) is int
    assert PreserveConfig(gate_options=None).gate_options == {}
    model, calib, _ = anisotropic_mlp_setup()
    handle = preserve(model, calib, progress=False, seed=np.int64(1))
    handle.save(tmp_path / "h.safetensors")
