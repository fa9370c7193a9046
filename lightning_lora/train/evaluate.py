"""Evaluate a base model and its adapters side by side on prompt/response examples.

For each variant (the base with every adapter off, then each adapter alone), on the same examples:

- **loss / perplexity on the responses**: the token-weighted mean next-token cross-entropy over the response tokens
  (the labels of ``train/data.py``: the assistant turns), ``ppl = exp(loss)``; the same figure as ``val_ppl``.
- **generation metrics**: a greedy reply (up to ``max_new_tokens``) to each example's prompt (its tokens before the
  first response token, i.e. the chat template up to the assistant's turn), against the reference (the first
  response, decoded without special tokens), scored by ``train/text_metrics.py``: exact match, ROUGE-L F1 and chrF.
- **example replies**: the first ``n_shown`` prompts with the reference and every variant's reply.

The report is a plain dict (``evaluate_model``); ``train/eval_report.py`` writes it as JSON and Markdown.
``python -m lightning_lora evaluate`` (``commands/evaluate.py``) and ``LoRAModule(evaluate=True)`` (at the end of
``fit``, on the validation split, with the model in memory) both go through ``evaluate_model``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_lora.core.verbs import active_adapters, disable_adapters, set_adapter
from lightning_lora.train.data import IGNORE, collate
from lightning_lora.train.loss import causal_lm_loss
from lightning_lora.train.text_metrics import text_metrics

log = logging.getLogger(__name__)
BASE = "base"


def split_example(example: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(prompt ids, reference ids)``: the tokens before the first labeled one, and the first run of labeled tokens."""
    labels = example["labels"]
    labeled = (labels != IGNORE).nonzero().flatten()
    if labeled.numel() == 0:
        raise ValueError("an evaluation example has no response token (every label is -100).")
    start = int(labeled[0])
    end = start
    while end < len(labels) and labels[end] != IGNORE:
        end += 1
    return example["input_ids"][:start], example["input_ids"][start:end]


@torch.no_grad()
def response_loss(model: nn.Module, examples: Sequence[Mapping[str, Tensor]], pad_id: int,
                  batch_size: int = 8) -> tuple[float, int]:  # fmt: skip
    """Token-weighted mean cross-entropy over the response tokens of ``examples``, and that token count."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(list(examples[i : i + batch_size]), pad_id).items()}
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        if n:
            loss = causal_lm_loss(model, batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"])
            total, count = total + float(loss) * n, count + n
    return (total / count if count else float("nan")), count


@torch.no_grad()
def greedy_replies(model: nn.Module, tokenizer, prompts: Sequence[Tensor], max_new_tokens: int = 32,
                   batch_size: int = 8) -> list[str]:  # fmt: skip
    """Greedy continuations of each prompt (left-padded batches), decoded without special tokens and stripped."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, p in enumerate(chunk):
            ids[r, width - len(p) :], mask[r, width - len(p) :] = p, 1
        gen = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)  # fmt: skip
        out += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in gen.cpu()]
    return out


@contextlib.contextmanager
def variant(model: nn.Module, name: str | None) -> Iterator[None]:
    """Inside the block the model runs as the base (``name`` None: adapters off) or adapter ``name`` alone; the
    adapters that were active before are active again after it."""
    before = active_adapters(model)
    try:
        if name is None:
            with disable_adapters(model):
                yield
        else:
            set_adapter(model, name)
            yield
    finally:
        if name is not None and before:
            set_adapter(model, dict(before))


