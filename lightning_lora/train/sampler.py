"""A training order that a checkpoint restores exactly: batches from ``(seed, epoch)``, split over ranks, resumable.

Lightning 2.6 saves the state of any training loader that has ``state_dict``/``load_state_dict`` (its ``_Stateful``
protocol) in the checkpoint (``loops.fit_loop.state_dict.combined_loader``) and loads it before the resumed epoch
starts; a plain ``DataLoader`` has no state, so a resumed run used to start its epoch again from batch 0.

- ``EpochSampler``: each epoch's batches are a pure function of ``(seed, epoch)``: a seeded permutation cut into
  batches, or, given the examples' lengths, batches grouped by length (``packing.length_grouped_batches``). Nothing is
  drawn from the global RNGs, so the order does not depend on what else consumed them. Under DDP/FSDP the batches go
  to the ranks in turn (rank r gets batches r, r + W, ...; the list is padded by repeating its first batches so every
  rank makes the same number of steps). It is a ``DistributedSampler``, so Lightning keeps it instead of wrapping it
  in another one that would shuffle again (and undo the grouping). A batch shorter than ``batch_size`` (at most one)
  goes last, so the loader's batching keeps every batch whole.
- ``ResumableLoader``: a ``DataLoader`` with that protocol: ``{"epoch", "batches"}``, the batches it yielded in the
  current epoch; after ``load_state_dict`` its next pass starts right after them (an epoch that had ended starts
  the next one). Only the indices are skipped: no skipped example is loaded or collated.

torchdata's ``StatefulDataLoader`` (0.11, installs beside torch 2.13) restores ``RandomSampler`` state, but under
DDP Lightning swaps in a ``DistributedSampler`` it cannot restore, and that sampler's fast-forward runs before
Lightning sets the resumed epoch; the order here needs neither.

Example::

    sampler = EpochSampler(len(data), batch_size=8, seed=0)
    loader = ResumableLoader(data, batch_size=8, sampler=sampler)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from lightning_lora.train.packing import length_grouped_batches, shuffled_batches


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class EpochSampler(DistributedSampler):
    """Seeded epoch order of ``size`` examples in batches of ``batch_size`` (see the module docstring).

    Args:
        size: the number of examples.
        batch_size: examples per batch (per rank).
        seed: the order of epoch e comes from ``seed`` and e only.
        lengths: the examples' lengths: group batches by length (``packing.length_grouped_batches``); None: shuffle.
        num_replicas, rank: the data-parallel ranks; default: ``torch.distributed``'s when used (1 and 0 when not
            started).

    Without ``set_epoch`` (Lightning calls it), each pass moves to the next epoch.
    """

    def __init__(self, size: int, batch_size: int, seed: int = 0, lengths: Sequence[int] | None = None,
                 num_replicas: int | None = None, rank: int | None = None):  # fmt: skip
        # DistributedSampler.__init__ needs a started process group and a dataset: its attributes are set here,
        # the ranks read from torch.distributed when first used (a loader may be built before the group starts).
        self._replicas, self._rank = num_replicas, rank
        if lengths is not None and len(lengths) != size:
            raise ValueError(f"EpochSampler: {len(lengths)} lengths for {size} examples.")
        if batch_size < 1 or (rank is not None and not 0 <= rank < (num_replicas or 1)):
            raise ValueError(f"EpochSampler: batch_size {batch_size}, rank {rank} of {num_replicas}.")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.lengths = None if lengths is None else list(lengths)
        self.epoch, self.shuffle, self.drop_last = 0, True, False
        self.start = 0  # this rank's batches to skip once, on the next pass (``ResumableLoader.load_state_dict``)
        self.pass_epoch: int | None = None  # the epoch and the skipped batches of the pass under way
        self.pass_start = 0
        self._epoch_set = False

    @property
    def num_replicas(self) -> int:
        return _world()[0] if self._replicas is None else self._replicas

    @property
    def rank(self) -> int:
        return _world()[1] if self._rank is None else self._rank

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._epoch_set = epoch, True

    def batches(self, epoch: int) -> list[list[int]]:
        """Every rank's batches of ``epoch``, in order; the short batch, if any, last."""
        if self.lengths is not None:
            out = length_grouped_batches(self.lengths, self.batch_size, self.seed, epoch)
        else:
            out = shuffled_batches(self.size, self.batch_size, self.seed, epoch)
        return sorted(out, key=lambda b: len(b) < self.batch_size)  # stable: only the short one moves

    def rank_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch``."""
        out, world = self.batches(epoch), self.num_replicas
        per_rank = -(-len(out) // world)
        out = out + (out * per_rank)[: per_rank * world - len(out)]
        return out[self.rank :: world]

    def __len__(self) -> int:
        return sum(len(b) for b in self.rank_batches(self.epoch))

    def __iter__(self) -> Iterator[int]:
        batches = self.rank_batches(self.epoch)
        self.pass_epoch, self.pass_start, self.start = self.epoch, self.start, 0
        if not self._epoch_set:
            self.epoch += 1
        return iter([i for b in batches[self.pass_start :] for i in b])


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over an ``EpochSampler`` whose position Lightning saves and restores (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, EpochSampler):
            raise TypeError(f"ResumableLoader needs an EpochSampler, got {type(self.sampler).__name__}.")
        self._pass = None  # the iterator of the current pass: it counts the batches it yielded

    def __iter__(self):
        self.sampler.pass_epoch = None  # set when the sampler starts the pass (lazily, at the first batch)
        self._pass = super().__iter__()
        return self._pass

    def state_dict(self) -> dict[str, int]:
        sampler = self.sampler
        if self._pass is None or sampler.pass_epoch is None:  # no pass under way
            return {"epoch": int(sampler.epoch), "batches": int(sampler.start)}
        return {"epoch": int(sampler.pass_epoch), "batches": sampler.pass_start + int(self._pass._num_yielded)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, done = int(state["epoch"]), int(state["batches"])
        if done >= len(self):  # the epoch had ended: the next pass is the next epoch's first
            epoch, done = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self.sampler.start, self.sampler.pass_epoch = done, None
        self._pass = None


__all__ = ["EpochSampler", "ResumableLoader"]
