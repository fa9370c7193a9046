"""``python -m lightning_lora generate``: one frozen base, one or more adapters, generate from a prompt.

    python -m lightning_lora generate --adapter runs/chat/adapter:0.7 --adapter runs/docs/adapter:0.3 \\
        --prompt "What is a list?" [--compare] [--base_model smollm2-135m-instruct]

Each ``--adapter`` is a PEFT-format folder, optionally followed by ``:weight`` (default 1). The base is the one the
adapters record (``base_model_name_or_path``) unless ``--base_model`` names another. Without ``--compare`` the
weighted combination base + sum_i w_i dW_i generates once. With ``--compare`` the base and every adapter alone run as
one batch (``per_sample_adapters``: one row per adapter), then the combination, and the outputs are printed side by
side. Decoding is greedy, so runs are reproducible. ``--merge_to DIR`` instead writes the combination merged into the
base as a Hugging Face folder (``export_combination``, with the merged writer of ``io/export.py``: probed, written
as one transaction), loadable with ``AutoModelForCausalLM.from_pretrained(DIR)``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from lightning_lora.commands import command_args
from lightning_lora.compose import per_sample_adapters
from lightning_lora.core.verbs import merge, set_adapter
from lightning_lora.io.card import recorded_base
from lightning_lora.io.export import save_merged
from lightning_lora.io.files import atomic_dir, write_json
from lightning_lora.io.finite import probe
from lightning_lora.io.models import load_causal_lm
from lightning_lora.io.peft import load_adapter
from lightning_lora.io.tokens import tokenizer_for_adapters

MERGE_RECORD = "lightning_lora_merge.json"  # written into a merged folder: what it was made from


def parse_adapter(spec: str) -> tuple[str, float]:
    """``"path[:weight]"`` -> (path, weight); a suffix that is not a number belongs to the path."""
    path, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return spec, 1.0


GENERIC_FOLDERS = ("adapter", "adapters", "export", "exports", "merged", "checkpoints")


def adapter_label(path: str | os.PathLike) -> str:
    """The name an adapter folder is shown under: its own name, or the nearest parent's when the folder has a generic
    name (``runs/chat/export/adapter`` -> ``chat``)."""
    parts = [p for p in Path(path).resolve().parts[1:] if p]
    for part in reversed(parts):
        if part.lower() not in GENERIC_FOLDERS:
            return part.replace(".", "_")
    return "adapter"


def load_adapters_weighted(model: nn.Module, adapters: Mapping[str, float]) -> dict[str, float]:
    """Load each adapter folder under a name made from its folder name; return ``{name: weight}``."""
    weights: dict[str, float] = {}
    for path, weight in adapters.items():
        stem = adapter_label(path)
        name, i = stem, 1
        while name in weights:
            name, i = f"{stem}_{i}", i + 1
        load_adapter(model, path, name)
        weights[name] = float(weight)
    return weights


def _prompt_ids(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    if chat and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tokenizer(prompt, return_tensors="pt").input_ids


@torch.no_grad()
def generate_variants(
    model: nn.Module, tokenizer, prompt: str, weights: Mapping[str, float], compare: bool,
    max_new_tokens: int = 32, chat: bool = True,
) -> dict[str, str]:  # fmt: skip
    """Greedy continuations of ``prompt``: ``{label: text}`` for the combination and, with ``compare``, the base and
    each adapter alone."""
    ids = _prompt_ids(tokenizer, prompt, chat)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    def decode(out: torch.Tensor) -> list[str]:
        return [tokenizer.decode(row[ids.shape[1] :], skip_special_tokens=True).strip() for row in out]

    texts: dict[str, str] = {}
    if compare:
        rows = [None, *weights]  # one row per variant, same prompt, so no padding is needed
        with per_sample_adapters(model, rows):
            batch = ids.expand(len(rows), -1)
            outs = decode(model.generate(batch, attention_mask=torch.ones_like(batch), **kwargs))
        texts.update(zip(["base", *weights], outs))
    if not compare or len(weights) > 1 or next(iter(weights.values())) != 1.0:
        set_adapter(model, dict(weights))
        label = " + ".join(f"{w:g}*{n}" for n, w in weights.items())
        texts[label] = decode(model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs))[0]
    return texts


def export_combination(
    base_model: str | os.PathLike, adapters: Mapping[str, float], out_dir: str | os.PathLike, dtype: str | None = None
) -> Path:
    """Merge ``{adapter folder: weight}`` into a fresh fp32 copy of ``base_model``, W' = W + sum_i w_i dW_i, probe it
    (finite outputs) and write a Hugging Face folder (model, tokenizer, ``lightning_lora_merge.json``) to ``out_dir``
    in one step, with ``io/export.py``'s merged writer."""
    model, tokenizer = load_causal_lm(base_model, dtype="float32")
    tokenizer = tokenizer_for_adapters(model, tokenizer, adapters)  # adapters trained with new_tokens
    weights = load_adapters_weighted(model, adapters)
    set_adapter(model, weights)
    merge(model)
    probe(model, what="the merged combination")
    with atomic_dir(out_dir) as tmp:
        save_merged(model, tokenizer, tmp, dtype)
        record = {"base_model": str(base_model), "adapters": {str(p): float(w) for p, w in adapters.items()}}
        write_json(record, tmp / MERGE_RECORD)
    return Path(out_dir)


