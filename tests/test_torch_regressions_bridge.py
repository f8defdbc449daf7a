"""Regression tests of the bridge, each named after the defect it pins.

Persistence (resume mid-warm-up, another method's defaults, the ``C_t`` of the bases), rollback of a
failed ``preserve`` or ``calibrate``, batch and input handling, meters and statistics I/O, online
statistics without autograd graphs, ``torch.compile``'d models, one gate for FoLoRA and the handle,
a removed handle's optimizer. Each test failed on the code before its fix.
"""

from __future__ import annotations

import collections
import copy
import functools
import logging

import numpy as np
import pytest
import torch
from _tiny_bert import calibration_batches, tiny_bert_classifier
from torch import nn

import rqcore_torch.calibration as calibration_module
from rqcore_torch import CalibrationStatistics, TorchCovariance, calibrate, load, preserve


def _mlp(seed: int = 0, d: int = 6) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 2))


def _data(n: int = 4, d: int = 6, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, d, generator=g) for _ in range(n)]


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int, d: int = 6) -> None:
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        model(torch.randn(8, d, generator=g)).pow(2).sum().backward()
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


# --- meters and statistics I/O ------------------------------------------------------------------


def test_penalty_is_never_negative_and_zero_reference_gives_inf():
    from rqcore_torch.handle import _ratio

    assert _ratio(0.0, 0.0) == 0.0 and _ratio(1.0, 0.0) == float("inf") and _ratio(1.0, 2.0) == 0.5
    model = nn.Sequential(nn.Linear(4, 3))
    nn.init.zeros_(model[0].weight)
    nn.init.zeros_(model[0].bias)
    handle = preserve(model, [torch.randn(16, 4)], method="none", progress=False)
    with torch.no_grad():
        model[0].weight.add_(0.1)
    report = handle.penalty()
    assert report.per_layer["0"] == float("inf") and report.total == float("inf")  # total was 0.0
    handle.remove()


def test_penalty_clamps_rounding_below_zero(monkeypatch):
    import rqcore_torch.handle as handle_module

    model = _mlp()
    handle = preserve(model, _data(), method="none", progress=False)
    monkeypatch.setattr(handle_module, "penalty_terms", lambda W, W0, C: (-1.2e-9, 3.0))
    report = handle.penalty()
    assert all(v == 0.0 for v in report.per_layer.values()) and report.total == 0.0
    handle.remove()


