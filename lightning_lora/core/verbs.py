"""The verbs over a model: inject, set_adapter, merge, delete_adapter, remove, disable_adapters.

Every verb checks everything first and changes the model only once nothing can fail any more: an error leaves the
model exactly as it was.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from lightning_lora.core import merging, trained
from lightning_lora.core.experts import place, stack_at
from lightning_lora.core.experts_dispatch import use_experts_dispatch
from lightning_lora.core.kinds import kind_of, merged_base_layer
from lightning_lora.core.layer import METHODS, AdapterBranch, AdapterConfig, AdapterLayer, build_branch
from lightning_lora.core.start import start_layers
from lightning_lora.core.targets import find_targets
from lightning_lora.core.trained_plan import check_trained, plan_trained

log = logging.getLogger(__name__)

_REQUIRES_GRAD = "_lightning_lora_requires_grad"  # the model's requires_grad flags before the first injection
_LAYER_CACHE = "_lightning_lora_layers"  # (structure version, adapted layers) cached for set_adapter
_structure_version = 0  # bumped whenever a verb here replaces a module, which invalidates every layer cache


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every adapted layer of ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters on ``model``, in the order they were added."""
    names: dict[str, None] = {}
    for layer in adapter_layers(model).values():
        names.update(dict.fromkeys(layer.adapters))
        names.update(dict.fromkeys(layer.trained))
    return list(names)


def active_adapters(model: nn.Module) -> dict[str, float]:
    for layer in adapter_layers(model).values():
        return dict(layer.active)
    return {}


def check_adapter_config(config: object) -> None:
    """The one check that ``config`` is an adapter config (a registered method or a user's subclass)."""
    if not isinstance(config, AdapterConfig):
        raise TypeError(
            f"adapter must be an AdapterConfig ({', '.join(METHODS)}, or your own subclass), got {type(config).__name__}."
        )


def check_known(model: nn.Module, names, where: str = "", known: list[str] | None = None) -> None:
    """The one check that every adapter name in ``names`` is on ``model`` (``None`` entries allowed: the base).

    Raises:
        ValueError: ``<where>: no adapter named [...] on the model; it has [...]``.
    """
    known = adapter_names(model) if known is None else known
    names = [names] if isinstance(names, str) else list(names)
    unknown = list(dict.fromkeys(n for n in names if n is not None and n not in known))
    if unknown:
        shown = repr(unknown[0]) if len(unknown) == 1 and len(names) == 1 else unknown
        raise ValueError(f"{where + ': ' if where else ''}no adapter named {shown} on the model; it has {known}.")


def plan_injection(model: nn.Module, config: AdapterConfig, name: str) -> list[tuple[str, AdapterBranch]]:
    """The branches ``inject`` would add, one per target layer, built but not yet attached."""
    check_adapter_config(config)
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}.")
    if name in adapter_names(model):
        raise ValueError(
            f"an adapter named {name!r} is already on the model; choose another name or delete_adapter(model, {name!r})."
        )
    targets = find_targets(model, config.target_modules, config.exclude_modules, config.supports, config.method,
                           config.target_parameters)
    layers = [stack_at(model, t) for t in targets]  # a module, or a bare MoE expert stack (core/experts.py)
    bases = [layer.base_layer if isinstance(layer, AdapterLayer) else layer for layer in layers]
    if any(kind_of(base).experts for base in bases):
        use_experts_dispatch(model)  # the experts' forward that runs adapted stacks, once proved (raises if not)
    check_trained(model, config, targets)  # modules_to_save, token rows, biases: checked now, built by attach
    shared = config.shared_state(bases)
    return [(t, build_branch(config, base, shared, t)) for t, base in zip(targets, bases)]


def layer_map(model: nn.Module, name: str) -> dict[str, AdapterBranch]:
    """The per-layer map of adapter ``name``: full target name -> its branch, in model order. A target is a layer
    (its module name) or an MoE expert stack (``<experts module>.<parameter>``)."""
    return {t: layer.adapters[name] for t, layer in adapter_layers(model).items() if name in layer.adapters}


def trained_map(model: nn.Module, name: str) -> dict[str, trained.Trained]:
    """What adapter ``name`` trains besides its branches, by layer name (``core/trained.py``), in model order."""
    return {t: layer.trained[name] for t, layer in adapter_layers(model).items() if name in layer.trained}


