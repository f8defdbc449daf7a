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
from rqcore_torch.calibration import CalibrationStatistics, calibrate
from rqcore_torch.config import PreserveConfig
from rqcore_torch.folora import (
    FoLoRAAdam,
    LoRAPencil,
    SpectralLayer,
    folora_layers_from_covariances,
    lora_init_from_basis,
)
from rqcore_torch.handle import PreservationHandle
from rqcore_torch.optim import GatedOptimizer
from rqcore_torch.persistence import load
from rqcore_torch.preserve import preserve
from rqcore_torch.projectors import (
    LayerGate,
    TorchGate,
    TorchNullspaceGate,
    TorchRayleighGate,
    to_torch,
)
from rqcore_torch.sampling import (
    CalibrationMix,
    CalibrationSamples,
    SamplingCollapseWarning,
    SamplingStats,
    mix,
    sample_calibration,
)
from rqcore_torch.statistics import TorchCovariance

__all__ = [
    "CalibrationMix",
    "CalibrationSamples",
    "CalibrationStatistics",
    "FoLoRAAdam",
    "GatedOptimizer",
    "LayerGate",
    "LoRAPencil",
    "PreservationHandle",
    "PreserveConfig",
    "SamplingCollapseWarning",
    "SamplingStats",
    "SpectralLayer",
    "TorchCovariance",
    "TorchGate",
    "TorchNullspaceGate",
    "TorchRayleighGate",
    "__version__",
    "calibrate",
    "folora_layers_from_covariances",
    "load",
    "lora_init_from_basis",
    "mix",
    "preserve",
    "sample_calibration",
    "to_torch",
]
