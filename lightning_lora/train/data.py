"""Data as LightningDataModules: instruction pairs (loss on responses only) and packed plain text.

``InstructionDataModule``: JSONL lines ``{"prompt", "response"}`` or ``{"messages": [{"role", "content"}, ...]}``, or
the built-in ``chatterbot`` source (2,393 English prompt/response pairs of the ``chatterbot-corpus`` package).
Conversations are rendered with the tokenizer's chat template when it has one (else ``prompt\\nresponse<eos>``);
labels equal ``input_ids`` on the assistant turns (including the template's end-of-turn text) and are -100 elsewhere.
``TextDataModule``: plain text (a file, or the built-in ``pydoc`` source: the stdlib's ``pydoc_data.topics`` prose)
tokenized and packed into blocks of ``block_size`` tokens, ``labels = input_ids``.

The tokenizer is the LightningModule's ``.tokenizer`` (taken at ``setup``) unless ``tokenizer`` names a model (alias or
folder, see ``lightning_lora.io.models``). Both modules split off a deterministic validation set (``seed``).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_lora.io.models import load_tokenizer
from lightning_lora.train.packing import collate_packed, log_padding, log_shared_prefix
from lightning_lora.train.sampler import EpochSampler, ResumableLoader

log = logging.getLogger(__name__)
IGNORE = -100
CHATTERBOT_PIP = "pip install --no-deps chatterbot-corpus==1.3.3"
Conversation = list[dict[str, str]]


# ----------------------------------------------------------------------------------------------------------- sources
def read_jsonl(path: str | Path) -> list[Conversation]:
    """Conversations from a JSONL file; a bad line raises ``ValueError`` naming the file and the line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    out = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg}). Each line must be one object.") from err
            out.append(_conversation(row, f"{path}:{lineno}"))
    return out


def _conversation(row, where: str) -> Conversation:
    if isinstance(row, dict) and "prompt" in row and "response" in row:
        return [{"role": "user", "content": str(row["prompt"])}, {"role": "assistant", "content": str(row["response"])}]
    if isinstance(row, dict) and isinstance(row.get("messages"), list):
        msgs = row["messages"]
        if all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs) and any(
            m["role"] == "assistant" for m in msgs
        ):
            return [{"role": str(m["role"]), "content": str(m["content"])} for m in msgs]
    got = sorted(row) if isinstance(row, dict) else type(row).__name__
    raise ValueError(
        f"{where}: expected keys 'prompt' and 'response', or 'messages' (a list of {{'role', 'content'}} with at "
        f"least one 'assistant' turn); got {got}."
    )


