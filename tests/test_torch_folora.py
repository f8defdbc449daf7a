"""Tests of rqcore_torch.folora: the spectral Adam, its refresh policies, LoRA helpers, and the toy claim."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rqcore import RayleighBasis, generalized_topk
from rqcore_torch.folora import (
    FoLoRAAdam,
    LoRAPencil,
    SpectralLayer,
    folora_layers_from_covariances,
    lora_init_from_basis,
    resolve_tau,
)

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def _cov(d: int, rng: np.random.Generator, alpha: float = 1.0) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * np.arange(1, d + 1) ** -alpha) @ q.T


def _layer(
    d_in: int = 6,
    out: int = 4,
    k: int | None = None,
    bias: bool = True,
    seed: int = 0,
    transposed=False,
) -> tuple[SpectralLayer, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    d = d_in + bias
    Ct, Cp = _cov(d, rng), _cov(d, rng, 2.0)
    basis = RayleighBasis.from_pencil(Ct, Cp, k or d, reg=1e-2)
    torch.manual_seed(seed)
    shape = (d_in, out) if transposed else (out, d_in)
    w = torch.nn.Parameter(torch.randn(*shape, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(out, dtype=torch.float64)) if bias else None
    return SpectralLayer.from_basis("l", w, b, basis, transposed=transposed), Ct, Cp


def _rows(layer: SpectralLayer) -> torch.Tensor:
    W = layer.weight.T if layer.transposed else layer.weight
    return W if layer.bias is None else torch.cat([W, layer.bias[:, None]], 1)


def _set_grads(layer: SpectralLayer, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out, d_in = layer.shape_out_in
    G = torch.randn(out, d_in + (layer.bias is not None), generator=g, dtype=torch.float64)
    gw = G[:, :d_in]
    layer.weight.grad = (gw.T if layer.transposed else gw).clone()
    if layer.bias is not None:
        layer.bias.grad = G[:, d_in].clone()
    return G


def test_step_matches_manual_spectral_adam() -> None:
    layer, _, _ = _layer()
    opt = FoLoRAAdam([layer], lr=0.1, betas=(0.8, 0.9), eps=1e-8)
    V, MV = layer.vectors, layer.dual
    g = opt.gains("l")
    s = layer.scale
    m = v = torch.zeros(4, V.shape[1], dtype=torch.float64)
    W = _rows(layer).detach().clone()
    for t in range(1, 4):
        G = _set_grads(layer, t)
        opt.step()
        z = G @ V
        m = 0.8 * m + 0.2 * z
        v = 0.9 * v + 0.1 * z * z
        u = (m / (1 - 0.8**t)) / ((v / (1 - 0.9**t)).sqrt() + 1e-8)
        W = W - 0.1 * s * (u * g) @ V.T
        torch.testing.assert_close(_rows(layer).detach(), W)
    # the coordinates of the step are the gated Adam step: penalty Σ g² u² (times (lr·s)²)
    assert torch.all((g >= 0) & (g <= 1))
    assert MV.shape == V.shape


def test_transposed_layer_matches_plain() -> None:
    a, _, _ = _layer(seed=3)
    b, _, _ = _layer(seed=3, transposed=True)
    b.weight.data.copy_(a.weight.data.T)
    b.bias.data.copy_(a.bias.data)  # type: ignore[union-attr]
    oa, ob = FoLoRAAdam([a], lr=0.01), FoLoRAAdam([b], lr=0.01)
    for t in range(3):
        _set_grads(a, t)
        _set_grads(b, t)
        oa.step()
        ob.step()
    torch.testing.assert_close(a.weight.T, b.weight)


def test_top_k_without_complement_stays_in_span_and_complement_is_m_orthogonal() -> None:
    layer, _, _ = _layer(d_in=10, k=3)
    W0 = _rows(layer).detach().clone()
    opt = FoLoRAAdam([layer], lr=0.05)
    for t in range(3):
        _set_grads(layer, t)
        opt.step()
    step = _rows(layer).detach() - W0
    V, MV = layer.vectors, layer.dual
    torch.testing.assert_close(step - (step @ MV) @ V.T, torch.zeros_like(step), atol=1e-10, rtol=0)

    layer2, _, _ = _layer(d_in=10, k=3)
    opt2 = FoLoRAAdam([layer2], lr=0.05, complement=0.5)
    for t in range(3):
        _set_grads(layer2, t)
        opt2.step()
    step2 = _rows(layer2).detach() - W0
    resid = step2 - (step2 @ MV) @ V.T
    assert resid.norm() > 1e-3  # the complement moves
    torch.testing.assert_close(step2 @ MV, step @ MV)  # the in-span part is unchanged by g⊥
    assert "comp_exp_avg" in opt2.state[layer2.weight]


def test_gated_weight_decay_does_not_move_blocked_directions() -> None:
    layer, _, _ = _layer()
    W0 = _rows(layer).detach().clone()
    opt = FoLoRAAdam([layer], lr=0.1, weight_decay=0.5, gate="hard", rank=0)
    _set_grads(layer, 0)
    opt.step()
    torch.testing.assert_close(_rows(layer).detach(), W0)
    opt2 = FoLoRAAdam([layer], lr=0.1, weight_decay=0.5, gate="none")
    layer.weight.grad = torch.zeros_like(layer.weight)
    layer.bias.grad = torch.zeros_like(layer.bias)  # type: ignore[union-attr]
    opt2.step()  # with all gains 1 and a full basis this is plain decoupled decay
    torch.testing.assert_close(_rows(layer).detach(), W0 * (1 - 0.05))


def test_other_params_follow_torch_adamw() -> None:
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(5, 3))
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1 = FoLoRAAdam([], [p1], lr=0.01, weight_decay=0.1)
    o2 = torch.optim.AdamW([p2], lr=0.01, weight_decay=0.1)
    for t in range(4):
        g = torch.randn(5, 3, generator=torch.Generator().manual_seed(t))
        p1.grad, p2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    torch.testing.assert_close(p1, p2)


def _new_basis(seed: int, d: int, k: int | None = None):
    rng = np.random.default_rng(seed)
    b = RayleighBasis.from_pencil(_cov(d, rng), _cov(d, rng, 2.0), k or d, reg=1e-2)
    return (torch.tensor(b.values), torch.tensor(b.vectors), torch.tensor(b.MV))


def test_transport_keeps_first_moment_of_gradient_exactly_for_full_basis() -> None:
    layer, _, _ = _layer()
    opt = FoLoRAAdam([layer], lr=0.01)
    for t in range(3):
        _set_grads(layer, t)
        opt.step()
    st = opt.state[layer.weight]
    m_G = st["exp_avg"] @ st["dual"].T
    v_before = st["exp_avg_sq"].clone()
    opt.set_basis("l", *_new_basis(7, 7))
    st = opt.state[layer.weight]
    torch.testing.assert_close(st["exp_avg"] @ st["dual"].T, m_G)
    assert torch.all(st["exp_avg_sq"] >= 0) and not torch.equal(st["exp_avg_sq"], v_before)
    assert float(st["step"]) == 3  # bias correction continues


def test_transport_with_top_k_and_complement_keeps_first_moment() -> None:
    layer, _, _ = _layer(d_in=8, k=3)
    opt = FoLoRAAdam([layer], lr=0.01, complement=0.3)
    for t in range(3):
        _set_grads(layer, t)
        opt.step()
    st = opt.state[layer.weight]
    m_G = st["exp_avg"] @ st["dual"].T + st["comp_exp_avg"]
    opt.set_basis("l", *_new_basis(8, 9, k=4))
    st = opt.state[layer.weight]
    torch.testing.assert_close(st["exp_avg"] @ st["dual"].T + st["comp_exp_avg"], m_G)
    assert st["exp_avg"].shape == (4, 4)


def test_reset_and_keep_policies() -> None:
    layer, _, _ = _layer()
    opt = FoLoRAAdam([layer], lr=0.01, refresh_moments="reset")
    _set_grads(layer, 0)
    opt.step()
    opt.set_basis("l", *_new_basis(9, 7))
    st = opt.state[layer.weight]
    assert float(st["step"]) == 0 and not st["exp_avg"].any() and not st["exp_avg_sq"].any()
    layer2, _, _ = _layer()
    opt2 = FoLoRAAdam([layer2], lr=0.01, refresh_moments="keep")
    _set_grads(layer2, 0)
    opt2.step()
    m = opt2.state[layer2.weight]["exp_avg"].clone()
    opt2.set_basis("l", *_new_basis(9, 7))
    torch.testing.assert_close(opt2.state[layer2.weight]["exp_avg"], m)


def test_state_dict_resumes_exactly_across_a_refresh() -> None:
    def make():
        layer, _, _ = _layer(d_in=8, k=4)
        other = torch.nn.Parameter(torch.ones(3))
        return (
            layer,
            other,
            FoLoRAAdam([layer], [other], lr=0.02, complement=0.2, weight_decay=0.01),
        )

    layer, other, opt = make()
    for t in range(3):
        _set_grads(layer, t)
        other.grad = torch.full((3,), float(t))
        opt.step()
    opt.set_basis("l", *_new_basis(5, 9, k=5))
    saved = copy.deepcopy(opt.state_dict())
    params = [_rows(layer).detach().clone(), other.detach().clone()]

    def cont(layer, other, opt):
        for t in range(3, 6):
            _set_grads(layer, t)
            other.grad = torch.full((3,), float(t))
            opt.step()
        return _rows(layer).detach().clone(), other.detach().clone()

    ref = cont(layer, other, opt)
    layer2, other2, opt2 = make()
    with torch.no_grad():
        layer2.weight.copy_(params[0][:, :-1])
        layer2.bias.copy_(params[0][:, -1])  # type: ignore[union-attr]
        other2.copy_(params[1])
    opt2.load_state_dict(saved)
    got = cont(layer2, other2, opt2)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0)


def test_budget_tau_spends_the_budget() -> None:
    layer, _, _ = _layer(d_in=12)
    opt = FoLoRAAdam([layer], lr=0.01, tau="budget", tau_param=0.3)
    W0 = _rows(layer).detach().clone()
    _set_grads(layer, 0)
    opt.step()
    c = (_rows(layer).detach() - W0) @ layer.dual / (0.01 * layer.scale)  # = -g·u
    ungated = c / opt.gains("l")
    frac = float((c**2).sum() / (ungated**2).sum())
    assert frac == pytest.approx(0.3, rel=1e-6)


def test_tau_rules() -> None:
    lam = np.array([4.0, 2.0, 1.0, 0.5, -1e-12])
    assert resolve_tau(lam, "median") == 1.0
    assert resolve_tau(lam, "mean") == pytest.approx(7.5 / 4)
    assert resolve_tau(lam, 0.3) == 0.3
    with pytest.raises(ValueError):
        resolve_tau(lam, "nope")
    layer, _, _ = _layer()
    layer2, _, _ = _layer(seed=4)
    layer2.name = "m"
    opt = FoLoRAAdam([layer, layer2], tau_scope="global")
    assert float(opt.state[layer.weight]["tau"]) == pytest.approx(
        float(opt.state[layer2.weight]["tau"])
    )


def test_lora_init_from_basis_rows() -> None:
    rng = np.random.default_rng(0)
    basis = RayleighBasis.from_pencil(_cov(9, rng), _cov(9, rng, 2.0), 9, reg=1e-2)
    A = lora_init_from_basis(basis, 3, dtype=torch.float64)
    assert A.shape == (3, 9)
    torch.testing.assert_close(
        A.norm(dim=1), torch.full((3,), 1 / math.sqrt(3), dtype=torch.float64)
    )
    V = torch.tensor(basis.vectors[:, :3])
    torch.testing.assert_close(A / A.norm(dim=1, keepdim=True), (V / V.norm(dim=0)).T)
    with pytest.raises(ValueError):
        lora_init_from_basis(basis, 10)


def test_lora_pencil_gates_B_in_the_r_dim_pencil_and_refreshes() -> None:
    rng = np.random.default_rng(1)
    d, r, out = 10, 3, 5
    Ct, Cp = torch.tensor(_cov(d, rng)), torch.tensor(_cov(d, rng, 2.0))
    A = torch.nn.Parameter(torch.randn(r, d, dtype=torch.float64))
    B = torch.nn.Parameter(torch.zeros(out, r, dtype=torch.float64))
    eye = torch.eye(r, dtype=torch.float64)
    layerB = SpectralLayer("B", B, None, torch.ones(r, dtype=torch.float64), eye, eye)
    opt = FoLoRAAdam(
        [layerB], [A], lr=0.01, lora_pencils={"B": LoRAPencil(A, Ct, Cp)}, refresh_every=2
    )
    st = opt.state[B]
    ref = generalized_topk(
        (A @ Ct @ A.T).detach().numpy(), (A @ Cp @ A.T).detach().numpy(), r, reg=1e-2
    )
    np.testing.assert_allclose(st["values"].numpy(), ref.values, rtol=1e-8)
    old = st["vectors"].clone()
    for _ in range(3):
        B.grad = torch.randn(out, r, dtype=torch.float64)
        A.grad = torch.randn(r, d, dtype=torch.float64)
        opt.step()
    assert not torch.allclose(opt.state[B]["vectors"], old)  # re-solved through the moved L_A


def test_folora_layers_from_covariances_matches_core() -> None:
    rng = np.random.default_rng(2)
    lin = torch.nn.Linear(5, 3).double()
    Ct, Cp = _cov(6, rng), _cov(6, rng, 2.0)
    (layer,) = folora_layers_from_covariances(
        [("x", lin)], {"x": torch.tensor(Ct)}, {"x": torch.tensor(Cp)}, reg=1e-2
    )
    core = RayleighBasis.from_pencil(Ct, Cp, 6, reg=1e-2)
    np.testing.assert_allclose(layer.values.numpy(), core.values, rtol=1e-8)
    M = Cp + core.reg_used * np.eye(6)
    np.testing.assert_allclose(
        layer.vectors.numpy().T @ M @ layer.vectors.numpy(), np.eye(6), atol=1e-8
    )
    assert layer.scale == pytest.approx(math.sqrt(np.trace(M) / 6))


def test_validation() -> None:
    layer, _, _ = _layer()
    with pytest.raises(ValueError):
        FoLoRAAdam([layer], refresh_moments="bogus")
    with pytest.raises(ValueError):
        FoLoRAAdam([layer], tau="bogus")
    with pytest.raises(ValueError):
        FoLoRAAdam([layer], complement=2.0)
    with pytest.raises(ValueError):
        SpectralLayer("x", layer.weight, None, layer.values, layer.vectors, layer.dual)
    opt = FoLoRAAdam([layer])
    with pytest.raises(ValueError):
        opt.set_basis("l", *_new_basis(0, 5))


@pytest.mark.slow
def test_toy_experiment_folora_beats_every_baseline_on_balance() -> None:
    """A reduced toy_two_task run (3 seeds): FoLoRA's defaults beat each tuned baseline's balance."""
    sys.path.insert(0, str(REPO))
    from benchmarks.experiments import toy_two_task as toy

    cfg = toy.test_config()
    res, _ = toy.evaluate([*toy.baselines(), toy.FOLORA_DEFAULT], cfg, [0, 1, 2])
    ours = res[toy.FOLORA_DEFAULT.label]
    assert ours.valid
    for label, r in res.items():
        if label != ours.label:
            assert ours.balance.mean() > r.balance.mean() + 0.01, (label, r.balance, ours.balance)


def test_gate_on_step_matches_core_gate_of_the_adam_step() -> None:
    rng = np.random.default_rng(11)
    d = 7
    basis = RayleighBasis.from_pencil(_cov(d, rng), _cov(d, rng, 2.0), 4, reg=1e-2)
    w = torch.nn.Parameter(torch.randn(3, d - 1, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    layer = SpectralLayer.from_basis("l", w, b, basis)
    opt = FoLoRAAdam([layer], lr=0.1, gate_position="step", complement=0.25)
    W0 = _rows(layer).detach().clone()
    G = _set_grads(layer, 0)
    opt.step()
    u = (G / (G.abs() + 1e-8)).numpy()  # Adam's first step
    want = W0.numpy() - 0.1 * basis.gate(u, opt.gains("l").numpy(), complement=0.25)
    np.testing.assert_allclose(_rows(layer).detach().numpy(), want, rtol=1e-10, atol=1e-12)
