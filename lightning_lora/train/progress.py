"""``StepProgressBar``: one bar for a fit, counted in optimizer steps: ``step 12/40``, loss, tokens/s, val ppl.

Lightning's bars count batches per epoch (``Epoch 0/-2`` with ``max_steps``, ``6/1`` after a resume) and show
``v_num``. Fine-tuning runs are set by ``max_steps``, so this bar runs from the resumed step to ``max_steps`` (or
``estimated_stepping_batches``); validation runs without a bar, and its perplexity joins the bar's figures.

The time left (``eta``) is the median duration of the steps so far times the steps left, shown from the second step
on: the first step carries one-time work (the first forward's allocations, kernels' set-up, the data loader's
start), and an estimate from it alone said 35 minutes for a 2-minute run. The median ignores a step that ran a
validation.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from tqdm.auto import tqdm

SHOWN = {"train_loss": "loss", "tokens_per_s": "tokens/s", "val_ppl": "val ppl"}


def eta_seconds(durations: list[float], steps_left: int) -> float | None:
    """Seconds left: the median of ``durations`` (the steps after the first) times ``steps_left``; None before one
    such step is known."""
    return statistics.median(durations) * steps_left if durations else None


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class StepProgressBar(ProgressBar):
    """A tqdm bar over optimizer steps with the figures in ``SHOWN`` (no ``v_num``)."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._bar: tqdm | None = None
        self._durations: list[float] = []  # of the steps after the first one of this fit
        self._last: float | None = None
        self._seen = 0

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
                         bar_format="{desc} {n_fmt}/{total_fmt} {bar:20} [{elapsed}]{postfix}")
        self._durations, self._last, self._seen = [], None, trainer.global_step

    def _show(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._bar is None:
            return
        metrics = self.get_metrics(trainer, pl_module)
        shown = {}
        if self._bar.total:
            eta = eta_seconds(self._durations, self._bar.total - trainer.global_step)
            shown["eta"] = _clock(eta) if eta is not None else "-"
        for key, label in SHOWN.items():
            value = metrics.get(key)
            if value is not None:
                value = float(value)
                shown[label] = f"{value:,.0f}" if key == "tokens_per_s" else f"{value:.3f}"
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(trainer.global_step - self._bar.n)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if trainer.global_step > self._seen:  # an optimizer step ended (not an accumulating micro-batch)
            now = time.perf_counter()
            if self._last is not None:
                self._durations.append(now - self._last)
            self._last, self._seen = now, trainer.global_step
        self._show(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._show(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


__all__ = ["StepProgressBar", "eta_seconds"]
