"""Export a trained adapter: ``<dir>/adapter`` (PEFT format) and ``<dir>/merged`` (the adapter folded into the base).

For a Hugging Face model with a known source (``base_model``), the merged model is computed against the base
re-loaded at high precision from that source, never against the weights used in training: a QLoRA run (NF4 base)
thus merges losslessly, W' = W_fp32 + s B A. ``<dir>/merged`` is then a ``save_pretrained`` folder with the
tokenizer, so ``AutoModelForCausalLM.from_pretrained(<dir>/merged)`` works. Other models merge a copy and save its
state dict as ``<dir>/merged/model.safetensors``. Every folder is written atomically.

Offline, from an adapter-only checkpoint written by ``LoRAModule``::

    python -m lightning_lora export --ckpt_path runs/last.ckpt --export_dir out
    python -m lightning_lora export --ckpt_path X --export_dir out --config configs/quickstart.yaml  # or --base_model
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
from pathlib import Path

import torch
from torch import nn

from lightning_lora.io.files import atomic_dir, save_tensors
from lightning_lora.core.verbs import adapter_names, adapter_state_dict, inject, merge
from lightning_lora.core.layer import AdapterConfig
from lightning_lora.io.peft import load_adapter, save_adapter, save_adapters

CKPT_KEY = "lightning_lora"  # plain-typed run facts LoRAModule stores in checkpoints (readable with weights_only=True)


def _is_hf(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel)


def _cast(model: nn.Module, dtype: str | None) -> nn.Module:
    if dtype in (None, "auto", "float32", "torch.float32"):
        return model
    return model.to(getattr(torch, str(dtype).removeprefix("torch.")))


def export(
    model: nn.Module,
    export_dir: str | os.PathLike,
    name: str = "default",
    base_model: str | None = None,
    tokenizer=None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    in_place: bool = False,
) -> dict[str, Path]:
    """Write ``<export_dir>/adapter`` and ``<export_dir>/merged`` for adapter ``name`` of ``model``; return both paths.

    With several adapters on the model, ``<export_dir>/adapter`` holds all of them in PEFT's layout ("default" at the
    root, the others in subfolders named after them); ``merged`` is the base with ``name`` merged in.

    Args:
        base_model: source of the base (alias, folder, hub id): the merge is done on a fresh high-precision copy.
            None merges a deep copy of ``model`` (or ``model`` itself with ``in_place=True``).
        tokenizer: saved next to a merged Hugging Face model (default: the source's tokenizer, if any).
        dtype: dtype of the saved merged model (default float32).
    """
    export_dir = Path(export_dir)
    several = len(adapter_names(model)) > 1  # then every adapter is exported, in PEFT's multi-adapter layout
    adapter_dir = save_adapters(model, export_dir / "adapter") if several else save_adapter(model, export_dir / "adapter", name)
    merged_dir = export_dir / "merged"
    if base_model is not None:
        from lightning_lora.io.models import load_causal_lm

        merged, source_tokenizer = load_causal_lm(base_model, dtype="float32", trust_remote_code=trust_remote_code)
        tokenizer = tokenizer if tokenizer is not None else source_tokenizer
        load_adapter(merged, adapter_dir / name if several and name != "default" else adapter_dir, name)
    else:
        # a LightningModule points to its Trainer: map it to None so the copy does not drag the Trainer along
        merged = model if in_place else copy.deepcopy(model, {id(getattr(model, "_trainer", None)): None})
    merge(merged)
    merged = _cast(merged, dtype)
    with atomic_dir(merged_dir) as tmp:
        if _is_hf(merged):
            merged.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        else:
            save_tensors(merged.state_dict(), tmp / "model.safetensors")
    print(f"lightning_lora: adapter (PEFT format) written to {adapter_dir}")
    print(f"lightning_lora: merged model written to {merged_dir}")
    return {"adapter": adapter_dir, "merged": merged_dir}


# ------------------------------------------------------------------ offline export from a checkpoint
def _adapter_from_spec(spec: dict) -> AdapterConfig:
    """An adapter config from ``{"class_path": ..., "init_args": {...}}`` (only AdapterConfig subclasses)."""
    path = spec.get("class_path", "lightning_lora.LoRA")
    if "." not in path:
        path = f"lightning_lora.{path}"
    module_name, _, cls_name = path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, AdapterConfig)):
        raise ValueError(f"adapter class_path {path!r} is not a lightning_lora adapter config (LoRA, DoRA, VeRA).")
    return cls(**(spec.get("init_args") or {}))


def _facts_from_config(path: str) -> dict:
    import yaml

    with open(path) as f:
        config = yaml.safe_load(f) or {}
    model = config.get("model") or {}
    model = model.get("init_args", model)
    adapter = model.get("adapter") or {"class_path": "lightning_lora.LoRA"}
    return {k: v for k, v in {"base_model": model.get("base_model"), "adapter": adapter,
                              "adapter_name": model.get("adapter_name"), "dtype": model.get("dtype")}.items() if v}  # fmt: skip


def export_checkpoint(
    ckpt_path: str | os.PathLike, export_dir: str | os.PathLike, config: str | None = None, base_model: str | None = None
) -> dict[str, Path]:
    """Rebuild the high-precision base, load the checkpoint's adapter into it, and ``export`` (no training state)."""
    from lightning_lora.io.models import load_causal_lm

    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    facts = dict(checkpoint.get(CKPT_KEY) or {})
    if config:
        facts.update(_facts_from_config(config))
    if base_model:
        facts["base_model"] = base_model
    if not facts.get("base_model") or not facts.get("adapter"):
        raise ValueError(
            f"{ckpt_path} does not say which base model and adapter it was trained with (it was not written by "
            "LoRAModule); pass --config <the run's yaml> or --base_model."
        )
    name = facts.get("adapter_name") or "default"
    model, tokenizer = load_causal_lm(facts["base_model"], dtype="float32")
    inject(model, _adapter_from_spec(facts["adapter"]), name)
    state = {k.removeprefix("model."): v for k, v in checkpoint.get("state_dict", {}).items()}
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
    return export(model, export_dir, name=name, tokenizer=tokenizer, dtype=facts.get("dtype"), in_place=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_lora export",
        description="Export <export_dir>/adapter (PEFT) and <export_dir>/merged from an adapter-only checkpoint.",
    )
    parser.add_argument("--ckpt_path", "--ckpt", required=True, help="checkpoint written by a LoRAModule run")
    parser.add_argument("--export_dir", required=True, help="output folder")
    parser.add_argument("--config", help="the run's YAML (base_model, adapter); default: read from the checkpoint")
    parser.add_argument("--base_model", help="override the base model (alias, folder or cached hub id)")
    args = parser.parse_args(list(argv or [])[1:] if argv and argv[0] == "export" else argv)
    export_checkpoint(args.ckpt_path, args.export_dir, config=args.config, base_model=args.base_model)


if __name__ == "__main__":
    main()
