"""Checkpoints that resume exactly, written often enough, into the run's own folder.

A resumed fit equals the uninterrupted one step for step when the checkpoint holds everything training reads:

- the adapter and the optimizer state (``LoRAModule``), and the loop counters (Lightning);
- the loader's position in its epoch (``train/sampler.py``; Lightning saves any loader with ``state_dict``);
- every RNG training draws from, per rank: torch's CPU generator (adapter dropout), CUDA's, numpy's and Python's
  (``ExactResume``). They are put back when training starts, after the model was loaded and validated, so nothing
  drawn before the first resumed step shifts them. Lightning restores none of them by itself.

``RunCheckpoint`` (a ``ModelCheckpoint``): besides saving after each validation (top-k and ``last.ckpt``), it writes
``last.ckpt`` every ``every_n_steps`` steps and every ``every_minutes`` minutes, and at the end of training when
the last step was not saved; a step that validates right after is saved after that validation (which
``FiniteLossGuard`` checks first). When a resumed fit writes into the folder it resumes from, it does not warn that
the folder is not empty, nor that its name changed (a relative and an absolute name of one folder).

``run_folder(ckpt_path)``: the logger's version folder a checkpoint belongs to (``.../version_3`` for
``.../version_3/checkpoints/last.ckpt``), so the CLI can resume into it; ``discard_empty_run`` removes the folder of
a run that failed before writing a checkpoint or training a step (plots then never see empty runs).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

log = logging.getLogger(__name__)
NOT_EMPTY = r"Checkpoint directory .* exists and is not empty"  # Lightning's warning; expected when resuming into it


# ------------------------------------------------------------------------------------------------------------ RNGs
def rng_state() -> dict[str, Any]:
    """This process's RNG states, in types a ``weights_only`` load accepts (tensors, tuples, ints)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        return state
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back the states ``rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


