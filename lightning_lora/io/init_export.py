"""Exports of adapters whose start rewrote the base (``started_from``: PiSSA, QPiSSA, LoftQ): every export computes
the function that was trained, never the original W plus the adapter (which would count the start twice).

- ``merged``: each adapted layer gets W' = base + adapter, with base the layer the adapter trained on (PiSSA's
  residual W_res, or dequant(Q) for QPiSSA and LoftQ); quantized layers the adapter does not touch are dequantized
  (the function trained used them that way). This is exact; no re-quantization, no reload of the original W.
- ``adapter``: what ``save_adapter`` writes for such an adapter, for the original base: each branch's
  ``for_original_base`` (PiSSA: the rank-2r conversion) and its method's note on which base it belongs on (LoftQ's
  quantized base) in the README. Nothing method-specific is decided here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from lightning_lora.core.layer import AdapterLayer, dense_weight, is_quantized, kind_of, merged_base_layer
from lightning_lora.core.verbs import layer_map, remove
from lightning_lora.io.peft import save_adapter


def svd_init(model: nn.Module, name: str) -> str | None:
    """The start that rewrote the base of adapter ``name`` (e.g. ``"PiSSA"``, ``"LoftQ (1 iter.)"``), or None."""
    return next((b.started_from for b in layer_map(model, name).values() if b.started_from), None)


def save_for_original_base(model: nn.Module, path: str | Path, name: str = "default", **card) -> Path:
    """Adapter ``name`` in PEFT's format for the original base: ``save_adapter`` (module docstring)."""
    return save_adapter(model, path, name, **card)


def merge_exact(model: nn.Module, name: str, target: nn.Module | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """A plain model computing what ``model`` computes with adapter ``name``: ``target`` (a model of the same
    architecture, e.g. the base re-loaded) gets each adapted layer's base + adapter and each NF4 layer dequantized,
    written one layer at a time. Without ``target`` a copy of ``model`` is used."""
    if target is None:
        target = remove(copy.deepcopy(model))
    with torch.no_grad():
        for layer_name, module in list(model.named_modules()):
            bias = None
            if isinstance(module, AdapterLayer):
                base = module.base_layer
                weight = dense_weight(base).detach()
                if name in module.adapters:
                    branch = module.adapters[name]
                    weight = branch.merged_weight(weight.float(), base)
                    original = kind_of(base).bias(base)
                    bias = branch.merged_bias(original, base)
                    bias = None if bias is original else bias
            elif is_quantized(module) and not layer_name.endswith(".base_layer"):
                weight = dense_weight(module).detach()
            else:
                continue
            old = target.get_submodule(layer_name)
            new = merged_base_layer(old, weight.to(dtype or torch.float32), dtype or torch.float32, bias)
            if new is not old:
                parent, _, child = layer_name.rpartition(".")
                setattr(target.get_submodule(parent) if parent else target, child, new)
    return target