def test_plot_keeps_the_callers_matplotlib_backend(tmp_path):
    import matplotlib

    previous = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        handle = preserve(_mlp(), _data(), method="gate", progress=False)
        handle.plot(tmp_path / "spectra.png")
        assert matplotlib.get_backend().lower() == "svg"  # plot() switched it to Agg before
        assert (tmp_path / "spectra.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        handle.remove()
    finally:
        matplotlib.use(previous)


def test_mixed_statistics_are_not_continued_and_extreme_weights_merge():
    model = _mlp()
    a = calibrate(model, _data(seed=1), progress=False)
    b = calibrate(model, _data(seed=2), progress=False)
    mixed = CalibrationStatistics.weighted_merge([(a, 1e308), (b, 1e308)])
    assert mixed.mixed
    half = CalibrationStatistics.weighted_merge([(a, 1.0), (b, 1.0)])
    for name in ("0", "2"):
        torch.testing.assert_close(mixed.covariance(name), half.covariance(name))
        assert torch.isfinite(mixed.covariance(name)).all()
    with pytest.raises(ValueError, match="weighted mix"):
        calibrate(model, _data(), statistics=mixed, skip_batches=0, progress=False)
    tensors, meta = mixed.state_dict()
    assert CalibrationStatistics.from_state_dict(tensors, meta).mixed


@pytest.mark.parametrize(
    ("key", "value"),
    [("layers", [["0", 7]]), ("batches", -5), ("tokens", 3.7), ("unreached", "abc")],
)
def test_statistics_metadata_is_validated(key, value):
    stats = calibrate(_mlp(), _data(), progress=False)
    tensors, meta = stats.state_dict()
    meta = dict(meta, **{key: value})
    with pytest.raises(ValueError, match="malformed statistics metadata"):
        CalibrationStatistics.from_state_dict(tensors, meta)


# --- online statistics, persistence of C_t, compiled models, gates, removal --------------------


def test_torch_backend_statistics_never_hold_the_autograd_graph(tmp_path, monkeypatch):
    # The torch backend (every non-CPU device) summed grad-requiring rows into its totals: each
    # training step's graph stayed alive, and state_dict()'s .numpy() raised.
    acc = TorchCovariance(4, backend="torch")
    layer = nn.Linear(4, 4)
    for _ in range(2):
        acc.update(layer(torch.randn(8, 4)), check_finite=False)
    assert not any(t.requires_grad for t in acc._totals.values())
    acc.state_dict()

    # End to end: online tracking of method="gate" on the torch backend (what a GPU gets).
    torch_backend = functools.partial(TorchCovariance, backend="torch")
    monkeypatch.setattr(calibration_module, "TorchCovariance", torch_backend)
    model = _mlp()
    handle = preserve(model, _data(), method="gate", refresh_every=100, progress=False)
    opt = handle.optimizer(torch.optim.SGD, lr=1e-2)
    _train(model, opt, 2, seed=1)
    assert handle._online_stats is not None and handle._online_stats.groups
    for acc in handle._online_stats.groups.values():
        assert acc.backend == "torch"
        assert not any(t.requires_grad for t in acc._totals.values())
    opt.state_dict()  # raised "Can't call numpy() on Tensor that requires grad"
    handle.save(tmp_path / "h.safetensors")
    handle.refresh()  # solves with the online C_t
    handle.remove()


def _bases(handle) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Values, vectors and gains of each group's basis (copies)."""
    return {
        g: (p.values.copy(), p.vectors.copy(), p.gains.copy())
        for g, p in handle._projectors.items()
    }


def _assert_same_bases(expected, handle) -> None:
    got = _bases(handle)
    assert set(got) == set(expected)
    for group, arrays in expected.items():
        for a, b in zip(arrays, got[group], strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("save_at", [0, 7])
def test_load_keeps_the_task_statistics_and_the_solved_task_covariance(tmp_path, save_at):
    # save() stored only the online window in place of the task statistics: right after preserve()
    # the pre-pass C_t was lost (bases of the placeholder C_t); after a refresh the window's partial
    # statistics replaced the C_t the bases were solved with.
    g = torch.Generator().manual_seed(3)
    task = [
        torch.randn(16, 6, generator=g) * torch.tensor([0.1, 0.1, 1, 3, 1, 1]) for _ in range(3)
    ]
    model = _mlp()
    handle = preserve(
        model, _data(), task_loader=task, method="gate", refresh_every=5, progress=False, seed=0
    )
    opt = handle.optimizer(torch.optim.SGD, lr=1e-2)  # no optimizer state: the file must suffice
    _train(model, opt, save_at, seed=1)
    path = tmp_path / "h.safetensors"
    handle.save(path)
    saved_bases = _bases(handle)
    weights = copy.deepcopy(model.state_dict())
    _train(model, opt, 6, seed=2)  # crosses the next refresh (step 5 or 10)
    reference = model.state_dict()

    resumed = _mlp(seed=5)
    resumed.load_state_dict(weights)
    loaded = load(path, resumed)
    assert loaded.task_statistics is not None and loaded.step == save_at
    _assert_same_bases(saved_bases, loaded)
    _train(resumed, loaded.optimizer(torch.optim.SGD, lr=1e-2), 6, seed=2)
    for key, value in resumed.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)
    _assert_same_bases(_bases(handle), loaded)


@pytest.mark.parametrize("refresh_every", [None, 4])
def test_load_after_the_folora_warmup_keeps_its_task_covariance(tmp_path, refresh_every):
    # After FoLoRA's warm-up refresh the bases come from the online C_t, then the window is reset:
    # save() stored nothing of it and load() re-solved with the isotropic placeholder.
    model = _mlp()
    handle = preserve(
        model, _data(), task_warmup=2, refresh_every=refresh_every, progress=False, seed=0
    )
    opt = handle.optimizer(torch.optim.AdamW, lr=1e-2)
    _train(model, opt, 3, seed=1)
    path = tmp_path / "h.safetensors"
    handle.save(path)
    opt_state = copy.deepcopy(opt.state_dict())
    weights = copy.deepcopy(model.state_dict())
    saved_bases = _bases(handle)

    resumed = _mlp(seed=5)
    resumed.load_state_dict(weights)
    loaded = load(path, resumed)
    _assert_same_bases(saved_bases, loaded)
    assert not loaded._warmup_pending and loaded.task_statistics is None

    _train(model, opt, 6, seed=2)  # crosses the refreshes at steps 4 and 8
    reference = model.state_dict()
    opt2 = loaded.optimizer(torch.optim.AdamW, lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt_state))
    _train(resumed, opt2, 6, seed=2)
    for key, value in resumed.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)
    _assert_same_bases(_bases(handle), loaded)


