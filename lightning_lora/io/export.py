"""Export a trained adapter: ``<dir>/adapter`` (PEFT format) and ``<dir>/merged`` (the adapter folded into the base).

For a Hugging Face model with a known source (``base_model``), the merged model is computed against the base
re-loaded at high precision from that source, never against the weights used in training: a QLoRA run (NF4 base)
thus merges losslessly, W' = W_fp32 + s B A. ``<dir>/merged`` is then a ``save_pretrained`` folder with the
tokenizer, so ``AutoModelForCausalLM.from_pretrained(<dir>/merged)`` works. Other models merge a copy and save its
state dict as ``<dir>/merged/model.safetensors``. Every folder is written atomically.

Offline, from an adapter-only checkpoint: ``python -m lightning_lora export`` (``commands/export.py``).
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch
from torch import nn

from lightning_lora.core.dtypes import parse_dtype
from lightning_lora.core.verbs import adapter_names, merge
from lightning_lora.io.files import atomic_dir, save_tensors
from lightning_lora.io.models import load_causal_lm
from lightning_lora.io.peft import load_adapter, save_adapter, save_adapters

log = logging.getLogger(__name__)


def _is_hf(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel)


def _cast(model: nn.Module, dtype: str | None) -> nn.Module:
    if dtype in (None, "auto"):
        return model
    dtype = parse_dtype(dtype)
    return model if dtype == torch.float32 else model.to(dtype)


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
    log.info("adapter (PEFT format) written to %s; merged model written to %s", adapter_dir, merged_dir)
    return {"adapter": adapter_dir, "merged": merged_dir}
