"""The torch gates equal the core's projectors (rqcore/projection.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rqcore import NullspaceProjector, RayleighBasis, gates
from rqcore_torch import (
    LayerGate,
    TorchGate,
    TorchNullspaceGate,
    TorchRayleighGate,
    to_torch,
)

D = 12


def _pencil(rng: np.random.Generator, d: int = D) -> tuple[np.ndarray, np.ndarray]:
    X = rng.standard_normal((3 * d, d))
    Y = rng.standard_normal((3 * d, d)) * np.linspace(0.2, 2.0, d)
    return X.T @ X / (3 * d), Y.T @ Y / (3 * d)


def _projectors(rng: np.random.Generator) -> dict[str, RayleighBasis | NullspaceProjector]:
    A, B = _pencil(rng)
    return {
        "ratio-c0": RayleighBasis.from_pencil(A, B, k=5, gains=lambda v: gates.ratio(v, 1.0)),
        "ratio-c05": RayleighBasis.from_pencil(A, B, k=5, complement=0.5),
        "hard-c0": RayleighBasis.from_pencil(A, B, k=5, gains=lambda v: gates.hard(v, rank=2)),
        "hard-full": RayleighBasis.from_pencil(
            A, B, gains=lambda v: gates.hard(v, rank=4), complement=0.5
        ),  # k = d
        "nullspace": NullspaceProjector(B, energy=0.9),
        "nullspace-r0": NullspaceProjector(B, rank=0),
        "nullspace-r9": NullspaceProjector(B, rank=9),  # stored in the complement form
        "nullspace-full": NullspaceProjector(B, rank=D),
    }


@pytest.mark.parametrize(
    "kind",
    [
        "ratio-c0",
        "ratio-c05",
        "hard-c0",
        "hard-full",
        "nullspace",
        "nullspace-r0",
        "nullspace-r9",
        "nullspace-full",
    ],
)
@pytest.mark.parametrize("n", [1, 7])
def test_apply_equals_core(kind: str, n: int) -> None:
    rng = np.random.default_rng(0)
    proj = _projectors(rng)[kind]
    G = rng.standard_normal((n, D))
    expected = proj.apply(G)
    # float64: the same products in the same precision
    gate64 = to_torch(proj, dtype=torch.float64)
    rows = torch.from_numpy(G.copy())
    out = gate64.apply_(rows)
    assert out is rows
    np.testing.assert_allclose(rows.numpy(), expected, rtol=0, atol=1e-12 * np.abs(G).max())
    # float32: relative to the size of the result
    gate32 = to_torch(proj)
    assert gate32.dtype == torch.float32
    rows32 = torch.from_numpy(G.astype(np.float32))
    gate32.apply_(rows32)
    scale = np.abs(G).max()
    np.testing.assert_allclose(rows32.numpy(), expected, rtol=0, atol=1e-5 * scale)


def test_classes_and_attributes() -> None:
    rng = np.random.default_rng(1)
    projs = _projectors(rng)
    gate = to_torch(projs["hard-c0"], dtype=torch.float64)
    assert isinstance(gate, TorchRayleighGate) and isinstance(gate, TorchGate)
    assert gate.dim == D and gate.rank == 5 and gate.complement == 0.0
    assert gate.MV is gate.factors[1]
    np.testing.assert_array_equal(gate.V.numpy(), projs["hard-c0"].vectors)
    np.testing.assert_array_equal(gate.gains.numpy(), projs["hard-c0"].gains)
    ns = to_torch(projs["nullspace"])
    assert isinstance(ns, TorchNullspaceGate) and ns.U.shape == (D, projs["nullspace"].rank)
    assert "TorchNullspaceGate" in repr(ns)
    assert ns.factors[0] == 1.0 and ns.rank == projs["nullspace"].rank == 6
    wide = to_torch(projs["nullspace-r9"])  # complement form: Q·Qᵀ with dim − r = 3 columns
    assert wide.factors[0] == 0.0 and wide.rank == 3 and wide.U.shape == (D, 9)
    with pytest.raises(TypeError, match=r"RayleighBasis or rqcore\.NullspaceProjector"):
        to_torch(np.eye(3))  # type: ignore[arg-type]


def test_to_changes_dtype_and_keeps_map() -> None:
    rng = np.random.default_rng(2)
    proj = _projectors(rng)["ratio-c05"]
    gate = to_torch(proj, dtype=torch.float64)
    assert gate.to() is gate and gate.to(dtype=torch.float64) is gate
    g32 = gate.to(dtype=torch.float32)
    assert isinstance(g32, TorchRayleighGate) and g32.dtype == torch.float32
    assert g32.MV is g32.factors[1] and gate.dtype == torch.float64
    G = rng.standard_normal((4, D))
    a = g32.apply_(torch.from_numpy(G.astype(np.float32)))
    np.testing.assert_allclose(a.numpy(), proj.apply(G), atol=1e-5 * np.abs(G).max())


def test_bad_rows_raise_with_fix() -> None:
    gate = to_torch(NullspaceProjector(np.eye(4), rank=2))
    with pytest.raises(ValueError, match=r"shape \(n, 4\)"):
        gate.apply_(torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"shape \(n, 4\)"):
        gate.apply_(torch.zeros(4))
    with pytest.raises(ValueError, match=r"gate.to\(device='cpu', dtype=torch.float64\)"):
        gate.apply_(torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"torch\.Tensor"):
        gate.apply_(np.zeros((3, 4)))  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_wrong_device_raises_and_cuda_equals_core() -> None:
    rng = np.random.default_rng(3)
    proj = _projectors(rng)["hard-c0"]
    gate = to_torch(proj, device="cuda", dtype=torch.float64)
    with pytest.raises(ValueError, match=r"gate\.to"):
        gate.apply_(torch.zeros(2, D, dtype=torch.float64))
    G = rng.standard_normal((5, D))
    out = gate.apply_(torch.from_numpy(G).cuda()).cpu().numpy()
    np.testing.assert_allclose(out, proj.apply(G), atol=1e-12 * np.abs(G).max())
    assert gate.to(device="cpu").device.type == "cpu"


def test_layer_gate_validation() -> None:
    lin = torch.nn.Linear(4, 3)
    aug = to_torch(NullspaceProjector(np.eye(5), rank=1))
    plain = to_torch(NullspaceProjector(np.eye(4), rank=1))
    lg = LayerGate("fc", lin.weight, lin.bias, aug)
    assert (lg.d_in, lg.d_out) == (4, 3)
    LayerGate("fc", lin.weight, None, plain)
    with pytest.raises(ValueError, match=r"needs 5 \(d_in \+ 1"):
        LayerGate("fc", lin.weight, lin.bias, plain)
    with pytest.raises(ValueError, match="transposed=True"):
        LayerGate("fc", torch.nn.Parameter(torch.zeros(4, 3)), None, plain.to(), transposed=False)
    LayerGate("conv", torch.nn.Parameter(torch.zeros(4, 3)), lin.bias, aug, transposed=True)
    with pytest.raises(ValueError, match=r"gate.to\(device='cpu', dtype=torch.float64\)"):
        LayerGate("fc", torch.nn.Parameter(lin.weight.double()), None, plain)
    with pytest.raises(ValueError, match="TorchGate"):
        LayerGate("fc", lin.weight, None, object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"bias has shape"):
        LayerGate("fc", lin.weight, torch.nn.Parameter(torch.zeros(4)), aug)


# --- session 12 review: gains beyond the gate's dtype, dtype checks on to() ----------------------


@pytest.mark.parametrize(
    ("gains", "complement", "dtype"),
    [(1e39, 0.0, torch.float32), (1e5, 0.0, torch.float16), (1.0, 1e39, torch.float32)],
)
def test_gate_refuses_factors_that_overflow_its_dtype(gains, complement, dtype):
    # Before session 12 the factors were stored as inf and every row came back inf (or raised a raw
    # torch RuntimeError for the complement), where the core refuses such gains on float32 G.
    basis = RayleighBasis.from_pencil(
        np.diag([3.0, 2.0, 1.0]), None, k=1, gains=gains, complement=complement
    )
    with pytest.raises(ValueError, match="overflow"):
        to_torch(basis, dtype=dtype)
    gate = to_torch(basis, dtype=torch.float64)  # representable there
    with pytest.raises(ValueError, match="overflow"):
        gate.to(dtype=dtype)


def test_gate_to_refuses_non_floating_dtypes():
    gate = to_torch(NullspaceProjector(np.diag([2.0, 1.0]), rank=1), dtype=torch.float64)
    for dtype in (torch.int32, torch.int64, torch.complex64):
        with pytest.raises(ValueError, match="floating dtype"):
            gate.to(dtype=dtype)


def test_folora_refuses_gains_that_overflow_the_weights():
    from rqcore_torch import preserve

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    handle = preserve(
        model, [torch.randn(16, 4)], gate=lambda values: np.full_like(values, 1e39), progress=False
    )
    with pytest.raises(ValueError, match="overflow the weights' dtype"):
        handle.optimizer(torch.optim.AdamW, lr=1e-3)
    handle.remove()