def test_calibrate_and_track_a_compiled_model():
    # Dynamo traced the forward pre-hooks (and the accumulators' NumPy calls) and failed.
    model = _mlp()
    compiled = torch.compile(model, backend="eager")
    try:
        handle = preserve(compiled, _data(), method="gate", refresh_every=2, progress=False)
        assert handle.targets
        opt = handle.optimizer(torch.optim.SGD, lr=1e-2)
        _train(compiled, opt, 1, seed=1)
        assert handle._online_stats is not None
        assert all(acc.count > 0 for acc in handle._online_stats.groups.values())
        _train(compiled, opt, 1, seed=2)  # the refresh at step 2 solves with the tracked C_t
        assert handle.step == 2
        handle.remove()
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize(
    ("gate", "options"),
    [("sigmoid", {}), ("sigmoid", {"temperature": 2.0}), ("power", {"alpha": 2.0})],
)
def test_folora_optimizer_and_handle_apply_the_same_gains(gate, options):
    # FoLoRAAdam's sigmoid used temperature 0.5, the handle's bases rqcore's default 1.0, and FoLoRA
    # refused the temperature (and alpha) that PreserveConfig documents.
    g = torch.Generator().manual_seed(3)
    task = [torch.randn(16, 6, generator=g) * torch.tensor([0.1, 0.1, 1, 3, 1, 1])]
    model = _mlp()
    handle = preserve(
        model, _data(), task_loader=task, gate=gate, gate_options=options, progress=False
    )
    opt = handle.optimizer(torch.optim.AdamW, lr=1e-3)
    for name in ("0", "2"):
        expected = torch.as_tensor(handle.projector(name).gains)
        torch.testing.assert_close(opt.gains(name).double(), expected, rtol=1e-6, atol=1e-7)
    handle.remove()


@pytest.mark.parametrize(
    ("method", "cls"), [("gate", torch.optim.SGD), ("folora", torch.optim.AdamW)]
)
def test_removed_handle_does_not_refresh_its_optimizer(method, cls):
    # remove() left on_step attached: the optimizer kept re-solving the bases from statistics that
    # no longer tracked anything (after the first reset: the placeholder C_t).
    model = _mlp()
    handle = preserve(model, _data(), method=method, refresh_every=2, progress=False)
    opt = handle.optimizer(cls, lr=1e-2)
    refreshes: list[int] = []
    refresh = handle.refresh
    handle.refresh = lambda: (refreshes.append(handle.step), refresh())[1]  # type: ignore[method-assign]
    _train(model, opt, 2, seed=1)
    assert refreshes == [2]
    handle.remove()
    _train(model, opt, 4, seed=2)
    assert refreshes == [2]


