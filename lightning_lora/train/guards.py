"""Guards of a run's outputs: no non-finite step, validation or adapter reaches a checkpoint, one fit per export_dir.

- ``FiniteLossGuard``: the first NaN/inf training loss stops the run before its backward (the adapter is unchanged);
  a non-finite validation loss during ``fit`` (e.g. after a step whose update overflowed the model: the adapter's
  values can stay finite while every logit is NaN) stops it before any checkpoint callback saves that adapter. Both
  errors name the step and the last good checkpoint.
- ``check_finite_adapter``: called where a checkpoint is assembled (``LoRAModule.on_save_checkpoint``,
  ``AdapterCallback``): a non-finite trainable tensor refuses the save on every rank, so a good ``last.ckpt`` is never
  replaced by a NaN one.
- ``ExportDirLock``: rank 0 holds ``<export_dir>.lock`` (``io/lock.py``) from the fit's setup to its teardown; a second
  fit into the same folder refuses, naming the holder.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from lightning_lora.io.lock import FolderLock


def last_good_checkpoint(trainer: Trainer) -> str | None:
    """The newest checkpoint a ``ModelCheckpoint`` of ``trainer`` wrote (None when none was)."""
    paths = [cb.last_model_path or cb.best_model_path for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    return next((path for path in paths if path), None)


def check_finite_loss(trainer: Trainer, loss: torch.Tensor) -> None:
    """Raise ``FloatingPointError`` naming the step when ``loss`` is NaN or inf (no optimizer step happens then)."""
    if torch.isfinite(loss.detach()).all():
        return
    raise FloatingPointError(
        f"the training loss became {loss.detach().float().item()} at global step {trainer.global_step} "
        f"(epoch {trainer.current_epoch}); the run was stopped before this step updated the adapter. "
        f"Last good checkpoint: {last_good_checkpoint(trainer) or 'none saved yet'}. Try a lower learning rate, "
        "gradient clipping (trainer.gradient_clip_val), or check the batch data; resume with --ckpt_path <last good "
        "checkpoint>."
    )


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor  # an FSDP2 shard: this rank's rows


def check_finite_adapter(trainer: Trainer | None, module: torch.nn.Module) -> None:
    """Raise ``FloatingPointError`` naming the step and the first bad tensor when a trainable parameter of ``module``
    holds NaN/inf on any rank (every rank decides alike: call it on every rank, as checkpoint hooks run)."""
    bad = next((name for name, p in module.named_parameters()
                if p.requires_grad and not bool(torch.isfinite(_local(p.detach())).all())), None)  # fmt: skip
    anywhere = bad is not None
    if trainer is not None and trainer.world_size > 1:
        anywhere = trainer.strategy.reduce_boolean_decision(anywhere, all=False)
    if not anywhere:
        return
    step = trainer.global_step if trainer is not None else "?"
    last = last_good_checkpoint(trainer) if trainer is not None else None
    raise FloatingPointError(
        f"the adapter holds NaN/inf after global step {step} ({bad or 'on another rank'}), so no checkpoint was "
        f"written; the last good one is {last or 'none saved yet'}. Try a lower learning rate or gradient clipping "
        "(trainer.gradient_clip_val), and resume with --ckpt_path <last good checkpoint>."
    )


class FiniteLossGuard(Callback):
    """Stops training at the first NaN/inf loss, or NaN/inf validation loss during fit, naming the step; earlier
    checkpoints stay as they are.

    Example::

        Trainer(callbacks=[FiniteLossGuard()])
    """

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        check_finite_loss(trainer, loss)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning runs checkpoint callbacks last, so this comes before any save of this validation's adapter.
        value = trainer.callback_metrics.get("val_loss")
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or value is None:
            return
        if torch.isfinite(torch.as_tensor(value)).all():
            return
        raise FloatingPointError(
            f"the validation loss became {float(value)} after global step {trainer.global_step} (epoch "
            f"{trainer.current_epoch}): the model's outputs are not finite, and this adapter was neither "
            f"checkpointed nor exported. Last good checkpoint: {last_good_checkpoint(trainer) or 'none saved yet'}. "
            "Try a lower learning rate or gradient clipping (trainer.gradient_clip_val), and resume with "
            "--ckpt_path <last good checkpoint>."
        )


class ExportDirLock(Callback):
    """One fit per ``export_dir``: global rank 0 holds its lock from ``setup("fit")`` to teardown (or an error).

    Raises:
        FolderInUseError: (at setup) another live run holds the lock.
    """

    def __init__(self, export_dir: str | None):
        self.lock = FolderLock(export_dir) if export_dir else None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self.lock is not None and trainer.is_global_zero and not self.lock.held:
            self.lock.acquire()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.lock is not None:
            self.lock.release()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")
