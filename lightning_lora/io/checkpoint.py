"""Adapter-only Lightning checkpoints: the one place that writes and reads their run facts.

A checkpoint written by ``LoRAModule`` or ``AdapterCallback`` keeps only the trainable tensors (the adapter, and any
parameter the user left trainable) in ``state_dict``, plus plain-typed run facts under ``CKPT_KEY`` (base model,
adapter config as ``class_path``/``init_args``, adapter name, quantization, dtype), so it loads with
``torch.load(..., weights_only=True)`` and an offline export can rebuild the model from it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn

from lightning_lora.core.imports import import_class
from lightning_lora.core.layer import AdapterConfig
from lightning_lora.core.verbs import adapter_state_dict

CKPT_KEY = "lightning_lora"


def trainable_keys(module: nn.Module, model: nn.Module, prefix: str) -> set[str]:
    """State-dict keys of ``module`` to checkpoint: the adapters of ``model`` (its submodule under ``prefix``) and
    every parameter that still requires grad (e.g. a head the user unfroze)."""
    keys = {prefix + k for k in adapter_state_dict(model)}
    keys |= {n for n, p in module.named_parameters() if p.requires_grad}
    return keys


def keep_adapter_only(checkpoint: dict, module: nn.Module, model: nn.Module, prefix: str) -> None:
    """Drop every frozen tensor from ``checkpoint["state_dict"]`` (in place)."""
    if "state_dict" in checkpoint:
        keep = trainable_keys(module, model, prefix)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}


def class_spec(config: object) -> dict:
    """``{"class_path", "init_args"}`` of a dataclass config, in plain types (as LightningCLI writes it)."""
    return {"class_path": f"{type(config).__module__}.{type(config).__qualname__}",
            "init_args": _plain(dataclasses.asdict(config))}  # fmt: skip


def write_facts(checkpoint: dict, *, adapter: AdapterConfig, adapter_name: str, base_model: str | None = None,
                quantize: object = None, dtype: str | None = None) -> None:  # fmt: skip
    """Store the run facts an offline export needs under ``checkpoint[CKPT_KEY]``."""
    checkpoint[CKPT_KEY] = {
        "base_model": base_model,
        "adapter": class_spec(adapter),
        "adapter_name": adapter_name,
        "quantize": class_spec(quantize) if dataclasses.is_dataclass(quantize) else None,
        "dtype": dtype,
    }


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """(run facts, adapter state dict) of a checkpoint, loaded without unpickling code (``weights_only=True``)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return dict(checkpoint.get(CKPT_KEY) or {}), dict(checkpoint.get("state_dict") or {})


def facts_from_config(path: str | os.PathLike) -> dict:
    """The run facts a LightningCLI YAML states (``model.base_model``, ``model.adapter``, ...)."""
    import yaml

    with open(path) as f:
        config = yaml.safe_load(f) or {}
    model = config.get("model") or {}
    model = model.get("init_args", model)
    adapter = model.get("adapter") or {"class_path": "lightning_lora.LoRA"}
    facts = {"base_model": model.get("base_model"), "adapter": adapter, "adapter_name": model.get("adapter_name"),
             "dtype": model.get("dtype"), "quantize": model.get("quantize")}  # fmt: skip
    return {k: v for k, v in facts.items() if v}


def adapter_from_spec(spec: dict) -> AdapterConfig:
    """An adapter config from ``{"class_path": ..., "init_args": {...}}`` (only AdapterConfig subclasses)."""
    path = spec.get("class_path", "lightning_lora.LoRA")
    if "." not in path:
        path = f"lightning_lora.{path}"
    cls = import_class(path, AdapterConfig, "adapter class_path")
    return cls(**(spec.get("init_args") or {}))


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists and non-plain leaves as strings (for weights_only-safe checkpoints)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
