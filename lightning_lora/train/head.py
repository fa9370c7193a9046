"""The output head of a Hugging Face causal LM, swapped for a stand-in for the length of a call, and the one-time
probe that decides whether such a swap is faithful.

``causal_lm_loss`` (``loss.py``) and DPO's log-probabilities (``dpo.py``) run the model's own ``forward`` with its
output head replaced by a module that takes the last hidden states H and returns what they need from the head,
e.g. the loss on the labeled rows. That equals computing from ``model(...).logits`` only if the forward returns the
head's output untouched: logits = W H (+ b). Gemma 2 soft-caps them afterwards (c tanh(z / c)), Granite divides
them by ``logits_scaling``; a stand-in head would skip that. So before the first swap the model is probed once
(``probe.py``): on 2 tokens it must call its head exactly once, the real head's output there must equal the model's
logits within 1e-5, and a marker returned by the stand-in must come back unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from lightning_lora.train.probe import Verdict, differs, frozen_modes, logits, probe_ids, verdict


def _head_slot(model: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    """(parent module, attribute name, head) of the model's output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"causal_lm_loss needs a causal LM with an output head; {type(model).__name__} has none "
                         "(get_output_embeddings() returned None).")
    for name, module in model.named_modules():
        if module is head and name:
            parent, _, attr = name.rpartition(".")
            return model.get_submodule(parent), attr, head
    raise ValueError(f"the output head of {type(model).__name__} is not one of its submodules.")


@contextlib.contextmanager
def head_swapped(model: nn.Module, stand_in) -> Iterator[nn.Module]:
    """Inside the block ``model``'s output head is ``stand_in(head)`` (yielded); the head is put back on exit."""
    parent, attr, head = _head_slot(model)
    replacement = stand_in(head)
    setattr(parent, attr, replacement)
    try:
        yield replacement
    finally:
        setattr(parent, attr, head)


def rescales_logits(model: nn.Module) -> bool:
    """Whether a stand-in head would skip something ``model``'s forward does after its head (softcapping, logit
    scales): the negative verdict of the one-time probe ``head_swap_verdict``."""
    return not head_swap_verdict(model)


class _HeadProbe(nn.Module):
    """Stands in for the head during the probe: records what the real head gives on its input, returns ``marker``."""

    def __init__(self, head: nn.Module, marker: Tensor):
        super().__init__()
        self.head, self.marker, self.outputs = head, marker, []

    def forward(self, hidden: Tensor) -> Tensor:
        self.outputs.append(self.head(hidden))  # inside the model's forward (FSDP2 has gathered the head here)
        return self.marker.to(hidden.dtype)


def head_swap_verdict(model: nn.Module) -> Verdict:
    """Whether ``causal_lm_loss`` may swap the model's output head for its loss head (probed once per model): on 2
    tokens the model calls the head exactly once, the real head's output there equals the model's logits within
    1e-5, and the model returns whatever the head returned (a marker of integers in [-64, 64], exact in every float
    dtype) untouched, i.e. nothing rescales or caps the logits after the head."""
    return verdict(model, "the labeled-rows loss head", _probe_head)


def _probe_head(model: nn.Module) -> Verdict:
    ids = probe_ids(model, 2)
    with frozen_modes(model):
        reference = logits(model, ids)
        marker = torch.randint(-64, 65, reference.shape, generator=torch.Generator().manual_seed(0))
        marker = marker.to(reference.device, torch.float32)
        with head_swapped(model, lambda head: _HeadProbe(head, marker)) as probe:
            out = logits(model, ids)
    calls = probe.outputs
    if len(calls) != 1:
        return Verdict(False, f"its forward called the output head {len(calls)} times, not once")
    if differs(reference, calls[0]):
        return Verdict(False, f"the head's own output is not the model's logits ({differs(reference, calls[0])})")
    if differs(marker, out, tolerance=0.0):
        return Verdict(False, "its forward changes the logits after the output head (rescaling or soft-capping)")
    return Verdict(True)


__all__ = ["head_swap_verdict", "head_swapped", "rescales_logits"]
