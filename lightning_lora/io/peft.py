"""Adapters on disk in Hugging Face PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are ``base_model.model.<module name>.<suffix>`` with each method's PEFT suffixes (``lora_A.weight``,
``lora_magnitude_vector``, ``vera_lambda_b``, ...) plus its shared tensors as ``base_model.<name>`` (``vera_A``), so a
folder written here loads with ``peft.PeftModel.from_pretrained`` and a folder PEFT wrote loads with ``load_adapter``.
Everything method-specific comes from the method contract (``core/layer.py``): ``to_peft``/``from_peft``,
``peft_suffixes``, ``peft_tensors`` and the shared-tensor hooks. Only safetensors are read.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lightning_lora.core.experts import expert_stacks
from lightning_lora.core.kinds import is_quantized
from lightning_lora.core.layer import METHODS, AdapterConfig, peft_config_of
from lightning_lora.core.targets import compact_targets
from lightning_lora.core.trained_plan import plan_trained
from lightning_lora.core.verbs import (adapter_names, attach, check_known, delete_adapter, layer_map, plan_injection,
                                       trained_map)
from lightning_lora.io.card import base_source, model_card, task_type_of
from lightning_lora.io.files import atomic_dir, load_tensors, read_json, save_tensors, write_json
from lightning_lora.io.finite import check_finite
from lightning_lora.io.peft_experts import add_to_config, our_targets, peft_paths, warn_peft_drops
from lightning_lora.io.peft_trained import (card_rows, drop_saved_base, from_peft_config, keep_matching, take_trained,
                                            to_peft_config, trained_tensors)

PREFIX, SHARED_PREFIX = "base_model.model.", "base_model."
CONFIG_FILE, WEIGHTS_FILE, CARD_FILE = "adapter_config.json", "adapter_model.safetensors", "README.md"


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

    An adapter whose start rewrote the base (PiSSA, LoftQ) is written for the original base: each branch's
    ``for_original_base`` (PiSSA's rank-2r conversion), with its method's note on the base in the card.
    ``base_model_name_or_path`` and ``task_type`` default to where ``model`` was loaded from and ``"CAUSAL_LM"`` for
    causal LMs; ``run`` (``data``, ``steps``, ``val_loss``) goes into the card.
    """
    trained = layer_map(model, name)
    if not trained:
        check_known(model, name, "save_adapter")
    bases = {t: model.get_submodule(t).base_layer for t in trained}
    branches = {t: b.for_original_base(bases[t]) for t, b in trained.items()}
    first = next(iter(branches.values()))
    config = first.config
    paths = peft_paths(model, branches)  # an MoE expert stack sits under its experts module (peft_experts.py)
    tensors = {f"{PREFIX}{paths[t]}.{suffix}": v for t, b in branches.items() for suffix, v in b.peft_tensors().items()}
    tensors.update({SHARED_PREFIX + k: v for k, v in config.peft_shared_tensors(first.shared).items()})
    tensors.update(trained_tensors(trained_map(model, name), set(branches), PREFIX))  # modules_to_save, tokens, bias
    stacks = {t: b for t, b in branches.items() if b.kind.experts}
    modules = sorted(t for t in branches if t not in stacks)
    file_config = peft_config_of(config, compact_targets(model, modules), branches)
    add_to_config(file_config, model, stacks)
    warn_peft_drops(model, modules)
    to_peft_config(file_config, config)
    if "fan_in_fan_out" in file_config:  # a flag of the layer kind (GPT-2 Conv1D), not of the method
        file_config["fan_in_fan_out"] = any(b.kind.fan_in_fan_out for b in branches.values())
    file_config["task_type"] = task_type or task_type_of(model)
    file_config["base_model_name_or_path"] = base_model_name_or_path or base_source(model)
    original = next(iter(trained.values())).config
    note = ""
    if any(b.started_from for b in trained.values()):
        note = original.original_base_note(any(is_quantized(base) for base in bases.values()))
    facts = config.card_facts(branches) | card_rows(trained_map(model, name))  # + whole copies, token rows, biases
    card = model_card(file_config, original.label, run, facts=facts)
    with atomic_dir(path) as tmp:
        write_json(file_config, tmp / CONFIG_FILE)
        save_tensors(tensors, tmp / WEIGHTS_FILE)
        (tmp / CARD_FILE).write_text(card + note)
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
    """Our config for a PEFT ``adapter_config.json``: the one registered method whose ``from_peft`` claims it, with
    the options every method shares (``modules_to_save``, ``trainable_token_indices``, ``bias``; targets are set by
    the caller from the file's tensors)."""
    claims = {name: cfg for name, cls in METHODS.items() if (cfg := _from_peft(cls, peft_config, source)) is not None}
    if len(claims) > 1:
        raise ValueError(f"{source}: methods {sorted(claims)} all claim this file; make their from_peft disjoint.")
    if not claims:
        known = sorted({cls.peft_type for cls in METHODS.values() if cls.peft_type})
        raise ValueError(
            f"{source}: peft_type {peft_config.get('peft_type')!r} is not supported; lightning_lora reads "
            f"{', '.join(known)} (registered methods: {', '.join(METHODS)})."
        )
    config = next(iter(claims.values()))
    ignored = [k for k in ("rank_pattern", "alpha_pattern") if peft_config.get(k) and not getattr(config, k, None)]
    if ignored:  # per-layer options the claiming method did not take would be dropped silently
        raise ValueError(f"{source}: {config.method} does not read {ignored} (per-layer options); they would be lost.")
    return from_peft_config(config, peft_config, source)


