"""preserve(method="folora") on PEFT LoRA: lora_A starts in the pencil's top eigenvectors, lora_B is gated
in the r-dimensional pencil, ``lora=dict(...)`` adds the adapters, and a resume stays exact."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rqcore_torch import FoLoRAAdam, PreserveConfig, preserve

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from _tiny_bert import calibration_batches, tiny_bert_classifier  # noqa: E402

LORA = dict(r=4, alpha=8, target_modules=["query", "value", "dense"])


def _ids(n: int = 3, seed: int = 1, low: int = 0, high: int = 100) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(low, high, (4, 8), generator=g)} for _ in range(n)]


def _peft_bert(r: int = 4) -> nn.Module:
    model = tiny_bert_classifier(dropout=0.0)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["query", "value"])
    return peft.inject_adapter_in_model(cfg, model)


def _lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A")}


def _train(model, opt, steps, start=0, seed=5):
    g = torch.Generator().manual_seed(seed)
    batches = [
        (torch.randint(0, 100, (4, 8), generator=g), torch.randint(0, 2, (4,), generator=g))
        for _ in range(start + steps)
    ]
    for ids, y in batches[start:]:
        opt.zero_grad()
        model(input_ids=ids, labels=y).loss.backward()
        opt.step()


def test_lora_a_starts_in_the_top_r_generalized_eigenvectors_with_the_peft_row_norm():
    model = _peft_bert(r=4)
    mods = _lora_modules(model)
    before = {n: m.lora_A["default"].weight.detach().clone() for n, m in mods.items()}
    handle = preserve(model, calibration_batches(), task_loader=_ids(), progress=False)
    for name, mod in mods.items():
        A = mod.lora_A["default"].weight.detach().double()
        basis = handle.projector(name)
        V = torch.tensor(basis.vectors[:, :4])  # a copy: the basis's arrays are read-only
        # rows in the span of the top-r eigenvectors: least-squares residual ~0
        coef = torch.linalg.lstsq(V, A.T).solution
        assert torch.linalg.norm(V @ coef - A.T) < 1e-6 * torch.linalg.norm(A)
        # they are those eigenvectors (rescaled), so M-orthogonal: A M Aᵀ diagonal
        M = torch.tensor(basis.B) + basis.reg_used * torch.eye(A.shape[1], dtype=torch.float64)
        G = A @ M @ A.T
        off = G - torch.diag(torch.diagonal(G))
        assert off.abs().max() < 1e-6 * torch.diagonal(G).abs().max()
        # every row has the RMS row norm of PEFT's init (kaiming_uniform(a=√5): ≈ 1/√3)
        rms = before[name].double().pow(2).sum(1).mean().sqrt()
        torch.testing.assert_close(A.norm(dim=1), rms.expand(4), rtol=1e-5, atol=0)
        assert abs(float(rms) - 1 / np.sqrt(3)) < 0.15
        assert torch.count_nonzero(mod.lora_B["default"].weight) == 0  # ΔW = 0 still
    assert handle.penalty().total == 0.0
    handle.remove()

    # lora_init="keep": PEFT's init stays
    keep = _peft_bert(r=4)  # same seed, same PEFT init
    handle = preserve(keep, calibration_batches(), lora_init="keep", progress=False)
    for name, mod in _lora_modules(keep).items():
        torch.testing.assert_close(mod.lora_A["default"].weight, before[name], rtol=0, atol=0)
    handle.remove()
    # the default without task statistics: the isotropic placeholder C_t's top eigenvectors
    forced = _peft_bert(r=4)
    handle = preserve(forced, calibration_batches(), progress=False)
    for name, mod in _lora_modules(forced).items():
        V = torch.tensor(handle.projector(name).vectors[:, :4])
        A = mod.lora_A["default"].weight.detach().double()
        coef = torch.linalg.lstsq(V, A.T).solution
        assert torch.linalg.norm(V @ coef - A.T) < 1e-6 * torch.linalg.norm(A)
    handle.remove()


def test_a_trained_adapter_is_not_reinitialized(caplog):
    model = _peft_bert(r=4)
    mod = next(iter(_lora_modules(model).values()))
    with torch.no_grad():
        mod.lora_B["default"].weight.fill_(0.1)
    A0 = mod.lora_A["default"].weight.detach().clone()
    with caplog.at_level("WARNING"):
        handle = preserve(model, calibration_batches(), progress=False)
    assert torch.equal(A0, mod.lora_A["default"].weight)
    assert "trained adapter" in caplog.text
    handle.remove()


def _linear_lora(r: int = 4, init: str = "keep", lora_b: str = "pencil"):
    """One Linear(8 → 5) with LoRA; task inputs span 3 of the 8 dims, so one r-pencil λ is 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 5))
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(64, 8, generator=g) for _ in range(2)]
    task = [torch.randn(64, 8, generator=g) * (torch.arange(8) < 3) for _ in range(2)]
    handle = preserve(
        model,
        calib,
        task_loader=task,
        lora=dict(r=r, alpha=2 * r, target_modules=["0"]),
        lora_init=init,
        lora_b=lora_b,
        progress=False,
    )
    return model, handle, torch.cat(task), torch.cat(calib)


