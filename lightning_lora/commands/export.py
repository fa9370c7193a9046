"""``python -m lightning_lora export``: write the exports of an adapter-only checkpoint (written by ``LoRAModule``, or
by ``AdapterCallback`` with ``--base_model``) into a folder, as one transaction, without any training state::

    python -m lightning_lora export --ckpt_path runs/last.ckpt --export_dir out             # out/adapter, out/merged
    python -m lightning_lora export --ckpt_path X --export_dir out --config configs/quickstart.yaml  # or --base_model
    python -m lightning_lora export --ckpt_path X --export_dir out --exports gguf           # only out/adapter.gguf
    python -m lightning_lora export --ckpt_path X --export_dir out --exports gguf-merged:q8_0   # out/merged-q8_0.gguf

Only the formats asked for are written; the others already in ``--export_dir`` stay as they were.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from lightning_lora.commands import command_args
from lightning_lora.io.checkpoint import load_for_export
from lightning_lora.io.export import DEFAULT_EXPORTS, FORMATS, check_export_dir, export, label

_OLD_FLAGS = ("--format", "--merged", "--outtype")


def export_checkpoint(ckpt_path: str | os.PathLike, export_dir: str | os.PathLike, config: str | None = None,
                      base_model: str | None = None, exports=None) -> dict[str, Path]:  # fmt: skip
    """Rebuild the trained model from the checkpoint (``io/checkpoint.py``) and ``export`` it (``io/export.py``)."""
    check_export_dir(export_dir, exports)  # a format typo, a file there: before the model loads
    model, tokenizer, facts = load_for_export(ckpt_path, config, base_model)
    return export(model, export_dir, name=facts.get("adapter_name") or "default", exports=exports,
                  tokenizer=tokenizer, dtype=facts.get("dtype"), in_place=True, run=facts.get("run"))  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_lora export",
        description="Write the exports (PEFT adapter, merged model, GGUF) of an adapter-only checkpoint.",
    )
    parser.add_argument("--ckpt_path", "--ckpt", required=True, help="checkpoint written by a LoRAModule run")
    parser.add_argument("--export_dir", required=True, help="output folder")
    parser.add_argument("--config", help="the run's YAML (base_model, adapter); default: read from the checkpoint")
    parser.add_argument("--base_model", help="override the base model (alias, folder or cached hub id)")
    formats = ", ".join(f"{k} ({FORMATS[k].path.format(option='<type>')})" for k in FORMATS)
    parser.add_argument("--exports", nargs="+", default=list(DEFAULT_EXPORTS), metavar="FORMAT",
                        help=f"what to write (default: {' '.join(DEFAULT_EXPORTS)}): {formats}; gguf-merged takes "
                             ":f16, :bf16 or :q8_0")  # fmt: skip
    for flag in _OLD_FLAGS:
        parser.add_argument(flag, nargs="?", const=True, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Path]:
    args = build_parser().parse_args(command_args(argv, "export"))
    if any(getattr(args, flag[2:]) is not None for flag in _OLD_FLAGS):
        raise ValueError("export: --format, --merged and --outtype were replaced by --exports. Use e.g. --exports gguf "
                         "(adapter.gguf) or --exports gguf-merged:q8_0 (merged-q8_0.gguf).")  # fmt: skip
    exports = [e for item in args.exports for e in item.split(",") if e]
    logging.getLogger("lightning_lora.io.export").setLevel(logging.WARNING)  # its lines are printed here instead
    paths = export_checkpoint(args.ckpt_path, args.export_dir, config=args.config, base_model=args.base_model,
                              exports=exports)  # fmt: skip
    for spec, path in paths.items():
        key, _, option = spec.partition(":")
        print(f"lightning_lora: {label(key, option or None)} written to {path}")
    return paths
