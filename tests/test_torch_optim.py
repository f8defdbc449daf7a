"""GatedOptimizer on real models: the applied step is the gated base step, and training machinery works."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _scripts import run_quick

from rqcore import NullspaceProjector, RayleighBasis, gates
from rqcore_torch import GatedOptimizer, LayerGate, TorchGate, to_torch

ROOT = Path(__file__).resolve().parents[1]
D_IN, D_HID, D_OUT, N_CAL = 8, 16, 4, 5


def _augment(X: torch.Tensor) -> np.ndarray:
    Xa = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], dim=1).double().numpy()
    return Xa.T @ Xa / Xa.shape[0]


def _mlp(dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(D_IN, D_HID), torch.nn.Tanh(), torch.nn.Linear(D_HID, D_OUT)
    ).to(dtype)


def _calibration(model: torch.nn.Sequential) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration inputs of both Linear layers (n = 5 rows < d: rank-deficient covariances)."""
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(N_CAL, D_IN, generator=gen, dtype=model[0].weight.dtype)
    with torch.no_grad():
        H = torch.tanh(model[0](X))
    return X, H


def _null_layers(model: torch.nn.Sequential, energy: float = 0.999999) -> list[LayerGate]:
    X, H = _calibration(model)
    dt = model[0].weight.dtype
    return [
        LayerGate(
            name,
            lin.weight,
            lin.bias,
            to_torch(NullspaceProjector(_augment(inp), energy=energy), dtype=dt),
        )
        for name, lin, inp in (("0", model[0], X), ("2", model[2], H))
    ]


def _batch(step: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return (
        torch.randn(16, D_IN, generator=gen, dtype=dtype),
        torch.randn(16, D_OUT, generator=gen, dtype=dtype),
    )


def _loss(model: torch.nn.Module, step: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    x, y = _batch(step, dtype)
    return torch.nn.functional.mse_loss(model(x), y)


def _rel_change(after: torch.Tensor, before: torch.Tensor) -> float:
    return float((after - before).norm() / before.norm())


# ----------------------------------------------------------------------------------- protection
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_nullspace_keeps_calibration_outputs(base: str) -> None:
    outs = {}
    for gated in (True, False):
        model = _mlp(torch.float32)
        X, _ = _calibration(model)
        with torch.no_grad():
            before = model(X)
        inner = (
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
            if base == "sgd"
            else torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        )
        opt: torch.optim.Optimizer = GatedOptimizer(inner, _null_layers(model)) if gated else inner
        for step in range(20):
            opt.zero_grad()
            _loss(model, step, torch.float32).backward()
            opt.step()
        with torch.no_grad():
            outs[gated] = _rel_change(model(X), before)
    assert outs[True] < 1e-5
    assert outs[False] > 1e-2


def test_gpt2_conv1d_transposed_nullspace() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    cfg = transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    results = {}
    for gated in (True, False):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(cfg)
        convs = {n: m for n, m in model.named_modules() if isinstance(m, Conv1D)}
        captured: dict[str, torch.Tensor] = {}

        def keep(name: str, store: dict[str, torch.Tensor]):  # type: ignore[no-untyped-def]
            def hook(mod: torch.nn.Module, args: tuple[torch.Tensor, ...], out: object) -> None:
                store[name] = args[0].detach().reshape(-1, args[0].shape[-1]).clone()

            return hook

        handles = [m.register_forward_hook(keep(n, captured)) for n, m in convs.items()]
        calib = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            model(calib)
        for h in handles:
            h.remove()
        with torch.no_grad():
            before = {n: convs[n](captured[n]) for n in convs}
        layers = [
            LayerGate(
                n,
                m.weight,
                m.bias,
                to_torch(NullspaceProjector(_augment(captured[n]), energy=0.999999)),
                transposed=True,
            )
            for n, m in convs.items()
        ]
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        opt: torch.optim.Optimizer = GatedOptimizer(inner, layers) if gated else inner
        gen = torch.Generator().manual_seed(7)
        for _ in range(20):
            ids = torch.randint(0, 64, (2, 8), generator=gen)
            opt.zero_grad()
            model(ids, labels=ids).loss.backward()
            opt.step()
        with torch.no_grad():
            results[gated] = max(_rel_change(convs[n](captured[n]), before[n]) for n in convs)
    assert results[True] < 1e-5
    assert results[False] > 1e-2


def test_rayleigh_hard_gate_blocks_gated_off_directions() -> None:
    model = _mlp(torch.float32)
    X, _ = _calibration(model)
    rng = np.random.default_rng(0)
    T = rng.standard_normal((40, D_IN + 1))
    A = T.T @ T / 40
    basis = RayleighBasis.from_pencil(A, _augment(X) + 0.1 * np.eye(D_IN + 1), gains=1.0)
    basis.configure(gains=lambda v: gates.hard(v, rank=3), complement=0.0)
    lin = model[0]
    old = torch.cat([lin.weight, lin.bias[:, None]], 1).detach().double().numpy()
    opt = GatedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
        [LayerGate("0", lin.weight, lin.bias, to_torch(basis))],
    )
    for step in range(20):
        opt.zero_grad()
        _loss(model, step, torch.float32).backward()
        opt.step()
    new = torch.cat([lin.weight, lin.bias[:, None]], 1).detach().double().numpy()
    coords = (new - old) @ basis.MV  # c = Vᵀ M Δw, full basis
    on, off = basis.gains == 1.0, basis.gains == 0.0
    assert np.abs(coords[:, off]).max() < 1e-5 * np.abs(coords[:, on]).max()
    assert np.abs(coords[:, on]).max() > 1e-3


# ----------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("clip", [False, True])
def test_applied_step_is_gated_base_step(base: str, clip: bool) -> None:
    """Each step equals ``gate(plain step)`` on gated layers and the plain step elsewhere."""
    model = _mlp()
    X, _ = _calibration(model)
    basis = RayleighBasis.from_pencil(
        _augment(X) + np.eye(D_IN + 1), None, k=4, gains=[1.0, 0.5, 0.0, 2.0], complement=0.5
    )
    gate = to_torch(basis, dtype=torch.float64)
    layers = [LayerGate("0", model[0].weight, model[0].bias, gate)]  # layer "2" stays ungated

    def make(m: torch.nn.Module) -> torch.optim.Optimizer:
        if base == "sgd":
            return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
        return torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)

    opt = GatedOptimizer(make(model), layers)
    twin = copy.deepcopy(model)
    for step in range(4):
        twin.load_state_dict(model.state_dict())
        twin_opt = make(twin)
        twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load shares tensors
        old = [p.detach().clone() for p in model.parameters()]
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad()
            _loss(m, step).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
            o.step()
        plain = [t.detach() - o for t, o in zip(twin.parameters(), old, strict=True)]
        got = [p.detach() - o for p, o in zip(model.parameters(), old, strict=True)]
        rows = torch.cat([plain[0], plain[1][:, None]], 1)
        expected = torch.from_numpy(basis.apply(rows.numpy()))
        torch.testing.assert_close(got[0], expected[:, :D_IN], rtol=0, atol=1e-13)
        torch.testing.assert_close(got[1], expected[:, D_IN], rtol=0, atol=1e-13)
        torch.testing.assert_close(got[2], plain[2], rtol=0, atol=1e-15)  # ungated
        torch.testing.assert_close(got[3], plain[3], rtol=0, atol=1e-15)