def test_lora_b_steps_are_gated_in_the_r_dim_pencil():
    lr, steps = 1e-2, 3
    runs = {}
    for mode in ("pencil", "adam"):
        model, handle, _, _ = _linear_lora(lora_b=mode)  # lora_init="keep": random L_A rows
        lora = model[0]
        A, B = lora.lora_A["default"].weight, lora.lora_B["default"].weight
        opt = handle.optimizer(torch.optim.AdamW, lr=lr, weight_decay=0.0)
        g = torch.Generator().manual_seed(3)
        grads = [torch.randn(B.shape, generator=g) for _ in range(steps)]
        B0 = B.detach().clone()
        for i, gB in enumerate(grads):  # identical gradients for both runs; L_A held still
            opt.zero_grad()
            B.grad, A.grad = gB.clone(), torch.zeros_like(A)
            opt.step()
            if i == 0 and mode == "pencil":
                st = opt.state[B]
                lam, gains = st["values"].double(), st["gains"].double()
                coords = (B.detach() - B0).double() @ st["dual"].double()  # M-coordinates
                expected = lr * float(st["scale"]) * gains
                # Adam's first step is ±1 per coordinate: |coords_ij| = lr·s·g_j
                torch.testing.assert_close(
                    coords.abs(), expected.expand_as(coords), rtol=1e-3, atol=1e-9
                )
                assert lam.min().abs() < 1e-6 * lam.max()  # C_t has rank 3 < r = 4
                assert gains.min() < 1e-6  # ... so that direction gets no step
        stats = handle.statistics.covariance(handle.targets[0].name).double()
        D = (B.detach() - B0).double() @ A.detach().double()
        runs[mode] = float(((D @ stats) * D).sum())  # tr(ΔL_B L_A C_p L_Aᵀ ΔL_Bᵀ)
        handle.remove()
    assert runs["pencil"] < 0.5 * runs["adam"], runs


