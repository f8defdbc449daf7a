"""Warning classes of rqcore.

Every warning rqcore emits derives from :class:`RqcoreWarning`, so a user can silence or escalate all of
them at once (``warnings.simplefilter("error", rqcore.RqcoreWarning)``).
"""

from __future__ import annotations

__all__ = ["ConvergenceWarning", "RqcoreWarning"]


class RqcoreWarning(UserWarning):
    """Base class of the warnings emitted by rqcore."""


class ConvergenceWarning(RqcoreWarning):
    """An iterative method stopped at its iteration limit before reaching the requested tolerance.

    The message carries the numbers (iterations, worst residual, tolerance, number of converged pairs);
    the result object returned alongside has ``converged=False`` and holds the best pairs found.
    """