class ExactResume(Callback):
    """Save every rank's RNG states in each checkpoint; put this rank's back when a resumed fit starts training.

    A checkpoint from another number of ranks cannot be exact: its states are then left out, with a warning.
    """

    def __init__(self) -> None:
        self._pending: list[dict] | None = None

    @override
    def state_dict(self) -> dict[str, Any]:
        state = rng_state()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, state)  # checkpoints are assembled on every rank
            return {"rng": states}
        return {"rng": [state]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        states, self._pending = self._pending, None
        if not states:
            return
        if len(states) != trainer.world_size:
            log.warning(f"the checkpoint holds RNG states of {len(states)} ranks, this run has {trainer.world_size}: "
                        "dropout and other random draws will differ from the uninterrupted run.")  # fmt: skip
            return
        set_rng_state(states[trainer.global_rank])


# ----------------------------------------------------------------------------------------------------- checkpoints
class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also writes ``last.ckpt`` periodically and at the end (module docstring).

    Args:
        every_n_steps: write ``last.ckpt`` after every this many optimizer steps (None: not by steps).
        every_minutes: write it when this many minutes passed since the last write (None: not by time).
        **kwargs: ``ModelCheckpoint``'s (``dirpath``, ``save_top_k``, ...); ``save_last`` is True.

    Example::

        Trainer(callbacks=[RunCheckpoint(every_n_steps=50, every_minutes=10)])
    """

    def __init__(self, every_n_steps: int | None = None, every_minutes: float | None = None, **kwargs: Any):
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive number of steps or None, got {every_n_steps}.")
        if every_minutes is not None and not every_minutes > 0:
            raise ValueError(f"every_minutes must be a positive number of minutes or None, got {every_minutes}.")
        kwargs.setdefault("save_last", True)
        super().__init__(**kwargs)
        self.every_n_steps, self.every_minutes = every_n_steps, every_minutes
        self._last_write = time.monotonic()

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        with warnings.catch_warnings():
            if _resuming_into(trainer, self.dirpath or ""):
                warnings.filterwarnings("ignore", message=NOT_EMPTY)
            super().setup(trainer, pl_module, stage)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_write = time.monotonic()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("dirpath")
        if saved and self.dirpath and os.path.realpath(saved) == os.path.realpath(self.dirpath):
            state_dict = {**state_dict, "dirpath": self.dirpath}  # the same folder, named relative or absolute
        super().load_state_dict(state_dict)

    def _validates_now(self, trainer: Trainer) -> bool:
        """This step is the last, or a step-counted validation follows it: it is saved after that validation."""
        step = trainer.global_step
        interval = trainer.val_check_interval
        counted = isinstance(interval, int) and trainer.check_val_every_n_epoch is None and trainer.limit_val_batches
        return 0 < trainer.max_steps <= step or bool(counted and step % interval == 0)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        if self._should_skip_saving_checkpoint(trainer) or self._validates_now(trainer):
            return
        due = bool(self.every_n_steps) and trainer.global_step % self.every_n_steps == 0
        if self.every_minutes is not None:
            late = time.monotonic() - self._last_write >= 60 * self.every_minutes
            due = due or bool(trainer.strategy.broadcast(late))  # rank 0's clock decides for every rank
        if due:
            self.save_last_now(trainer)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.save_last and self.saved_step != trainer.global_step and not trainer.sanity_checking:
            self.save_last_now(trainer)

    @property
    def saved_step(self) -> int:
        """The global step of the last checkpoint this callback wrote."""
        return self._last_global_step_saved

    def save_last_now(self, trainer: Trainer) -> str:
        """Write ``last.ckpt`` now (every rank calls it); return its path."""
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_write = time.monotonic()
        return self.last_model_path


def _resuming_into(trainer: Trainer, folder: str) -> bool:
    ckpt = getattr(trainer, "ckpt_path", None)
    if not ckpt or not folder or not os.path.isfile(ckpt):
        return False
    return Path(ckpt).resolve().parent == Path(folder).resolve()


def save_resumable(trainer: Trainer) -> str:
    """Write a resumable checkpoint now (every rank calls it) and return its path: ``last.ckpt`` of the run's
    checkpoint callback (nothing new when it wrote this step already), else ``<default_root_dir>/last.ckpt``."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, RunCheckpoint):
        if callback.saved_step == trainer.global_step and callback.last_model_path:
            return callback.last_model_path
        return callback.save_last_now(trainer)
    folder = callback.dirpath if isinstance(callback, ModelCheckpoint) and callback.dirpath else trainer.default_root_dir
    path = os.path.join(folder, "last.ckpt")
    if trainer.is_global_zero and os.path.islink(path):  # never write through a link into another checkpoint
        os.remove(path)
    trainer.strategy.barrier("save_resumable")
    trainer.save_checkpoint(path)
    return path


# ---------------------------------------------------------------------------------------------------- run folders
def run_folder(ckpt_path: str | os.PathLike | None) -> Path | None:
    """The logger's version folder of a checkpoint written into ``<version folder>/checkpoints/`` (None otherwise)."""
    if not ckpt_path or not os.path.isfile(ckpt_path):
        return None
    folder = Path(ckpt_path).parent  # as given: the checkpoint callback's folder is then named alike
    folder = folder if folder.name == "checkpoints" else Path(ckpt_path).resolve().parent
    if folder.name != "checkpoints":
        return None
    run = folder.parent
    marks = ("config.yaml", "hparams.yaml", "metrics.csv")
    return run if any((run / m).is_file() for m in marks) or any(run.glob("events.out.tfevents.*")) else None


def discard_empty_run(log_dir: str | os.PathLike | None, trained: bool) -> bool:
    """Remove ``log_dir`` when it holds no checkpoint and no step was trained; True when it was removed."""
    if not log_dir or trained or not os.path.isdir(log_dir) or any(Path(log_dir).rglob("*.ckpt")):
        return False
    shutil.rmtree(log_dir, ignore_errors=True)
    log.info(f"removed {log_dir}: the run failed before it trained a step or wrote a checkpoint.")
    return True


__all__ = ["NOT_EMPTY", "ExactResume", "RunCheckpoint", "discard_empty_run", "rng_state", "run_folder", "save_resumable",
           "set_rng_state"]
