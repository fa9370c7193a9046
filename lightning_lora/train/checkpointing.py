"""Gradient checkpointing of the whole decoder layer, or of its MLP only (selective checkpointing).

Full checkpointing (Chen et al. 2016, arXiv:1604.06174; Hugging Face's ``gradient_checkpointing_enable``) keeps
each decoder layer's input and recomputes the whole layer in backward: about one more forward pass.

``"mlp"`` recomputes only each decoder layer's MLP. In a Llama block the MLP keeps most of the layer's activations
for backward, per token

    gate x, silu(gate x), up x, and their product (4 m values; m, the intermediate size, is 2.7 h in SmolLM2, 3.5 h in Llama-3-8B)

against ~5 h for the norms, attention and residual stream. Recomputing it runs the MLP's forward again: its three
projections are ~3/4 of a Llama layer's matmuls, so at most ~1/4 more compute (forward + backward being ~3 forwards),
where full checkpointing adds ~1/3 and drops nearly all activations. Measured on SmolLM2 QLoRA, 4 x 512 tokens, one
CPU thread: activations kept for backward 1.65 -> 0.83 GB, step time +18% (selective checkpointing in the sense of
Korthikanti et al. 2022, arXiv:2205.05198, applied to the MLP).

The MLP is recomputed with non-reentrant ``torch.utils.checkpoint`` around its own ``forward``; its module, names
and parameters are unchanged (adapters inside it are recomputed too).

**Offloading** (``offloading``): on an accelerator, every tensor autograd saves during the forward (with
checkpointing: each layer's input, which torch's non-reentrant checkpoint saves through autograd) goes to pinned host
memory and comes back when backward needs it (``torch.autograd.graph.save_on_cpu``; torchtune's activation
offloading does the same with overlapping streams). The device then holds about one layer's activations at a time,
for one copy out and one back of the saved bytes per step. On CPU it does nothing (they are in host memory already).

Both are proved per model before they are used (``probe.py``): a 2-token training step gives the same logits and
gradients within 1e-5, and every layer ran again in backward (checkpointing) or tensors went to the host
(offloading); otherwise they are refused with the model type and the reason.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_lora.train.probe import (
    Verdict,
    cached,
    differs_step,
    logits_and_grads,
    model_type,
    num_layers,
    probe_ids,
    verdict,
)

MODES = (False, True, "mlp")


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    """The module's own class ``forward``, recomputed in backward when it runs with autograd in training mode."""
    forward = type(self).forward
    if self.training and torch.is_grad_enabled():
        return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
    return forward(self, *args, **kwargs)


def _mlps(model: nn.Module) -> list[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [layer.mlp for layer in model.modules()
            if isinstance(layer, GradientCheckpointingLayer) and isinstance(getattr(layer, "mlp", None), nn.Module)]


def checkpoint_mlps(model: nn.Module) -> int:
    """Recompute every decoder layer's ``mlp`` in backward (module docstring); returns how many."""
    mlps = _mlps(model)
    if not mlps:
        raise ValueError(f"gradient_checkpointing='mlp' found no decoder layer with an .mlp in {type(model).__name__}; "
                         "use gradient_checkpointing=True (whole layers) for this model.")
    for mlp in mlps:
        mlp.forward = types.MethodType(_checkpointed_forward, mlp)
    return len(mlps)


def check_mode(mode) -> None:
    """Refuse a ``gradient_checkpointing`` value other than false, true (whole layers) or "mlp"."""
    if mode not in MODES:
        raise ValueError(f"gradient_checkpointing must be true, false or 'mlp', got {mode!r}.")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers: the first ``nn.ModuleList`` holding as many modules as the config has layers."""
    layers = num_layers(model)
    found = next((m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == layers), None)
    return list(found) if found is not None else []


def enable_checkpointing(model: nn.Module, mode: bool | str) -> None:
    """``True``: whole decoder layers (Hugging Face's); ``"mlp"``: the MLPs only; ``False``: none.

    Proved once per model before it is kept (``probe.py``): a training step on 2 tokens gives the same logits and
    gradients (input embeddings and every trainable parameter) within 1e-5 as before, and every decoder layer (or
    every MLP) ran again during backward. Otherwise the model is put back as it was and a ``ValueError`` names the
    model type and the reason.
    """
    check_mode(mode)
    if not mode:
        return
    key = f"gradient_checkpointing={mode!r}"
    reference = None if cached(model, key) else logits_and_grads(model, probe_ids(model, 2))
    if mode == "mlp":
        units = _mlps(model)
        checkpoint_mlps(model)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        units = decoder_layers(model)
    found = verdict(model, key, lambda m: _probe_recompute(m, reference, units))
    if not found:
        if mode == "mlp":
            for mlp in units:
                mlp.__dict__.pop("forward", None)
        else:
            model.gradient_checkpointing_disable()
        raise ValueError(f"{key} is not proven for {model_type(model)}: {found.reason}; use gradient_checkpointing="
                         f"{'True or ' if mode == 'mlp' else ''}False for this model.")
    model.config.use_cache = False


def _probe_recompute(model: nn.Module, reference, units: list[nn.Module]) -> Verdict:
    layers = num_layers(model)
    if len(units) != layers:
        return Verdict(False, f"found {len(units)} layers to recompute, but the model has {layers}")
    step = logits_and_grads(model, probe_ids(model, 2))
    why = differs_step(reference, step)
    if why:
        return Verdict(False, f"a training step changed ({why})")
    again = sum(any(id(m) in step[2] for m in unit.modules()) for unit in units)
    if again != len(units):
        return Verdict(False, f"only {again} of its {len(units)} layers ran again in backward")
    return Verdict(True)


class _CountingOffload(torch.autograd.graph.save_on_cpu):
    """``save_on_cpu`` that counts the tensors it moved to host memory."""

    def __init__(self, pin_memory: bool):
        super().__init__(pin_memory=pin_memory)
        pack, self.packed = self.pack_hook, 0

        def counting(tensor):
            self.packed += 1
            return pack(tensor)

        self.pack_hook = counting


def offloading(enabled: bool, device: torch.device, model: nn.Module | None = None):
    """A context in which autograd keeps the tensors it saves in pinned host memory (on an accelerator, when
    ``enabled``); elsewhere a context that does nothing. With ``model``, the first use proves it (``probe.py``): a
    training step on 2 tokens gives the same logits and gradients within 1e-5 with and without it, and tensors did
    go to the host; otherwise a ``ValueError`` names the model type and the reason."""
    if not (enabled and torch.device(device).type != "cpu"):
        return contextlib.nullcontext()
    if model is not None:
        found = verdict(model, "activation offloading", _probe_offload)
        if not found:
            raise ValueError(f"offload_activations is not proven for {model_type(model)}: {found.reason}; set "
                             "offload_activations=False.")
    return torch.autograd.graph.save_on_cpu(pin_memory=True)


def _probe_offload(model: nn.Module) -> Verdict:
    ids = probe_ids(model, 2)
    reference = logits_and_grads(model, ids)
    context = _CountingOffload(pin_memory=ids.device.type != "cpu")  # pinned host memory needs an accelerator
    why = differs_step(reference, logits_and_grads(model, ids, context=context))
    if why:
        return Verdict(False, f"a training step changed ({why})")
    return Verdict(True) if context.packed else Verdict(False, "no saved tensor went to host memory")


__all__ = ["MODES", "check_mode", "checkpoint_mlps", "decoder_layers", "enable_checkpointing", "offloading"]
