"""Ctrl-C and SIGTERM end a fit with a resumable checkpoint, not with lost work.

``Interrupts`` handles SIGINT and SIGTERM. While the training loop runs, the first signal only sets a flag: at the end
of the current step every rank learns of it (one all-reduce of the signal number, so all stop at the same step, even
when the signal reached one rank), a resumable checkpoint is written (``resume.save_resumable``: ``last.ckpt``) and
``Interrupted`` is raised, carrying the signal, the step and the path. A second signal raises it at once, naming the
last checkpoint written before. Outside the training loop (loading, validating, exporting) the first signal raises
it at once. During training it replaces Lightning's own SIGTERM handler, whose exception would exit with status 0.

The command turns ``Interrupted`` into one line with the checkpoint and the exact resume command, and exit status
128 + the signal number (130 for SIGINT, 143 for SIGTERM), as shells report a process killed by that signal.

Example::

    interrupts = Interrupts()
    interrupts.install()          # the whole command: a signal before training stops at once
    Trainer(callbacks=[interrupts]).fit(module)
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lightning_lora.train.guards import last_good_checkpoint
from lightning_lora.train.resume import save_resumable

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A fit stopped by a signal (a ``BaseException``, like ``KeyboardInterrupt``: Lightning passes it through).

    Attributes:
        signum: the signal; ``exit_code`` is 128 + it.
        checkpoint: the resumable checkpoint written (or the last one written before), None when there is none.
        step: the global step the checkpoint holds (None before training).
        saved: True when the checkpoint was written because of this signal.
    """

    def __init__(self, signum: int, checkpoint: str | None = None, step: int | None = None, saved: bool = False):
        self.signum, self.checkpoint, self.step, self.saved = int(signum), checkpoint, step, saved
        super().__init__(f"interrupted by {self.name}")

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Interrupts(Callback):
    """Stop a fit at the end of the step on SIGINT/SIGTERM, with a resumable checkpoint (module docstring)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.armed = False
        self._trainer: Trainer | None = None
        self._previous: dict[int, Any] = {}

    def handle(self, signum: int, frame: Any = None) -> None:
        """The signal handler: note the first signal while training, else stop now."""
        if self.armed and self.signum is None:
            self.signum = signum
            log.warning(f"{signal.Signals(signum).name}: stopping after this step with a checkpoint "
                        "(send it again to stop now).")  # fmt: skip
            return
        trainer = self._trainer
        raise Interrupted(signum, last_good_checkpoint(trainer) if trainer is not None else None,
                          getattr(trainer, "global_step", None))  # fmt: skip

    def install(self) -> None:
        """Make ``handle`` the handler of SIGINT and SIGTERM (main thread only; elsewhere nothing changes)."""
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                previous = signal.signal(signum, self.handle)
                self._previous.setdefault(signum, previous)

    def uninstall(self) -> None:
        """Put back the handlers ``install`` replaced the first time."""
        if threading.current_thread() is threading.main_thread():
            for signum, previous in self._previous.items():
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after Lightning registered its SIGTERM handler; it restores the handlers it replaced at teardown
        self._trainer, self.signum, self.armed = trainer, None, True
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                signal.signal(signum, self.handle)

    def _agreed(self, trainer: Trainer) -> int:
        """The signal any rank received (0: none), the same on every rank."""
        if trainer.world_size == 1:
            return self.signum or 0
        flag = torch.tensor(self.signum or 0, device=trainer.strategy.root_device)
        return int(trainer.strategy.reduce(flag, reduce_op="max"))

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        signum = self._agreed(trainer)
        if not signum:
            return
        self.armed = False  # a signal while saving stops at once
        path = save_resumable(trainer)
        raise Interrupted(signum, path, trainer.global_step, saved=True)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        signum = self._agreed(trainer)  # one that came during the last validation: save, and stop before export
        self.armed = False
        if signum:
            raise Interrupted(signum, save_resumable(trainer), trainer.global_step, saved=True)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.armed = False


__all__ = ["Interrupted", "Interrupts"]
