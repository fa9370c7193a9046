"""Regional ``torch.compile``: each decoder layer compiled on its own (``LoRAModule(compile=True)``).

Compiling the repeated block rather than the whole model (torchtune's and PEFT's advice; PyTorch's "regional
compilation" recipe) traces one layer, and every layer of the same class reuses its graph: compile time is that of
one layer, not of the model. What runs inside a layer is traced without a graph break: the adapters, the NF4 base,
packed attention, MLP or whole-layer checkpointing, saved-tensor hooks (offloading), the lean functions
(``tests/test_compiling.py`` checks each with ``fullgraph=True``). The embeddings and the loss head run outside,
uncompiled.

Packed rows do not recompile: under compilation packed attention is one opaque operator reading the example
boundaries from a tensor (``packed_op.py``), and that tensor's length is marked dynamic. The lean functions
(``lean.py``) run their plain forward ops there: inductor decides what to save and recompute. DoRA and VeRA skip
their caches keyed on data pointers and version counters, and DoRA runs its plain-autograd form (no data-dependent
branch in a graph).

Swapping the compiled layers in is proven like every other swap (``probe.py``): a training step on 2 x 3 tokens
gives the same logits (within 1e-5 relative) and gradients (1e-4: ``GRAD_TOLERANCE``) as before compiling, else the layers are put back as they
were and the reason is logged (as is a failure to compile, e.g. no C++ compiler for inductor on CPU). Shapes are
dynamic by default, so the graph the probe checks is the one that trains, for any batch size above 1 and any length.
"""

from __future__ import annotations

import logging

from torch import nn

from lightning_lora.train.distributed import decoder_layers
from lightning_lora.train.probe import Verdict, cached, differs_step, logits_and_grads, model_type, probe_ids, verdict

log = logging.getLogger(__name__)
KEY = "torch.compile"
# Gradients of the probe step may differ by this much relative to their scale (logits: probe.TOLERANCE, 1e-5):
# inductor fuses and reorders fp32 sums, and on SmolLM2 (30 layers, fp32) a LoRA gradient moved by 1.03e-5 of its
# scale; a wrong mask or a missed branch moves gradients by O(1) of theirs.
GRAD_TOLERANCE = 1e-4


def compile_layers(model: nn.Module, **options) -> Verdict:
    """Compile every decoder layer of ``model`` in place (``nn.Module.compile(**options)``, e.g. ``backend``,
    ``mode``, ``fullgraph``). Call it after every other swap (quantizing, injecting, attention, checkpointing, lean
    activations): the probe step runs the model as it will train. Returns the verdict (cached per model); negative
    when the probe step differs or fails, or no decoder layer is found, with the model left as it was.
    One line is logged either way."""
    options = {"dynamic": True, **options}  # one graph for every batch shape, the one the probe step checks
    found = verdict(model, KEY, lambda m: _compile_and_probe(m, options))
    if found:
        log.info("torch.compile: %d decoder layers of %s compiled one by one (%s)", len(decoder_layers(model)),
                 model_type(model), ", ".join(f"{k}={v}" for k, v in options.items()) or "default options")
    return found  # a refusal is logged by verdict()


def _compile_and_probe(model: nn.Module, options: dict) -> Verdict:
    layers = decoder_layers(model)
    if not layers:
        return Verdict(False, "no decoder layers found")
    ids = probe_ids(model, 3, rows=2)  # not 1: with dynamic shapes, 1 would be specialized and training recompile
    reference = logits_and_grads(model, ids)
    for layer in layers:
        layer.compile(**options)
    try:
        why = differs_step(reference, logits_and_grads(model, ids), GRAD_TOLERANCE)
        why = why and f"a training step changed: {why}"
    except Exception as err:  # noqa: BLE001 - any failure to compile or run means "do not use it"; reason reported
        first = (str(err).strip().splitlines() or [""])[0]
        why = f"the compiled step failed ({type(err).__name__}: {first})"
    if why:
        for layer in layers:
            layer._compiled_call_impl = None  # what nn.Module.compile set: the layer runs its own forward again
        return Verdict(False, why)
    return Verdict(True)


def check_compile(value) -> dict | None:
    """``LoRAModule(compile=...)``: False -> None (off), True -> {} (torch's defaults), a dict -> its options; any
    other value is refused."""
    if value is False or value is None:
        return None
    if value is True:
        return {}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return dict(value)
    raise ValueError(f"compile must be true, false or a dict of torch.compile options (e.g. {{backend: aot_eager}}), "
                     f"got {value!r}.")


def compiling(model: nn.Module) -> bool:
    """Whether ``compile_layers`` compiled this model's decoder layers."""
    return bool(cached(model, KEY))


__all__ = ["KEY", "check_compile", "compile_layers", "compiling"]
