"""What a run reports: a validation at its very end, and a one-screen summary of it.

- ``ValidateAtEnd``: Lightning validates every ``val_check_interval`` batches, so a run that stops before the first
  interval (``max_steps: 10`` with ``val_check_interval: 40``) never validates, and a checkpoint callback that saves
  after validation never saves. Asking the trainer to stop (``trainer.should_stop``) on the last step makes Lightning
  run its validation there (its rule for early stopping), so every fit ends with a validation and a checkpoint.
- ``RunSummary``: counts steps, tokens (``attention_mask`` ones, else every id), the wall time of the training loop
  and the time inside training steps (tokens/s is counted on the latter), keeps the first and last optimizer step's
  training loss (the logged ``train_loss``: with ``TokenWeightedLoss`` the step's token-weighted mean, where
  ``training_step`` returns each micro-batch's sum; for a module that logs no ``train_loss``, what the step's last
  micro-batch returned), and gives ``summary_lines``: steps, time, tokens/s, validation loss and perplexity before
  and after, where the checkpoint, the exports and the logs are, and how to look at the curves.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class ValidateAtEnd(Callback):
    """Make the last training step (``max_steps``, or the last batch of the last epoch) run a validation."""

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        last_step = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
        last_epoch = trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1
        last_batch = isinstance(trainer.num_training_batches, int) and batch_idx + 1 >= trainer.num_training_batches
        if last_step or (last_epoch and last_batch):
            trainer.should_stop = True  # Lightning validates when a run is asked to stop (then it stops anyway)


def _batch_tokens(batch: Any) -> int:
    if isinstance(batch, dict):
        mask = batch.get("attention_mask")
        if torch.is_tensor(mask):
            return int(mask.sum())
        ids = batch.get("input_ids")
        if torch.is_tensor(ids):
            return ids.numel()
    return 0


def _float(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class RunSummary(Callback):
    """Collect the facts of a fit for ``summary_lines`` (see the module docstring)."""

    def __init__(self, loss_key: str = "train_loss") -> None:
        self.loss_key = loss_key  # the logged step loss shown (see the module docstring)
        self.before: dict[str, float] = {}
        self.after: dict[str, float] = {}
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.tokens = 0
        self.steps = 0
        self.start_step = 0
        self.seconds = 0.0  # wall time of the fit's training loop (validations included)
        self.step_seconds = 0.0  # time inside training steps only: tokens/s is counted on it
        self._t0: float | None = None
        self._batch_t0: float | None = None
        self._step_before = 0  # the global step when the current batch started

    def set_before(self, metrics: dict[str, Any]) -> None:
        """The validation metrics before training (the CLI runs that validation)."""
        self.before = {k: v for k, v in ((k, _float(v)) for k, v in metrics.items()) if v is not None}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start_step = trainer.global_step
        self._t0 = time.perf_counter()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_t0 = time.perf_counter()
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if self._batch_t0 is not None:
            self.step_seconds += time.perf_counter() - self._batch_t0
        self.tokens += _batch_tokens(batch)
        if trainer.global_step == self._step_before:
            return  # no optimizer step after this micro-batch: the step's loss is known at its last one
        loss = trainer.callback_metrics.get(self.loss_key)  # logged before the optimizer step (step_loss.py)
        if loss is None:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        loss = _float(loss.detach()) if torch.is_tensor(loss) else None
        if loss is not None:
            self.first_loss = loss if self.first_loss is None else self.first_loss
            self.last_loss = loss

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._t0 is not None:
            self.seconds = time.perf_counter() - self._t0
        self.steps = trainer.global_step - self.start_step
        self.after = {k: v for k, v in ((k, _float(v)) for k, v in trainer.callback_metrics.items()
                                        if k.startswith("val_")) if v is not None}  # fmt: skip

    def summary_lines(self, trainer: Trainer, export_dir: str | None = None) -> list[str]:
        """The run in a few lines: what was done, how well, and where everything is."""
        rate = f"{self.tokens / self.step_seconds:,.1f} tokens/s" if self.step_seconds > 0 else "- tokens/s"
        lines = [f"steps {self.start_step} -> {trainer.global_step} ({self.steps} this run) in {self.seconds:.1f} s "
                 f"({self.step_seconds:.1f} s training), {self.tokens:,} tokens, {rate}"]  # fmt: skip
        if self.first_loss is not None:
            lines.append(f"train loss {self.first_loss:.4f} (first step) -> {self.last_loss:.4f} (last step)")
        for key in ("val_loss", "val_ppl"):
            if key in self.before or key in self.after:
                b, a = self.before.get(key), self.after.get(key)
                lines.append(f"{key:<8} before {b:.4f}" if b is not None else f"{key:<8} before -")
                lines[-1] += f" -> after {a:.4f}" if a is not None else " -> after -"
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or getattr(
            trainer.checkpoint_callback, "best_model_path", "")
        lines.append(f"checkpoint  {ckpt}" if ckpt else "checkpoint  (none written)")
        exported = getattr(trainer.lightning_module, "exported", None) if trainer.lightning_module else None
        if exported:  # what the export wrote, e.g. {"peft": out/adapter, "gguf": out/adapter.gguf}
            lines.append("exports     " + ", ".join(f"{path} ({spec})" for spec, path in exported.items()))
        elif export_dir:
            lines.append(f"exports     {Path(export_dir)} (none written)")
        log_dir = getattr(trainer.logger, "log_dir", None) if trainer.logger is not None else None
        if log_dir:
            lines.append(f"logs        {log_dir}")
            if type(trainer.logger).__name__ == "TensorBoardLogger":
                lines.append(f"curves      tensorboard --logdir {log_dir}")
                lines.append(f"            (or a PNG: python -m lightning_lora plot {log_dir})")
        return lines


__all__ = ["RunSummary", "ValidateAtEnd"]
