"""Non-finite values never leave the process: tensors are checked before they are written or loaded, and a model
runs one probe batch before it is exported.

A run whose learning rate blew up can leave an adapter whose every value is finite yet huge (lr 1e30: B ~ 1e30), so
the merged weights (~6e29) pass a finite check while every logit is NaN (the attention scores overflow). Only running
the model shows it: ``probe`` feeds one small batch, watches every module's output (forward hooks, in the order the
modules finish), and refuses with the first module whose output is non-finite and the largest weight.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

PROBE_TOKENS = 16


def first_non_finite(tensors: Mapping[str, Tensor]) -> tuple[str, int, int] | None:
    """``(key, bad values, numel)`` of the first floating tensor holding NaN/inf, else None."""
    for key, value in tensors.items():
        if torch.is_tensor(value) and value.is_floating_point():
            finite = torch.isfinite(value.detach())
            if not bool(finite.all()):
                return key, int((~finite).sum()), value.numel()
    return None


def check_finite(tensors: Mapping[str, Tensor], source: str, fix: str | None = None) -> None:
    """Raise ``ValueError`` naming ``source`` and the first tensor of ``tensors`` with NaN/inf values."""
    bad = first_non_finite(tensors)
    if bad is not None:
        key, count, numel = bad
        raise ValueError(
            f"{source}: tensor {key!r} holds {count} NaN/inf value(s) of {numel}. "
            + (fix or "Nothing was written; check the training run that produced it (a learning rate too high?).")
        )


def _tensors(output: Any) -> Iterable[Tensor]:
    if torch.is_tensor(output):
        yield output
    elif isinstance(output, Mapping):
        for value in output.values():
            yield from _tensors(value)
    elif isinstance(output, (tuple, list)):
        for value in output:
            yield from _tensors(value)


def _is_bad(output: Any) -> bool:
    return any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in _tensors(output))


def probe_input(model: nn.Module) -> Tensor | None:
    """A batch of ``PROBE_TOKENS`` token ids for a Hugging Face language model (from its ``config.vocab_size``)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        return None
    return (torch.arange(PROBE_TOKENS) * 7919 % vocab).unsqueeze(0)


def _largest_weight(model: nn.Module) -> tuple[str, float]:
    best = ("", 0.0)
    for name, param in model.named_parameters():
        if param.is_floating_point() and param.numel():
            value = float(param.detach().abs().max())
            if value > best[1]:
                best = (name, value)
    return best


@torch.no_grad()
def probe(model: nn.Module, inputs: Any = None, what: str = "the model") -> bool:
    """Run ``model`` once on ``inputs`` (default: ``probe_input``) and raise ``ValueError`` when an output is
    non-finite, naming the first module that produced one. Returns False (nothing run) when there is no input."""
    inputs = probe_input(model) if inputs is None else inputs
    if inputs is None:
        return False
    first: list[str] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if not first and _is_bad(output):
            first.append(names[module])

    names = {m: n or type(model).__name__ for n, m in model.named_modules()}
    handles = [m.register_forward_hook(hook) for m in names]
    training = model.training
    try:
        model.eval()
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if torch.is_tensor(inputs) and not inputs.is_floating_point() and hasattr(model, "config"):
            out = model(input_ids=inputs.to(device), use_cache=False)
        else:
            out = model(inputs.to(device) if torch.is_tensor(inputs) else inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    if first or _is_bad(out):
        layer = first[0] if first else type(model).__name__
        name, value = _largest_weight(model)
        raise ValueError(
            f"{what} gives non-finite (NaN/inf) outputs on a probe batch: the first layer whose output is non-finite "
            f"is {layer!r} (largest weight {value:.3g}, in {name!r}). Nothing was written; check the training run "
            "that produced the adapter (a learning rate too high?)."
        )
    return True


__all__ = ["check_finite", "first_non_finite", "probe", "probe_input"]