def test_a_refresh_with_nothing_tracked_says_so(caplog):
    # Tracking runs only in train mode with grad enabled; a run that trains in eval() mode (to turn
    # dropout off) got the pre-pass or placeholder C_t at every refresh without a word.
    model = _mlp()
    handle = preserve(model, _data(), method="gate", refresh_every=2, progress=False)
    opt = handle.optimizer(torch.optim.SGD, lr=1e-2)
    g = torch.Generator().manual_seed(1)
    model.eval()
    with caplog.at_level(logging.WARNING, logger="rqcore_torch"):
        for _ in range(2):
            model(torch.randn(8, 6, generator=g)).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
    assert any("no task statistics were tracked" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rqcore_torch"):
        _train(model, opt, 2, seed=2)  # train mode: tracked, no warning
    assert not any("no task statistics were tracked" in r.getMessage() for r in caplog.records)
    handle.remove()


def test_same_seed_same_bases_on_the_iterative_path():
    # Layer "0" has d = 65 and rank 4: a Lanczos solve from a random block, which ignored the
    # config's seed (vectors differed in sign, weights by 1e-11 after ten steps).
    runs = []
    for _ in range(2):
        model = _mlp(d=64)
        handle = preserve(
            model, _data(d=64), method="gate", rank=4, refresh_every=3, seed=0, progress=False
        )
        opt = handle.optimizer(torch.optim.SGD, lr=1e-2)
        _train(model, opt, 7, seed=1, d=64)
        runs.append((handle.projector("0").vectors.copy(), model.state_dict()))
        handle.remove()
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    for key, value in runs[0][1].items():
        torch.testing.assert_close(value, runs[1][1][key], rtol=0, atol=0)


def test_load_installs_the_saved_bases_without_solving(tmp_path, monkeypatch):
    model = _mlp(d=64)
    handle = preserve(model, _data(d=64), method="gate", rank=4, refresh_every=3, progress=False)
    opt = handle.optimizer(torch.optim.SGD, lr=1e-2)
    _train(model, opt, 4, seed=1, d=64)  # past a (warm-started, iterative) refresh
    path = tmp_path / "h.safetensors"
    handle.save(path)
    import rqcore_torch.handle as handle_module

    def no_solve(*args, **kwargs):
        raise AssertionError("load() solved a pencil instead of installing the saved basis")

    monkeypatch.setattr(handle_module, "generalized_topk", no_solve)
    loaded = load(path, model)
    for name in ("0", "2"):
        a, b = handle.projector(name), loaded.projector(name)
        for field in ("values", "vectors", "MV", "gains"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_files_without_saved_bases_still_load(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = _mlp()
    handle = preserve(model, _data(), method="gate", progress=False)
    path = tmp_path / "h.safetensors"
    handle.save(path)
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith("bases/")}
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=metadata)
    old = load(tmp_path / "old.safetensors", model)  # re-solved from the statistics
    np.testing.assert_allclose(old.projector("0").values, handle.projector("0").values, rtol=1e-12)


def test_loading_a_lora_handle_keeps_its_adapters(tmp_path, caplog):
    # load() re-ran lora_init: at step 0 it rewrote lora_A (1e-8 here, 3e-3 in a resumed run),
    # and later it warned once per adapter that lora_A was kept.
    model = tiny_bert_classifier(dropout=0.0)
    handle = preserve(model, calibration_batches(), lora=dict(r=2), progress=False)
    path = tmp_path / "lora.safetensors"
    handle.save(path)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    with caplog.at_level(logging.WARNING, logger="rqcore_torch"):
        load(path, model)
    after = dict(model.named_parameters())
    for name, value in before.items():
        torch.testing.assert_close(after[name].detach(), value, rtol=0, atol=0)
    assert not [r for r in caplog.records if "lora_A is kept" in r.getMessage()]


def test_training_through_a_child_module_keeps_the_collector_small():
    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _mlp()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    wrap = Wrap()
    handle = preserve(wrap, _data(), method="gate", refresh_every=1000, progress=False)
    opt = handle.optimizer(torch.optim.SGD, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):  # the root's hook (which clears the list per forward) never runs
        wrap.body(torch.randn(8, 6, generator=g)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert handle._online is not None
    assert sum(len(v) for v in handle._online._consumed.values()) <= 4  # grew by 2 per step
    handle.remove()


def test_folora_refuses_adams_coupled_weight_decay():
    # torch's Adam adds weight_decay·w to the gradient (L2); FoLoRA decayed it as AdamW silently.
    handle = preserve(_mlp(), _data(), progress=False)
    with pytest.raises(ValueError, match="decoupled"):
        handle.optimizer(torch.optim.Adam, lr=1e-3, weight_decay=0.1)
    ok = handle.optimizer(torch.optim.Adam, lr=1e-3, weight_decay=0.1, decoupled_weight_decay=True)
    assert ok.param_groups[0]["weight_decay"] == 0.1
    assert handle.optimizer(torch.optim.Adam, lr=1e-3) is not None  # no decay: nothing to refuse
    handle.remove()