def evaluate_model(model: nn.Module, tokenizer, examples: Sequence[Mapping[str, Tensor]],
                   variants: Mapping[str, str | None], max_new_tokens: int = 32, n_shown: int = 3,
                   batch_size: int = 8, source: str | None = None) -> dict:  # fmt: skip
    """Score every variant (``{label: adapter name, or None for the base}``) on ``examples`` (tokenized as by
    ``train/data.py``: ``input_ids`` and ``labels``). The model is put in eval mode for the call (train mode is
    restored). Returns the report: ``{"data", "examples", "max_new_tokens", "variants": {label: {"loss", "ppl",
    "tokens", "exact_match", "rouge_l", "chrf", "seconds"}}, "shown": [{"prompt", "reference", "replies"}]}``."""
    if not examples:
        raise ValueError("evaluate: no example to evaluate on (the data gave no usable example).")
    if max_new_tokens < 1:
        raise ValueError(f"evaluate: max_new_tokens must be positive, got {max_new_tokens}.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    prompts, references = zip(*(split_example(e) for e in examples))
    reference_text = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in references]
    was_training = model.training
    model.eval()
    results, replies = {}, {}
    try:
        for label, name in variants.items():
            t0 = time.perf_counter()
            with variant(model, name):
                loss, tokens = response_loss(model, examples, pad, batch_size)
                replies[label] = greedy_replies(model, tokenizer, prompts, max_new_tokens, batch_size)
            scores = text_metrics(replies[label], reference_text)
            results[label] = {"loss": loss, "ppl": math.exp(loss) if loss < 700 else float("inf"), "tokens": tokens,
                              **scores, "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
            log.info(f"evaluate {label}: loss {loss:.4f}, ppl {results[label]['ppl']:.3f}, exact match "
                     f"{scores['exact_match']:.3f}, ROUGE-L {scores['rouge_l']:.3f}, chrF {scores['chrf']:.2f}")
    finally:
        model.train(was_training)
    shown = [{"prompt": tokenizer.decode(prompts[i], skip_special_tokens=True).strip(), "reference": reference_text[i],
              "replies": {label: replies[label][i] for label in variants}} for i in range(min(n_shown, len(examples)))]
    return {"data": source, "examples": len(examples), "max_new_tokens": max_new_tokens, "variants": results,
            "shown": shown}  # fmt: skip


def evaluate_adapters(base_model: str, adapters: Mapping[str, str], data: str, max_new_tokens: int = 32,
                      limit: int | None = None, max_length: int = 256, n_shown: int = 3, batch_size: int = 8,
                      dtype: str | None = None, tasks: Sequence[str] = ()) -> dict:  # fmt: skip
    """Load ``base_model`` and the adapters (``{label: PEFT folder}``), read ``data`` (a JSONL file, or
    ``chatterbot``), and ``evaluate_model`` the base and each adapter alone on the first ``limit`` examples; with
    ``tasks``, also ``lm_eval_tasks`` (under ``report["tasks"]``)."""
    from lightning_lora.io.models import load_causal_lm
    from lightning_lora.io.peft import load_adapter
    from lightning_lora.io.tokens import tokenizer_for_adapters
    from lightning_lora.train.data import chatterbot_pairs, read_jsonl, tokenize_conversations

    if tasks:
        _import_lm_eval()  # before loading anything
    convs = chatterbot_pairs() if data == "chatterbot" else read_jsonl(data)
    convs = convs[:limit] if limit else convs
    model, tokenizer = load_causal_lm(base_model, dtype=dtype)
    tokenizer = tokenizer_for_adapters(model, tokenizer, adapters.values())  # adapters trained with new_tokens
    if BASE in adapters:
        raise ValueError(f"evaluate: an adapter may not be labelled {BASE!r} (that is the base model's row).")
    for name, path in adapters.items():
        load_adapter(model, path, name)
    examples = tokenize_conversations(tokenizer, convs, max_length)
    variants = {BASE: None, **{name: name for name in adapters}}
    report = evaluate_model(model, tokenizer, examples, variants, max_new_tokens, n_shown, batch_size, source=data)
    report["base_model"], report["adapters"] = str(base_model), {name: str(p) for name, p in adapters.items()}
    if tasks:
        report["tasks"] = lm_eval_tasks(model, tokenizer, variants, tasks, limit, batch_size)
    return report




def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise ImportError("--tasks needs EleutherAI's lm-evaluation-harness, which is not installed. Install it: "
                          "pip install lm-eval (its tasks download their data sets from the Hugging Face hub)") from err
    return lm_eval, HFLM


def lm_eval_tasks(model: nn.Module, tokenizer, variants: Mapping[str, str | None], tasks: Sequence[str],
                  limit: int | None = None, batch_size: int = 8) -> dict[str, dict]:  # fmt: skip
    """Run EleutherAI's lm-evaluation-harness ``tasks`` through ``model`` for every variant (its ``HFLM`` wrapping
    the model in memory, adapters as set by ``variant``); ``{label: {task: {metric: value}}}``.

    Raises:
        ImportError: ``lm_eval`` is not installed (``pip install lm-eval``; its tasks download their data sets).
    """
    lm_eval, HFLM = _import_lm_eval()
    out: dict[str, dict] = {}
    was_training = model.training
    model.eval()
    try:
        for label, name in variants.items():
            with variant(model, name):
                results = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer,
                                                             batch_size=batch_size), tasks=list(tasks), limit=limit)
            out[label] = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                          for task, metrics in (results or {}).get("results", {}).items()}  # fmt: skip
    finally:
        model.train(was_training)
    return out


__all__ = ["BASE", "evaluate_adapters", "evaluate_model", "greedy_replies", "lm_eval_tasks", "response_loss",
           "split_example", "variant"]