def test_lora_b_layers_are_in_the_optimizer_and_refreshed_at_warmup(monkeypatch):
    model = tiny_bert_classifier(dropout=0.0)
    handle = preserve(
        model,
        calibration_batches(),
        lora=LORA,
        lora_b="pencil",
        lora_b_tau="layer",
        task_warmup=2,
        lora_refresh_every=None,
        progress=False,
    )
    assert handle.model is model
    assert {t.kind for t in handle.targets} == {"lora"}
    names = {t.name.split(".")[-1] for t in handle.targets}
    assert names == {"query", "value", "dense"}
    opt = handle.optimizer(torch.optim.AdamW, lr=1e-2)
    assert isinstance(opt, FoLoRAAdam)
    layers = [g["layer"] for g in opt.param_groups if g["layer"] is not None]
    n = len(handle.targets)
    assert sum(".lora_A." in x for x in layers) == n and sum(".lora_B." in x for x in layers) == n
    assert set(opt.lora_pencils) == {x for x in layers if ".lora_B." in x}
    assert opt.refresh_every == 0
    # lora_b_tau="layer": lora_B's gate uses its layer's τ (the one lora_A gets)
    for mod in _lora_modules(model).values():
        tau_a = opt.state[mod.lora_A["default"].weight]["tau"]
        tau_b = opt.state[mod.lora_B["default"].weight]["tau"]
        torch.testing.assert_close(tau_b, tau_a, rtol=1e-5, atol=0)
    # PEFT froze everything else: the classifier head is not trained unless unfrozen
    assert not model.classifier.weight.requires_grad
    calls: list[int] = []
    orig = FoLoRAAdam.refresh_lora_pencils

    def spy(self, names=None):
        calls.append(handle.step)
        return orig(self, names)

    monkeypatch.setattr(FoLoRAAdam, "refresh_lora_pencils", spy)
    some_b = next(iter(opt.lora_pencils))
    values0 = opt._lstate(some_b)["values"].clone()
    _train(model, opt, 3)
    assert calls == [2]  # the warm-up refresh installs C_t in the r-dim pencils too
    assert not torch.allclose(opt._lstate(some_b)["values"], values0)
    assert 0 < handle.penalty().total < 1
    handle.remove()


def test_lora_b_adam_mode_keeps_lora_b_in_the_plain_group():
    assert PreserveConfig().lora_b == "adam" and PreserveConfig().lora_init == "basis"  # defaults
    model = tiny_bert_classifier(dropout=0.0)
    handle = preserve(model, calibration_batches(), lora=LORA, progress=False)
    opt = handle.optimizer(torch.optim.AdamW, lr=1e-2)
    layers = [g["layer"] for g in opt.param_groups if g["layer"] is not None]
    assert all(".lora_A." in x for x in layers) and not opt.lora_pencils
    others = {id(p) for p in opt.param_groups[-1]["params"]}
    for mod in _lora_modules(model).values():
        assert id(mod.lora_B["default"].weight) in others
    handle.remove()


class _Exploding:
    def __iter__(self):
        raise AssertionError("the calibration loader must not be read")


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        (dict(r=4, rank=2), r"unknown lora keys \['rank'\]"),
        (dict(r=4, lora_alpha=8, scale=1), r"unknown lora keys \['lora_alpha', 'scale'\]"),
        (dict(r=0), "positive integer"),
        (dict(r=2.5), "positive integer"),
        (dict(alpha=-1), "alpha"),
        (dict(dropout=1.0), "dropout"),
        (dict(target_modules=[]), "target_modules"),
        (dict(target_modules=["no_such_layer"]), "PEFT could not add adapters"),
    ],
)
def test_lora_dict_is_validated_before_any_forward_pass(lora, message):
    model = tiny_bert_classifier(dropout=0.0)
    with pytest.raises(ValueError, match=message):
        preserve(model, _Exploding(), lora=lora, progress=False)


def test_bad_lora_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="lora must be a dict"):
        preserve(tiny_bert_classifier(), _Exploding(), lora=[("r", 4)], progress=False)
    with pytest.raises(ValueError, match="already has PEFT LoRA layers"):
        preserve(_peft_bert(), _Exploding(), lora=dict(r=2), progress=False)
    with pytest.raises(ValueError, match="wraps none of the preserved layers"):
        preserve(
            tiny_bert_classifier(),
            _Exploding(),
            targets="*.query",
            lora=dict(target_modules=["value"]),
            progress=False,
        )
    with pytest.raises(ValueError, match="lora_init"):
        PreserveConfig(lora_init="random")
    with pytest.raises(ValueError, match="lora_b"):
        PreserveConfig(lora_b="sgd")
    with pytest.raises(ValueError, match="lora_b_tau"):
        PreserveConfig(lora_b_tau="global")
    with pytest.raises(ValueError, match="lora_init"):
        PreserveConfig(lora_init="auto")
    with pytest.raises(ValueError, match="lora_refresh_every"):
        PreserveConfig(lora_refresh_every=0)


