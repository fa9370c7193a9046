"""Adapters on disk in Hugging Face PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are ``base_model.model.<module name>.<suffix>`` with PEFT's suffixes (``lora_A.weight``, ``lora_B.weight``,
``lora_embedding_A``, ``lora_magnitude_vector``, ``vera_lambda_b``, ...), so a folder written here loads with
``peft.PeftModel.from_pretrained`` and a folder PEFT wrote loads with ``load_adapter``. Only safetensors are read.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_lora.core.layer import AdapterConfig
from lightning_lora.core.targets import compact_targets
from lightning_lora.core.verbs import adapter_layers, adapter_names, attach, delete_adapter, plan_injection
from lightning_lora.io.card import base_source, model_card, task_type_of
from lightning_lora.io.files import atomic_dir, load_tensors, read_json, save_tensors, write_json
from lightning_lora.methods.dora import DoRA
from lightning_lora.methods.lora import LoRA
from lightning_lora.methods.vera import VeRA, VeRABranch

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE, CARD_FILE = "adapter_config.json", "adapter_model.safetensors", "README.md"
_SUFFIXES = (
    "lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
    "vera_lambda_b", "vera_lambda_d",
)  # fmt: skip


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    name: str = "default",
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    run: dict | None = None,
) -> Path:
    """Write adapter ``name`` of ``model`` to the folder ``path`` in PEFT's format (atomically), with a ``README.md``
    card (``io/card.py``). Returns the path.

    ``base_model_name_or_path`` and ``task_type`` default to where ``model`` was loaded from and ``"CAUSAL_LM"`` for
    causal LMs; ``run`` (``data``, ``steps``, ``val_loss``) goes into the card.
    """
    branches = {t: layer.adapters[name] for t, layer in adapter_layers(model).items() if name in layer.adapters}
    if not branches:
        raise ValueError(f"save_adapter: no adapter named {name!r} on the model; it has {adapter_names(model)}.")
    config = next(iter(branches.values())).config
    tensors = {f"{PREFIX}{t}.{suffix}": v for t, b in branches.items() for suffix, v in b.peft_tensors().items()}
    first = next(iter(branches.values()))
    if isinstance(first, VeRABranch) and config.save_projection:
        tensors["base_model.vera_A"] = first.projections.A
        tensors["base_model.vera_B"] = first.projections.B
    peft_config = config.to_peft(compact_targets(model, sorted(branches)))
    layers = adapter_layers(model)
    peft_config["fan_in_fan_out"] = any(isinstance(layers[t].base_layer, Conv1D) for t in branches)  # GPT-2
    peft_config["task_type"] = task_type or task_type_of(model)
    peft_config["base_model_name_or_path"] = base_model_name_or_path or base_source(model)
    method = type(config).__name__ + (" (rsLoRA)" if getattr(config, "rslora", False) else "")
    with atomic_dir(path) as tmp:
        write_json(peft_config, tmp / CONFIG_FILE)
        save_tensors(tensors, tmp / WEIGHTS_FILE)
        (tmp / CARD_FILE).write_text(model_card(peft_config, method, run))
    return Path(path)


def save_adapters(model: nn.Module, path: str | os.PathLike, **kwargs) -> Path:
    """Write every adapter of ``model`` as PEFT's ``save_pretrained`` lays several out: adapter ``"default"`` at the
    root of ``path``, each other one in the subfolder ``path/<name>`` (atomically, as one folder); ``kwargs`` go to
    ``save_adapter``. PEFT reads it with
    ``PeftModel.from_pretrained(base, path)`` and ``.load_adapter(path/<name>, adapter_name=<name>)``."""
    names = adapter_names(model)
    if not names:
        raise ValueError("save_adapters: the model has no adapters (inject or load_adapter first).")
    bad = [n for n in names if n != "default" and (n != Path(n).name or n in (CONFIG_FILE, WEIGHTS_FILE))]
    if bad:
        raise ValueError(f"save_adapters: adapter names {bad} cannot be folder names; rename them before saving.")
    with atomic_dir(path) as tmp:
        for name in sorted(names, key=lambda n: n != "default"):  # the root first: save_adapter replaces its folder
            save_adapter(model, tmp if name == "default" else tmp / name, name, **kwargs)
    return Path(path)


def load_adapters(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load every adapter of a folder written by ``save_adapters`` (or PEFT): the root as ``"default"`` if it holds
    one, each subfolder holding an adapter under the subfolder's name. On any error the adapters loaded so far are
    deleted again, so the model is left as it was. Returns the names loaded."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter folder {path} does not exist.")
    folders = {"default": path} if (path / CONFIG_FILE).exists() else {}
    folders.update({sub.name: sub for sub in sorted(path.iterdir()) if (sub / CONFIG_FILE).exists()})
    if not folders:
        raise ValueError(f"{path} holds no adapter ({CONFIG_FILE} at the root or in a subfolder).")
    loaded: list[str] = []
    try:
        for name, folder in folders.items():
            load_adapter(model, folder, name)
            loaded.append(name)
    except Exception:
        for name in reversed(loaded):
            delete_adapter(model, name)
        raise
    return loaded


def config_from_peft(peft_config: dict, source: str = "adapter_config.json") -> AdapterConfig:
    """Our config for a PEFT ``adapter_config.json`` (targets are set by the caller from the file's tensors)."""
    kind = peft_config.get("peft_type")
    unsupported = {k: peft_config.get(k) for k in ("rank_pattern", "alpha_pattern", "modules_to_save") if peft_config.get(k)}
    if peft_config.get("bias", "none") != "none":
        unsupported["bias"] = peft_config["bias"]
    if unsupported:
        raise ValueError(f"{source}: PEFT options not supported by lightning_lora: {unsupported}.")
    if kind == "LORA":
        cls = DoRA if peft_config.get("use_dora") else LoRA
        return cls(
            r=int(peft_config["r"]),
            alpha=float(peft_config.get("lora_alpha", 8)),
            dropout=float(peft_config.get("lora_dropout", 0.0)),
            rslora=bool(peft_config.get("use_rslora", False)),
        )
    if kind == "VERA":
        return VeRA(
            r=int(peft_config["r"]),
            seed=int(peft_config.get("projection_prng_key", 0)),
            d_initial=float(peft_config.get("d_initial", 0.1)),
            dropout=float(peft_config.get("vera_dropout", 0.0)),
            save_projection=bool(peft_config.get("save_projection", True)),
        )
    raise ValueError(f"{source}: peft_type {kind!r} is not supported; lightning_lora reads LORA (incl. DoRA) and VERA.")


def _split_key(key: str, source: Path) -> tuple[str, str]:
    if key.endswith("lora_magnitude_vector.weight"):  # older PEFT releases
        key = key[: -len(".weight")]
    for suffix in _SUFFIXES:
        if key.startswith(PREFIX) and key.endswith("." + suffix):
            return key[len(PREFIX) : -len(suffix) - 1], suffix
    raise ValueError(f"{source}: unexpected tensor {key!r}; is this a PEFT LoRA/DoRA/VeRA adapter?")


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default") -> nn.Module:
    """Add the adapter stored in folder ``path`` to ``model`` under ``name`` (injecting its layers).

    Everything is checked before the model is touched: on any error the model is left exactly as it was.

    Raises:
        FileNotFoundError: the folder or one of its files is missing.
        ValueError: a truncated or pickle-based file, an unsupported method, layers the model lacks, shapes that do
            not fit (the message names the layer and both shapes), or ``name`` already in use.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter folder {path} does not exist.")
    weights_path = path / WEIGHTS_FILE
    if not weights_path.exists() and any(path.glob("*.bin")) | any(path.glob("*.pt")) | any(path.glob("*.pth")):
        raise ValueError(
            f"{path} holds only pickle-based weights; lightning_lora never unpickles files (they can run code). "
            f"Convert them to {WEIGHTS_FILE} with a tool you trust."
        )
    config = config_from_peft(read_json(path / CONFIG_FILE), str(path / CONFIG_FILE))
    tensors = load_tensors(weights_path)
    projections = {k: tensors.pop(k) for k in ("base_model.vera_A", "base_model.vera_B") if k in tensors}
    _drop_saved_embeddings(model, tensors, weights_path)
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        layer, suffix = _split_key(key, weights_path)
        by_layer.setdefault(layer, {})[suffix] = value
    if not by_layer:
        raise ValueError(f"{weights_path} holds no adapter tensors.")
    modules = dict(model.named_modules())
    missing = [layer for layer in by_layer if layer not in modules]
    if missing:
        raise ValueError(
            f"{path}: the adapter is for layers this {type(model).__name__} does not have, e.g. {missing[:3]}; "
            "is it for another architecture, or was it saved from a wrapper of this model?"
        )
    config.target_modules = sorted(by_layer)
    plan = plan_injection(model, config, name)
    if isinstance(config, VeRA) and projections:
        _use_saved_projections(plan, projections, weights_path)
    for target, branch in plan:
        expected = branch.peft_tensors()
        given = by_layer[target]
        if set(given) != set(expected):
            raise ValueError(f"{weights_path}: layer {target!r} has tensors {sorted(given)}, expected {sorted(expected)}.")
        for suffix, param in expected.items():
            if tuple(given[suffix].shape) != tuple(param.shape):
                raise ValueError(
                    f"{weights_path}: {suffix} of layer {target!r} has shape {tuple(given[suffix].shape)} but the "
                    f"model needs {tuple(param.shape)}; the adapter was made for a model with other layer sizes."
                )
    with torch.no_grad():
        for target, branch in plan:
            for suffix, param in branch.peft_tensors().items():
                param.copy_(by_layer[target][suffix])
    return attach(model, plan, name)


def _drop_saved_embeddings(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """PEFT also saves the full weight of adapted embeddings (``...embed_tokens.base_layer.weight``). They are
    accepted when equal to the model's own; different ones (a resized vocabulary) are refused, not loaded silently."""
    for key in [k for k in tensors if k.endswith(".base_layer.weight")]:
        try:
            layer = model.get_submodule(key[len(PREFIX) : -len(".base_layer.weight")])
        except AttributeError:
            layer = None
        weight = getattr(layer, "weight", None)  # an adapted layer forwards .weight to its base layer
        if weight is None or not torch.equal(weight.detach().to(tensors[key].dtype), tensors[key]):
            raise ValueError(
                f"{source}: {key} carries base weights that differ from this model's (a resized vocabulary?); "
                "lightning_lora loads adapters only. Load that base model first."
            )
        del tensors[key]


def _use_saved_projections(plan, projections: dict[str, torch.Tensor], source: Path) -> None:
    shared = plan[0][1].projections
    for key, mine in (("base_model.vera_A", shared.A), ("base_model.vera_B", shared.B)):
        if key in projections and tuple(projections[key].shape) != tuple(mine.shape):
            raise ValueError(f"{source}: {key} has shape {tuple(projections[key].shape)}, expected {tuple(mine.shape)}.")
    shared.A = projections.get("base_model.vera_A", shared.A).float()
    shared.B = projections.get("base_model.vera_B", shared.B).float()
    shared._copies.clear()