def test_gradient_accumulation_equals_big_batch() -> None:
    results = []
    for micro in (1, 4):
        model = _mlp()
        opt = GatedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), _null_layers(model))
        for step in range(3):
            opt.zero_grad()
            x, y = _batch(step)
            for xs, ys in zip(x.chunk(micro), y.chunk(micro), strict=True):
                (torch.nn.functional.mse_loss(model(xs), ys) / micro).backward()
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------ machinery
def test_scheduler_param_groups_and_hooks_shared() -> None:
    model = _mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = GatedOptimizer(base, _null_layers(model))
    assert opt.optimizer is base
    assert opt.param_groups is base.param_groups and opt.state is base.state
    assert opt.defaults is base.defaults
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    seen = []
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(o))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for step in range(3):
            opt.zero_grad()
            _loss(model, step).backward()
            opt.step()
            sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert seen == [opt] * 3
    assert (
        "GatedOptimizer" in repr(opt) and "SGD" in repr(opt) and "TorchNullspaceGate" in repr(opt)
    )
    # closure
    loss = opt.step(lambda: float(_loss(model, 0).detach()))
    assert isinstance(loss, float)


def test_add_param_group_and_set_layers() -> None:
    model = _mlp()
    layers = _null_layers(model)
    opt = GatedOptimizer(torch.optim.AdamW([model[0].weight, model[0].bias], lr=1e-2), layers[:1])
    with pytest.raises(ValueError, match="not in the wrapped optimizer"):
        opt.set_layers(layers)
    opt.add_param_group({"params": [model[2].weight, model[2].bias], "lr": 1e-3})
    assert len(opt.optimizer.param_groups) == 2
    rows_before = opt._slots[0].rows
    opt.set_layers(layers)  # now gate both; the first layer's buffer is reused
    assert opt._slots[0].rows is rows_before and len(opt.layers) == 2
    with pytest.raises(ValueError, match="gated by two layers"):
        opt.set_layers([layers[0], layers[0]])
    X, _ = _calibration(model)
    with torch.no_grad():
        before = model(X)
    for step in range(5):
        opt.zero_grad()
        _loss(model, step).backward()
        opt.step()
    with torch.no_grad():
        assert _rel_change(model(X), before) < 1e-10
    # swapping in a pass-through gate (rank 0 null space) lets the calibration outputs move
    free = [
        LayerGate(lg.name, lg.weight, lg.bias, to_torch(NullspaceProjector(np.eye(lg.gate.dim),
                                                                           rank=0), dtype=torch.float64))
        for lg in layers
    ]  # fmt: skip
    opt.set_layers(free)
    opt.zero_grad()
    _loss(model, 9).backward()
    opt.step()
    with torch.no_grad():
        assert _rel_change(model(X), before) > 1e-4
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        GatedOptimizer(object(), [])  # type: ignore[arg-type]


