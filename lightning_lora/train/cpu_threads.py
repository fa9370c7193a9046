"""CPU threads that follow the machine's load during a fit: as many as the cores that other processes leave free.

A parallel region of torch's CPU kernels ends when its slowest thread does. With ``n`` threads on ``n`` cores and
one busy process beside them, one of our threads shares its core and gets half of it, so every region waits for it:
on the 2-core machine of the README the quickstart's fit took 4.6x its quiet time with one busy neighbour, and 1.3x
with one thread. So, between training steps, ``FollowLoad`` measures how many cores the other processes kept busy
over the last interval,

    others = (machine busy CPU time - this process's CPU time) / wall time      (from /proc/stat and os.times)

and sets ``torch.set_num_threads(clamp(cores - round(others), 1, most))`` (``most``: the cores, by default), so it
also goes back up when the neighbour stops. Our own threads, spinning or not, never count as others', so the measure
does not depend on the count it sets. What a step computes does not depend on the thread count beyond float
summation order. Linux only (elsewhere it does nothing); the commands add it on CPU when they chose the thread count
themselves (``commands/threads.py``).
"""

from __future__ import annotations

import logging

import torch
from lightning.pytorch import Callback

from lightning_lora.core.cpu_load import Sample, others_cores, sample, threads_for, usable_cores

log = logging.getLogger(__name__)


class FollowLoad(Callback):
    """Set torch's CPU thread count between training steps from the last ``min_seconds`` or more of wall time
    (module docstring); one log line at each change."""

    def __init__(self, cores: int | None = None, min_seconds: float = 2.0, most: int | None = None):
        self.cores = cores or usable_cores()
        self.min_seconds, self.most = min_seconds, most or self.cores
        self.last: Sample | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.last = sample() if trainer.strategy.root_device.type == "cpu" else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.last is None:
            return
        now = sample()
        if now is None or now.wall - self.last.wall < self.min_seconds:
            return
        others = others_cores(self.last, now)
        self.last = now
        wanted = threads_for(self.cores, others, self.most)
        if wanted != torch.get_num_threads():
            log.info("CPU threads %d -> %d: other processes kept %.1f of %d cores busy", torch.get_num_threads(),
                     wanted, others, self.cores)
            torch.set_num_threads(wanted)

    def on_train_end(self, trainer, pl_module) -> None:
        self.last = None  # the count stays: the final validation and the export meet the same neighbours


__all__ = ["FollowLoad"]
