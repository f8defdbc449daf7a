"""preserve(method="folora"): the handle builds FoLoRAAdam, refreshes its bases, resumes exactly."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _tiny_bert import anisotropic_mlp_setup
from torch import nn

from rqcore_torch import FoLoRAAdam, PreserveConfig, preserve


def _train(model, opt, task, steps, start=0):
    for i in range(start, start + steps):
        x, y = task[i % len(task)]
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def test_folora_is_the_default_and_builds_folora_adam():
    model, calib, task = anisotropic_mlp_setup()
    model[2].bias.requires_grad_(False)  # weight trainable, bias frozen: plain-Adam part
    handle = preserve(model, calib, progress=False)
    assert handle.config.method == "folora"
    assert handle.config.reg == 1e-1 and handle.config.tau_fraction == 0.3
    opt = handle.optimizer(torch.optim.AdamW, lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1)
    assert isinstance(opt, FoLoRAAdam)
    names = [g["layer"] for g in opt.param_groups]
    assert names == ["0", None]  # layer "2" (frozen bias) is not gated; its weight is in "others"
    others = opt.param_groups[-1]["params"]
    assert any(p is model[2].weight for p in others)
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["weight_decay"]) == (3e-3, (0.8, 0.99), 0.1)
    # The handle's basis is the optimizer's: same λ and (augmented) vectors.
    basis = handle.projector("0")
    st = opt.state[model[0].weight]
    np.testing.assert_allclose(st["values"].numpy(), basis.values, rtol=1e-5, atol=1e-6)
    assert st["vectors"].shape == (7, 7)  # d_in + 1 (bias column), full basis
    w0 = model[0].weight.detach().clone()
    _train(model, opt, task, 3)
    assert not torch.equal(w0, model[0].weight) and handle.step == 3
    handle.remove()


def test_defaults_per_method_and_bad_optimizer():
    assert PreserveConfig(method="gate").reg == 1e-4
    assert PreserveConfig(method="gate").tau_fraction == 0.9
    model, calib, _ = anisotropic_mlp_setup()
    handle = preserve(model, calib, progress=False)
    with pytest.raises(TypeError, match="replaces the optimizer"):
        handle.wrap(torch.optim.AdamW(model.parameters()))
    sgd = handle.optimizer(torch.optim.SGD, lr=0.1)  # not Adam: its step is gated in the bases
    assert type(sgd).__name__ == "GatedOptimizer" and len(sgd.layers) == 2
    with pytest.raises(ValueError, match="amsgrad"):
        handle.optimizer(torch.optim.AdamW, amsgrad=True)
    with pytest.raises(TypeError, match="unexpected"):
        handle.optimizer(torch.optim.AdamW, nesterov=True)
    handle.remove()


def test_warmup_and_periodic_refresh_call_set_basis(monkeypatch):
    model, calib, task = anisotropic_mlp_setup()
    handle = preserve(model, calib, progress=False, refresh_every=6, task_warmup=2)
    opt = handle.optimizer(torch.optim.AdamW, lr=1e-2)
    calls: list[tuple[int, str]] = []
    orig = FoLoRAAdam.set_basis

    def spy(self, name, *args, **kwargs):
        calls.append((handle.step, name))
        return orig(self, name, *args, **kwargs)

    monkeypatch.setattr(FoLoRAAdam, "set_basis", spy)
    iso = opt.state[model[0].weight]["values"].clone()
    _train(model, opt, task, 2)
    assert calls == [(2, "0"), (2, "2")]  # warm-up refresh: real task statistics replace I
    assert not torch.allclose(opt.state[model[0].weight]["values"], iso)
    # after the warm-up only the last refresh_every window is tracked; eval does not track
    model.eval()
    with torch.no_grad():
        model(torch.randn(8, 6))
    model.train()
    _train(model, opt, task, 10, start=2)
    assert [s for s, _ in calls] == [2, 2, 6, 6, 12, 12]
    handle.remove()


def test_task_loader_skips_warmup():
    model, calib, task = anisotropic_mlp_setup()
    handle = preserve(model, calib, task_loader=[x for x, _ in task], progress=False)
    opt = handle.optimizer(torch.optim.AdamW, lr=1e-2)
    before = opt.state[model[0].weight]["vectors"].clone()
    _train(model, opt, task, 12)
    assert torch.equal(before, opt.state[model[0].weight]["vectors"])  # no refresh configured
    assert handle._online is None  # nothing tracked online
    handle.remove()


def test_state_dict_resume_is_exact_across_a_refresh():
    def run(split: int | None):
        model, calib, task = anisotropic_mlp_setup()
        handle = preserve(model, calib, progress=False, refresh_every=5, task_token_fraction=1.0)
        opt = handle.optimizer(torch.optim.AdamW, lr=1e-2, weight_decay=0.01)
        if split is None:
            _train(model, opt, task, 14)
            return model.state_dict()
        _train(model, opt, task, split)
        saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
        handle.remove()
        model2, calib2, _ = (
            anisotropic_mlp_setup()
        )  # a fresh process: same pretrained model, same calibration
        handle2 = preserve(model2, calib2, progress=False, refresh_every=5, task_token_fraction=1.0)
        model2.load_state_dict(saved[0])
        opt2 = handle2.optimizer(torch.optim.AdamW, lr=1e-2, weight_decay=0.01)
        opt2.load_state_dict(saved[1])
        assert handle2.step == split
        _train(model2, opt2, task, 14 - split, start=split)
        return model2.state_dict()

    ref = run(None)
    for split in (3, 7):  # inside the warm-up window and between periodic refreshes
        got = run(split)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6)


def test_trainer_runs_with_folora_optimizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    from _tiny_bert import TokenLabels, calibration_batches, tiny_bert_classifier

    model = tiny_bert_classifier()
    calib = calibration_batches()
    handle = preserve(model, calib, task_warmup=2, progress=False)
    opt = handle.optimizer(torch.optim.AdamW, lr=1e-3)
    data = TokenLabels(8)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    before = model.bert.encoder.layer[0].intermediate.dense.weight.detach().clone()
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, optimizers=(opt, None)
    )
    trainer.train()
    assert handle.step == 3 and opt._global_step == 3  # the warm-up refresh ran at step 2
    assert not torch.equal(before, model.bert.encoder.layer[0].intermediate.dense.weight)
    handle.remove()


@pytest.mark.slow
def test_transformer_experiment_folora_beats_baselines_on_balance():
    """A reduced transformer_two_task run (3 seeds, the full run's selected lrs; ~75 s alone).

    Robust in the full run (every seed): FoLoRA beats AdamW, LoRA and null-space at every energy. In
    this reduced run the margin over null-space e=0.9 is +0.013 on the mean but −0.001 on the worst
    seed, so only the mean is asserted against it; AdamW and LoRA are beaten by > 0.02 on every seed.
    """
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.experiments import transformer_two_task as exp

    torch.set_num_threads(1)
    res, _ = exp.evaluate(exp.test_methods(), exp.test_config(), [0, 1, 2])
    ours = res["FoLoRA (defaults)"]
    assert ours.valid
    adamw, lora, nullspace = res["AdamW"], res["LoRA r=8"], res["null-space e=0.9"]
    assert (ours.balance - adamw.balance).min() > 0.02, (adamw.balance, ours.balance)
    assert (ours.balance - lora.balance).min() > 0.02, (lora.balance, ours.balance)
    assert ours.balance.mean() > nullspace.balance.mean(), (nullspace.balance, ours.balance)
    assert ours.p_ratio.mean() > 0.98  # P kept
