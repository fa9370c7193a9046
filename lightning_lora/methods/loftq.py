"""LoftQ and QPiSSA: an NF4 base and a LoRA start chosen together, so base + adapter starts close to the original W.

LoftQ (Li et al. 2023, arXiv:2310.08659, Algorithm 1), with A_0 = B_0 = 0 and t = 1 .. T (``loftq_iters``):

    Q_t = NF4(W - s B_{t-1} A_{t-1}),      (A_t, B_t) = top-r SVD of W - dequant(Q_t), sqrt(S) on each side / sqrt(s)

(the top-r SVD is exact, as in the paper and PEFT's ``loftq_utils``: on SmolLM2's 210 layers it takes ~30 s on one CPU
thread, and a randomized one, 8 subspace iterations, started measurably worse: 54.29 validation ppl against 53.88)

The base becomes Q_T and the adapter starts at (A_T, B_T): dequant(Q_T) + s B_T A_T is the best rank-r correction of
Q_T's rounding error. With T = 1, Q_1 = NF4(W) is the plain QLoRA base (the same NF4 quantization bitsandbytes and
transformers' ``BitsAndBytesConfig`` produce), so the adapter applies to that standard base; with T > 1 the base is
LoftQ's own (deterministic: the same W, r, s, NF4 settings and T give the same Q).

QPiSSA (arXiv:2404.02948, section 4.4): PiSSA's residual W - s B0 A0 (``methods/pissa.py``) is what gets quantized.

Each function works on one layer, so the whole-model start (``core/start.py``) needs one layer's temporaries. The
quantization itself is not known here: ``quantize(weight)`` (from ``quant/prepare.py``) returns the quantized layer.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from lightning_lora.core.kinds import dense_weight
from lightning_lora.methods.pissa import pissa_factors, split_factors, top_r

Quantize = Callable[[Tensor], nn.Module]  # (out, in) weight -> the quantized layer holding it


def loftq(weight: Tensor, r: int, scale: float, quantize: Quantize, iters: int = 1) -> tuple[nn.Module, Tensor, Tensor]:
    """LoftQ's (quantized base, A, B) for the high-precision (out, in) ``weight`` (module docstring); A (r, in),
    B (out, r) in fp32."""
    weight = weight.detach().float()
    A = B = None
    for _ in range(iters):
        target = weight if A is None else weight - scale * (B @ A)
        base = quantize(target)
        A, B = split_factors(*top_r(weight - dense_weight(base).float(), r), scale)
    return base, A, B


def qpissa(
    weight: Tensor, r: int, scale: float, quantize: Quantize, niter: int | None = None
) -> tuple[nn.Module, Tensor, Tensor]:
    """QPiSSA's (quantized base of W - s B0 A0, A0, B0) for the high-precision (out, in) ``weight``."""
    A, B, residual = pissa_factors(weight, r, scale, niter)
    return quantize(residual), A, B
