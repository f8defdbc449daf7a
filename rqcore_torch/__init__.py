"""rqcore_torch: the PyTorch bridge of rqcore.

It hooks rqcore's maths (streaming covariances, generalized eigensolvers, spectral gates) into a PyTorch
finetuning run. It needs torch, installed with ``pip install 'rqcore[torch]'``.
"""

from __future__ import annotations

try:
    import torch  # noqa: F401  (checked here so the error names the fix)
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "rqcore_torch needs PyTorch. Install it with: pip install 'rqcore[torch]' "
        "(the core, rqcore, works without it)."
    ) from exc

from rqcore._version import __version__
from rqcore_torch.statistics import TorchCovariance

__all__ = ["TorchCovariance", "__version__"]
