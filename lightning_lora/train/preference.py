"""Preference pairs for DPO (``train/dpo.py``): ``{prompt, chosen, rejected}`` JSONL, or a built-in set.

Each pair becomes two conversations, the prompt with the chosen reply and the prompt with the rejected one, rendered
and tokenized as ``train/data.py`` does (chat template, labels on the reply only). A batch of B pairs holds the B
chosen sequences, then the B rejected ones: padded to the longest (``attention_mask``), or packed end to end
(``packing: true``, ``train/packing.py``: position ids restart per sequence, no padding inside a row). Either way
``example_ids`` gives each position's sequence (0..2B-1, -1 for padding) and ``num_pairs`` is B.

Built-in ``source: chatterbot``: each chatterbot-corpus prompt with its own response as chosen and the response of
another pair as rejected (a seeded derangement; pairs whose two responses are the same text are left out), so a
model learns to prefer the answer that belongs to the question. Offline, 2,393 pairs.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lightning_lora.train.conversations import read_text
from lightning_lora.train.data import _TokenizedDataModule, chatterbot_pairs, collate, tokenize_conversations
from lightning_lora.train.packing import collate_packed

Pair = tuple[list[dict[str, str]], list[dict[str, str]]]


def read_pairs(path: str | Path) -> list[Pair]:
    """``(chosen conversation, rejected conversation)`` per JSONL line ``{"prompt", "chosen", "rejected"}``; a bad
    line raises ``ValueError`` naming the file and line."""
    pairs = []
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg}). Each line must be one object.") from err
        if not (isinstance(row, dict) and all(isinstance(row.get(k), str) for k in ("prompt", "chosen", "rejected"))):
            got = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"{path}:{lineno}: expected string keys 'prompt', 'chosen' and 'rejected'; got {got}.")
        pairs.append(_pair(row["prompt"], row["chosen"], row["rejected"]))
    return pairs


def _pair(prompt: str, chosen: str, rejected: str) -> Pair:
    user = {"role": "user", "content": prompt}
    return [user, {"role": "assistant", "content": chosen}], [user, {"role": "assistant", "content": rejected}]


def chatterbot_preferences(seed: int = 0) -> list[Pair]:
    """Chatterbot prompts, their own response chosen, another pair's response rejected (module docstring)."""
    convs = chatterbot_pairs()
    n = len(convs)
    shift = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    other = {int(shift[i]): int(shift[(i + 1) % n]) for i in range(n)}  # a cycle through a random order: no fixed point
    pairs = []
    for i, conv in enumerate(convs):
        chosen, rejected = conv[1]["content"], convs[other[i]][1]["content"]
        if chosen.strip() != rejected.strip():
            pairs.append(_pair(conv[0]["content"], chosen, rejected))
    return pairs


def collate_pairs(batch: list[dict], pad_id: int, packing: bool = False, capacity: int | None = None) -> dict:
    """B pairs -> one batch of 2B sequences (chosen 0..B-1, rejected B..2B-1), with ``example_ids`` and ``num_pairs``."""
    seqs = [p["chosen"] for p in batch] + [p["rejected"] for p in batch]
    if not packing:
        out = collate(seqs, pad_id)
        ids = torch.arange(len(seqs))[:, None].expand_as(out["input_ids"])
        out["example_ids"] = torch.where(out["attention_mask"] == 1, ids, -1)
    else:
        capacity = capacity or sum(len(s["input_ids"]) for s in seqs)
        out = collate_packed(seqs, pad_id, capacity)
        # the same packing of the sequences' indices (equal lengths, so equal rows) says which sequence is where
        tags = [{"input_ids": torch.full_like(s["input_ids"], i), "labels": s["labels"]} for i, s in enumerate(seqs)]
        out["example_ids"] = collate_packed(tags, -1, capacity)["input_ids"]
    out["num_pairs"] = torch.tensor(len(batch))
    return out


class PreferenceDataModule(_TokenizedDataModule):
    """Preference pairs for ``DPOModule``.

    Args:
        path: a JSONL file of ``{"prompt", "chosen", "rejected"}`` lines.
        source: ``"chatterbot"`` (built in, module docstring) when ``path`` is None, or the path of a JSONL file.
        tokenizer: alias or model folder; None: the LightningModule's ``.tokenizer``.
        max_length: longer sequences are truncated; a pair whose chosen or rejected reply loses every token is left out.
        batch_size: pairs per batch (2 x batch_size sequences).
        packing: lay the batch's 2 x batch_size sequences end to end (rows of up to ``pack_length`` tokens, default
            all of them in one row).
        val_fraction, seed, num_workers, limit: as for ``InstructionDataModule``.
    """

    SOURCES = ("chatterbot",)

    def __init__(self, path: str | None = None, source: str | None = "chatterbot", tokenizer: str | None = None,
                 max_length: int = 256, batch_size: int = 4, val_fraction: float = 0.1, seed: int = 0,
                 num_workers: int = 0, limit: int | None = None, packing: bool = False,
                 pack_length: int | None = None):  # fmt: skip
        super().__init__(path, source, tokenizer, batch_size, val_fraction, seed, num_workers, limit)
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}.")
        if pack_length is not None and pack_length < max_length:
            raise ValueError(f"pack_length must be at least max_length ({max_length}), got {pack_length}.")
        self.max_length, self.packing, self.pack_length = max_length, bool(packing), pack_length

    def _examples(self) -> list[dict]:
        pairs = read_pairs(self.path) if self.path is not None else chatterbot_preferences(self.seed)
        if self.limit and len(pairs) > self.limit:
            keep = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(self.seed))[: self.limit]
            pairs = [pairs[i] for i in sorted(keep.tolist())]
        chosen = tokenize_conversations(self.tokenizer, [c for c, _ in pairs], self.max_length)
        rejected = tokenize_conversations(self.tokenizer, [r for _, r in pairs], self.max_length)
        if len(chosen) == len(rejected) == len(pairs):
            return [{"chosen": c, "rejected": r} for c, r in zip(chosen, rejected)]
        out = []  # some sequence kept no reply token: tokenize pair by pair to keep the pairs that survive whole
        for pair in pairs:
            both = tokenize_conversations(self.tokenizer, list(pair), self.max_length)
            if len(both) == 2:
                out.append({"chosen": both[0], "rejected": both[1]})
        return out

    def _loader(self, data: list, shuffle: bool) -> DataLoader:
        pad = self.tokenizer.pad_token_id
        pad = (self.tokenizer.eos_token_id if pad is None else pad) or 0
        fn = functools.partial(collate_pairs, pad_id=pad, packing=self.packing, capacity=self.pack_length)
        return DataLoader(data, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          collate_fn=fn)  # fmt: skip


__all__ = ["PreferenceDataModule", "chatterbot_preferences", "collate_pairs", "read_pairs"]
