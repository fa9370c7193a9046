"""The pieces of ``merge`` (``verbs.py``) for one adapted layer: its original weight, the weight and bias with its
active adapters folded in (each branch's ``merged_weight``/``merged_bias``), the finite check, and untying a weight
shared with another module."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lightning_lora.core.kinds import dense_weight, is_quantized, kind_of
from lightning_lora.core.wrapper import AdapterLayer

log = logging.getLogger(__name__)


def merged_weight(layer: AdapterLayer, weight: Tensor) -> Tensor:
    """W with the layer's active adapters folded in (each branch's ``merged_weight``, in activation order)."""
    for name, scale in layer.active.items():
        if name in layer.adapters:
            weight = layer.adapters[name].merged_weight(weight, layer.base_layer, scale)
    return weight


def merged_bias(layer: AdapterLayer) -> Tensor | None:
    """The bias with the layer's active adapters folded in (``merged_bias``), or None when none of them changes it."""
    base = layer.base_layer
    original = bias = kind_of(base).bias(base)
    for name, scale in layer.active.items():
        if name in layer.adapters:
            bias = layer.adapters[name].merged_bias(bias, base, scale)
    return None if bias is original else bias


def all_finite(weight: Tensor) -> bool:
    """True when no element is NaN/inf: one reduction (a finite sum), and the exact check only if that overflows."""
    return bool(torch.isfinite(weight.sum())) or bool(torch.isfinite(weight).all())


def untie(model: nn.Module, target: str, base: nn.Module) -> None:
    """Give ``base`` its own weight if it shares it with another module (tied input/output embeddings), so the merge
    changes only this layer; the model's config then says the embeddings are no longer tied."""
    weight = getattr(base, "weight", None)
    if not isinstance(weight, nn.Parameter) or is_quantized(base):
        return
    users = [n for n, p in model.named_parameters(remove_duplicate=False) if p is weight]
    if len(users) > 1:
        base.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
        log.warning("merge: %r shared its weight with %s; it was untied so the merge changes only it.", target, users)


def original_weight(target: str, base: nn.Module, base_weights: Mapping[str, Tensor] | None) -> Tensor:
    current = dense_weight(base)
    if base_weights is not None and target in base_weights:
        given = base_weights[target]
        if tuple(given.shape) != tuple(current.shape):
            raise ValueError(f"merge: base weight for {target!r} has shape {tuple(given.shape)}, expected {tuple(current.shape)}.")
        return given.to(current.device)
    return current.detach()  # merged_weight returns a new tensor; a quantized base without originals: merge warns