def test_state_dict_resume_is_exact_on_the_lora_path():
    opts = dict(
        lora=LORA,
        lora_b="pencil",
        lora_b_tau="layer",
        task_warmup=2,
        lora_refresh_every=3,
        task_token_fraction=1.0,
    )

    def run(split: int | None):
        model = tiny_bert_classifier(dropout=0.0)
        handle = preserve(model, calibration_batches(), progress=False, **opts)
        opt = handle.optimizer(torch.optim.AdamW, lr=1e-2, weight_decay=0.01)
        if split is None:
            _train(model, opt, 8)
            return model.state_dict()
        _train(model, opt, split)
        saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
        handle.remove()
        model2 = tiny_bert_classifier(dropout=0.0)  # a fresh process: same model, same calibration
        handle2 = preserve(model2, calibration_batches(), progress=False, **opts)
        model2.load_state_dict(saved[0])
        opt2 = handle2.optimizer(torch.optim.AdamW, lr=1e-2, weight_decay=0.01)
        opt2.load_state_dict(saved[1])
        assert handle2.step == split
        _train(model2, opt2, 8 - split, start=split)
        return model2.state_dict()

    ref = run(None)
    for split in (1, 5):  # inside the warm-up, and after the warm-up and a lora_B refresh (step 4)
        got = run(split)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- LoRA on GPT-2's Conv1D layers
@pytest.fixture(scope="module")
def tiny_gpt2(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    import _tiny_gpt2

    cache = getattr(request.config, "cache", None)
    root = (
        Path(cache.mkdir("rqcore_tiny_gpt2"))
        if cache is not None
        else tmp_path_factory.mktemp("tiny_gpt2")
    )
    return _tiny_gpt2.load_or_train(root)[0]


def _penalty_by_hand(W: torch.Tensor, W0: torch.Tensor, C: torch.Tensor) -> tuple[float, float]:
    D = (W - W0).double()
    W0 = W0.double()
    return float(torch.trace(D @ C @ D.T)), float(torch.trace(W0 @ C @ W0.T))


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False")  # PEFT fixes it for Conv1D
def test_lora_on_gpt2_conv1d_trains_and_its_penalty_is_the_merged_weights(tiny_gpt2):
    model = copy.deepcopy(tiny_gpt2)
    vocab = model.config.vocab_size
    calib = _ids(n=3, seed=2, high=vocab)
    handle = preserve(
        model,
        calib,
        targets="*.c_attn",
        task_loader=_ids(n=2, seed=3, high=vocab),
        lora=dict(r=2, target_modules=["c_attn"]),
        progress=False,
    )
    mods = _lora_modules(model)
    assert [t.name for t in handle.targets] == list(mods) and len(mods) == 2
    n_embd = model.config.n_embd
    for t in handle.targets:
        assert t.kind == "lora" and t.d_in == n_embd and t.dim == n_embd
        assert mods[t.name].fan_in_fan_out  # Conv1D stores (d_in, d_out)
    W0 = {n: m.base_layer.weight.detach().T.clone() for n, m in mods.items()}  # (d_out, d_in)
    opt = handle.optimizer(torch.optim.AdamW, lr=1e-2)
    for batch in _ids(n=2, seed=4, high=vocab):
        opt.zero_grad()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
    assert all(torch.count_nonzero(m.lora_B["default"].weight) > 0 for m in mods.values())
    pen = handle.penalty()
    assert pen.total > 0
    num_total = den_total = 0.0
    for name, mod in mods.items():
        mod.merge()  # PEFT's own ΔW, in the base's (d_in, d_out) layout
        C = handle.statistics.covariance(name).double()
        num, den = _penalty_by_hand(mod.base_layer.weight.detach().T, W0[name], C)
        assert pen.per_layer[name] == pytest.approx(num / den, rel=1e-6)
        num_total, den_total = num_total + num, den_total + den
    assert pen.total == pytest.approx(num_total / den_total, rel=1e-6)
    assert handle.penalty().total == pytest.approx(pen.total, rel=1e-6)  # merged: not twice
    handle.remove()


def test_resolve_targets_on_a_peft_gpt2_model():
    from rqcore_torch.targets import resolve_targets

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_layer=1, n_embd=16, n_head=2, n_positions=32)
    lora = peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    model = peft.get_peft_model(transformers.GPT2LMHeadModel(cfg), lora)
    (target,) = resolve_targets(model)
    assert target.name.endswith("h.0.attn.c_attn") and target.kind == "lora"
    assert target.d_in == 16
    assert target.effective_weight().shape == (48, 16)  # (d_out, d_in), whatever the storage


