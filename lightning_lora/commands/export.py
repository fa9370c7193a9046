"""``python -m lightning_lora export``: write ``<dir>/adapter`` (PEFT) and ``<dir>/merged`` from an adapter-only
checkpoint written by ``LoRAModule`` (or ``AdapterCallback`` with ``--base_model``), without any training state::

    python -m lightning_lora export --ckpt_path runs/last.ckpt --export_dir out
    python -m lightning_lora export --ckpt_path X --export_dir out --config configs/quickstart.yaml  # or --base_model
    python -m lightning_lora export --ckpt_path X --export_dir out --format gguf             # + out/adapter.gguf
    python -m lightning_lora export --ckpt_path X --export_dir out --format gguf --merged --outtype q8_0  # merged GGUF
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lightning_lora.commands import command_args
from lightning_lora.core.verbs import adapter_state_dict, inject
from lightning_lora.io.checkpoint import adapter_from_spec, facts_from_config, read_checkpoint
from lightning_lora.io.export import export
from lightning_lora.io.gguf_model import MODEL_DTYPES
from lightning_lora.io.models import load_causal_lm
from lightning_lora.quant.nf4 import NF4
from lightning_lora.quant.prepare import prepare


def export_checkpoint(
    ckpt_path: str | os.PathLike, export_dir: str | os.PathLike, config: str | None = None, base_model: str | None = None,
    gguf: list[str] | None = None,
) -> dict[str, Path]:
    """Rebuild the high-precision base, load the checkpoint's adapter into it, and ``export`` (no training state);
    ``gguf`` as in ``io.export.export``."""
    facts, state = read_checkpoint(ckpt_path)
    if config:
        facts.update(facts_from_config(config))
    if base_model:
        facts["base_model"] = base_model
    if not facts.get("base_model") or not facts.get("adapter"):
        raise ValueError(
            f"{ckpt_path} does not say which base model and adapter it was trained with (it was not written by "
            "LoRAModule); pass --config <the run's yaml> or --base_model."
        )
    name = facts.get("adapter_name") or "default"
    model, tokenizer = load_causal_lm(facts["base_model"], dtype="float32")
    adapter = adapter_from_spec(facts["adapter"])
    if adapter.rewrites_base:  # PiSSA/LoftQ: rebuild the trained base (deterministic)
        quant = facts.get("quantize")
        prepare(model, adapter, name, NF4(**(quant.get("init_args", quant) or {})) if quant else None)
    else:
        inject(model, adapter, name)
    state = {k.removeprefix("model."): v for k, v in state.items()}
    wanted = set(adapter_state_dict(model, name))
    missing = sorted(wanted - set(state))
    if missing:
        raise ValueError(
            f"{ckpt_path} lacks {len(missing)} adapter tensors the config implies (e.g. {missing[:2]}); "
            "is the config/base_model the one this checkpoint was trained with?"
        )
    mine = adapter_state_dict(model, name)
    for key in mine:  # model order: the first mismatching layer
        if key in wanted and tuple(state[key].shape) != tuple(mine[key].shape):
            raise ValueError(
                f"{ckpt_path}: {key} has shape {tuple(state[key].shape)} but the base {facts['base_model']!r} needs "
                f"{tuple(mine[key].shape)}. The adapter was trained on another base model: pass that one as "
                "--base_model (or the run's --config)."
            )
    model.load_state_dict({k: state[k] for k in wanted}, strict=False)
    return export(model, export_dir, name=name, tokenizer=tokenizer, dtype=facts.get("dtype"), in_place=True,
                  gguf=gguf)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_lora export",
        description="Export <export_dir>/adapter (PEFT) and <export_dir>/merged from an adapter-only checkpoint.",
    )
    parser.add_argument("--ckpt_path", "--ckpt", required=True, help="checkpoint written by a LoRAModule run")
    parser.add_argument("--export_dir", required=True, help="output folder")
    parser.add_argument("--config", help="the run's YAML (base_model, adapter); default: read from the checkpoint")
    parser.add_argument("--base_model", help="override the base model (alias, folder or cached hub id)")
    parser.add_argument("--format", choices=("peft", "gguf"), default="peft",
                        help="gguf: also write llama.cpp GGUF: <export_dir>/adapter.gguf, or with --merged the merged "
                             "model <export_dir>/merged-<outtype>.gguf")  # fmt: skip
    parser.add_argument("--merged", action="store_true", help="with --format gguf: the merged model (any method)")
    parser.add_argument("--outtype", choices=MODEL_DTYPES, default="f16", help="merged GGUF weight type")
    args = parser.parse_args(command_args(argv, "export"))
    gguf = None if args.format == "peft" else [args.outtype] if args.merged else ["adapter"]
    paths = export_checkpoint(args.ckpt_path, args.export_dir, config=args.config, base_model=args.base_model,
                              gguf=gguf)  # fmt: skip
    print(f"lightning_lora: adapter (PEFT format) written to {paths['adapter']}")
    print(f"lightning_lora: merged model written to {paths['merged']}")
    for key in (k for k in paths if "gguf" in k):
        print(f"lightning_lora: {key.replace('_', ' ')} written to {paths[key]}")

