"""``prepare``: quantize (optional) and inject an adapter, starting it as its ``init`` says. LoRAModule, AdapterCallback
and the offline export all build their model through it, so a run, its resume and its export start alike.

``LoRA(init=...)`` (DoRA inherits the fields):

- ``"default"``: A Kaiming-uniform, B = 0 (LoRA paper); ``"gaussian"``: A ~ N(0, 1/r^2), B = 0 (PEFT's "gaussian").
  The base is untouched; with ``quantize`` it is NF4(W) (QLoRA).
- ``"pissa"`` (arXiv:2404.02948): A, B start on W's top-r singular triplets and the base keeps the residual
  W - s B0 A0 (``methods/pissa.py``); with ``quantize`` the residual is quantized (QPiSSA). ``pissa_niter`` picks the
  randomized SVD. The start (A0, B0) is kept on each branch as the buffers ``init_lora_A``/``init_lora_B`` (so in
  adapter-only checkpoints): the PEFT export needs it to re-express the adapter on the original W.
- ``"loftq"`` (arXiv:2310.08659): needs ``quantize=NF4(...)``; base and start come from LoftQ's alternating fit
  (``quant/loftq.py``) with ``loftq_iters`` steps. A target NF4 keeps in high precision (``skip_modules``, a shape
  bitsandbytes mishandles, GPT-2 Conv1D) has no rounding error to fit: it gets the default start (logged).

DoRA takes "default", "gaussian" and "pissa" (QPiSSA too): after the SVD start its magnitude is recomputed as the row
norm of base + s B0 A0, so DoRA is the identity at init. DoRA with "loftq" is refused: LoftQ is defined for an
additive correction and neither paper nor PEFT defines it for DoRA, so there is no reference to check it against.

Everything is checked before the model changes (bad input leaves it as it was). Layers are initialized one at a time:
the high-precision weight of a layer is dropped once its NF4 base exists, so memory peaks about one layer above the
model. The time taken is logged.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import torch
from torch import nn

from lightning_lora.core.kinds import dense_weight, in_out_features, is_linear_like, is_quantized
from lightning_lora.core.layer import AdapterConfig, AdapterLayer
from lightning_lora.core.verbs import attach, check_adapter_config, inject, plan_injection
from lightning_lora.methods.dora import DoRA, DoRABranch
from lightning_lora.methods.pissa import pissa_factors
from lightning_lora.quant.loftq import loftq, qpissa
from lightning_lora.quant.nf4 import NF4, unsupported_shape
from lightning_lora.quant.nf4 import quantize as quantize_model

log = logging.getLogger(__name__)

SVD_INITS = ("pissa", "loftq")
INIT_A, INIT_B = "init_lora_A", "init_lora_B"  # PiSSA's starting factors, kept on each branch


def prepare(model: nn.Module, adapter: AdapterConfig, name: str = "default", quantize: NF4 | None = None) -> nn.Module:
    """Quantize ``model`` with ``quantize`` (if given) and inject ``adapter`` as ``name``, initialized as
    ``adapter.init`` says (module docstring). Returns ``model``, changed in place.

    Raises:
        ValueError: ``init="loftq"`` without ``quantize``; DoRA with ``init="loftq"``; an SVD init with r larger than
            min(in, out) of a target, on a model that already has adapters or a quantized target, on a non-linear
            target or a weight shared with another layer; anything ``inject`` refuses. The model is then unchanged.
    """
    init = getattr(adapter, "init", "default")
    if init not in SVD_INITS:
        if quantize is not None:
            quantize_model(model, quantize)
        return inject(model, adapter, name)
    plan = _checked_plan(model, adapter, name, quantize)
    start = time.perf_counter()
    scale, factors, kept = adapter.scaling, {}, []
    with torch.no_grad(), _one_cpu_thread():
        for target, _ in plan:
            layer = model.get_submodule(target)
            to_nf4 = quantize is not None and _quantizes(layer, target, quantize)
            if init == "loftq" and not to_nf4:
                kept.append(target)
                continue
            if init == "loftq":
                new, A, B = loftq(layer, adapter.r, scale, quantize, adapter.loftq_iters)
            elif to_nf4:
                new, A, B = qpissa(layer, adapter.r, scale, quantize, adapter.pissa_niter)
            else:
                A, B, residual = pissa_factors(dense_weight(layer), adapter.r, scale, adapter.pissa_niter)
                new = None
                dense_weight(layer).copy_(residual)  # in place (Conv1D: its transposed view)
            if new is not None:
                parent, _, child = target.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, new)  # the fp weight is freed here
            factors[target] = (A, B)
        if quantize is not None:
            quantize_model(model, quantize)  # the layers the adapter does not target (already-NF4 ones are skipped)
        attach(model, plan, name)
        for target, branch in plan:
            if target in factors:
                _set_start(branch, model.get_submodule(target).base_layer, *factors[target], keep=init == "pissa")
    seconds = time.perf_counter() - start
    what = {"pissa": "QPiSSA" if quantize is not None else "PiSSA", "loftq": f"LoftQ ({adapter.loftq_iters} iter.)"}[init]
    log.info("init: %s start for %d layers in %.2f s%s", what, len(factors), seconds,
             f"; default start for {len(kept)} layers NF4 keeps in high precision: {kept}" if kept else "")
    return model


@contextlib.contextmanager
def _one_cpu_thread() -> Iterator[None]:
    """Run the per-layer SVDs and NF4 round trips on one CPU thread. These are many small LAPACK/bitsandbytes calls;
    on 2 shared cores under load, 2 threads made them 5-10x slower than 1 (576 x 1536 SVD: 18 s vs 2.4 s;
    randomized: 1.1 s vs 0.13 s), and with 1 thread nothing else waits on them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _quantizes(layer: nn.Module, target: str, nf4: NF4) -> bool:
    """True when ``quantize(model, nf4)`` would turn this layer into NF4 (the same rules)."""
    return (isinstance(layer, nn.Linear) and not is_quantized(layer) and not nf4.skips(target)
            and unsupported_shape(layer, nf4.blocksize) is None)  # fmt: skip