# ---------------------------------------------------------- the penalty meter follows PEFT's state
def test_penalty_of_merged_and_disabled_adapters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    handle = preserve(
        model,
        [torch.randn(32, 6)],
        targets="0",
        method="none",
        lora=dict(r=2, target_modules=["0"]),
        progress=False,
    )
    lora = model[0]
    W0 = lora.base_layer.weight.detach().clone()
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_()  # a trained adapter
    C = handle.statistics.covariance("0").double()
    num, den = _penalty_by_hand(W0 + lora.get_delta_weight("default").detach(), W0, C)
    active = handle.penalty().total
    assert active == pytest.approx(num / den, rel=1e-6) and active > 0
    lora.merge()
    assert handle.penalty().total == pytest.approx(active, rel=1e-6)  # ΔW counted once
    lora.enable_adapters(False)  # disabled while merged: PEFT's forward unmerges, back to W₀
    assert handle.penalty().total == pytest.approx(0.0, abs=1e-10)
    lora.unmerge()
    assert handle.penalty().total == pytest.approx(0.0, abs=1e-10)  # disabled: W₀
    lora.enable_adapters(True)
    assert handle.penalty().total == pytest.approx(active, rel=1e-6)
    handle.remove()


# ------------------------------------------------------------ lora= wraps exactly the named layers
def test_lora_default_target_modules_match_full_names_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), nn.Linear(4, 2))
    handle = preserve(model, [torch.randn(16, 4)], targets=["1"], lora=dict(r=2), progress=False)
    assert list(_lora_modules(model)) == ["1"]  # not "0.1", whose name ends in "1"
    assert [t.name for t in handle.targets] == ["1"]
    handle.remove()
    # a non-Linear module whose name ends like a target is not picked up either
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2))
    handle = preserve(model, [torch.randn(16, 4)], targets=["1"], lora=dict(r=2), progress=False)
    assert list(_lora_modules(model)) == ["1"]
    handle.remove()


# ---------------------------------------------------------------------------- task_loader=mix(...)
def test_task_loader_accepts_a_mix():
    from rqcore_torch import calibrate, mix

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(16, 6, generator=g)]
    first = [torch.randn(8, 6, generator=g) for _ in range(3)]  # more tokens than the second
    second = [3 * torch.randn(8, 6, generator=g)]
    handle = preserve(
        model,
        calib,
        task_loader=mix(first, second, weights=[1, 3]),
        method="gate",
        progress=False,
    )
    task = handle.task_statistics
    assert task is not None and task.mixed
    for name in ("0", "2"):
        assert task.layers[name].group == handle.statistics.layers[name].group
        parts = [calibrate(model, src, targets=name, progress=False) for src in (first, second)]
        expected = 0.25 * parts[0].covariance(name) + 0.75 * parts[1].covariance(name)
        torch.testing.assert_close(task.covariance(name), expected, rtol=1e-10, atol=1e-12)
    handle.remove()