def refuse_trained(model: nn.Module, names, where: str) -> None:
    """The one refusal of adapters that train tensors besides their branches where a verb cannot carry them
    (``combine``, mixed batches).

    Raises:
        ValueError: ``<where>: adapter 'a' trains <what> of 'layer' (modules_to_save, ...); ...``.
    """
    for name in [n for n in dict.fromkeys(names) if n is not None]:
        for target, state in trained_map(model, name).items():
            raise ValueError(f"{where}: adapter {name!r} trains {state.describe()} of {target!r} (modules_to_save, "
                             "trainable_token_indices, bias), which this cannot carry; use that adapter alone "
                             "(set_adapter) or merge it first.")


def attach(model: nn.Module, plan: list[tuple[str, AdapterBranch]], name: str,
           trained_layers: Mapping[str, trained.Trained] | None = None) -> nn.Module:  # fmt: skip
    """Attach planned branches under ``name``, with the tensors the adapter trains besides them (``trained_layers``,
    default: built from the branches' config, ``core/trained_plan.py``); freeze everything else. The first adapter
    on a model becomes active."""
    if trained_layers is None:
        trained_layers = plan_trained(model, plan[0][1].config, name, [t for t, _ in plan]) if plan else {}
    if not hasattr(model, _REQUIRES_GRAD):
        setattr(model, _REQUIRES_GRAD, {n: p.requires_grad for n, p in model.named_parameters()})
    active = active_adapters(model) if adapter_names(model) else None  # read before new layers are attached
    model.requires_grad_(False)
    for target, branch in plan:
        layer = stack_at(model, target)
        if not isinstance(layer, AdapterLayer):
            layer = (kind_of(layer).wrap or AdapterLayer)(layer).train(layer.training)
            _set_submodule(model, target, layer)
        layer.adapters[name] = branch.train(layer.training)  # an eval-mode model stays in eval mode (no dropout)
    for target, state in trained_layers.items():
        layer = model.get_submodule(target)
        if not isinstance(layer, AdapterLayer):
            layer = AdapterLayer(layer).train(layer.training)
            _set_submodule(model, target, layer)
        layer.trained[name] = state.train(layer.training)
    set_adapter(model, name if active is None else active)
    return model


def inject(model: nn.Module, adapter: AdapterConfig, name: str = "default") -> nn.Module:
    """Wrap every layer ``adapter.target_modules`` selects with an adapter called ``name``; freeze the rest.

    The model's output is unchanged right after injection. The first adapter injected becomes active; later ones
    are added inactive (``set_adapter`` picks). A start that rewrites the base (``LoRA(init="pissa")``) runs here as
    in ``prepare`` (``core/start.py``); one that needs a quantized base (``init="loftq"``) is refused, pointing to
    ``prepare``. Returns ``model`` (changed in place).

    Raises:
        ValueError: no layer matches, a matched layer cannot be adapted, ``name`` is taken, or the start cannot run.
            The model is then unchanged.
    """
    check_adapter_config(adapter)
    if adapter.rewrites_base:
        adapter.check_start(None)
    plan = plan_injection(model, adapter, name)
    if adapter.rewrites_base:
        start_layers(model, plan, adapter)
    return attach(model, plan, name)


