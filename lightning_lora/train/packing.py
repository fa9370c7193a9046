"""Batches with little padding: padding-free packing, or batches grouped by length.

**Packing** (``InstructionDataModule(packing=True)``): the ``batch_size`` examples of a batch are laid end to end into
as few rows of at most ``pack_length`` tokens (default ``batch_size * max_length``: one row, no padding at all) as
first-fit decreasing finds, so a batch still holds exactly ``batch_size`` examples (the examples per optimizer step
do not change) but fewer, fuller rows. The rows carry ``position_ids`` that restart at 0 for each example and no
``attention_mask``. A model running ``train/attention.py``'s packed attention (LoRAModule's) attends within each
example at the example's own cost; any other transformers model (>= 4.44; checked with sdpa and eager on CPU in
transformers 5) finds the boundaries from the restarts (``masking_utils.find_packed_sequence_indices``) and builds a
block-diagonal causal mask, so no token attends across examples either way. The first label of each example is set
to -100, so no example is asked to predict the next one's first token (as transformers' ``DataCollatorWithFlattening``
does); unpacked, that label is never predicted either. Rows are right-padded to the longest row with positions
restarting at 0, so the padding is a block of its own.

**Shared prefix** (``share_prefix=True``): the longest start that all the batch's examples have in common and that
carries no label (``shared_prefix_length``) is held once at the head of each row; each example continues it, its
own tokens at positions p, p + 1, ... (only packed attention reads rows this way; ``causal_lm_loss`` refuses them
for other models).

**Grouping by length** (``packing=False``): shuffled indices are cut into mega-batches of 50 batches, each sorted by
length, cut into batches, and the batches are shuffled, so a batch pads to a length close to its members' (the
scheme of Hugging Face's ``group_by_length``). ``train/sampler.py`` turns these batches into a resumable sampler.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

log = logging.getLogger(__name__)
IGNORE = -100
MEGABATCHES = 50


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` packed into rows of at most ``capacity`` (first-fit decreasing); longer items alone."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def shared_prefix_length(batch: list[dict[str, torch.Tensor]]) -> int:
    """The longest p such that every example starts with the same p tokens, none of them labeled nor the token after
    them (labels[1..p] are all -100: the prefix's positions predict nothing), and every example keeps a token of its
    own after the prefix."""
    if len(batch) < 2:
        return 0
    first = batch[0]["input_ids"]
    limit = min(len(b["input_ids"]) for b in batch) - 1
    same = torch.ones(limit, dtype=torch.bool)
    for b in batch:
        same &= (b["input_ids"][:limit] == first[:limit]) & (b["labels"][1 : limit + 1] == IGNORE)
    return limit if bool(same.all()) else int((~same).nonzero()[0])


def collate_packed(batch: list[dict[str, torch.Tensor]], pad_id: int, capacity: int,
                   share_prefix: bool = False) -> dict[str, torch.Tensor]:
    """Pack ``batch`` into rows of at most ``capacity`` tokens: input_ids, labels, position_ids (restarting per
    example), and ``num_tokens`` (the examples' tokens); no attention_mask (see the module docstring).

    With ``share_prefix`` the examples' common unlabeled prefix (``shared_prefix_length``) starts each row once and
    every example continues it: its remaining tokens carry position ids p, p + 1, ... (``train/attention.py``).
    """
    p = shared_prefix_length(batch) if share_prefix else 0
    rows = first_fit([len(b["input_ids"]) - p for b in batch], capacity - p)
    width = max(p + sum(len(batch[i]["input_ids"]) - p for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, :p], pos[r, :p] = batch[0]["input_ids"][:p], torch.arange(p)
        start = p
        for i in row:
            k = len(batch[i]["input_ids"])
            ids[r, start : start + k - p] = batch[i]["input_ids"][p:]
            labels[r, start + 1 : start + k - p] = batch[i]["labels"][p + 1 :]
            pos[r, start : start + k - p] = torch.arange(p, k)
            start += k - p
        pos[r, start:] = torch.arange(width - start)
    return {"input_ids": ids, "labels": labels, "position_ids": pos,
            "num_tokens": torch.tensor(sum(len(b["input_ids"]) for b in batch))}


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100003 + epoch)


def shuffled_batches(size: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """A seeded permutation of ``range(size)`` for ``epoch``, cut into batches of ``batch_size`` (the last shorter)."""
    order = torch.randperm(size, generator=_epoch_generator(seed, epoch)).tolist()
    return [order[i : i + batch_size] for i in range(0, size, batch_size)]


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of ``epoch`` in which every batch has similar lengths (see the module docstring); deterministic per
    ``seed`` and ``epoch``. Only the last mega-batch can leave a batch shorter than ``batch_size``."""
    g = _epoch_generator(seed, epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    size = batch_size * MEGABATCHES
    out = []
    for start in range(0, len(order), size):
        mega = sorted(order[start : start + size], key=lambda i: -lengths[i])
        out += [mega[j : j + batch_size] for j in range(0, len(mega), batch_size)]
    return [out[i] for i in torch.randperm(len(out), generator=g).tolist()]


def padding_share(lengths: Sequence[int], batches: list[list[int]], capacity: int | None = None) -> float:
    """Share of padding positions when each batch is padded to its longest example, or, with ``capacity``, packed
    into rows of at most ``capacity`` tokens and padded to the longest row."""
    real = padded = 0
    for b in batches:
        lens = [lengths[i] for i in b]
        if capacity is None:
            rows, width = len(lens), max(lens)
        else:
            packed = first_fit(lens, capacity)
            rows, width = len(packed), max(sum(lens[i] for i in row) for row in packed)
        real, padded = real + sum(lens), padded + rows * width
    return 1 - real / padded if padded else 0.0


def log_padding(lengths: Sequence[int], batch_size: int, seed: int, packing: bool, capacity: int) -> None:
    """One log line: the padding share of random batches padded to the longest, and of the batches used instead."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=g).tolist()
    random = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    before = padding_share(lengths, random)
    if packing:
        after = padding_share(lengths, random, capacity)
        how = f"packed ({batch_size} examples per batch in rows of up to {capacity} tokens)"
    else:
        after = padding_share(lengths, length_grouped_batches(lengths, batch_size, seed, 0))
        how = "batches grouped by length"
    log.info(f"padding: {100 * before:.1f}% of positions in random batches padded to the longest; "
             f"{100 * after:.1f}% with {how}.")


def log_shared_prefix(data: Sequence[dict[str, torch.Tensor]], batch_size: int, seed: int) -> None:
    """One log line: the share of the examples' positions that a shared prefix per batch leaves out (random batches)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=g).tolist()
    batches = [[data[i] for i in order[j : j + batch_size]] for j in range(0, len(order), batch_size)]
    total = sum(len(x["input_ids"]) for x in data)
    saved = sum((len(b) - 1) * shared_prefix_length(b) for b in batches)
    log.info(f"shared prefix: {100 * saved / max(total, 1):.1f}% of the examples' positions are a prompt prefix that "
             "another example of the batch already holds; each row holds it once.")


__all__ = ["collate_packed", "first_fit", "length_grouped_batches", "log_padding", "log_shared_prefix", "padding_share",
           "shared_prefix_length", "shuffled_batches"]
