"""``StepProgressBar``: one bar for a fit, counted in optimizer steps: ``step 12/40``, loss, tokens/s, val ppl.

Lightning's bars count batches per epoch (``Epoch 0/-2`` with ``max_steps``, ``6/1`` after a resume) and show
``v_num``. Fine-tuning runs are set by ``max_steps``, so this bar runs from the resumed step to ``max_steps`` (or
``estimated_stepping_batches``); validation runs without a bar, and its perplexity joins the bar's figures.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from tqdm.auto import tqdm

SHOWN = {"train_loss": "loss", "tokens_per_s": "tokens/s", "val_ppl": "val ppl"}


class StepProgressBar(ProgressBar):
    """A tqdm bar over optimizer steps with the figures in ``SHOWN`` (no ``v_num``)."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._bar: tqdm | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._enabled or not trainer.is_global_zero:
            return
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
        total = int(total) if total != float("inf") else None
        self._bar = tqdm(total=total, initial=trainer.global_step, desc="step", unit="step", file=sys.stderr,
                         bar_format="{desc} {n_fmt}/{total_fmt} {bar:20} [{elapsed}<{remaining}]{postfix}")

    def _show(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._bar is None:
            return
        metrics = self.get_metrics(trainer, pl_module)
        shown = {}
        for key, label in SHOWN.items():
            value = metrics.get(key)
            if value is not None:
                value = float(value)
                shown[label] = f"{value:,.0f}" if key == "tokens_per_s" else f"{value:.3f}"
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(trainer.global_step - self._bar.n)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        self._show(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._show(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


__all__ = ["StepProgressBar"]
