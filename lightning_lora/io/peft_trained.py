"""PEFT's files for what an adapter trains besides its method (``core/trained.py``): ``modules_to_save``,
``trainable_token_indices`` and ``bias`` in ``adapter_config.json``, their tensors in ``adapter_model.safetensors``.

| trained | key (after ``base_model.model.<layer>.``) | read also |
|---|---|---|
| a whole copy (``modules_to_save``) | the module's own keys (``weight``, ``bias``) | |
| token rows | ``token_adapter.trainable_tokens_delta`` (n, dim): the rows' values, not a difference | a tied head's copy of its embedding's rows, when equal |
| a bias | ``base_layer.bias`` on a layer the method adapts, else ``bias`` | the other of the two |

PEFT also saves base weights next to them (an adapted or resized embedding's ``base_layer.weight``, the output
embedding's ``weight``): those are accepted when they equal this model's, outside the rows the adapter trains (a
resized vocabulary's new rows are the trained ones), and refused otherwise: lightning_lora loads adapters, never a
different base.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_lora.core.layer import AdapterConfig
from lightning_lora.core.trained import FIELDS, ROWS_KEY, Trained
from lightning_lora.core.trained_plan import matching_entries

SAVED_BASE = (".token_adapter.base_layer.weight", ".base_layer.weight")  # base weights PEFT saves beside adapters


def to_peft_config(file_config: dict, config: AdapterConfig) -> None:
    """Write the options into a PEFT config (in place): those set, and those the method's ``to_peft`` wrote."""
    for key in FIELDS:
        value = getattr(config, key)
        if key in file_config or value not in (None, "none"):
            file_config[key] = value


def from_peft_config(config: AdapterConfig, peft_config: dict, source: str) -> AdapterConfig:
    """``config`` with the options of a PEFT config (checked as ``AdapterConfig`` checks them, the file named)."""
    if peft_config.get("ensure_weight_tying") and peft_config.get("modules_to_save"):
        raise ValueError(f"{source}: ensure_weight_tying with modules_to_save (one trained copy shared by tied "
                         "layers) is not supported by lightning_lora; save the adapter without ensure_weight_tying.")
    given = {k: peft_config[k] for k in FIELDS if peft_config.get(k) is not None}
    try:
        return dataclasses.replace(config, **given)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


def keep_matching(model: nn.Module, config: AdapterConfig) -> None:
    """Drop ``modules_to_save`` entries that select no module of ``model``, as PEFT ignores them (a classifier's
    ``"classifier"`` and ``"score"``, written for any model family)."""
    if config.modules_to_save:
        config.modules_to_save = matching_entries(model, config.modules_to_save) or None


def card_rows(trained: Mapping[str, Trained]) -> dict[str, str]:
    """The model card's rows for what the adapter trains besides its method (none when it trains nothing else)."""
    copies = [t for t, s in trained.items() if s.copy is not None]
    rows = {t: len(s.indices) for t, s in trained.items() if s.rows is not None and s.follows is None}
    biases = sum(s.bias is not None for s in trained.values())
    out = {"trained copies (modules_to_save)": ", ".join(copies)} if copies else {}
    out |= {"trained token rows": ", ".join(f"{n} of {t}" for t, n in rows.items())} if rows else {}
    return out | ({"trained biases": str(biases)} if biases else {})


def trained_tensors(trained: Mapping[str, Trained], adapted: set[str], prefix: str) -> dict[str, Tensor]:
    """The PEFT file's tensors of ``trained`` (layer -> ``Trained``); ``adapted``: the layers the method adapts."""
    return {f"{prefix}{t}.{k}": v for t, state in trained.items() for k, v in state.peft_tensors(t in adapted).items()}


