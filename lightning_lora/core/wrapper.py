"""``AdapterLayer``: a frozen base layer of any registered kind plus its named adapter branches (the contract and
the order in which branches act: ``core/layer.py``), and the precision helpers methods use under autocast."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lightning_lora.core.trained import active_trained

if TYPE_CHECKING:
    from lightning_lora.core.layer import AdapterBranch


class AdapterLayer(nn.Module):
    """A frozen base layer plus named adapter branches; its output with the active ones: ``core/layer.py``'s module
    docstring (wrapping branches around the base call, then the others on its output, in activation order). An
    active adapter's trained tensors (``trained[name]``: a whole copy, token rows, a bias; ``core/trained.py``)
    stand in for the base layer's own during the whole call."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.trained = nn.ModuleDict()  # adapter name -> Trained: tensors it trains in place of the base's (trained.py)
        self.active: dict[str, float] = {}  # adapter name -> weight
        self.enabled = True
        self.sample_adapters: list[str | None] | None = None  # one adapter name per batch row (mixed batches)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        base = self.base_layer
        if not self.enabled:
            return base(x, *args, **kwargs)
        call = functools.partial(_call_base, base, args, kwargs)
        if self.sample_adapters is not None:
            if len(self.sample_adapters) != x.shape[0]:
                raise ValueError(f"mixed batch: {len(self.sample_adapters)} adapter names for a batch of {x.shape[0]} "
                                 "samples.")
            return self.run_per_row(x, self.sample_adapters, call, base)
        owner = active_trained(self)
        if owner is not None:  # the active adapter's trained tensors stand in for the base's, branches included
            if not any(n in self.adapters._modules for n in self.active):
                return owner.call(base, x, *args, **kwargs)
            with owner.in_place_of(base) as replaced:
                return self.run(x, functools.partial(_call_base, replaced, args, kwargs), replaced)
        return self.run(x, call, base)

    def run(self, x: Tensor, call: Callable[[Tensor], Tensor], base: nn.Module) -> Tensor:
        """The output with the active branches: ``call(x)`` is the base layer's call, ``base`` what the branches
        see as the base layer (the layer itself; one expert of a stack for ``core/experts.py``)."""
        branches = self.adapters._modules
        active = [(branches[n], w) for n, w in self.active.items() if n in branches]
        if any(b.wraps_base for b, _ in active):  # input-side branches nest around the base call (module docstring)
            for branch, weight in active:
                if branch.wraps_base:
                    call = functools.partial(_call_wrap, branch, call, base, weight)
            active = [(b, w) for b, w in active if not b.wraps_base]
        out = call(x)
        for branch, weight in active:
            out = branch(x, out, base, weight)
        return out

    def run_per_row(self, x: Tensor, names: list[str | None], call: Callable[[Tensor], Tensor],
                    base: nn.Module) -> Tensor:
        """Mixed batch: row i of ``x`` runs with adapter ``names[i]`` alone (None: the base); one base call."""
        out = call(x)
        for name in dict.fromkeys(n for n in names if n is not None and n in self.adapters):
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            branch = self.adapters[name]
            if branch.wraps_base:  # its rows need their own base call, on their own input
                out[rows] = branch.wrap(x[rows], call, base, 1.0)
            else:
                out[rows] = branch(x[rows], out[rows], base, 1.0)
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "adapters", "trained"):
                raise
            return getattr(self.base_layer, name)  # weight, in_features, ... as the code around expects

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, trained={list(self.trained)}, active={self.active}, enabled={self.enabled}"


def _call_base(base: nn.Module, args: tuple, kwargs: dict, x: Tensor) -> Tensor:
    return base(x, *args, **kwargs)


def _call_wrap(branch: AdapterBranch, inner: Callable, base: nn.Module, weight: float, x: Tensor) -> Tensor:
    return branch.wrap(x, inner, base, weight)


def own_precision(like: Tensor) -> contextlib.AbstractContextManager:
    """A context in which autocast is off on ``like``'s device (a no-op when it is off already): for a method that
    computes in its adapter's own dtype under mixed precision, in forward and in its autograd functions' backward."""
    device = like.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


def in_own_precision(forward: Callable) -> Callable:
    """Decorator: run a branch's ``forward(x, ...)`` under ``own_precision(x)``."""

    @functools.wraps(forward)
    def run(self, x: Tensor, *args, **kwargs):
        with own_precision(x):
            return forward(self, x, *args, **kwargs)

    return run
