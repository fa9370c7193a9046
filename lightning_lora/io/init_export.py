"""Exports of adapters that started from an SVD (``init="pissa"`` / ``"loftq"``): every export computes the function
that was trained, never the original W plus the adapter (which would count the start twice).

- ``merged``: each adapted layer gets W' = base + adapter, with base the layer the adapter trained on: PiSSA's residual
  W_res (fp), or dequant(Q) for QPiSSA and LoftQ; NF4 layers the adapter does not touch are dequantized (the function
  trained used them that way). This is exact; no re-quantization, no reload of the original W.
- ``adapter`` (PEFT format), for the original base:
  * PiSSA / QPiSSA: W_res + s B A = W + s (B A - B0 A0), so the folder holds the rank-2r LoRA B' = s [B, -B0],
    A' = [A; A0] with scaling 1 (``methods/pissa.py``), as PEFT converts PiSSA adapters. On the original fp W it is
    exact for PiSSA; for QPiSSA it differs from the trained function by the NF4 rounding of the residual (the merged
    export is the exact one; the README says so).
  * LoftQ: A and B as trained; they belong on LoftQ's base Q, which the README names: with ``loftq_iters=1`` that is
    the standard NF4 quantization of the original weights (bitsandbytes / ``BitsAndBytesConfig`` with the same
    block size and double quantization), with more iterations LoftQ's own deterministic Q (rebuild it with
    ``prepare``). The merged export is the exact one.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path

import torch
from torch import nn

from lightning_lora.core.layer import AdapterLayer, dense_weight, is_quantized, merged_base_layer
from lightning_lora.core.verbs import adapter_layers, remove
from lightning_lora.io.files import atomic_dir
from lightning_lora.io.peft import save_adapter
from lightning_lora.methods.dora import DoRABranch
from lightning_lora.methods.pissa import shared_factors
from lightning_lora.quant.prepare import SVD_INITS, initial_factors


def svd_init(model: nn.Module, name: str) -> str | None:
    """"pissa" or "loftq" when adapter ``name`` of ``model`` started from an SVD, else None."""
    for layer in adapter_layers(model).values():
        if name in layer.adapters:
            init = getattr(layer.adapters[name].config, "init", "default")
            return init if init in SVD_INITS else None
    return None


def save_for_original_base(model: nn.Module, path: str | Path, name: str = "default", **card) -> Path:
    """Write adapter ``name`` in PEFT's format for the original base (module docstring), with a note on its start
    added to the README card; ``card`` goes to ``save_adapter``."""
    init = svd_init(model, name)
    layers = {t: layer for t, layer in adapter_layers(model).items() if name in layer.adapters}
    config = next(iter(layers.values())).adapters[name].config
    quantized = any(is_quantized(layer.base_layer) for layer in layers.values())
    originals = {t: layer.adapters[name] for t, layer in layers.items()}
    try:
        if init == "pissa":  # swap in the rank-2r conversion for the save, then put the trained branches back
            for t, layer in layers.items():
                layer.adapters[name] = _converted(originals[t], layer.base_layer)
        with atomic_dir(path) as tmp:
            save_adapter(model, tmp / "peft", name, **card)
            for f in (tmp / "peft").iterdir():
                shutil.move(str(f), str(tmp / f.name))
            (tmp / "peft").rmdir()
            readme = tmp / "README.md"
            text = readme.read_text() if readme.exists() else ""
            readme.write_text(text + _note(init, config, quantized))
    finally:
        for t, layer in layers.items():
            layer.adapters[name] = originals[t]
    return Path(path)


def _converted(branch: nn.Module, base: nn.Module) -> nn.Module:
    """A plain LoRA (or DoRA) branch of rank 2r, scaling 1, equal to ``branch`` on the original weight W."""
    start = initial_factors(branch)
    A, B = branch.lora_A.detach(), branch.lora_B.detach()
    A0, B0 = start if start is not None else (torch.zeros_like(A), torch.zeros_like(B))
    A2, B2 = shared_factors(A, B, A0.to(A.dtype), B0.to(B.dtype), branch.scale)
    r2 = A2.shape[0]
    config = dataclasses.replace(branch.config, r=r2, alpha=float(r2), rslora=False, init="default")
    new = config.build(base)
    with torch.no_grad():
        new.lora_A.copy_(A2)
        new.lora_B.copy_(B2)
        if isinstance(branch, DoRABranch):
            new.magnitude.copy_(branch.magnitude.detach())
    return new


def _note(init: str, config, quantized: bool) -> str:
    r = config.r
    if init == "pissa":
        body = (f"This adapter was trained from a PiSSA start (arXiv:2404.02948, r={r}) on the residual W - s B0 A0"
                + (" quantized to NF4 (QPiSSA)" if quantized else "") + ". It is saved converted for the **original**"
                f" base weights W, as the rank-{2 * r} LoRA s [B, -B0] [A; A0] with scaling 1.")
        if quantized:
            body += (" On W it differs from the trained model by the NF4 rounding of the residual; the merged export"
                     " is the exact trained model.")
    else:
        body = (f"This adapter was trained from a LoftQ start (arXiv:2310.08659, r={r}, {config.loftq_iters} "
                "iteration(s)). It is meant for the same NF4 quantization of the base it was trained on, not for the"
                " full-precision weights (the start corrects that quantization's error). ")
        body += ("With one iteration that base is the standard NF4 quantization of the original weights"
                 " (bitsandbytes, the run's block size and double quantization), as `BitsAndBytesConfig("
                 "load_in_4bit=True, bnb_4bit_quant_type='nf4')` loads it." if config.loftq_iters == 1 else
                 "With more than one iteration the base is LoftQ's own quantization Q = NF4(W - s B A), which is"
                 " deterministic: `lightning_lora.quant.prepare.prepare` with the same settings rebuilds it.")
        body += " The merged export is the exact trained model."
    return f"\n## Initialization\n\n{body}\n"


def merge_exact(model: nn.Module, name: str, target: nn.Module | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """A plain model computing what ``model`` computes with adapter ``name``: ``target`` (a model of the same
    architecture, e.g. the base re-loaded) gets each adapted layer's base + adapter and each NF4 layer dequantized,
    written one layer at a time. Without ``target`` a copy of ``model`` is used."""
    if target is None:
        target = remove(copy.deepcopy(model))
    with torch.no_grad():
        for layer_name, module in list(model.named_modules()):
            if isinstance(module, AdapterLayer):
                base = module.base_layer
                weight = dense_weight(base).detach()
                if name in module.adapters:
                    weight = module.adapters[name].merged_weight(weight.float(), base)
            elif is_quantized(module) and not layer_name.endswith(".base_layer"):
                weight = dense_weight(module).detach()
            else:
                continue
            old = target.get_submodule(layer_name)
            new = merged_base_layer(old, weight.to(dtype or torch.float32), dtype or torch.float32)
            if new is not old:
                parent, _, child = layer_name.rpartition(".")
                setattr(target.get_submodule(parent) if parent else target, child, new)
    return target