def take_trained(trained: Mapping[str, Trained], adapted: set[str], tensors: dict[str, Tensor], prefix: str,
                 source: Path) -> dict[Tensor, Tensor]:  # fmt: skip
    """Pop the trained tensors' keys from ``tensors``: ``{model tensor: file tensor}``, shapes checked.

    Raises:
        ValueError: a tensor missing or of another shape, a tied head's rows that differ from its embedding's.
    """
    out: dict[Tensor, Tensor] = {}
    for layer, state in trained.items():
        for suffix, mine in state.peft_tensors(layer in adapted).items():
            key = f"{prefix}{layer}.{suffix}"
            other = _other_bias_key(key)
            if key not in tensors and other in tensors:
                key = other
            if key not in tensors:
                raise ValueError(f"{source}: {key} is missing; the config trains {state.describe()} of {layer!r} "
                                 f"({', '.join(FIELDS)}), so the file must hold it.")  # fmt: skip
            value = tensors.pop(key)
            if tuple(value.shape) != tuple(mine.shape):
                raise ValueError(f"{source}: {key} has shape {tuple(value.shape)} but the model needs "
                                 f"{tuple(mine.shape)}; the adapter was made for a model with other layer sizes.")
            out[mine] = value
    for layer, state in trained.items():  # PEFT may save a tied head's rows too: they must be its embedding's
        key = f"{prefix}{layer}.{ROWS_KEY}"
        if state.follows is not None and key in tensors:
            leader = out[trained[state.follows].rows]
            if not torch.equal(tensors.pop(key).to(leader.dtype), leader):
                raise ValueError(f"{source}: {key} differs from the rows of {state.follows!r}, whose weight it shares; "
                                 "the file is inconsistent.")
    return out


def _other_bias_key(key: str) -> str:
    if key.endswith(".base_layer.bias"):
        return key[: -len(".base_layer.bias")] + ".bias"
    return key[: -len(".bias")] + ".base_layer.bias" if key.endswith(".bias") else key


def drop_saved_base(model: nn.Module, tensors: dict[str, Tensor], trained: Mapping[str, Trained], prefix: str,
                    source: Path) -> None:  # fmt: skip
    """Drop from ``tensors`` the base weights PEFT saves beside an adapter (module docstring) when they equal the
    model's outside the trained rows; refuse them otherwise."""
    heads = _embedding_names(model)
    for key in list(tensors):
        name = key[len(prefix):] if key.startswith(prefix) else None
        layer_name = next((name[: -len(s)] for s in SAVED_BASE if name and name.endswith(s)), None)
        if layer_name is None and name and name.endswith(".weight") and name[: -len(".weight")] in heads:
            layer_name = name[: -len(".weight")]
        if layer_name is None:
            continue
        try:
            layer = model.get_submodule(layer_name)
        except AttributeError:
            layer = None
        weight = getattr(layer, "weight", None)  # an adapted layer forwards .weight to its base layer
        given = tensors[key]
        state = trained.get(layer_name)
        if weight is not None and tuple(weight.shape) == tuple(given.shape) and state is not None and state.rows is not None:
            keep = torch.ones(given.shape[0], dtype=torch.bool)
            keep[state.indices.cpu()] = False  # the rows the adapter trains replace these
            weight, given = weight.detach()[keep.to(weight.device)], given[keep]
        if weight is None or tuple(weight.shape) != tuple(given.shape) or not torch.equal(
                weight.detach().to(given.dtype).cpu(), given):  # fmt: skip
            raise ValueError(
                f"{source}: {key} carries base weights that differ from this model's (a resized vocabulary?); "
                "lightning_lora loads adapters only. Load that base model first (resized as it was trained)."
            )
        del tensors[key]


def _embedding_names(model: nn.Module) -> set[str]:
    """Names of the input and output embeddings (PEFT saves their ``weight`` when the vocabulary was resized)."""
    wanted = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            wanted.append(getattr(model, getter)())
        except (AttributeError, NotImplementedError):
            pass
    return {n for n, m in model.named_modules() if n and any(m is w for w in wanted if w is not None)}
