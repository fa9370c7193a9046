"""Export a trained adapter: ``<dir>/adapter`` (PEFT format) and ``<dir>/merged`` (the adapter folded into the base).

For a Hugging Face model with a known source (``base_model``), the merged model is computed against the base
re-loaded at high precision from that source, never against the weights used in training: a QLoRA run (NF4 base)
thus merges losslessly, W' = W_fp32 + s B A. ``<dir>/merged`` is then a ``save_pretrained`` folder with the
tokenizer, so ``AutoModelForCausalLM.from_pretrained(<dir>/merged)`` works. Other models merge a copy and save its
state dict as ``<dir>/merged/model.safetensors``. Every folder is written atomically.

Offline, from an adapter-only checkpoint: ``python -m lightning_lora export`` (``commands/export.py``). With
``gguf=`` it also writes llama.cpp files: the adapter GGUF and/or the merged model GGUF.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from lightning_lora.core.dtypes import parse_dtype
from lightning_lora.core.verbs import adapter_names, merge
from lightning_lora.io.card import base_source
from lightning_lora.io.files import atomic_dir, save_tensors
from lightning_lora.io.gguf import hf_config, lora_pairs, write_adapter_gguf
from lightning_lora.io.gguf_model import MODEL_DTYPES, write_model_gguf
from lightning_lora.io.init_export import merge_exact, save_for_original_base, svd_init
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
    dtype = None if dtype is None else parse_dtype(dtype, auto=True)
    return model if dtype in (None, "auto", torch.float32) else model.to(dtype)


def export(
    model: nn.Module,
    export_dir: str | os.PathLike,
    name: str = "default",
    base_model: str | None = None,
    tokenizer=None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    in_place: bool = False,
    gguf: Sequence[str] | str | None = None,
    run: dict | None = None,
) -> dict[str, Path]:
    """Write ``<export_dir>/adapter`` and ``<export_dir>/merged`` for adapter ``name`` of ``model``; return both paths.

    With several adapters on the model, ``<export_dir>/adapter`` holds all of them in PEFT's layout ("default" at the
    root, the others in subfolders named after them); ``merged`` is the base with ``name`` merged in.

    Args:
        base_model: source of the base (alias, folder, hub id): the merge is done on a fresh high-precision copy.
            None merges a deep copy of ``model`` (or ``model`` itself with ``in_place=True``).
        tokenizer: saved next to a merged Hugging Face model (default: the source's tokenizer, if any).
        dtype: dtype of the saved merged model (default float32).
        gguf: llama.cpp files to write too (``io/gguf.py``, ``io/gguf_model.py``): ``"adapter"`` for
            ``<export_dir>/adapter.gguf`` (LoRA/rsLoRA only), and/or ``"f16"``, ``"bf16"``, ``"q8_0"`` for the merged
            model as ``<export_dir>/merged-<type>.gguf``. Everything is checked before anything is written.
        run: facts for the adapter's model card (``data``, ``steps``, ``val_loss``).

    Returns:
        ``{"adapter", "merged"}`` paths, plus ``"adapter_gguf"`` and ``"gguf_<type>"`` for the GGUF files written.
    """
    export_dir = Path(export_dir)
    gguf = check_gguf_request(model, name, gguf, tokenizer if base_model is None else "later")
    several = len(adapter_names(model)) > 1  # then every adapter is exported, in PEFT's multi-adapter layout
    card = {"base_model_name_or_path": base_source(model, base_model), "run": run}
    svd_start = svd_init(model, name)  # PiSSA/LoftQ: every export computes the trained function (init_export.py)
    if svd_start and "adapter" in gguf:
        raise ValueError(f"gguf='adapter': adapter {name!r} started from {svd_start!r} and trained on the base it "
                         "changed, which llama.cpp's base GGUF does not hold; export the merged model GGUF instead.")
    if svd_start:
        adapter_dir = save_for_original_base(model, export_dir / "adapter", name, **card)
    else:
        adapter_dir = (save_adapters(model, export_dir / "adapter", **card) if several
                       else save_adapter(model, export_dir / "adapter", name, **card))  # fmt: skip
    paths = {"adapter": adapter_dir, "merged": export_dir / "merged"}
    if "adapter" in gguf:
        paths["adapter_gguf"] = write_adapter_gguf(model, export_dir / "adapter.gguf", name)
    merged_dir = export_dir / "merged"
    if svd_start:  # the trained base (residual, LoftQ's Q) plus the adapter, written into a fresh copy of the base
        fresh = None
        if base_model is not None:
            fresh, source_tokenizer = load_causal_lm(base_model, dtype="float32", trust_remote_code=trust_remote_code)
            tokenizer = tokenizer if tokenizer is not None else source_tokenizer
        merged = merge_exact(model, name, fresh)
    elif base_model is not None:
        merged, source_tokenizer = load_causal_lm(base_model, dtype="float32", trust_remote_code=trust_remote_code)
        tokenizer = tokenizer if tokenizer is not None else source_tokenizer
        load_adapter(merged, adapter_dir / name if several and name != "default" else adapter_dir, name)
    else:
        # a LightningModule points to its Trainer: map it to None so the copy does not drag the Trainer along
        merged = model if in_place else copy.deepcopy(model, {id(getattr(model, "_trainer", None)): None})
    if not svd_start:
        merge(merged)
    for kind in (k for k in gguf if k != "adapter"):
        paths[f"gguf_{kind}"] = write_model_gguf(merged, tokenizer, export_dir / f"merged-{kind}.gguf", kind)
    merged = _cast(merged, dtype)
    with atomic_dir(merged_dir) as tmp:
        if _is_hf(merged):
            merged.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        else:
            save_tensors(merged.state_dict(), tmp / "model.safetensors")
    log.info("adapter (PEFT format) written to %s; merged model written to %s", adapter_dir, merged_dir)
    return paths


def check_gguf_request(model: nn.Module, name: str, gguf: Sequence[str] | str | None, tokenizer) -> list[str]:
    """The list of GGUF files asked for, after checking they can all be written (nothing is written here)."""
    kinds = [gguf] if isinstance(gguf, str) else list(gguf or [])
    bad = [k for k in kinds if k != "adapter" and k not in MODEL_DTYPES]
    if bad:
        raise ValueError(f"gguf={bad}: choose from 'adapter' (llama.cpp LoRA adapter) and {', '.join(MODEL_DTYPES)} "
                         "(the merged model).")  # fmt: skip
    if kinds:
        hf_config(model)  # llama family only
    if "adapter" in kinds:
        lora_pairs(model, name)  # DoRA/VeRA: "merge first: --merged"
    if any(k != "adapter" for k in kinds) and tokenizer is None:
        raise ValueError("a merged GGUF needs the tokenizer: pass tokenizer= (or base_model=) to export.")
    return kinds
