"""The bridge's device accumulator equals the core's StreamingCovariance and shares its state format."""

from __future__ import annotations

import numpy as np
import pytest

from rqcore import StreamingCovariance

torch = pytest.importorskip("torch")
from rqcore_torch.statistics import TorchCovariance  # noqa: E402

FLOAT_KEYS = ("total_weight", "sum", "scatter", "third", "fourth")
# "core": CPU batches through zero-copy views into rqcore; "torch": the torch re-expression that
# accelerators run, exercised here on the CPU and held equal to the core.
BACKENDS = pytest.mark.parametrize("backend", ["core", "torch"])


def _batches(seed: int, d: int = 12, mean: float = 0.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    scales = np.linspace(2.0, 0.2, d)
    return [mean + rng.standard_normal((n, d)) * scales for n in (7, 1, 30, 0, 5000)]


def _assert_states_close(a: dict, b: dict, rtol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        if key in FLOAT_KEYS:
            scale = max(float(np.max(np.abs(b[key]))), 1e-300)
            np.testing.assert_allclose(a[key], b[key], rtol=0, atol=rtol * scale, err_msg=key)
        else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("decay", [1.0, 0.9])
@pytest.mark.parametrize("weighted", [False, True])
@BACKENDS
def test_float64_updates_equal_the_core(
    centered: bool, decay: float, weighted: bool, backend: str
) -> None:
    core = StreamingCovariance(12, centered=centered, decay=decay)
    dev = TorchCovariance(12, centered=centered, decay=decay, backend=backend)
    rng = np.random.default_rng(1)
    for X in _batches(0, mean=3.0):
        w = rng.uniform(0, 2, X.shape[0]) if weighted else None
        core.update(X, weights=w)
        dev.update(torch.from_numpy(X), weights=None if w is None else torch.from_numpy(w))
    _assert_states_close(dev.state_dict(), core.state_dict(), rtol=1e-12)
    cov = core.covariance()
    np.testing.assert_allclose(dev.covariance().numpy(), cov, rtol=0, atol=1e-12 * abs(cov).max())


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@BACKENDS
def test_low_precision_inputs_are_multiplied_in_float32_and_summed_in_float64(
    dtype: str, backend: str
) -> None:
    batches = _batches(2, d=16)
    reference = StreamingCovariance(16)
    dev = TorchCovariance(16, backend=backend)
    for X in batches:
        X_t = torch.from_numpy(X).to(getattr(torch, dtype))
        dev.update(X_t)
        reference.update(X_t.double().numpy())  # the same rounded inputs, in float64
    tol = 1e-6 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(
        dev.covariance().numpy(),
        reference.covariance(),
        atol=tol * np.abs(reference.covariance()).max(),
    )


@BACKENDS
def test_centered_is_accurate_for_a_large_mean(backend: str) -> None:
    rng = np.random.default_rng(3)
    X = 1e4 + rng.standard_normal((6000, 8))
    dev = TorchCovariance(8, centered=True, backend=backend)
    for part in np.array_split(X, 5):
        dev.update(torch.from_numpy(part))
    reference = np.cov(X, rowvar=False, bias=True)
    np.testing.assert_allclose(dev.covariance().numpy(), reference, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("centered", [False, True])
@BACKENDS
def test_state_dicts_are_interchangeable_with_the_core(centered: bool, backend: str) -> None:
    first, second = _batches(4)[:3], _batches(5)[2:]
    dev = TorchCovariance(12, centered=centered, backend=backend)
    for X in first:
        dev.update(torch.from_numpy(X))
    core = StreamingCovariance.from_state_dict(dev.state_dict())  # device -> core
    back = TorchCovariance.from_state_dict(core.state_dict(), backend=backend)
    assert back.backend == backend  # core -> device
    for X in second:
        core.update(X)
        back.update(torch.from_numpy(X))
    _assert_states_close(back.state_dict(), core.state_dict(), rtol=1e-12)
    assert back.to_core().count == core.count == sum(len(X) for X in first + second)


@BACKENDS
def test_non_finite_batch_raises_and_leaves_state_unchanged(backend: str) -> None:
    dev = TorchCovariance(4, backend=backend)
    dev.update(torch.ones(3, 4, dtype=torch.float64))
    before = dev.state_dict()
    bad = torch.ones(2, 4, dtype=torch.float64)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        dev.update(bad)
    _assert_states_close(dev.state_dict(), before, rtol=0)


@BACKENDS
def test_non_finite_batch_is_skipped_on_device_without_check(backend: str) -> None:
    dev = TorchCovariance(4, centered=True, backend=backend)
    dev.update(torch.arange(12.0, dtype=torch.float64).reshape(3, 4))
    before = dev.state_dict()
    bad = torch.full((2, 4), float("inf"), dtype=torch.float64)
    dev.update(bad, check_finite=False)
    _assert_states_close(dev.state_dict(), before, rtol=0)
    assert int(dev.skipped_batches) == 1 and dev.count == 3


def test_bad_inputs_name_the_problem() -> None:
    dev = TorchCovariance(4)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        dev.update(np.ones((2, 4)))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating"):
        dev.update(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"shape \(n, 4\)"):
        dev.update(torch.ones(2, 5))
    with pytest.raises(ValueError, match="non-negative"):
        dev.update(torch.ones(2, 4), weights=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="decay"):
        TorchCovariance(4, decay=0.0)
    with pytest.raises(ValueError, match="no data"):
        TorchCovariance(4).covariance()
    with pytest.raises(ValueError, match="backend"):
        TorchCovariance(4, backend="gpu")


def test_auto_backend_uses_the_core_on_cpu_and_reports_it() -> None:
    acc = TorchCovariance(3)
    assert acc.backend == "auto"
    acc.update(torch.ones(2, 3))
    assert acc.backend == "core" and "backend='core'" in repr(acc)
    assert TorchCovariance(3, backend="torch").update(torch.ones(2, 3)).backend == "torch"


@pytest.mark.parametrize("backend", ["core", "torch"])
@pytest.mark.parametrize("centered", [False, True])
def test_overflowing_fourth_moments_match_the_core_on_both_backends(backend, centered):
    # Entries near 1e77: the covariance fits float64, Σ‖x‖⁴ does not. The torch backend took the
    # overflow for a NaN input ("X contains 0 non-finite value(s)").
    acc = TorchCovariance(4, centered=centered, backend=backend)
    f64 = torch.float64
    rows = [
        torch.full((1, 4), -5e76, dtype=f64),
        torch.tensor([[5e76, 1e77, 1.5e77, 2e77]], dtype=f64),
    ]
    for x in rows:
        acc.update(x)
    core = StreamingCovariance(4, centered=centered)
    for x in rows:
        core.update(x.numpy())
    state = acc.state_dict()
    assert state["fourth"] == np.inf
    np.testing.assert_allclose(acc.to_core().covariance(), core.covariance(), rtol=1e-12)
    with pytest.raises(ValueError, match="non-finite"):
        acc.update(torch.tensor([[float("nan"), 0.0, 0.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("backend", ["core", "torch"])
def test_float32_batches_whose_products_overflow_are_summed_in_float64(backend):
    X = torch.full((10, 2), 1e19, dtype=torch.float32)  # finite; squares exceed float32
    acc = TorchCovariance(2, backend=backend).update(X)
    np.testing.assert_allclose(acc.to_core().covariance(), np.full((2, 2), 1e38), rtol=1e-6)
