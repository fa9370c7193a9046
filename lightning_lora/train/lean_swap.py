"""Put ``lean.py``'s functions into a Hugging Face model, where a probe shows that the model computes the same.

``use_lean_activations(model)`` finds the candidates by what they are, not by family name:

- norms: modules whose class name ends in ``RMSNorm``, with a 1-D ``weight`` and an ``eps`` / ``variance_epsilon``;
  which of the three forms (Llama: w * (x r).to(dtype); cast last: (w * x r).to(dtype); Gemma: x r (1 + w)) is the
  class's is found by running one instance of it both ways on the hidden states it really gets;
- MLPs: modules with ``gate_proj``, ``up_proj``, ``down_proj`` and a SiLU ``act_fn``: down(silu(gate(y)) * up(y));
- the rotary embedding: the ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` of the modeling module of an
  attention layer that calls it. That function is module-global, so it is replaced by a dispatcher that runs the lean
  version only for the cos/sin tensors this model's rotary modules made (tagged by a forward hook); any other model
  of the family computes exactly as before.

Each swap is an instance attribute (``forward``) or the dispatcher: names, parameters and state dicts are unchanged,
and ``use_lean_activations(model, enabled=False)`` removes them. A class whose instance does not give the same output
bitwise and the same input gradient within 1e-6 (relative) is left alone; then the whole model is probed once
(``probe.py``: a training step on 2 tokens, logits and every gradient within 1e-5) and, if anything moved, every
swap is undone. Each refusal is logged with its reason.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
import types
import weakref

import torch
from torch import Tensor, nn

from lightning_lora.train import lean
from lightning_lora.train.probe import (Verdict, differs_step, forget, frozen_modes, logits_and_grads, model_type,
                                        probe_ids, verdict)

log = logging.getLogger(__name__)
KEY = "lean activations"
_FORMS = ((0.0, False), (0.0, True), (1.0, True))  # (offset, cast_last) of lean.rms_norm
_TAGGED: dict[int, weakref.ref] = {}  # id -> weakref of the cos/sin tensors made by lean models' rotary modules


def _norm_forward(self: nn.Module, hidden: Tensor) -> Tensor:
    eps_name, offset, cast_last = self._lean_norm
    return lean.rms_norm(hidden, self.weight, getattr(self, eps_name), offset, cast_last)


def _mlp_forward(self: nn.Module, x: Tensor) -> Tensor:
    return self.down_proj(lean.swiglu(self.gate_proj(x), self.up_proj(x)))


def _tag(module: nn.Module, args, out) -> None:
    for t in out if isinstance(out, (tuple, list)) else (out,):
        if isinstance(t, Tensor):
            _TAGGED[id(t)] = weakref.ref(t, lambda _, key=id(t): _TAGGED.pop(key, None))


def _tagged(t: Tensor) -> bool:
    ref = _TAGGED.get(id(t))
    return ref is not None and ref() is t


def _dispatcher(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if not torch.compiler.is_compiling() and _tagged(cos) and _tagged(sin):  # compiled: lean.rotary's plain ops
            return lean.rotary(q, k, cos, sin, unsqueeze_dim)
        return original(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.lean_original = original
    return apply_rotary_pos_emb


def _candidates(model: nn.Module) -> tuple[list, list, list]:
    norms, mlps, rope_modules = [], [], set()
    for module in model.modules():
        name = type(module).__name__
        weight = getattr(module, "weight", None)
        eps = next((e for e in ("variance_epsilon", "eps") if isinstance(getattr(module, e, None), float)), None)
        if name.endswith("RMSNorm") and isinstance(weight, Tensor) and weight.ndim == 1 and eps:
            norms.append((module, eps))
        act = getattr(module, "act_fn", None)
        if all(isinstance(getattr(module, p, None), nn.Module) for p in ("gate_proj", "up_proj", "down_proj")) \
                and type(act).__name__ in ("SiLU", "SiLUActivation"):
            mlps.append(module)
        forward = inspect.unwrap(getattr(type(module), "forward", None) or (lambda: None))  # under decorators
        if "apply_rotary_pos_emb" in getattr(getattr(forward, "__code__", None), "co_names", ()):
            rope_modules.add(sys.modules[type(module).__module__])
    return norms, mlps, sorted(rope_modules, key=lambda m: m.__name__)


def _inputs_of(model: nn.Module, modules: list[nn.Module], rope_modules: list) -> dict:
    """The first input each of ``modules`` (and the first arguments each modeling module's
    ``apply_rotary_pos_emb``) receives in a 2-token forward of the model."""
    seen, handles, originals = {}, [], {}

    def keep(module: nn.Module, args) -> None:
        seen.setdefault(id(module), args[0].detach())

    def recording(modeling, original):
        def apply_rotary_pos_emb(*args, **kwargs):
            seen.setdefault(modeling.__name__, (args, kwargs))
            return original(*args, **kwargs)
        return apply_rotary_pos_emb

    for m in modules:
        handles.append(m.register_forward_pre_hook(keep))
    for modeling in rope_modules:
        originals[modeling] = modeling.apply_rotary_pos_emb
        modeling.apply_rotary_pos_emb = recording(modeling, getattr(originals[modeling], "lean_original",
                                                                    originals[modeling]))
    try:
        with torch.no_grad(), frozen_modes(model, training=True):  # as in training (eval may take other paths)
            model(input_ids=probe_ids(model, 2), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        for modeling, original in originals.items():
            modeling.apply_rotary_pos_emb = original
    return seen


def _function_of(rope):
    """The function behind ``apply_rotary_pos_emb``: with the ``kernels`` package installed (transformers >= 5.25
    depends on it), transformers makes it a module (``use_kernel_forward_from_hub``) whose ``forward`` is the
    function; the attention layer's own call routes through its per-instance copy."""
    return rope.forward if isinstance(rope, nn.Module) and hasattr(rope, "kernel_layer_name") else rope


