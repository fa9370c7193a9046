"""Data as LightningDataModules: instruction pairs (loss on responses only) and packed plain text.

``InstructionDataModule``: JSONL lines ``{"prompt", "response"}`` or ``{"messages": [{"role", "content"}, ...]}``, or
the built-in ``chatterbot`` source (2,393 English prompt/response pairs of the ``chatterbot-corpus`` package), read
and checked by ``train/conversations.py`` (bad lines: ``file:line`` errors; lines with a missing value: dropped and
counted). Conversations are rendered with the tokenizer's chat template when it has one (else
``prompt\\nresponse<eos>``); labels equal ``input_ids`` on the assistant's tokens, its end-of-turn token included,
and are -100 elsewhere (``train/chat.py``, for any family's template).
``TextDataModule``: plain text (a file, or the built-in ``pydoc`` source: the stdlib's ``pydoc_data.topics`` prose)
tokenized and packed into blocks of ``block_size`` tokens, ``labels = input_ids``.

The tokenizer is the LightningModule's ``.tokenizer`` (taken at ``setup``) unless ``tokenizer`` names a model (alias or
folder, see ``lightning_lora.io.models``). Both modules split the examples once, seeded: ``val_fraction`` for
validation (a warning when that is fewer than ``MIN_HELD_OUT`` examples), ``test_fraction`` (default 0: no test
split, and ``test`` refuses rather than score the validation split again), the rest for training. The split is
recorded in checkpoints; validating or testing a checkpoint on the same data split differently is refused, since
its held-out examples would then include ones it trained on.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_lora.io.models import load_tokenizer
from lightning_lora.train.chat import IGNORE, render, tokenize_conversations
from lightning_lora.train.conversations import (
    CHATTERBOT_PIP,
    Conversation,
    chatterbot_pairs,
    jsonl_conversations,
    pydoc_text,
    read_jsonl,
    read_text,
)
from lightning_lora.train.packing import collate_packed, log_padding, log_shared_prefix
from lightning_lora.train.sampler import EpochSampler, ResumableLoader

__all__ = ["CHATTERBOT_PIP", "IGNORE", "Conversation", "InstructionDataModule", "TextDataModule", "chatterbot_pairs",
           "collate", "pydoc_text", "read_jsonl", "render", "tokenize_conversations"]
log = logging.getLogger(__name__)
MIN_HELD_OUT = 10  # fewer validation (or test) examples than this: the figures are noise, and we say so
SPLIT_KEYS = ("seed", "val_fraction", "test_fraction", "limit")


def collate(batch: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: pad id in input_ids, 0 in attention_mask, -100 in labels."""
    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b["input_ids"])
        ids[i, :k], labels[i, :k], mask[i, :k] = b["input_ids"], b["labels"], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ----------------------------------------------------------------------------------------------------- datamodules
