"""Starts that rewrite the base: each planned branch initializes itself from its layer and returns the base it
trains on (the method's ``start`` hook: PiSSA's residual, LoftQ's quantized base, ``methods/``), one layer at a time.

``inject`` runs this for a config whose start ``rewrites_base`` (without quantization), ``prepare`` with a quantizer
per layer (``quant/prepare.py``). Everything is checked before the model changes: a model that already has adapters
(their base would change under them), a target that is already quantized (the start needs the original weights), a
weight shared with another layer (tied embeddings), and each branch's own ``refuse_start`` (e.g. a rank above
min(in, out)). Layers are rewritten one at a time, so a high-precision weight is freed as soon as its replacement
exists: memory peaks about one layer above the model.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from lightning_lora.core.kinds import is_quantized, kind_of
from lightning_lora.core.layer import AdapterBranch, AdapterConfig, AdapterLayer

log = logging.getLogger(__name__)

Quantizer = Callable[[str, nn.Module], Callable[[Tensor], nn.Module] | None]  # (name, layer) -> weight -> layer


def check_base_rewrite(model: nn.Module, plan: list[tuple[str, AdapterBranch]], config: AdapterConfig) -> None:
    """Raise ValueError (naming the layer and the fix) when the planned start cannot run; the model is untouched."""
    what = f"{config.method}'s start"
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ValueError(f"{what} rewrites the base weights, which would change the adapters already on the model; "
                         "start it on a model without adapters (or use the default start).")
    shared = _shared_weights(model)
    for target, branch in plan:
        layer = model.get_submodule(target)
        if is_quantized(layer):
            raise ValueError(f"{what} needs the original weights, but {target!r} is already quantized: give the "
                             "full-precision model and let prepare quantize it (quantize=NF4(...)).")
        why = branch.refuse_start(layer)
        if why:
            raise ValueError(f"{what} cannot run on {target!r}: {why}")
        weight = getattr(layer, "weight", None)
        if id(weight) in shared:
            raise ValueError(f"{what} rewrites {target!r}'s weight, which it shares with {shared[id(weight)]} (tied "
                             "embeddings): exclude it or untie the weights first.")


def start_layers(model: nn.Module, plan: list[tuple[str, AdapterBranch]], config: AdapterConfig,
                 quantizer: Quantizer | None = None) -> None:  # fmt: skip
    """Run every planned branch's ``start`` on its layer and put the base it returns in place (module docstring)."""
    check_base_rewrite(model, plan, config)
    began = time.perf_counter()
    with torch.no_grad(), _one_cpu_thread():
        for target, branch in plan:
            layer = model.get_submodule(target)
            new = branch.start(layer, None if quantizer is None else quantizer(target, layer))
            if new is not layer:
                branch.kind_name = kind_of(new).name  # e.g. now a quantized kind
                parent, _, child = target.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, new)  # the old weight is freed here
    started: dict[str, list[str]] = {}
    for target, branch in plan:
        started.setdefault(branch.started_from or "default", []).append(target)
    kept = started.pop("default", [])
    log.info("init: %s start for %d layers in %.2f s%s", ", ".join(started) or "default",
             sum(map(len, started.values())), time.perf_counter() - began,
             f"; default start for {len(kept)} layers (their base stays as it is): {kept}" if kept else "")


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


def _shared_weights(model: nn.Module) -> dict[int, list[str]]:
    """id of every parameter reachable under more than one name -> those names."""
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return {k: v for k, v in names.items() if len(v) > 1}