def _same_rope(original, args: tuple, kwargs: dict) -> bool:
    """``lean.rotary`` equals ``original`` on the arguments it really gets: outputs bitwise, gradients within 1e-6."""
    q, k, cos, sin, *rest = args
    results = []
    for fn in (original, lean.rotary):
        qi, ki = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
        outs = fn(qi, ki, cos, sin, *rest, **kwargs)
        grads = torch.autograd.grad(sum(o.float().sum() for o in outs), (qi, ki))
        results.append(([o.detach() for o in outs], grads))
    (ref, gref), (got, ggot) = results
    return all(torch.equal(a, b) for a, b in zip(ref, got)) and all(
        (a - b).abs().max().item() <= 1e-6 * max(a.abs().max().item(), 1e-30) for a, b in zip(gref, ggot))


def _same(module: nn.Module, swapped, x: Tensor) -> bool:
    """``swapped(x)`` equals the module's own forward bitwise, and its input gradient within 1e-6 (relative)."""
    results = []
    for fn in (type(module).forward.__get__(module), swapped):
        xi = x.clone().requires_grad_()
        out = fn(xi)
        (grad,) = torch.autograd.grad(out.float().sum(), xi)  # a sum: every output counts
        results.append((out.detach(), grad))
    (ref, gref), (got, ggot) = results
    scale = max(gref.abs().max().item(), 1e-30)
    return torch.equal(ref, got) and (ggot - gref).abs().max().item() <= 1e-6 * scale