def _from_peft(cls: type[AdapterConfig], peft_config: dict, source: str) -> AdapterConfig | None:
    """``cls.from_peft(peft_config)`` with a missing key or a value of the wrong type named, with the file."""
    try:
        return cls.from_peft(peft_config)
    except KeyError as err:
        raise ValueError(f"{source}: the key {err.args[0]!r} is missing ({cls.__name__} needs it). Add it as PEFT "
                         "writes it (is the file complete?).") from None  # fmt: skip
    except (TypeError, ValueError) as err:
        keys = [k for k, v in peft_config.items() if isinstance(v, (str, list, dict)) and repr(v) in str(err)]
        key = f"the value {keys[0]}={peft_config[keys[0]]!r}" if keys else "a value"
        raise ValueError(f"{source}: {key} is not what {cls.__name__} expects ({err}). Give it as PEFT writes it "
                         "(e.g. a number for r and lora_alpha).") from None  # fmt: skip


def _is_shared(key: str) -> bool:
    return key.startswith(SHARED_PREFIX) and not key.startswith(PREFIX) and "." not in key[len(SHARED_PREFIX) :]


def _split_key(key: str, config: AdapterConfig) -> tuple[str, str] | None:
    """(layer, suffix) of a method's tensor key, or None for any other key."""
    for old, new in config.peft_aliases.items():
        if key.endswith("." + old):
            key = key[: -len(old)] + new
    others = [s for cls in METHODS.values() for s in cls.peft_suffixes]  # so a mislabelled file names its tensors
    for suffix in dict.fromkeys([*config.peft_suffixes, *others]):
        if key.startswith(PREFIX) and key.endswith("." + suffix):
            return key[len(PREFIX) : -len(suffix) - 1], suffix
    return None


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
    file_config = read_json(path / CONFIG_FILE)
    config = config_from_peft(file_config, str(path / CONFIG_FILE))
    tensors = load_tensors(weights_path)
    check_finite(tensors, str(weights_path), "The adapter is not loaded; it comes from a run that diverged: use an "
                 "earlier export or checkpoint of it.")  # fmt: skip
    shared = {k[len(SHARED_PREFIX) :]: tensors.pop(k) for k in list(tensors) if _is_shared(k)}
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key in list(tensors):
        if (split := _split_key(key, config)) is not None:
            by_layer.setdefault(split[0], {})[split[1]] = tensors.pop(key)
    if not by_layer:
        raise ValueError(f"{weights_path} holds no adapter tensors.")
    by_layer = our_targets(model, by_layer, file_config, str(path / CONFIG_FILE))  # MoE expert stacks by name
    modules, stacks = dict(model.named_modules()), expert_stacks(model)
    missing = [layer for layer in by_layer if layer not in modules and layer not in stacks]
    if missing:
        raise ValueError(
            f"{path}: the adapter is for layers this {type(model).__name__} does not have, e.g. {missing[:3]}; "
            "is it for another architecture, or was it saved from a wrapper of this model?"
        )
    config.target_modules = sorted(t for t in by_layer if t not in stacks)
    config.target_parameters = sorted(t for t in by_layer if t in stacks) or None
    keep_matching(model, config)  # PEFT ignores modules_to_save entries that select nothing
    try:
        plan = plan_injection(model, config, name)
        trained = plan_trained(model, config, name, [t for t, _ in plan])
    except ValueError as err:  # what the config asks does not fit this model: name the file
        raise ValueError(f"{path / CONFIG_FILE}: {err}") from None
    given_trained = take_trained(trained, set(by_layer), tensors, PREFIX, weights_path)
    drop_saved_base(model, tensors, trained, PREFIX, weights_path)
    if tensors:
        raise ValueError(f"{weights_path}: unexpected tensor {next(iter(tensors))!r}; is this a PEFT {config.method} "
                         "adapter (with these modules_to_save, trainable_token_indices and bias)?")
    config.load_shared_tensors(plan[0][1].shared, shared, str(weights_path))
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
        for mine, value in given_trained.items():
            mine.copy_(value)
    return attach(model, plan, name, trained)
