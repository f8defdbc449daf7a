"""rqcore: generalized Rayleigh-quotient linear algebra for foundation-preserving finetuning.

The core is framework-agnostic (NumPy, SciPy, Numba); the PyTorch bridge is :mod:`rqcore_torch`.
"""

from rqcore import gates
from rqcore._version import __version__
from rqcore.covariance import StreamingCovariance
from rqcore.exceptions import ConvergenceWarning, RqcoreWarning
from rqcore.generalized import GeneralizedEigenResult, generalized_topk, pair_residuals
from rqcore.pencil import Pencil
from rqcore.projection import (
    NullspaceProjector,
    Projector,
    RayleighBasis,
    projector_from_state_dict,
)

__all__ = [
    "ConvergenceWarning",
    "GeneralizedEigenResult",
    "NullspaceProjector",
    "Pencil",
    "Projector",
    "RayleighBasis",
    "RqcoreWarning",
    "StreamingCovariance",
    "__version__",
    "gates",
    "generalized_topk",
    "pair_residuals",
    "projector_from_state_dict",
]
