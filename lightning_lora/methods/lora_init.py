"""The starts of the LoRA family, ``LoRA(init=...)`` (DoRA inherits the fields): the method's init hooks.

- ``"default"``: A Kaiming-uniform (a = sqrt(5)), B = 0 (LoRA paper); ``"gaussian"``: A ~ N(0, 1/r^2), B = 0 (PEFT's
  "gaussian"); on an embedding A = 0 and B normal (PEFT). The base is untouched.
- ``"pissa"`` (arXiv:2404.02948): A, B start on W's top-r singular triplets and the base keeps the residual
  W - s B0 A0 (``pissa.py``); with a quantizer the residual is quantized (QPiSSA). ``pissa_niter`` picks the
  randomized SVD. The start (A0, B0) stays on the branch as the buffers ``init_lora_A``/``init_lora_B`` (so in
  adapter-only checkpoints): saving for the original base needs it.
- ``"loftq"`` (arXiv:2310.08659): needs a quantizer (``prepare(..., quantize=NF4())``); the base and the start come
  from LoftQ's alternating fit (``loftq.py``) with ``loftq_iters`` steps. A target the quantizer leaves in high
  precision (NF4's ``skip_modules``, a shape bitsandbytes mishandles, GPT-2 Conv1D) has no rounding error to fit: it
  keeps the default start.

``inject`` runs these starts as ``prepare`` does (``core/start.py``), so every verb honours ``init``. After training,
``save_adapter`` writes what fits the original base: PiSSA's rank-2r conversion (exact on the original W), and for
LoftQ the trained factors with a README note on the quantized base they belong on.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from lightning_lora.core.kinds import dense_weight, in_out_features, is_linear_like
from lightning_lora.methods.loftq import Quantize, loftq, qpissa
from lightning_lora.methods.pissa import pissa_factors, shared_factors

INITS = ("default", "gaussian", "pissa", "loftq")
REWRITING = ("pissa", "loftq")  # the starts that rewrite the base
INIT_A, INIT_B = "init_lora_A", "init_lora_B"  # PiSSA's starting factors, kept on each branch


def check_init(config) -> None:
    """Validate ``init``, ``pissa_niter`` and ``loftq_iters``."""
    if config.init not in INITS:
        raise ValueError(f"{config.method}: init must be one of {INITS}, got {config.init!r}.")
    niter = config.pissa_niter
    if niter is not None and (isinstance(niter, bool) or not isinstance(niter, int) or niter < 0):
        raise ValueError(f"{config.method}: pissa_niter must be None (exact SVD) or an integer >= 0, got {niter!r}.")
    iters = config.loftq_iters
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"{config.method}: loftq_iters must be an integer >= 1, got {iters!r}.")


def check_start(config, quantize: object) -> None:
    """LoftQ chooses the quantized base and the start together: it needs ``quantize``."""
    if config.init == "loftq" and quantize is None:
        raise ValueError("init='loftq' chooses the NF4 base and the adapter's start together, so it needs a quantized "
                         "base: use prepare(model, adapter, quantize=NF4()) (YAML: model.quantize), or init='pissa' "
                         "on a full-precision base.")


def reset(branch) -> None:
    """The default and gaussian starts (the SVD starts overwrite them in ``start``)."""
    with torch.no_grad():
        if branch.kind.reversed_init:  # embeddings, as PEFT: A zeros, B normal
            nn.init.zeros_(branch.lora_A)
            nn.init.normal_(branch.lora_B)
        elif branch.config.init == "gaussian":  # as PEFT's init_lora_weights="gaussian"
            nn.init.normal_(branch.lora_A, std=1.0 / branch.r)
            nn.init.zeros_(branch.lora_B)
        else:
            nn.init.kaiming_uniform_(branch.lora_A, a=math.sqrt(5))
            nn.init.zeros_(branch.lora_B)


def refuse_start(branch, base_layer: nn.Module) -> str | None:
    """An SVD start needs a linear weight with at least r singular values."""
    init = branch.config.init
    if not is_linear_like(base_layer):
        return (f"init={init!r} starts from the SVD of a linear layer's weight; this is a "
                f"{type(base_layer).__name__}: exclude it (exclude_modules) or use init='default'")
    n_in, n_out = in_out_features(base_layer)
    if branch.r > min(n_in, n_out):
        return (f"init={init!r}: r={branch.r} is larger than min(in, out) = {min(n_in, n_out)} ({n_out} x {n_in}), "
                "the number of its singular values; lower r (rank_pattern) or exclude the layer")
    return None


def start(branch, base_layer: nn.Module, quantize: Quantize | None) -> nn.Module:
    """Write the SVD start into ``branch`` and return the base to train on (module docstring)."""
    config, r, scale = branch.config, branch.r, branch.scale
    if config.init == "loftq" and quantize is None:
        return base_layer  # kept in high precision: no rounding error to fit, the default start stays
    weight = dense_weight(base_layer)
    if config.init == "loftq":
        new, A, B = loftq(weight, r, scale, quantize, config.loftq_iters)
        branch.started_from = f"LoftQ ({config.loftq_iters} iter.)"
    elif quantize is not None:
        new, A, B = qpissa(weight, r, scale, quantize, config.pissa_niter)
        branch.started_from = "QPiSSA"
    else:
        A, B, residual = pissa_factors(weight, r, scale, config.pissa_niter)
        weight.copy_(residual)  # in place (Conv1D: its transposed view)
        new = base_layer
        branch.started_from = "PiSSA"
    branch.load_factors(B.to(branch.lora_B.dtype), A.to(branch.lora_A.dtype))
    if config.init == "pissa":
        branch.register_buffer(INIT_A, branch.lora_A.detach().clone())
        branch.register_buffer(INIT_B, branch.lora_B.detach().clone())
    return new


def for_original_base(branch, base_layer: nn.Module):
    """PiSSA: the plain branch of rank 2r, scaling 1, that computes on the original W what ``branch`` computes on
    the residual; LoftQ and the other starts: ``branch`` itself (its note says which base it belongs on)."""
    A0, B0 = getattr(branch, INIT_A, None), getattr(branch, INIT_B, None)
    if A0 is None or B0 is None:
        return branch
    A, B = branch.lora_A.detach(), branch.lora_B.detach()
    A2, B2 = shared_factors(A, B, A0.to(A.dtype), B0.to(B.dtype), branch.scale)
    r2 = A2.shape[0]
    plain = dataclasses.replace(branch.config, r=r2, alpha=float(r2), rslora=False, init="default",
                                rank_pattern=None, alpha_pattern=None)  # fmt: skip
    converted = plain.build(base_layer, None, "")
    converted.load_factors(B2, A2)
    return converted


def note(config, quantized: bool) -> str:
    """The README paragraph on which base the saved adapter belongs (module docstring); "" for the plain starts."""
    r = config.r
    if config.init == "pissa":
        body = (f"This adapter was trained from a PiSSA start (arXiv:2404.02948, r={r}) on the residual W - s B0 A0"
                + (" quantized to NF4 (QPiSSA)" if quantized else "") + ". It is saved converted for the **original**"
                f" base weights W, as the rank-{2 * r} LoRA s [B, -B0] [A; A0] with scaling 1.")
        if quantized:
            body += (" On W it differs from the trained model by the NF4 rounding of the residual; the merged export"
                     " is the exact trained model.")
    elif config.init == "loftq":
        body = (f"This adapter was trained from a LoftQ start (arXiv:2310.08659, r={r}, {config.loftq_iters} "
                "iteration(s)). It is meant for the same NF4 quantization of the base it was trained on, not for the"
                " full-precision weights (the start corrects that quantization's error). ")
        body += ("With one iteration that base is the standard NF4 quantization of the original weights"
                 " (bitsandbytes, the run's block size and double quantization), as `BitsAndBytesConfig("
                 "load_in_4bit=True, bnb_4bit_quant_type='nf4')` loads it." if config.loftq_iters == 1 else
                 "With more than one iteration the base is LoftQ's own quantization Q = NF4(W - s B A), which is"
                 " deterministic: `lightning_lora.quant.prepare.prepare` with the same settings rebuilds it.")
        body += " The merged export is the exact trained model."
    else:
        return ""
    return f"\n## Initialization\n\n{body}\n"
