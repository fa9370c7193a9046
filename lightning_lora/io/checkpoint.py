"""Adapter-only Lightning checkpoints: the one place that writes, reads and validates them.

A checkpoint written by ``LoRAModule`` or ``AdapterCallback`` keeps only the trainable tensors (the adapter, and any
parameter the user left trainable) in ``state_dict``, plus plain-typed run facts under ``CKPT_KEY`` (base model,
adapter config as ``class_path``/``init_args``, adapter name, quantization, dtype, and what the model card says of the
run: data, steps, validation loss), so it loads with ``torch.load(..., weights_only=True)`` and ``load_for_export``
rebuilds the trained model from it offline. A checkpoint holding other pickled objects is refused, never unpickled.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_lora.core.imports import import_class
from lightning_lora.core.layer import AdapterConfig
from lightning_lora.core.verbs import adapter_state_dict, inject
from lightning_lora.io.finite import check_finite
from lightning_lora.io.models import load_causal_lm
from lightning_lora.io.tokens import add_new_tokens
from lightning_lora.quant.nf4 import NF4
from lightning_lora.quant.prepare import prepare

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
                quantize: object = None, dtype: str | None = None, run: dict | None = None,
                new_tokens: list[str] | None = None) -> None:  # fmt: skip
    """Store the run facts an offline export needs under ``checkpoint[CKPT_KEY]`` (``run``: the card's data, steps,
    val_loss at the time of the checkpoint; ``new_tokens``: the tokens the run added, ``io/tokens.py``)."""
    checkpoint[CKPT_KEY] = {
        "base_model": base_model,
        "adapter": class_spec(adapter),
        "adapter_name": adapter_name,
        "quantize": class_spec(quantize) if dataclasses.is_dataclass(quantize) else None,
        "dtype": dtype,
        "run": _plain(run) if run else None,
        "new_tokens": list(new_tokens) if new_tokens else None,
    }


def pickle_refusal(path: str | os.PathLike | None, err: BaseException) -> str:
    """One line for a checkpoint ``torch.load(weights_only=True)`` refused: what it holds, that we never unpickle it."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    what = f" ({found.group(1)})" if found else ""
    where = str(path) if path else "the checkpoint"
    return (f"{where} holds pickled Python objects{what}, not only tensors and plain values; lightning_lora loads "
            "checkpoints with weights_only=True and never runs code from a file. Use a checkpoint written by "
            "LoRAModule or AdapterCallback.")  # fmt: skip


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """(run facts, adapter state dict) of a checkpoint, loaded without unpickling code (``weights_only=True``)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(pickle_refusal(path, err)) from None
    return dict(checkpoint.get(CKPT_KEY) or {}), dict(checkpoint.get("state_dict") or {})


def load_for_export(ckpt_path: str | os.PathLike, config: str | os.PathLike | None = None,
                    base_model: str | None = None) -> tuple[nn.Module, Any, dict]:  # fmt: skip
    """``(model, tokenizer, facts)``: the high-precision base with the checkpoint's adapter, as trained (a PiSSA/LoftQ
    start rebuilds its changed base, deterministically). ``config`` (the run's YAML) and ``base_model`` override
    the checkpoint's facts.

    Raises:
        ValueError: no base/adapter known, tensors missing, of the wrong shape (another base) or non-finite; a
            checkpoint with pickled objects. Each names the checkpoint and the key.
    """
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
    state = {k.removeprefix("model."): v for k, v in state.items()}
    check_finite(state, str(ckpt_path), "Export an earlier checkpoint of the run, from before it diverged.")
    model, tokenizer = load_causal_lm(facts["base_model"], dtype="float32")
    adapter = add_new_tokens(model, tokenizer, adapter_from_spec(facts["adapter"]), facts.get("new_tokens") or [])
    quant = facts.get("quantize")
    if adapter.rewrites_base:  # PiSSA/LoftQ: rebuild the trained base (deterministic)
        prepare(model, adapter, name, NF4(**(quant.get("init_args", quant) or {})) if quant else None)
    else:
        inject(model, adapter, name)
    mine = adapter_state_dict(model, name)
    missing = sorted(set(mine) - set(state))
    if missing:
        raise ValueError(
            f"{ckpt_path} lacks {len(missing)} adapter tensors the config implies (e.g. {missing[:2]}); "
            "is the config/base_model the one this checkpoint was trained with?"
        )
    for key in mine:  # model order: the first mismatching layer
        if tuple(state[key].shape) != tuple(mine[key].shape):
            raise ValueError(
                f"{ckpt_path}: {key} has shape {tuple(state[key].shape)} but the base {facts['base_model']!r} needs "
                f"{tuple(mine[key].shape)}. The adapter was trained on another base model: pass that one as "
                "--base_model (or the run's --config)."
            )
    model.load_state_dict({k: state[k] for k in mine}, strict=False)
    facts["run"] = dict(facts.get("run") or {}, **({"quantize": "NF4"} if quant else {}))
    return model, tokenizer, facts


def facts_from_config(path: str | os.PathLike) -> dict:
    """The run facts a LightningCLI YAML states (``model.base_model``, ``model.adapter``, ...)."""
    import yaml

    with open(path) as f:
        config = yaml.safe_load(f) or {}
    model = config.get("model") or {}
    model = model.get("init_args", model)
    adapter = model.get("adapter") or {"class_path": "lightning_lora.LoRA"}
    facts = {"base_model": model.get("base_model"), "adapter": adapter, "adapter_name": model.get("adapter_name"),
             "dtype": model.get("dtype"), "quantize": model.get("quantize"), "new_tokens": model.get("new_tokens")}  # fmt: skip
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