def set_adapter(model: nn.Module, adapters: str | list[str] | Mapping[str, float]) -> nn.Module:
    """Make ``adapters`` the active ones: a name, a list of names, or ``{name: weight}`` for base + sum w_a dW_a.

    Only active adapters train (``requires_grad``); no base weight changes, so swapping is cheap.
    """
    weights = {adapters: 1.0} if isinstance(adapters, str) else dict(adapters) if isinstance(adapters, Mapping) else dict.fromkeys(adapters, 1.0)
    # A swap touches only plain dicts and tensor flags (no module walk, no nn.Module attribute machinery), so it
    # costs microseconds per layer; the adapted layers are cached until a verb here changes the model's structure.
    layers = _cached_layers(model)
    branches = [layer._modules["adapters"]._modules for layer in layers]
    known = [n for layer in layers for part in ("adapters", "trained") for n in layer._modules[part]._modules]
    check_known(model, list(weights), known=list(dict.fromkeys(known)))
    for layer in layers:
        if layer._modules["trained"]._modules:
            trained.check_active(layer, weights, lambda layer=layer: _layer_name(model, layer))
    for layer_branches in branches:
        for n, w in weights.items():
            if n in layer_branches and not layer_branches[n].additive:  # the two rules of non-additive branches
                method = layer_branches[n].config.method
                if w != 1.0:
                    raise ValueError(f"adapter {n!r} ({method}) cannot be weighted; use weight 1: "
                                     f"{not_additive_reason(layer_branches[n])}")
                if sum(other in layer_branches for other in weights) > 1:
                    raise ValueError(f"adapter {n!r} ({method}) must be the only active adapter on the layers it "
                                     f"adapts: {not_additive_reason(layer_branches[n])}")
    for layer, layer_branches in zip(_cached_layers(model), branches):
        layer.__dict__["active"] = dict(weights)
        for n, branch in layer_branches.items():
            for p in branch._parameters.values():
                if p is not None:
                    p.requires_grad_(n in weights)
        if layer._modules["trained"]._modules:
            trained.set_trainable(layer, weights)
    return model


def _layer_name(model: nn.Module, layer: AdapterLayer) -> str:
    """The name of ``layer`` in ``model``, for a message (a walk: only on the way to an error or a rare check)."""
    return next((n for n, m in model.named_modules() if m is layer), "?")


def not_additive_reason(branch: AdapterBranch) -> str:
    """Why ``branch`` is not an additive low-rank update: the ValueError its own ``factors()`` raises."""
    try:
        branch.factors()
    except ValueError as err:
        return str(err)
    return f"{branch.config.method} declares its update non-additive (additive = False)."


def _cached_layers(model: nn.Module) -> list[AdapterLayer]:
    """``adapter_layers(model)`` without walking every module on each swap; rebuilt after any structural change."""
    cached = model.__dict__.get(_LAYER_CACHE)
    if cached is None or cached[0] != _structure_version:
        cached = (_structure_version, list(adapter_layers(model).values()))
        model.__dict__[_LAYER_CACHE] = cached
    return cached[1]


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name``; layers left without adapters get their plain base layer back."""
    check_known(model, name)
    for target, layer in adapter_layers(model).items():
        if name in layer.adapters or name in layer.trained:
            for part in (layer.adapters, layer.trained):
                if name in part:
                    del part[name]
            layer.active.pop(name, None)
            if not len(layer.adapters) and not len(layer.trained):
                _set_submodule(model, target, layer.base_layer)
    _restore_requires_grad(model)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Drop every adapter and put the original layers back, bit for bit, with their original ``requires_grad``."""
    for target, layer in adapter_layers(model).items():
        _set_submodule(model, target, layer.base_layer)
    _restore_requires_grad(model)
    return model