def test_state_dict_resume_is_exact() -> None:
    def run(model: torch.nn.Module, opt: GatedOptimizer, steps: range) -> None:
        for step in steps:
            opt.zero_grad()
            _loss(model, step).backward()
            opt.step()

    model = _mlp()
    opt = GatedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
                         _null_layers(model))  # fmt: skip
    run(model, opt, range(3))
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    layers_cal = [lg.gate for lg in opt.layers]  # the gates travel outside the optimizer state
    run(model, opt, range(3, 6))

    fresh = _mlp(seed=123)
    fresh.load_state_dict(saved_model)
    layers = [
        LayerGate(name, lin.weight, lin.bias, g)
        for name, lin, g in (("0", fresh[0], layers_cal[0]), ("2", fresh[2], layers_cal[1]))
    ]
    opt2 = GatedOptimizer(torch.optim.AdamW(fresh.parameters(), lr=1e-2, weight_decay=0.1), layers)
    opt2.load_state_dict(saved_opt)
    assert opt2.state is opt2.optimizer.state  # still shared after the base replaced its dicts
    run(fresh, opt2, range(3, 6))
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


def test_grad_scaler_skips_inf_and_on_step_counts() -> None:
    calls: list[int] = []

    def count(o: GatedOptimizer) -> None:
        calls.append(1)

    results = {}
    for use_scaler in (False, True):
        model = _mlp(torch.float32)
        opt = GatedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), _null_layers(model), on_step=count
        )
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, enabled=use_scaler)
        calls.clear()
        if use_scaler:  # an overflowing step: nothing moves, on_step is not called
            snapshot = [p.detach().clone() for p in model.parameters()]
            opt.zero_grad()
            scaler.scale(_loss(model, 0, torch.float32)).backward()
            model[0].weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
            assert calls == []
            assert all(torch.equal(a, b) for a, b in zip(model.parameters(), snapshot, strict=True))
            assert scaler.get_scale() == 2.0**7
        for step in range(3):
            opt.zero_grad()
            scaler.scale(_loss(model, step, torch.float32)).backward()
            scaler.step(opt)
            scaler.update()
        assert len(calls) == 3
        results[use_scaler] = [p.detach().clone() for p in model.parameters()]
    # unscaling by a power of two is exact: the scaled run equals the plain one
    for a, b in zip(results[False], results[True], strict=True):
        assert torch.equal(a, b)


class _HalfGate(TorchGate):
    """A user-defined gate in the factored form: halve every row."""

    def __init__(self, dim: int) -> None:
        super().__init__(0.5, torch.zeros(dim, 0, dtype=torch.float64),
                         torch.zeros(0, dim, dtype=torch.float64))  # fmt: skip


def test_custom_factored_gate() -> None:
    model = _mlp()
    twin = copy.deepcopy(model)
    opt = GatedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                         [LayerGate("0", model[0].weight, model[0].bias, _HalfGate(D_IN + 1))])  # fmt: skip
    plain = torch.optim.SGD(twin.parameters(), lr=0.1)
    old = model[0].weight.detach().clone()
    for m, o in ((model, opt), (twin, plain)):
        _loss(m, 0).backward()
        o.step()
    torch.testing.assert_close(
        model[0].weight - old, (twin[0].weight - old) / 2, rtol=0, atol=1e-15
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_does_not_synchronize() -> None:
    model = _mlp(torch.float32).cuda()
    X, H = _calibration(_mlp(torch.float32))
    layers = [
        LayerGate("0", model[0].weight, model[0].bias,
                  to_torch(NullspaceProjector(_augment(X), energy=0.999999), device="cuda")),
        LayerGate("2", model[2].weight, model[2].bias,
                  to_torch(RayleighBasis.from_pencil(_augment(H), None, k=3, complement=0.5),
                           device="cuda")),
    ]  # fmt: skip
    for inner in (
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True),
    ):
        opt = GatedOptimizer(inner, layers)
        x, y = (t.float().cuda() for t in _batch(0))
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()  # warm-up: lazy state initialization may synchronize
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_benchmark_quick_runs() -> None:
    assert "optimizer step" in run_quick("compare_step.py")


def test_accelerate_prepare_and_scheduler() -> None:
    accelerate = pytest.importorskip("accelerate")
    model = _mlp(torch.float32)
    X, _ = _calibration(model)
    opt = GatedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), _null_layers(model))
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    acc = accelerate.Accelerator(cpu=True)
    pmodel, popt, psched = acc.prepare(model, opt, sched)
    with torch.no_grad():
        before = pmodel(X)
    for step in range(3):
        popt.zero_grad()
        acc.backward(_loss(pmodel, step, torch.float32))
        popt.step()
        psched.step()
    with torch.no_grad():
        assert _rel_change(pmodel(X), before) < 1e-5
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**3)
    assert set(popt.state_dict()) == {"state", "param_groups"}
