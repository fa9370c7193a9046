"""Which layers get trained tensors (``core/trained.py``) from an adapter config's ``modules_to_save``,
``trainable_token_indices`` and ``bias``, with PEFT's rules (peft 0.21 ``set_additional_trainable_modules``):

- ``modules_to_save`` and the layer names of ``trainable_token_indices: {name: ids}`` select every module whose
  full name *ends with* the entry (PEFT's plain ``str.endswith``, so ``"norm"`` selects every ``...layernorm`` too);
- ``trainable_token_indices: [ids]`` is the input embedding's (``get_input_embeddings()``); a module whose weight
  is that embedding's (a tied head) shares its rows, unless it is named with other ids;
- ``bias: "all"``: every parameter named ``bias`` (outside ``modules_to_save`` copies); ``"<method>_only"`` (PEFT
  writes ``lora_only``): those of the layers the adapter's method adapts.

Everything is checked here, before the model changes: overlaps (a module both copied and adapted, rows on an
adapted layer), ids outside the weight, entries that select nothing (PEFT ignores those: ``load_adapter`` drops
them from a file's config first, ``matching_entries``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lightning_lora.core.targets import adaptable_modules
from lightning_lora.core.trained import Trained, has_trained
from lightning_lora.core.wrapper import AdapterLayer

def plan_trained(model: nn.Module, config: object, name: str, targets: Sequence[str]) -> dict[str, Trained]:
    """The ``Trained`` of adapter ``name`` per layer name (``check_trained``), built, starting equal to the layers'
    own tensors, but not attached (``verbs.attach`` does)."""
    modules = dict(_plain_modules(model))
    out: dict[str, Trained] = {}
    for layer_name, spec in check_trained(model, config, targets).items():
        follows = spec.pop("follows")
        rows = out[follows].rows if follows is not None else None
        out[layer_name] = Trained(modules[layer_name], rows=rows, follows=follows, **spec)
    return out


def check_trained(model: nn.Module, config: object, targets: Sequence[str]) -> dict[str, dict]:
    """What the options of ``config`` train, per layer name: ``Trained``'s arguments (``whole``, ``indices``,
    ``bias``, ``follows``), leaders before the layers that follow them. ``targets``: the layers the adapter's method
    adapts. Builds nothing.

    Raises:
        ValueError: a module both copied and adapted (or holding adapted layers), token rows on an adapted or
            copied layer or outside its weight, an entry that selects nothing. The model is unchanged.
    """
    if not has_trained(config):
        return {}
    modules = dict(_plain_modules(model))
    adapted = set(targets)
    out: dict[str, dict] = {}
    for layer_name in _copied(modules, config.modules_to_save or []):
        inside = sorted(t for t in adapted if t == layer_name) + sorted(
            t for t in adapted | _adapted_layers(model) if t.startswith(layer_name + "."))
        if inside:
            raise ValueError(f"modules_to_save: {layer_name!r} is also adapted ({inside[0]!r}); a module is either "
                             "trained as a whole copy or adapted, not both. Remove it from one of the two.")
        out[layer_name] = {"whole": True, "indices": None, "bias": False, "follows": None}
    for layer_name, ids, follows in _token_layers(model, modules, config.trainable_token_indices):
        if follows is not None and layer_name in out:
            continue  # a head tied to the embedding but trained as a whole copy has its own weight
        if layer_name in out or layer_name in adapted:
            what = "copied by modules_to_save" if layer_name in out else "adapted by the method"
            raise ValueError(f"trainable_token_indices: {layer_name!r} is also {what}; train its rows or the whole "
                             "layer, not both.")
        layer = modules[layer_name]
        weight = getattr(layer, "weight", None)
        if not isinstance(layer, (nn.Embedding, nn.Linear)) or weight is None or weight.dim() != 2:
            raise ValueError(f"trainable_token_indices: {layer_name!r} is a {type(layer).__name__}; token rows are "
                             "trained on an nn.Embedding (or a linear head tied to one).")
        if max(ids) >= weight.shape[0]:
            raise ValueError(f"trainable_token_indices: token id {max(ids)} is outside {layer_name!r}, which has "
                             f"{weight.shape[0]} rows; add the tokens to the tokenizer and resize the embeddings "
                             "first (model.resize_token_embeddings), or fix the ids.")  # fmt: skip
        out[layer_name] = {"whole": False, "indices": list(ids), "bias": False, "follows": follows}
    copied = {n for n, spec in out.items() if spec["whole"]}
    for layer_name in _biased(modules, config.bias, adapted, copied):
        out.setdefault(layer_name, {"whole": False, "indices": None, "bias": False, "follows": None})["bias"] = True
    return out


def _plain_modules(model: nn.Module):
    """``(name, module)`` with an adapted layer as its base layer, and nothing from inside adapted layers."""
    return [(n, _base(m)) for n, m in adaptable_modules(model)]


def _adapted_layers(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def _copied(modules: dict[str, nn.Module], entries: Sequence[str]) -> list[str]:
    chosen = [n for n in modules if n and any(n.endswith(e) for e in entries)]
    unmatched = [e for e in entries if not any(n.endswith(e) for n in chosen)]
    if unmatched:
        heads = sorted({n.rsplit(".", 1)[-1] for n in modules if n})[:12]
        raise ValueError(f"modules_to_save: {unmatched} match no module (a module's name must end with the entry); "
                         f"module names end with e.g. {heads}.")
    nested = [(a, b) for a in chosen for b in chosen if b.startswith(a + ".")]
    if nested:
        raise ValueError(f"modules_to_save selects {nested[0][0]!r} and {nested[0][1]!r} inside it; name only one.")
    return chosen


def _token_layers(model: nn.Module, modules: dict[str, nn.Module], spec) -> list[tuple[str, list[int], str | None]]:
    """``(layer, ids, follows)``: the named layers, and the layers tied to the input embedding when it is named (they
    share its rows unless named with other ids: PEFT's weight tying)."""
    if spec is None:
        return []
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    input_name = next((n for n, m in modules.items() if embedding is not None and m is _base(embedding)), None)
    if isinstance(spec, dict):
        named: dict[str, list[int]] = {}
        for key, ids in spec.items():
            found = [n for n in modules if n and n.endswith(key)]
            if not found:
                raise ValueError(f"trainable_token_indices: {key!r} matches no module (a module's name must end "
                                 "with it, e.g. 'embed_tokens').")  # fmt: skip
            named.update({n: list(ids) for n in found})
    elif input_name is None:
        raise ValueError(f"trainable_token_indices as a list trains rows of the input embedding, which "
                         f"{type(model).__name__} does not name (get_input_embeddings); give {{layer name: [ids]}} "
                         "instead.")  # fmt: skip
    else:
        named = {input_name: list(spec)}
    weight = getattr(modules.get(input_name), "weight", None)
    tied = [n for n, m in modules.items() if input_name in named and n != input_name and weight is not None
            and getattr(m, "weight", None) is weight and named.get(n, named[input_name]) == named[input_name]]
    out = [(n, ids, None) for n, ids in named.items() if n not in tied]
    return out + [(n, named[input_name], input_name) for n in tied]


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdapterLayer) else module


def _biased(modules: dict[str, nn.Module], mode: str, adapted: set[str], copied: set[str]) -> list[str]:
    if mode == "none":
        return []
    owners = [n for n, m in modules.items() if isinstance(m._parameters.get("bias"), nn.Parameter)]
    if mode != "all":  # "<method>_only": the layers the method adapts
        return [n for n in owners if n in adapted]
    return [n for n in owners if not any(n == c or n.startswith(c + ".") for c in copied)]  # a copy has its own


def matching_entries(model: nn.Module, entries: Sequence[str]) -> list[str]:
    """The ``modules_to_save`` entries that select a module of ``model`` (PEFT's rule: the name ends with it)."""
    names = [n for n, _ in _plain_modules(model) if n]
    return [e for e in entries if any(n.endswith(e) for n in names)]
