"""``prepare``: quantize (optional) and inject an adapter, starting it as its method says. LoRAModule, AdapterCallback
and the offline export all build their model through it, so a run, its resume and its export start alike.

Only the order and the quantizer are decided here; what a start does is the method's (``AdapterBranch.start``, e.g.
``methods/lora_init.py``: ``LoRA(init="pissa" | "loftq")``) and the layer-by-layer loop is the core's
(``core/start.py``, which ``inject`` runs too). Two orders:

- a start that leaves the base alone (LoRA's ``"default"``/``"gaussian"``, DoRA, VeRA, ...): quantize the model, then
  inject (QLoRA);
- a start that rewrites the base (``rewrites_base``: PiSSA, LoftQ): each target layer first gets its start, with a
  quantizer for the layers ``quantize`` would turn into NF4 (the method chooses what to quantize: QPiSSA's residual,
  LoftQ's Q), then the remaining layers are quantized, then the branches are attached.

Everything is checked before the model changes (bad input leaves it as it was).
"""

from __future__ import annotations

import functools

from torch import nn

from lightning_lora.core.kinds import is_quantized
from lightning_lora.core.layer import AdapterConfig
from lightning_lora.core.start import start_layers
from lightning_lora.core.verbs import attach, check_adapter_config, inject, plan_injection
from lightning_lora.quant.nf4 import NF4, nf4_layer, unsupported_shape
from lightning_lora.quant.nf4 import quantize as quantize_model


def prepare(model: nn.Module, adapter: AdapterConfig, name: str = "default", quantize: NF4 | None = None) -> nn.Module:
    """Quantize ``model`` with ``quantize`` (if given) and inject ``adapter`` as ``name``, started as its method says
    (module docstring). Returns ``model``, changed in place.

    Raises:
        ValueError: the start refuses (e.g. ``init="loftq"`` without ``quantize``, DoRA with ``init="loftq"``, r above
            min(in, out) of a target, a model that already has adapters or a quantized target, a non-linear target, a
            weight shared with another layer), or anything ``inject`` refuses. The model is then unchanged.
    """
    check_start(adapter, quantize)
    if not adapter.rewrites_base:
        if quantize is not None:
            quantize_model(model, quantize)
        return inject(model, adapter, name)
    plan = plan_injection(model, adapter, name)
    start_layers(model, plan, adapter, None if quantize is None else functools.partial(_quantizer, quantize))
    if quantize is not None:
        quantize_model(model, quantize)  # the layers the adapter does not target (already-NF4 ones are skipped)
    return attach(model, plan, name)


def check_start(adapter: AdapterConfig, quantize: object = None) -> None:
    """The checks that need no model (LoRAModule and AdapterCallback run them at construction).

    Raises:
        TypeError: ``adapter`` is not an adapter config, or ``quantize`` not an NF4 config.
        ValueError: the method's own ``check_start`` refuses (e.g. ``init="loftq"`` without ``quantize``).
    """
    check_adapter_config(adapter)
    if quantize is not None and not isinstance(quantize, NF4):
        raise TypeError(f"quantize must be an NF4 config or None, got {type(quantize).__name__}.")
    adapter.check_start(quantize)


def _quantizer(nf4: NF4, target: str, layer: nn.Module):
    """``weight -> NF4 layer`` for a layer ``quantize(model, nf4)`` would turn into NF4 (the same rules), else None."""
    if (isinstance(layer, nn.Linear) and not is_quantized(layer) and not nf4.skips(target)
            and unsupported_shape(layer, nf4.blocksize) is None):  # fmt: skip
        return functools.partial(nf4_layer, like=layer, nf4=nf4)
    return None
