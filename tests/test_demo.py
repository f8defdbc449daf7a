"""The demo that ``make demo`` runs must keep working (small sizes here)."""

from __future__ import annotations

import re

import pytest

from rqcore import demo


def test_demo_runs_end_to_end_and_reports_accurate_numbers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert demo.main(["--dim", "96", "--rows", "3000", "--k", "6", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "Top-6 of C_t v" in out
    error = float(re.search(r"max \|λ - LAPACK\| / λ_max = (\S+);", out).group(1))  # type: ignore[union-attr]
    assert error < 1e-8
    orth = float(re.search(r"‖VᵀMV - I‖ = (\S+)", out).group(1))  # type: ignore[union-attr]
    assert orth < 1e-8
    # Gating must lower the forgetting penalty and raise utility per unit penalty.
    before, after = map(float, re.search(r"penalty tr\(ΔW C_p ΔWᵀ\): (\S+) -> (\S+)", out).groups())  # type: ignore[union-attr]
    assert after < before
