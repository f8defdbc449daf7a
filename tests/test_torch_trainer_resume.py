"""A Hugging Face Trainer run interrupted at a checkpoint resumes exactly (handle and optimizer state)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rqcore_torch import preserve

transformers = pytest.importorskip("transformers")
from _tiny_bert import TokenLabels, calibration_batches, tiny_bert_classifier  # noqa: E402


def _train(out: Path, method: str, resume: str | None) -> dict[str, torch.Tensor]:
    model = tiny_bert_classifier(dropout=0.0)
    calib = calibration_batches(seed=1)
    # refresh_every=2: bases are re-solved from online task statistics at steps 2, 4 and 6, so an
    # exact resume needs the handle's state in the checkpoint, not only AdamW's moments.
    handle = preserve(model, calib, method=method, refresh_every=2, progress=False, seed=0)
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="steps",
        save_steps=3,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=TokenLabels(32),
        optimizers=(handle.optimizer(torch.optim.AdamW, lr=1e-3), None),
    )
    trainer.train(resume_from_checkpoint=resume)
    handle.remove()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["gate", "nullspace", "folora"])
def test_trainer_resumes_exactly_from_a_checkpoint(tmp_path: Path, method: str) -> None:
    straight = _train(tmp_path / "a", method, None)
    _train(tmp_path / "b", method, None)  # writes checkpoint-3 (and -6) under b/
    resumed = _train(tmp_path / "b", method, str(tmp_path / "b" / "checkpoint-3"))
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)
