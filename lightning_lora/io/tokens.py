"""New tokens: added to the tokenizer, the embeddings resized to match, and only their rows trained.

``add_new_tokens(model, tokenizer, adapter, ["<tool>", "</tool>"])`` is what ``LoRAModule(new_tokens=...)``,
``AdapterCallback(new_tokens=...)`` and the offline export (``io/checkpoint.py``) do, in this order, so a run, its
resume and its export build the same model:

1. the tokens join the tokenizer as added tokens (never split; ``tokenizer.add_tokens``); one it already has keeps
   its id;
2. the input embedding (and an untied output embedding) grows to ``len(tokenizer)`` rows, each new row the mean of
   the old ones (deterministic: a rebuilt model is the same model; the mean is the usual start for new tokens,
   Hewitt 2021, without ``resize_token_embeddings``' random draw);
3. the adapter trains the tokens' rows: ``trainable_token_indices`` on the input embedding, which a tied head shares
   (``core/trained.py``), and on an untied head too (``{embedding: ids, head: ids}``; not when ``modules_to_save``
   trains the whole head), so the model can read and write them. Everything else of the embeddings stays frozen; the rows go into the PEFT folder
   (``token_adapter.trainable_tokens_delta``), the merged model and its GGUF (with the new vocabulary).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from lightning_lora.core.layer import AdapterConfig

log = logging.getLogger(__name__)


def check_new_tokens(tokens: object, adapter: AdapterConfig | None = None) -> list[str]:
    """``tokens`` as a list of distinct non-empty strings (``[]`` for None).

    Raises:
        ValueError: not such a list, or the adapter also names ``trainable_token_indices``.
    """
    if tokens is None:
        return []
    if isinstance(tokens, str) or not all(isinstance(t, str) and t for t in tokens) or len(set(tokens)) != len(tokens):
        raise ValueError(f"new_tokens must be a list of distinct non-empty strings, e.g. ['<tool>', '</tool>'], "
                         f"got {tokens!r}.")  # fmt: skip
    if tokens and adapter is not None and adapter.trainable_token_indices is not None:
        raise ValueError("new_tokens trains the new tokens' rows itself; leave the adapter's trainable_token_indices "
                         "unset (or give only trainable_token_indices).")  # fmt: skip
    return list(tokens)


def add_new_tokens(model: nn.Module, tokenizer, adapter: AdapterConfig, tokens: Sequence[str]) -> AdapterConfig:
    """Steps 1-3 of the module docstring: ``tokenizer`` and ``model`` change in place; returns ``adapter`` with the
    tokens' ``trainable_token_indices`` (``adapter`` itself when ``tokens`` is empty)."""
    tokens = check_new_tokens(tokens, adapter)
    if not tokens:
        return adapter
    if tokenizer is None or not hasattr(model, "get_input_embeddings"):
        raise ValueError("new_tokens needs a tokenizer and a model with get_input_embeddings() (a Hugging Face model).")
    ids = add_to_tokenizer(tokenizer, tokens)
    resize_embeddings(model, len(tokenizer))
    return dataclasses.replace(adapter, trainable_token_indices=token_rows(model, ids, adapter))


def add_to_tokenizer(tokenizer, tokens: Sequence[str]) -> list[int]:
    """Step 1: add the tokens ``tokenizer`` lacks (again: nothing); return the ids of all of them."""
    vocab = tokenizer.get_vocab()
    tokenizer.add_tokens([t for t in tokens if t not in vocab])
    return tokenizer.convert_tokens_to_ids(list(tokens))


def match_vocabulary(model: nn.Module, like: nn.Module) -> None:
    """Give ``model`` (a fresh copy of the base) the embedding rows of ``like`` (the trained model), if it has more."""
    if hasattr(model, "get_input_embeddings") and hasattr(like, "get_input_embeddings"):
        resize_embeddings(model, like.get_input_embeddings().weight.shape[0])


def resize_embeddings(model: nn.Module, rows: int) -> None:
    """Grow the input embedding (and an untied output embedding) to ``rows`` rows, new rows the mean of the old
    ones; nothing when it has them already."""
    embedding = model.get_input_embeddings()
    old = embedding.weight.shape[0]
    if rows <= old:
        return
    model.resize_token_embeddings(rows, mean_resizing=False)
    with torch.no_grad():
        for layer in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m}.values():
            layer.weight[old:] = layer.weight[:old].mean(0)
    log.info("new_tokens: embeddings resized from %d to %d rows (new rows: the mean of the old)", old, rows)


def tokenizer_for_adapters(model: nn.Module, tokenizer, folders: Iterable[str | Path]):
    """The tokenizer to run ``model`` with adapters that added tokens, and ``model``'s embeddings grown to it: an
    adapter folder written with ``new_tokens`` holds the grown tokenizer (as PEFT's do), and its token rows are the
    ones past the base's vocabulary (``load_adapter`` then fills them). ``tokenizer`` itself, the model unchanged,
    when no folder adds tokens. What ``generate``, ``evaluate`` and ``generate --merge_to`` do before loading.

    Raises:
        ValueError: two folders add different tokens, or a folder's tokenizer does not extend the base's (other ids
            for the base's tokens).
    """
    grown, source = None, None
    for folder in folders:
        if not (Path(folder) / "tokenizer_config.json").is_file():
            continue
        from transformers import AutoTokenizer

        saved = AutoTokenizer.from_pretrained(str(folder))
        if len(saved) <= len(tokenizer):
            continue
        if grown is not None and saved.get_vocab() != grown.get_vocab():
            raise ValueError(f"{folder}: its tokenizer adds other tokens than {source}'s; load these adapters one at a "
                             "time (each with the tokens it was trained with).")
        grown, source = saved, folder
    if grown is None:
        return tokenizer
    vocab = grown.get_vocab()
    if any(vocab.get(token) != i for token, i in tokenizer.get_vocab().items()):
        raise ValueError(f"{source}: its tokenizer does not extend the base model's (the base's tokens have other "
                         "ids there); pass the base model the adapter was trained on (--base_model).")
    resize_embeddings(model, len(grown))
    log.info("%s adds %d tokens: using its tokenizer", source, len(grown) - len(tokenizer))
    return grown


def token_rows(model: nn.Module, ids: list[int], adapter: AdapterConfig) -> list[int] | dict[str, list[int]]:
    """``trainable_token_indices`` for ``ids``: a list (the input embedding and a head tied to it) or, with an untied
    head, ``{embedding name: ids, head name: ids}``; a head the adapter trains whole (``modules_to_save``) needs no
    rows."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is embedding.weight:
        return list(ids)
    names = {id(m): n for n, m in model.named_modules()}
    if any(names[id(head)].endswith(entry) for entry in adapter.modules_to_save or []):
        return {names[id(embedding)]: list(ids)}
    return {names[id(embedding)]: list(ids), names[id(head)]: list(ids)}
