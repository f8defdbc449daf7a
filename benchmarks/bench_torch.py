"""asv benchmarks of the torch bridge: calibration pass, handle refresh, gated steps (tiny BERT, 1 thread)."""

from __future__ import annotations

from typing import Any

import torch


def _model_and_batch() -> tuple[Any, dict[str, torch.Tensor]]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        vocab_size=500,
    )
    return BertModel(cfg).eval(), {"input_ids": torch.randint(0, 500, (8, 64))}


class TimeCalibration:
    """One calibration pass over one batch (8x64 tokens)."""

    def setup(self) -> None:
        torch.set_num_threads(1)
        self.model, self.batch = _model_and_batch()

    def time_calibrate(self) -> None:
        from rqcore_torch import calibrate

        calibrate(self.model, [self.batch], progress=False)

    def time_calibrate_quarter_tokens(self) -> None:
        from rqcore_torch import calibrate

        calibrate(self.model, [self.batch], progress=False, token_fraction=0.25, seed=0)


class TimeRefresh:
    """Re-solving every pencil of a handle (warm start, factored C_p reused)."""

    def setup(self) -> None:
        from rqcore_torch import preserve

        torch.set_num_threads(1)
        self.model, batch = _model_and_batch()
        self.handle = preserve(self.model, [batch], method="gate", refresh_every=10, progress=False)

    def teardown(self) -> None:
        self.handle.remove()

    def time_refresh(self) -> None:
        self.handle.refresh()


class TimeGatedStep:
    """One optimizer step (gradients computed once in ``setup``): plain AdamW, AdamW wrapped by
    ``GatedOptimizer`` with Rayleigh (``method="gate"``) or null-space gates, and ``FoLoRAAdam``."""

    params = (["adamw", "gate", "nullspace", "folora"],)
    param_names = ("optimizer",)

    def setup(self, optimizer: str) -> None:
        from rqcore_torch import preserve

        torch.set_num_threads(1)
        self.model, batch = _model_and_batch()
        self.handle = None
        if optimizer == "adamw":
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        else:
            # task_warmup=None: no basis refresh inside the timed steps.
            self.handle = preserve(
                self.model, [batch], method=optimizer, progress=False, task_warmup=None
            )
            self.opt = self.handle.optimizer(torch.optim.AdamW, lr=1e-5)
        self.model(**batch).last_hidden_state.pow(2).mean().backward()
        self.opt.step()  # lazy optimizer state, gate buffers

    def teardown(self, optimizer: str) -> None:
        if self.handle is not None:
            self.handle.remove()

    def time_step(self, optimizer: str) -> None:
        self.opt.step()