class _TokenizedDataModule(pl.LightningDataModule):
    SOURCES: tuple[str, ...] = ()
    packing: bool | None = None  # None: rows are all alike (plain shuffled batches); else see ``train/packing.py``
    share_prefix = False

    def __init__(self, path, source, tokenizer, batch_size, val_fraction, seed, num_workers, limit, test_fraction=0.0):
        super().__init__()
        if path is None and source not in self.SOURCES:
            if source is None or not Path(str(source)).is_file():
                raise ValueError(f"Unknown source {source!r}: neither a built-in data set ({', '.join(self.SOURCES)}) "
                                 "nor an existing file. Use a built-in name or the path of your file (source: my.jsonl).")
            path, source = str(source), None  # a file path given as the source
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(f"val_fraction and test_fraction must be in [0, 1) and leave examples to train on, got "
                             f"{val_fraction} and {test_fraction}.")
        if batch_size < 1 or (limit is not None and limit < 1):
            raise ValueError(f"batch_size and limit must be positive, got {batch_size} and {limit}.")
        self.path, self.source, self.tokenizer_name = path, source, tokenizer
        self.batch_size, self.val_fraction, self.seed = batch_size, val_fraction, seed
        self.num_workers, self.limit, self.test_fraction = num_workers, limit, test_fraction
        self.tokenizer = None
        self.train_set: list | None = None
        self.val_set: list | None = None
        self.test_set: list | None = None
        self.split: dict | None = None  # what ``state_dict`` records: the split's settings and which data

    def _resolve_tokenizer(self):
        if self.tokenizer_name is not None and not isinstance(self.tokenizer_name, str):
            return self.tokenizer_name  # a tokenizer object, passed directly
        if self.tokenizer_name is not None:
            return load_tokenizer(self.tokenizer_name)
        module = self.trainer.lightning_module if self.trainer is not None else None
        if getattr(module, "tokenizer", None) is None:
            raise ValueError(f"{type(self).__name__} needs a tokenizer: pass tokenizer=<alias or model folder>, or "
                             "attach it to a Trainer whose LightningModule has a .tokenizer (LoRAModule does).")
        return module.tokenizer

    def _examples(self) -> list[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.tokenizer = self._resolve_tokenizer()
        examples = self._examples()
        if not examples:
            raise ValueError(f"The data set ({self.path or self.source}) is empty: it gave no usable example.")
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(self.seed)).tolist()
        order = order[: self.limit] if self.limit else order
        n = len(order)
        n_val = min(max(round(n * self.val_fraction), 1 if self.val_fraction > 0 else 0), n - 1)
        n_test = min(max(round(n * self.test_fraction), 1 if self.test_fraction > 0 else 0), n - 1 - n_val)
        self.val_set = [examples[i] for i in order[:n_val]]
        self.test_set = [examples[i] for i in order[n_val:n_val + n_test]]
        self.train_set = [examples[i] for i in order[n_val + n_test:]]
        for name, key, k in (("validation", "val_fraction", n_val), ("test", "test_fraction", n_test)):
            if 0 < k < MIN_HELD_OUT:
                log.warning(f"The {name} split holds only {k} of {n} examples ({key} {getattr(self, key)}): its loss "
                            f"and perplexity are noise. Use more data or a larger {key} (at least {MIN_HELD_OUT} "
                            "examples).")
        data = hashlib.sha256(Path(self.path).read_bytes()).hexdigest() if self.path else f"built-in {self.source}"
        self.split = {**{k: getattr(self, k) for k in SPLIT_KEYS}, "held_out": n_val + n_test, "data": data}

    def state_dict(self) -> dict:
        """The split (its settings, and the data: a file's sha256 or the built-in's name), saved in checkpoints."""
        return {"split": dict(self.split)} if self.split else {}

    def load_state_dict(self, state: dict) -> None:
        """Refuse a split of the checkpoint's own data that holds out examples the checkpoint trained on.

        Validation takes the first ``n_val`` examples of the seeded order, test the next ``n_test``, training the
        rest: with the same order (seed, limit, data), a split is safe while it holds out no more than the
        checkpoint's fit did.
        """
        saved = state.get("split")
        if not saved or not self.split or saved.get("data") != self.split["data"]:
            return  # other data (or no record): nothing of it was trained on through this split
        same_order = all(saved.get(k) == self.split[k] for k in ("seed", "limit"))
        if same_order and self.split["held_out"] <= saved.get("held_out", 0):
            return
        settings = ", ".join(f"{k} {saved.get(k)} -> {self.split[k]}"
                             for k in SPLIT_KEYS if saved.get(k) != self.split[k])
        raise ValueError(f"The checkpoint was trained on this data with another split ({settings}), so these "
                         "validation or test examples include ones it trained on. Use the data settings of its fit "
                         "(the run folder's config.yaml).")

    def _loader(self, data: list, shuffle: bool) -> DataLoader:
        """Training (``shuffle``): a ``ResumableLoader`` over an ``EpochSampler`` (seeded order per epoch, grouped by
        length unless packing or plain rows; its position is saved in checkpoints, ``train/sampler.py``). Else the
        examples in order."""
        pad = self.tokenizer.pad_token_id
        pad = (self.tokenizer.eos_token_id if pad is None else pad) or 0
        packing = self.packing
        fn = collate if not packing else functools.partial(collate_packed, capacity=self.pack_length,
                                                           share_prefix=self.share_prefix)  # fmt: skip
        collate_fn = functools.partial(fn, pad_id=pad)
        if not shuffle:
            return DataLoader(data, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate_fn)
        lengths = [len(x["input_ids"]) for x in data]
        if packing is not None:
            log_padding(lengths, self.batch_size, self.seed, packing, self.pack_length)
            if self.share_prefix:
                log_shared_prefix(data, self.batch_size, self.seed)
        sampler = EpochSampler(len(data), self.batch_size, self.seed, lengths=lengths if packing is False else None)
        # its own generator: the loader draws nothing from the global RNG (a checkpoint restores that for dropout)
        return ResumableLoader(data, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                               collate_fn=collate_fn, generator=torch.Generator().manual_seed(self.seed))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if not self.test_set:
            raise ValueError(f"{type(self).__name__} has no test split (test_fraction {self.test_fraction}). Set "
                             "data test_fraction (e.g. 0.1) when you fit, so those examples are held out from "
                             "training, and test with the same data settings; `validate` scores the validation split.")
        return self._loader(self.test_set, shuffle=False)