def _print_side_by_side(prompt: str, texts: Mapping[str, str]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        for label, text in texts.items():
            print(f"=== {label} ===\n{text}\n")
        return
    table = Table(title=f"prompt: {prompt}", show_lines=True)
    table.add_column("variant", no_wrap=True)
    table.add_column("output")
    for label, text in texts.items():
        table.add_row(label, text)
    Console().print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lightning_lora generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base_model", help="alias (smollm2-135m-instruct), HF folder or cached hub id; default: the "
                                             "base the adapters record")  # fmt: skip
    parser.add_argument("--adapter", action="append", required=True, metavar="PATH[:WEIGHT]",
                        help="PEFT adapter folder, optional weight (default 1); repeat for several")  # fmt: skip
    parser.add_argument("--prompt", help="text to continue (the chat template is applied when the tokenizer has one)")
    parser.add_argument("--compare", action="store_true", help="also generate with the base and each adapter alone")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--no_chat", action="store_true", help="do not apply the tokenizer's chat template")
    parser.add_argument("--merge_to", metavar="DIR", help="write the weighted combination merged into the base to DIR")
    return parser


def main(argv: list[str] | None = None) -> dict[str, str] | Path:
    args = build_parser().parse_args(command_args(argv, "generate"))
    adapters: dict[str, float] = {}
    for spec in args.adapter:
        path, weight = parse_adapter(spec)
        if not Path(path).is_dir():
            raise SystemExit(f"generate: adapter folder {path!r} does not exist (from --adapter {spec!r}).")
        adapters[path] = adapters.get(path, 0.0) + weight
    base_model = args.base_model or recorded_base(list(adapters))
    if args.merge_to:
        out = export_combination(base_model, adapters, args.merge_to)
        print(f"lightning_lora: merged model written to {out}")
        return out
    if not args.prompt:
        raise SystemExit("generate: give --prompt (or --merge_to DIR to export the combination).")
    if args.max_new_tokens <= 0:
        raise SystemExit(f"generate: --max_new_tokens must be positive, got {args.max_new_tokens}.")
    model, tokenizer = load_causal_lm(base_model)
    tokenizer = tokenizer_for_adapters(model, tokenizer, adapters)
    weights = load_adapters_weighted(model, adapters)
    texts = generate_variants(model, tokenizer, args.prompt, weights, args.compare, args.max_new_tokens, not args.no_chat)
    _print_side_by_side(args.prompt, texts)
    return texts
