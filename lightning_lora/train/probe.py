"""One-time proofs that what the library swaps into a model leaves what the model computes unchanged.

The library swaps things into a user's model: an attention function (``attention.py``), a stand-in for the output
head (``loss.py``), checkpointing wrappers and offloading (``checkpointing.py``). Each may silently change what the
model computes on an architecture its author never ran (Falcon's attention, for one, dropped its causal mask under
a custom attention name). So before a swap applies, a probe runs the model once on a tiny input with and without
it and compares (the pattern of transformers' attention-dispatch tests and PEFT's merge-then-compare tests):

    max_t,v |logits_swapped[t, v] - logits_original[t, v]| <= TOLERANCE (1e-5) * max(1, max_t,v |logits_original|)

(relative to the logits' scale once they exceed 1: the real SmolLM2 over NF4, whose logits reach about 20, differs
by 6e-5 between a packed row and its examples run alone, which is float32 rounding of differently shaped matmuls)

and counts that the swapped part ran where it must (every attention layer, every checkpointed layer). The verdict
is cached per model and key, so each model pays for each probe once; a swap whose verdict is negative is not made
(or is refused), with the reason in one line naming the model type.

Helpers for a new swap: ``verdict(model, key, check)`` caches ``check(model) -> Verdict``; ``probe_ids`` gives the
probe tokens; ``frozen_modes`` runs a probe in eval mode (no dropout) and restores every module's mode;
``differs`` compares two outputs; ``seeded`` replays the same random draws (dropout) for two runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

TOLERANCE = 1e-5
_VERDICTS: weakref.WeakKeyDictionary[nn.Module, dict[str, Verdict]] = weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Whether a swap keeps what the model computes (``ok``), and why not (``reason``, one clause)."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


def model_type(model: nn.Module) -> str:
    """The Hugging Face ``model_type`` of ``model`` (its class name when it has no config), for error messages."""
    return str(getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__)


def verdict(model: nn.Module, key: str, check: Callable[[nn.Module], Verdict]) -> Verdict:
    """``check(model)``, run once per model and ``key``; later calls return the cached verdict. A negative verdict
    is logged once (``<key>: <model type>: <reason>``)."""
    cache = _VERDICTS.setdefault(model, {})
    if key not in cache:
        cache[key] = check(model)
        if not cache[key].ok:
            log.info("%s not used for %s: %s", key, model_type(model), cache[key].reason)
    return cache[key]


def forget(model: nn.Module, key: str | None = None) -> None:
    """Drop the cached verdict ``key`` (all with None) of ``model``, e.g. after changing its architecture."""
    if key is None:
        _VERDICTS.pop(model, None)
    else:
        _VERDICTS.get(model, {}).pop(key, None)


def probe_ids(model: nn.Module, length: int = 2, rows: int = 1, seed: int = 0) -> Tensor:
    """(rows, length) token ids drawn from a fixed generator, inside the model's vocabulary, on its device."""
    config = getattr(model, "config", None)
    vocab = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "vocab_size", None)
    high = min(int(vocab or 2), 1000)
    ids = torch.randint(0, high, (rows, length), generator=torch.Generator().manual_seed(seed))
    param = next(model.parameters(), None)
    return ids.to(param.device) if param is not None else ids


def num_layers(model: nn.Module) -> int | None:
    """The number of decoder layers its config declares (None without a config)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "num_hidden_layers", None)


@contextlib.contextmanager
def frozen_modes(model: nn.Module, training: bool = False) -> Iterator[nn.Module]:
    """Every module in eval mode (``training=False``: no dropout) or train mode inside; each one's mode restored."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def seeded(seed: int = 0) -> Iterator[None]:
    """The same random draws (dropout masks) for every block entered with the same seed; the RNG state restored."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def differs(reference: Tensor, other: Tensor, tolerance: float = TOLERANCE) -> str | None:
    """None when ``other`` equals ``reference`` within ``tolerance`` times max(1, max |reference|) (max abs
    difference), else a clause saying by how much (or that the shapes differ)."""
    if reference.shape != other.shape:
        return f"shape {tuple(other.shape)} instead of {tuple(reference.shape)}"
    diff = (reference.float() - other.float()).abs().max().item() if reference.numel() else 0.0
    scale = max(1.0, reference.float().abs().max().item()) if reference.numel() else 1.0
    tolerance = tolerance * scale if math.isfinite(scale) else tolerance
    if not diff <= tolerance:  # also catches NaN
        return f"outputs moved by {diff:.2g} (> {tolerance:g})"
    return None


def logits(model: nn.Module, ids: Tensor, **kwargs) -> Tensor:
    """The model's logits on ``ids`` with no cache (as in training), without autograd."""
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, **kwargs).logits


def logits_and_grads(model: nn.Module, ids: Tensor, context=None, seed: int = 0) -> tuple[Tensor, list, set[int]]:
    """A training step on ``ids`` in train mode, dropout drawn from ``seed``, inside ``context`` (if given).

    The loss is sum(logits * R), R a fixed random tensor, so every logit's gradient matters. Returns the logits, the
    gradients of the input embeddings and of every trainable parameter (None where unused), and the ids of the
    modules that ran during backward (recomputed by checkpointing). Gradients are returned, not accumulated.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    called: set[int] = set()
    in_backward = [False]

    def record(module: nn.Module, args) -> None:
        if in_backward[0]:
            called.add(id(module))

    handle = nn.modules.module.register_module_forward_pre_hook(record)
    try:
        with frozen_modes(model, training=True), seeded(seed), context or contextlib.nullcontext():
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
            out = model(inputs_embeds=embeds, use_cache=False).logits
            weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
            in_backward[0] = True
            grads = torch.autograd.grad((out.float() * weights).sum(), [embeds, *params], allow_unused=True)
    finally:
        handle.remove()
    return out.detach(), list(grads), called


def differs_step(reference: tuple[Tensor, list], other: tuple[Tensor, list],
                 grad_tolerance: float = TOLERANCE) -> str | None:
    """``differs`` over a step's logits and every gradient of ``logits_and_grads`` (None when all agree); the
    gradients within ``grad_tolerance`` (a compiler's reordered float sums through every layer need more)."""
    why = differs(reference[0], other[0])
    if why:
        return f"logits: {why}"
    for i, (ref, got) in enumerate(zip(reference[1], other[1])):
        if (ref is None) != (got is None):
            return f"gradient {i} is {'missing' if got is None else 'new'}"
        why = ref is not None and differs(ref, got, grad_tolerance)
        if why:
            return f"gradient {i} ({'input embeddings' if i == 0 else 'a trainable parameter'}): {why}"
    return None


def cached(model: nn.Module, key: str) -> Verdict | None:
    """The verdict ``key`` already found for ``model``, or None when it was never probed."""
    return _VERDICTS.get(model, {}).get(key)


__all__ = ["TOLERANCE", "Verdict", "cached", "differs", "differs_step", "forget", "frozen_modes", "logits",
           "logits_and_grads", "model_type", "num_layers", "probe_ids", "seeded", "verdict"]