class InstructionDataModule(_TokenizedDataModule):
    """Prompt/response conversations, loss on the responses only.

    Args:
        path: a JSONL file; each line ``{"prompt", "response"}`` or ``{"messages": [{"role", "content"}, ...]}``.
        source: a built-in data set when ``path`` is None: ``"chatterbot"``, or the path of a JSONL file.
        tokenizer: alias or model folder to read the tokenizer from; None: the LightningModule's ``.tokenizer``.
        max_length: longer examples are truncated (their count is logged).
        limit: keep at most this many examples (a seeded random subset).
        val_fraction, test_fraction: shares held out (seeded by ``seed``) for ``validate`` and ``test``; at least
            one example each when non-zero, a warning under 10. ``test`` needs ``test_fraction`` > 0 set at fit time.
        packing: lay the ``batch_size`` examples of each batch end to end in rows of up to ``pack_length`` tokens
            (padding-free packing, ``train/packing.py``): a batch still holds ``batch_size`` examples, in fewer rows,
            with ``position_ids`` restarting per example and attention kept inside each example. Off: training
            batches are grouped by length. Either way the padding share before/after is logged once.
        pack_length: the row budget when packing; default ``batch_size * max_length``, i.e. one row per batch and
            no padding at all.
        share_prefix: with packing, each row holds the common unlabeled start of its examples (the chat template's
            system prompt, a repeated question) once, and every example continues it (``train/attention.py``:
            exact, needs the model to run ``use_packed_attention``, as LoRAModule's does). The share of positions
            it saves is logged once.

    Example::

        trainer.fit(LoRAModule("smollm2-135m-instruct", adapter=LoRA(r=8)), InstructionDataModule(max_length=64))
    """

    SOURCES = ("chatterbot",)

    def __init__(self, path: str | None = None, source: str | None = "chatterbot", tokenizer: str | None = None,
                 max_length: int = 256, batch_size: int = 8, val_fraction: float = 0.1, seed: int = 0,
                 num_workers: int = 0, limit: int | None = None, packing: bool = False, pack_length: int | None = None,
                 share_prefix: bool = False, test_fraction: float = 0.0):
        super().__init__(path, source, tokenizer, batch_size, val_fraction, seed, num_workers, limit, test_fraction)
        if share_prefix and not packing:
            raise ValueError("share_prefix needs packing: set packing: true as well (a shared prefix lives in packed "
                             "rows), or share_prefix: false.")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}.")
        if pack_length is not None and pack_length < max_length:
            raise ValueError(f"pack_length must be at least max_length ({max_length}) so every example fits a row, "
                             f"got {pack_length}; leave it None for one row per batch.")
        self.max_length = max_length
        self.packing, self.share_prefix = bool(packing), bool(share_prefix)
        self.pack_length = pack_length or batch_size * max_length

    def _examples(self):
        if self.path is not None:
            rows = jsonl_conversations(self.path)
            origins, convs = [w for w, _ in rows], [c for _, c in rows]
        else:
            convs = chatterbot_pairs()
            origins = [f"chatterbot pair {i}" for i in range(len(convs))]
        if self.limit and len(convs) > self.limit:  # tokenize only a seeded subset
            keep = torch.randperm(len(convs), generator=torch.Generator().manual_seed(self.seed))[: self.limit]
            convs, origins = ([xs[i] for i in sorted(keep.tolist())] for xs in (convs, origins))
        return tokenize_conversations(self.tokenizer, convs, self.max_length, origins)


class TextDataModule(_TokenizedDataModule):
    """Plain text packed into blocks of ``block_size`` tokens (``labels = input_ids``); documents end with eos.

    Args:
        path: a UTF-8 text file (one document); ``source`` when None: ``"pydoc"`` (the stdlib's pydoc topics), or
            a file path.
        limit: keep at most this many blocks (a seeded random subset).
        val_fraction, test_fraction: as in ``InstructionDataModule``.
    """

    SOURCES = ("pydoc",)

    def __init__(self, path: str | None = None, source: str | None = "pydoc", tokenizer: str | None = None,
                 block_size: int = 128, batch_size: int = 8, val_fraction: float = 0.1, seed: int = 0,
                 num_workers: int = 0, limit: int | None = None, test_fraction: float = 0.0):
        super().__init__(path, source, tokenizer, batch_size, val_fraction, seed, num_workers, limit, test_fraction)
        if block_size < 2:
            raise ValueError(f"block_size must be at least 2, got {block_size}.")
        self.block_size = block_size

    def _examples(self):
        if self.path is not None:
            docs = [read_text(self.path)]
        else:
            docs = pydoc_text()
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        ids = [t for seq in self.tokenizer(docs, add_special_tokens=False)["input_ids"] for t in seq + eos]
        n = len(ids) // self.block_size
        blocks = torch.tensor(ids[: n * self.block_size], dtype=torch.long).view(n, self.block_size)
        return [{"input_ids": b, "labels": b} for b in blocks]
