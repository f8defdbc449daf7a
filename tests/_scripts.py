"""Runs a benchmark script's ``--quick`` mode in a subprocess (the smoke tests of the comparison scripts)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_quick(script: str, *, timeout: float = 120) -> str:
    """Run ``benchmarks/<script> --quick`` on one BLAS thread from the repository root; assert it
    exits with 0 and return its standard output."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout
