"""Packaging promises: imports, public API hygiene, Numba cache fallback, test configuration."""

from __future__ import annotations

import inspect
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numba
import pytest
from hypothesis import settings

import rqcore

ROOT = Path(__file__).resolve().parents[1]


def test_core_imports_without_torch() -> None:
    # sys.modules["torch"] = None makes any "import torch" raise ImportError.
    code = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None
        import rqcore, rqcore.generalized, rqcore.pencil
        import importlib, pkgutil
        for info in pkgutil.walk_packages(rqcore.__path__, "rqcore."):
            if info.name != "rqcore.demo":
                importlib.import_module(info.name)
        assert "torch" not in {m for m in sys.modules if sys.modules[m] is not None}
        print("ok", rqcore.__version__)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_torch_bridge_imports_and_says_what_it_needs() -> None:
    code = 'import sys; sys.modules["torch"] = None\nimport rqcore_torch'
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert out.returncode != 0
    assert "pip install 'rqcore[torch]'" in out.stderr


def test_public_api_is_documented() -> None:
    missing = []
    for name in rqcore.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(rqcore, name)
        if inspect.ismodule(obj):
            members = [getattr(obj, n) for n in getattr(obj, "__all__", [])]
        else:
            members = [obj]
        for member in members:
            if not (inspect.getdoc(member) or "").strip():
                missing.append(getattr(member, "__qualname__", repr(member)))
    assert not missing, f"public names without a docstring: {missing}"


def test_version_matches_metadata() -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        assert version("rqcore") == rqcore.__version__
    except PackageNotFoundError:  # running from a source tree without an install
        pytest.skip("rqcore is not installed")


def test_py_typed_markers_ship() -> None:
    assert (ROOT / "rqcore" / "py.typed").exists()
    assert (ROOT / "rqcore_torch" / "py.typed").exists()


def test_numba_cache_falls_back_on_read_only_install(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from rqcore import _numba

    def refuse(self: object) -> None:  # what numba does when no cache locator is writable
        raise RuntimeError("cannot cache function 'f': no locator available for file 'x.py'")

    monkeypatch.setattr(numba.core.dispatcher.Dispatcher, "enable_caching", refuse)
    monkeypatch.setattr(_numba, "_cache_disabled_noted", False)

    def twice(x: float) -> float:
        return 2.0 * x

    with caplog.at_level(logging.INFO, logger="rqcore"):
        compiled = _numba.njit()(twice)
    assert compiled(3.0) == 6.0
    assert "NUMBA_CACHE_DIR" in caplog.text


def test_hypothesis_profile_is_derandomized_with_enough_examples() -> None:
    profile = settings()
    assert profile.derandomize
    if profile.max_examples < 100:
        pytest.skip("a development profile is loaded; CI uses the 'ci' profile")
    assert profile.max_examples >= 100


def test_ci_script_runs_make_test() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    assert "make test" in script
    readme = (ROOT / "README.md").read_text()
    first_section = readme.split("\n## ", 2)[1]
    assert "make demo" in first_section and "make test" in first_section