def _swap(model: nn.Module) -> tuple[list[str], list[str]]:
    norms, mlps, rope_modules = _candidates(model)
    inputs = _inputs_of(model, [m for m, _ in norms] + mlps, rope_modules)
    refused, by_class, swapped = [], {}, set()
    for module, eps in norms:
        cls = type(module)
        if cls not in by_class:
            x = inputs.get(id(module))
            by_class[cls] = next((f for f in _FORMS if x is not None and _same(
                module, lambda h, f=f: lean.rms_norm(h, module.weight, getattr(module, eps), *f), x)), None)
            if by_class[cls] is None:
                refused.append(f"{cls.__name__}: not one of the RMSNorm forms lean.rms_norm computes")
        if by_class[cls] is not None and "forward" not in vars(module):
            module._lean_norm = (eps, *by_class[cls])
            module.forward = types.MethodType(_norm_forward, module)
            swapped.add(cls.__name__)
    for mlp in mlps:
        cls = type(mlp)
        if cls not in by_class:
            x = inputs.get(id(mlp))
            by_class[cls] = x is not None and _same(mlp, types.MethodType(_mlp_forward, mlp), x)
            if not by_class[cls]:
                refused.append(f"{cls.__name__}: not down(silu(gate(y)) * up(y))")
        if by_class[cls] and "forward" not in vars(mlp):  # one swapped before (MLP checkpointing) keeps its own
            mlp.forward = types.MethodType(_mlp_forward, mlp)
            swapped.add(cls.__name__)
    done = sorted(swapped)
    for modeling in rope_modules:
        original = getattr(modeling, "apply_rotary_pos_emb", None)
        original = getattr(original, "lean_original", original)
        params = list(inspect.signature(_function_of(original)).parameters) if callable(original) else []
        if params != ["q", "k", "cos", "sin", "unsqueeze_dim"]:
            refused.append(f"{modeling.__name__}.apply_rotary_pos_emb: another signature ({params})")
            continue
        if modeling.__name__ not in inputs or not _same_rope(original, *inputs[modeling.__name__]):
            refused.append(f"{modeling.__name__}.apply_rotary_pos_emb: not q cos + rot(q) sin on the probe")
            continue
        if not hasattr(modeling.apply_rotary_pos_emb, "lean_original"):
            modeling.apply_rotary_pos_emb = _dispatcher(original)
        done.append(f"{modeling.__name__.rsplit('.', 1)[-1]}.apply_rotary_pos_emb")
    if any(d.endswith("apply_rotary_pos_emb") for d in done):
        model._lean_rope_hooks = [m.register_forward_hook(_tag) for m in model.modules()
                                  if type(m).__name__.endswith("RotaryEmbedding")]
    return done, refused


def _undo(model: nn.Module) -> None:
    for module in model.modules():
        if "_lean_norm" in vars(module):
            del module._lean_norm
            vars(module).pop("forward", None)
        if vars(module).get("forward") is not None and getattr(vars(module)["forward"], "__func__", None) is _mlp_forward:
            del module.forward
    for handle in vars(model).pop("_lean_rope_hooks", []):
        handle.remove()


def use_lean_activations(model: nn.Module, enabled: bool = True) -> Verdict:
    """Swap in lean RMSNorm / SwiGLU / rotary functions where proven (module docstring); ``enabled=False`` undoes
    them. Returns the model-level verdict; what was swapped and refused is logged once."""
    if not enabled:
        _undo(model)
        model._lean_activations = False
        forget(model, KEY)
        return Verdict(False, "disabled")
    if getattr(model, "_lean_activations", False):
        return verdict(model, KEY, lambda m: Verdict(True))

    def check(model: nn.Module) -> Verdict:
        reference = logits_and_grads(model, probe_ids(model, 2))
        done, refused = _swap(model)
        for reason in refused:
            log.info("lean activations: %s: %s left as it is", model_type(model), reason)
        if not done:
            return Verdict(False, "no RMSNorm, SwiGLU MLP or rotary embedding of a supported form")
        with lean.saving_lean():
            why = differs_step(reference, logits_and_grads(model, probe_ids(model, 2)))
        if why:
            _undo(model)
            return Verdict(False, f"a training step changed ({why})")
        log.info("lean activations for %s: %s", model_type(model), ", ".join(done))
        return Verdict(True)

    found = verdict(model, KEY, check)
    model._lean_activations = bool(found)
    return found


def saving(model: nn.Module):
    """``lean.saving_lean()`` for a model with lean activations, else a context that does nothing."""
    return lean.saving_lean() if getattr(model, "_lean_activations", False) else contextlib.nullcontext()


__all__ = ["KEY", "saving", "use_lean_activations"]
