"""Stop a run at the first non-finite loss, before it reaches the adapter, and say where it happened."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override


def check_finite_loss(trainer: Trainer, loss: torch.Tensor) -> None:
    """Raise ``FloatingPointError`` naming the step when ``loss`` is NaN or inf (no optimizer step happens then)."""
    if torch.isfinite(loss.detach()).all():
        return
    checkpoints = [cb.last_model_path or cb.best_model_path for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    last_good = next((path for path in checkpoints if path), None)
    raise FloatingPointError(
        f"the training loss became {loss.detach().float().item()} at global step {trainer.global_step} "
        f"(epoch {trainer.current_epoch}); the run was stopped before this step updated the adapter. "
        f"Last good checkpoint: {last_good or 'none saved yet'}. Try a lower learning rate, gradient clipping "
        "(trainer.gradient_clip_val), or check the batch data; resume with --ckpt_path <last good checkpoint>."
    )


class FiniteLossGuard(Callback):
    """Stops training at the first NaN/inf loss with a message naming the step; earlier checkpoints stay as they are.

    Example::

        Trainer(callbacks=[FiniteLossGuard()])
    """

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        check_finite_loss(trainer, loss)