def chatterbot_pairs() -> list[Conversation]:
    """Consecutive turns of every English chatterbot-corpus conversation as prompt/response pairs."""
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")  # located, not imported
    folder = Path(spec.submodule_search_locations[0]) / "data" / "english" if spec else None
    if folder is None or not folder.is_dir():
        raise ModuleNotFoundError(f"source='chatterbot' needs the chatterbot-corpus package:\n    {CHATTERBOT_PIP}")
    pairs = []
    for file in sorted(folder.glob("*.yml")):
        data = yaml.load(file.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        for conv in data.get("conversations") or []:
            turns = [str(t) for t in conv]  # some items are numbers
            pairs += [[{"role": "user", "content": a}, {"role": "assistant", "content": b}]
                      for a, b in zip(turns, turns[1:])]
    return pairs


def pydoc_text() -> list[str]:
    """The stdlib's pydoc topics (about 65k words of English prose), one document per topic, in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


# ---------------------------------------------------------------------------------------------------- tokenization
def render(tokenizer, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text and the character spans of its assistant turns (the loss targets)."""
    if getattr(tokenizer, "chat_template", None):
        def apply(msgs, gen=False):
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

        text, spans = apply(conv), []
        for i, m in enumerate(conv):
            if m["role"] != "assistant":
                continue
            before, upto = apply(conv[:i], gen=True), apply(conv[: i + 1])
            if not (text.startswith(upto) and upto.startswith(before)):
                raise ValueError("The tokenizer's chat template does not render conversations prefix by prefix; "
                                 "cannot locate the response tokens. Use a tokenizer without a chat template.")
            spans.append((len(before), len(upto)))
        return text, spans
    eos, bos = tokenizer.eos_token or "", tokenizer.bos_token or ""
    text, spans = (bos if bos != eos else ""), []
    for m in conv:
        if m["role"] == "assistant":
            spans.append((len(text), len(text) + len(m["content"]) + len(eos)))
            text += m["content"] + eos + "\n"
        else:
            text += m["content"] + "\n"
    return text, spans


def tokenize_conversations(tokenizer, convs: list[Conversation], max_length: int) -> list[dict[str, torch.Tensor]]:
    """input_ids/labels per conversation; longer ones are truncated (counted and logged)."""
    if not convs:
        return []
    rendered = [render(tokenizer, c) for c in convs]
    enc = tokenizer([t for t, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    examples, truncated, dropped = [], 0, 0
    for (_, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
        labels = [t if any(s <= o[0] < e for s, e in spans) else IGNORE for t, o in zip(ids, offsets)]
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(x == IGNORE for x in labels):
            dropped += 1  # nothing to learn from: the prompt fills max_length
            continue
        examples.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)})
    if truncated or dropped:
        log.warning(f"{truncated} of {len(convs)} examples were longer than max_length={max_length} and were "
                    f"truncated; {dropped} examples kept no response token and were dropped.")
    return examples


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

    def __init__(self, path, source, tokenizer, batch_size, val_fraction, seed, num_workers, limit):
        super().__init__()
        if path is None and source not in self.SOURCES:
            if source is None or not Path(str(source)).is_file():
                raise ValueError(f"Unknown source {source!r}: neither a built-in data set ({', '.join(self.SOURCES)}) "
                                 "nor an existing file. Use a built-in name or the path of your file (source: my.jsonl).")
            path, source = str(source), None  # a file path given as the source
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
        if batch_size < 1 or (limit is not None and limit < 1):
            raise ValueError(f"batch_size and limit must be positive, got {batch_size} and {limit}.")
        self.path, self.source, self.tokenizer_name = path, source, tokenizer
        self.batch_size, self.val_fraction, self.seed = batch_size, val_fraction, seed
        self.num_workers, self.limit = num_workers, limit
        self.tokenizer = None
        self.train_set: list | None = None
        self.val_set: list | None = None

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
        n_val = round(len(order) * self.val_fraction)
        n_val = min(max(n_val, 1 if self.val_fraction > 0 else 0), len(order) - 1)
        self.val_set = [examples[i] for i in order[:n_val]]
        self.train_set = [examples[i] for i in order[n_val:]]

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
        return self._loader(self.val_set, shuffle=False)


class InstructionDataModule(_TokenizedDataModule):
    """Prompt/response conversations, loss on the responses only.

    Args:
        path: a JSONL file; each line ``{"prompt", "response"}`` or ``{"messages": [{"role", "content"}, ...]}``.
        source: a built-in data set when ``path`` is None: ``"chatterbot"``, or the path of a JSONL file.
        tokenizer: alias or model folder to read the tokenizer from; None: the LightningModule's ``.tokenizer``.
        max_length: longer examples are truncated (their count is logged).
        limit: keep at most this many examples (a seeded random subset).
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
                 share_prefix: bool = False):
        super().__init__(path, source, tokenizer, batch_size, val_fraction, seed, num_workers, limit)
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
        convs = read_jsonl(self.path) if self.path is not None else chatterbot_pairs()
        if self.limit and len(convs) > self.limit:  # tokenize only a seeded subset
            keep = torch.randperm(len(convs), generator=torch.Generator().manual_seed(self.seed))[: self.limit]
            convs = [convs[i] for i in sorted(keep.tolist())]
        return tokenize_conversations(self.tokenizer, convs, self.max_length)


class TextDataModule(_TokenizedDataModule):
    """Plain text packed into blocks of ``block_size`` tokens (``labels = input_ids``); documents end with eos.

    Args:
        path: a UTF-8 text file (one document); ``source`` when None: ``"pydoc"`` (the stdlib's pydoc topics), or
            a file path.
        limit: keep at most this many blocks (a seeded random subset).
    """

    SOURCES = ("pydoc",)

    def __init__(self, path: str | None = None, source: str | None = "pydoc", tokenizer: str | None = None,
                 block_size: int = 128, batch_size: int = 8, val_fraction: float = 0.1, seed: int = 0,
                 num_workers: int = 0, limit: int | None = None):
        super().__init__(path, source, tokenizer, batch_size, val_fraction, seed, num_workers, limit)
        if block_size < 2:
            raise ValueError(f"block_size must be at least 2, got {block_size}.")
        self.block_size = block_size

    def _examples(self):
        if self.path is not None:
            if not Path(self.path).is_file():
                raise FileNotFoundError(f"{self.path} does not exist.")
            docs = [Path(self.path).read_text(encoding="utf-8")]
        else:
            docs = pydoc_text()
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        ids = [t for seq in self.tokenizer(docs, add_special_tokens=False)["input_ids"] for t in seq + eos]
        n = len(ids) // self.block_size
        blocks = torch.tensor(ids[: n * self.block_size], dtype=torch.long).view(n, self.block_size)
        return [{"input_ids": b, "labels": b} for b in blocks]
