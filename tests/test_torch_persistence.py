"""save/load of a handle: round trip, schema and mismatch errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rqcore_torch import load, preserve


def _model(width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, width), nn.ReLU(), nn.Linear(width, 2))


def test_round_trip(tmp_path):
    model = _model()
    calib = [torch.randn(16, 5) for _ in range(2)]
    handle = preserve(model, calib, method="gate", progress=False)
    opt = handle.optimizer(torch.optim.SGD, lr=0.1)
    model(torch.randn(4, 5)).sum().backward()
    opt.step()
    path = tmp_path / "h.safetensors"
    handle.save(path)
    again = load(path, model)
    assert again.step == 1 and again.config == handle.config
    assert again.penalty() == handle.penalty()  # W₀ comes from the file, not the trained model
    np.testing.assert_allclose(again.projector("0").values, handle.projector("0").values)
    torch.testing.assert_close(again.statistics.covariance("2"), handle.statistics.covariance("2"))
    assert load(path, model, method="nullspace").config.method == "nullspace"


def test_mismatches_are_named(tmp_path):
    path = tmp_path / "h.safetensors"
    preserve(_model(), [torch.randn(8, 5)], progress=False).save(path)
    with pytest.raises(
        ValueError, match=r"0: saved shapes \{'0': \[8, 5\]\}, model has \{'0': \[9, 5\]\}"
    ):
        load(path, _model(width=9))
    with pytest.raises(ValueError, match="fc: missing from the model"):
        bad = nn.Sequential()
        bad.add_module("fc", nn.Linear(5, 2))
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["rqcore"])
        meta["layers"]["fc"] = meta["layers"]["0"]
        save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"rqcore": json.dumps(meta)})
        load(tmp_path / "x.safetensors", nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2)))


def test_schema_checks(tmp_path):
    save_file({"a": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="no rqcore metadata"):
        load(tmp_path / "plain.safetensors", _model())
    meta = {"format": "rqcore_torch.preservation", "version": 99}
    save_file(
        {"a": torch.zeros(1)},
        str(tmp_path / "new.safetensors"),
        metadata={"rqcore": json.dumps(meta)},
    )
    with pytest.raises(ValueError, match="version 99 is not supported"):
        load(tmp_path / "new.safetensors", _model())
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.safetensors", _model())


def test_a_tampered_scatter_is_rejected_on_load(tmp_path):
    # A negative-definite C_p would make the null-space method protect nothing, silently.
    path = tmp_path / "h.safetensors"
    model = _model()
    preserve(model, [torch.randn(16, 5)], method="nullspace", progress=False).save(path)
    tensors = load_file(str(path))
    scatters = [k for k in tensors if k.startswith("stats/") and k.endswith("scatter")]
    assert scatters
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    for k in scatters:
        tensors[k] = -tensors[k]
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match="cannot be positive semidefinite"):
        load(tmp_path / "bad.safetensors", model)
