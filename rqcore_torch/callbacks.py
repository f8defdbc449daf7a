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

    Notes
    -----
    ``Trainer.log`` appends its logs to ``state.log_history`` *before* the callbacks' ``on_log``, and
    calls the callbacks in order, reporting integrations (TensorBoard, W&B, …) first. So the callback
    also writes the values into the ``log_history`` entry of the step (hence ``trainer_state.json``),
    and :meth:`install` puts it ahead of the integrations, which then report it too. Passed in
    ``callbacks=[...]`` it comes after them: the values reach ``log_history`` and the callbacks after
    it, not the integrations.

    Examples
    --------
    >>> from rqcore_torch.callbacks import PenaltyCallback  # doctest: +SKIP
    >>> trainer = Trainer(...)  # doctest: +SKIP
    >>> PenaltyCallback.install(trainer, handle)  # doctest: +SKIP
    """

    def __init__(self, handle: PreservationHandle, *, per_layer: bool = False) -> None:
        self.handle = handle
        self.per_layer = per_layer

    @classmethod
    def install(
        cls, trainer: Any, handle: PreservationHandle, *, per_layer: bool = False
    ) -> PenaltyCallback:
        """Create the callback and put it first among ``trainer``'s callbacks.

        Parameters
        ----------
        trainer : transformers.Trainer
        handle : PreservationHandle
        per_layer : bool, default False

        Returns
        -------
        PenaltyCallback
            The installed callback.
        """
        callback = cls(handle, per_layer=per_layer)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """Compute the meter and put it into ``logs`` and the step's ``log_history`` entry."""
        if logs is None:
            return
        report = self.handle.penalty()
        values = {"forgetting_penalty": report.total}
        if self.per_layer:
            for name, value in report.per_layer.items():
                values[f"forgetting_penalty/{name}"] = value
        logs.update(values)
        history = getattr(state, "log_history", None)
        if history and history[-1].get("step") == state.global_step:
            history[-1].update(values)  # Trainer.log copied the logs there before calling on_log