def merge(
    model: nn.Module, base_weights: Mapping[str, Tensor] | None = None, dtype: torch.dtype | None = None
) -> nn.Module:
    """Fold the active adapters into their base weights and put plain layers back: W' = W + sum_a w_a dW_a (DoRA:
    its merged weight), and the bias each branch's ``merged_bias`` gives (written through the kind table when a
    method changes it, e.g. output scaling). Inactive adapters are dropped.

    Args:
        base_weights: high-precision base weights by adapted-layer name, (out, in), for quantized bases (QLoRA):
            merging against them avoids the NF4 rounding. Without them a quantized base is dequantized, with a warning.
        dtype: dtype of layers rebuilt from a quantized base (default: that of the merged weight).

    Raises:
        ValueError: no adapters, or a merged weight would hold NaN/inf; the model is then left unchanged.
    """
    every = adapter_layers(model)
    if not every:
        raise ValueError("merge: the model has no adapters (inject or load_adapter first).")
    layers = {t: layer for t, layer in every.items() if len(layer.adapters)}  # those with branches (methods)
    rounded: dict = {}  # kind -> {layer: (rounding error, update)}: quantized layers merged without their original weight
    # A start that rewrote the base (PiSSA's residual, LoftQ's Q: ``started_from``) made that base the one every
    # adapter on the layer trained on, so it is the one to merge into (the original W would count the start twice).
    started = {t: b.started_from for t, layer in layers.items() for b in layer.adapters.values() if b.started_from}
    clash = sorted(set(started) & set(base_weights or {}))
    if clash:
        raise ValueError(f"merge: the adapter on {clash[:3]} started from {started[clash[0]]}, which rewrote its base, "
                         "and trained on that base; merge without base_weights (the merge is then exact), or use "
                         "lightning_lora.io.export.")
    for target, layer in every.items():
        state = trained.active_trained(layer)
        if state is not None:
            trained.check_finite(target, state)
    with torch.no_grad():
        # Pass 1 checks every merged weight and keeps none (memory: one layer's weight, not a second model), so a
        # refusal leaves the model unchanged; pass 2 recomputes each one (deterministically) and writes it in place.
        for target, layer in layers.items():
            start = merging.original_weight(target, layer.base_layer, base_weights)
            weight, bias = merging.merged_weight(layer, start), merging.merged_bias(layer)
            kind = kind_of(layer.base_layer)
            if (kind.rounding_error is not None and target not in started
                    and not (base_weights is not None and target in base_weights)):
                update = float((weight - start).norm() / start.norm())
                rounded.setdefault(kind, {})[target] = (kind.rounding_error(layer.base_layer), update)
            if not merging.all_finite(weight) or (bias is not None and not merging.all_finite(bias)):
                raise ValueError(
                    f"merge refused: layer {target!r} would get non-finite (NaN/inf) weights from adapter(s) "
                    f"{list(layer.active)}; the model is unchanged. Check the training run that produced them."
                )
            if bias is not None and kind.write_bias is None:
                raise ValueError(f"merge refused: adapter(s) {list(layer.active)} change the bias of {target!r}, a "
                                 f"{kind.name} layer that has none; the model is unchanged.")
            del weight, start, bias
        for kind, errors in rounded.items():
            kind.warn_rounding(errors)
        trained.fold_all(model, every)  # the active trained tensors into their base layers, the branches on top
        for target, layer in every.items():
            if target not in layers:
                _set_submodule(model, target, layer.base_layer)
        for target, layer in layers.items():
            merging.untie(model, target, layer.base_layer)
        for target, layer in layers.items():
            weight = merging.merged_weight(layer, merging.original_weight(target, layer.base_layer, base_weights))
            _set_submodule(model, target, merged_base_layer(layer.base_layer, weight, dtype, merging.merged_bias(layer)))
    _restore_requires_grad(model)
    return model


@contextlib.contextmanager
def layers_set(model: nn.Module, attribute: str, value: object) -> Iterator[nn.Module]:
    """Inside the block every adapted layer has ``attribute = value``; each layer's own value comes back after."""
    layers = list(adapter_layers(model).values())
    before = [getattr(layer, attribute) for layer in layers]
    for layer in layers:
        setattr(layer, attribute, value)
    try:
        yield model
    finally:
        for layer, old in zip(layers, before):
            setattr(layer, attribute, old)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes its base outputs exactly, as if no adapter were there."""
    with layers_set(model, "enabled", False):
        yield model


def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, Tensor]:
    """Adapter tensors of ``model`` (all adapters, or only ``name``) under their names in ``model.state_dict()``:
    the branches' and the tensors trained in place of the layers' own (``core/trained.py``)."""
    out = {}
    for target, layer in adapter_layers(model).items():
        for part in ("adapters", "trained"):  # the branches, and the tensors trained in place of the base's
            for adapter, module in layer._modules[part].items():
                if name is None or adapter == name:
                    prefix = f"{target}.{part}.{adapter}." if target else f"{part}.{adapter}."
                    out.update({prefix + k: v for k, v in module.state_dict().items()})
    return out


def _set_submodule(model: nn.Module, target: str, module: nn.Module) -> None:
    global _structure_version
    _structure_version += 1
    model.__dict__.pop(_LAYER_CACHE, None)  # do not keep replaced layers alive
    parent_name, _, child = target.rpartition(".")
    kind = kind_of(module)
    value = kind.restore(module) if kind is not None and kind.restore is not None else module  # an expert stack's
    place(model.get_submodule(parent_name) if parent_name else model, child, value)  # parameter goes back as such


def _restore_requires_grad(model: nn.Module) -> None:
    if adapter_layers(model) or not hasattr(model, _REQUIRES_GRAD):
        return
    flags = getattr(model, _REQUIRES_GRAD)
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, p.requires_grad))
    delattr(model, _REQUIRES_GRAD)