def check_start(adapter: AdapterConfig, quantize: object = None) -> None:
    """The checks of ``adapter.init`` that need no model (LoRAModule and AdapterCallback run them at construction).

    Raises:
        TypeError: ``adapter`` is not an adapter config.
        ValueError: ``init="loftq"`` without ``quantize``, or DoRA with ``init="loftq"``.
    """
    check_adapter_config(adapter)
    init = getattr(adapter, "init", "default")
    if init == "loftq" and quantize is None:
        raise ValueError("init='loftq' chooses the NF4 base and the adapter's start together, so it needs a quantized "
                         "base: pass quantize=NF4() (YAML: model.quantize), or use init='pissa' on a full-precision base.")
    if init == "loftq" and isinstance(adapter, DoRA):
        raise ValueError("DoRA(init='loftq') is not supported (LoftQ fits an additive correction; neither paper nor "
                         "PEFT defines it for DoRA): use DoRA(init='pissa') or LoRA(init='loftq').")


def _checked_plan(model: nn.Module, adapter: AdapterConfig, name: str, quantize: NF4 | None) -> list:
    """The injection plan, after every check an SVD init needs (module docstring); raises before any change."""
    init = adapter.init
    check_start(adapter, quantize)
    if quantize is not None and not isinstance(quantize, NF4):
        raise TypeError(f"quantize must be an NF4 config or None, got {type(quantize).__name__}.")
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ValueError(f"init={init!r} rewrites the base weights, which would change the adapters already on the "
                         "model; initialize it on a model without adapters (or use init='default').")
    plan = plan_injection(model, adapter, name)
    shared = _shared_weights(model)
    for target, _ in plan:
        layer = model.get_submodule(target)
        if not is_linear_like(layer):
            raise ValueError(f"init={init!r} starts from the SVD of a linear layer's weight; {target!r} is a "
                             f"{type(layer).__name__}: exclude it (exclude_modules) or use init='default'.")
        if is_quantized(layer):
            raise ValueError(f"init={init!r} needs the original weights, but {target!r} is already quantized: give the "
                             "full-precision model and let prepare quantize it (quantize=NF4(...)).")
        n_in, n_out = in_out_features(layer)
        if adapter.r > min(n_in, n_out):
            raise ValueError(f"init={init!r}: r={adapter.r} is larger than min(in, out) = {min(n_in, n_out)} of "
                             f"{target!r} ({n_out} x {n_in}), which has only that many singular values; lower r or "
                             "exclude the layer.")
        if id(layer.weight) in shared:
            raise ValueError(f"init={init!r} rewrites {target!r}'s weight, which it shares with {shared[id(layer.weight)]}"
                             " (tied embeddings): exclude it or untie the weights first.")
    return plan


def _shared_weights(model: nn.Module) -> dict[int, list[str]]:
    """id of every parameter reachable under more than one name -> those names."""
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return {k: v for k, v in names.items() if len(v) > 1}


def _set_start(branch: nn.Module, base: nn.Module, A: torch.Tensor, B: torch.Tensor, keep: bool) -> None:
    """Write the SVD start into ``branch``; ``keep`` stores it as buffers; DoRA's magnitude follows the new start."""
    branch.lora_A.copy_(A.to(branch.lora_A.dtype))
    branch.lora_B.copy_(B.to(branch.lora_B.dtype))
    if keep:
        branch.register_buffer(INIT_A, branch.lora_A.detach().clone())
        branch.register_buffer(INIT_B, branch.lora_B.detach().clone())
    if isinstance(branch, DoRABranch):
        branch.magnitude.copy_(branch.norm(base).to(branch.magnitude.dtype))


def initial_factors(branch: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A0, B0) a PiSSA branch started from, or None for a branch that starts at zero change."""
    A0, B0 = getattr(branch, INIT_A, None), getattr(branch, INIT_B, None)
    return None if A0 is None or B0 is None else (A0, B0)
