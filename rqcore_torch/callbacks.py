"""Hugging Face ``Trainer`` integration: log the forgetting meter.

Importing this module imports ``transformers``; :mod:`rqcore_torch` itself does not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

if TYPE_CHECKING:
    from rqcore_torch.handle import PreservationHandle

__all__ = ["PenaltyCallback"]


class PenaltyCallback(TrainerCallback):
    """Add ``"forgetting_penalty"`` (and optionally per-layer values) to the Trainer's logs.

    Parameters
    ----------
    handle : PreservationHandle
    per_layer : bool, default False
        Also log ``"forgetting_penalty/<layer>"`` for every layer.

    Examples
    --------
    >>> from rqcore_torch.callbacks import PenaltyCallback  # doctest: +SKIP
    >>> trainer = Trainer(..., callbacks=[PenaltyCallback(handle)])  # doctest: +SKIP
    """

    def __init__(self, handle: PreservationHandle, *, per_layer: bool = False) -> None:
        self.handle = handle
        self.per_layer = per_layer

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """Compute the meter and put it into ``logs`` (called by the Trainer at every log step)."""
        if logs is None:
            return
        report = self.handle.penalty()
        logs["forgetting_penalty"] = report.total
        if self.per_layer:
            for name, value in report.per_layer.items():
                logs[f"forgetting_penalty/{name}"] = value
