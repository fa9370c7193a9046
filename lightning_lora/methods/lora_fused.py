"""LoRA's fused linear branch: one autograd function for out = base_out + s * B A dropout(x) (``lora.py``).

It saves only what backward needs: the input x (a frozen base does not keep it; under lean activations a norm or SwiGLU
output is kept as its recipe, ``train/lean.py``), the r-wide activation h^T, and, with dropout, the kept-mask packed 8
per byte instead of a dropped copy of x. It adds into the base output in place (one ``addmm_``, no (N, out)
temporaries); without autograd (eval, ``torch.no_grad``) it is two plain GEMMs. Its backward keeps the adapter's dtype
inside an autocast block too.

Every r-wide product is formed with r as its *rows*: h^T = A x^T (r, N), g_h^T = B^T g^T, dB = (h^T g)^T, so the
long token axis N is the inner, contiguous dimension of each GEMM. With N as the reduction axis and r as the output
columns instead (``g.t() @ h``, ``g @ B``), one CPU thread ran SmolLM2's seven projections at N = 2,048 in 61.7 ms
per layer instead of 37.6 ms (same values up to summation order, 1.5e-6 relative): these skinny GEMMs are bound by
reading the (N, in) and (N, out) activations, and the (r, N) layout reads them once, in order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_lora.core.layer import own_precision

_BIT_SHIFTS: dict[torch.device, Tensor] = {}


def _shifts(device: torch.device) -> Tensor:
    if device not in _BIT_SHIFTS:
        _BIT_SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return _BIT_SHIFTS[device]


def pack_bits(mask: Tensor) -> Tensor:
    """A bool tensor as uint8, 8 elements per byte (little-endian bit order), padded to a multiple of 8."""
    flat = mask.reshape(-1).to(torch.uint8)
    if flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(8 - flat.numel() % 8)])
    return (flat.view(-1, 8) << _shifts(mask.device)).sum(1, dtype=torch.uint8)  # distinct bits: sum == or


def unpack_bits(bits: Tensor, shape: torch.Size) -> Tensor:
    flat = ((bits.unsqueeze(1) >> _shifts(bits.device)) & 1).view(-1)
    return flat[: shape.numel()].view(shape).bool()


def add_up(base_out: Tensor, hT: Tensor, B: Tensor, scale: float, inplace: bool) -> Tensor:
    """``base_out + scale * h B^T`` for h^T (r, N), base_out (..., out): one ``addmm``, into ``base_out`` itself when
    ``inplace`` (the caller then marks it dirty)."""
    if inplace:
        base_out.view(-1, base_out.shape[-1]).addmm_(hT.t(), B.t(), alpha=scale)
        return base_out
    return torch.addmm(base_out.reshape(-1, base_out.shape[-1]), hT.t(), B.t(), alpha=scale).view(base_out.shape)


class _LoRALinear(torch.autograd.Function):
    """out = base_out + s * (dropout(x) A^T) B^T for x (..., in), base_out (..., out).

    Saves x (a recipe under lean activations), h^T = A dropout(x)^T (r, N) and, with dropout, the kept-mask
    packed 8 per byte (1/32 of x in fp32); 1/(1-p) is applied to r-wide tensors, so no dropped copy of x is ever kept.
    With ``inplace`` the sum is written into ``base_out`` (marked dirty), which saves an (N, out) allocation.
    """

    @staticmethod
    def forward(ctx, x: Tensor, base_out: Tensor, A: Tensor, B: Tensor, scale: float, p: float, inplace: bool) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(A.dtype)  # a temporary when x is bf16/fp16: x itself is what is saved
        bits = None
        if p > 0.0:
            mask = torch.empty(x2.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)
            hT = torch.mm(A, (x2 * mask).t()).mul_(1.0 / (1.0 - p))
            bits = pack_bits(mask)
        else:
            hT = torch.mm(A, x2.t())
        out = add_up(base_out, hT, B, scale, inplace)
        if inplace:
            ctx.mark_dirty(base_out)
        ctx.scale, ctx.p = scale, p
        ctx.save_for_backward(x, bits, hT, A, B)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        with own_precision(grad_out):  # backward called inside an autocast block: still the adapter's dtype
            return _LoRALinear._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: Tensor):
        x, bits, hT, A, B = ctx.saved_tensors
        scale, p = ctx.scale, ctx.p
        need_x, need_base, need_A, need_B = ctx.needs_input_grad[:4]
        g = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1]).to(A.dtype)
        mask = None if bits is None else unpack_bits(bits, x2.shape)
        grad_x = grad_A = grad_B = None
        if need_x or need_A:  # d out / d (A x_kept) = s * g B, times 1/(1-p) for the dropout rescale
            grad_hT = torch.mm(B.t(), g.t()).mul_(scale if mask is None else scale / (1.0 - p))
            if need_A:
                grad_A = torch.mm(grad_hT, x2 if mask is None else x2 * mask)
            if need_x:
                grad_x = torch.mm(grad_hT.t(), A)
                if mask is not None:
                    grad_x.mul_(mask)
                grad_x = grad_x.view(x.shape).to(x.dtype)
        if need_B:
            grad_B = torch.mm(hT, g).mul_(scale).t().contiguous()
        return grad_x, (grad_out if need_base else None), grad_A, grad_B, None, None, None


def lora_linear(
    x: Tensor, base_out: Tensor, A: Tensor, B: Tensor, scale: float, p: float, inplace: bool = False
) -> Tensor:
    """``base_out + scale * B A dropout_p(x)`` over any leading dims, in the adapter's dtype (cast back to
    ``base_out``'s). Without autograd (eval, ``torch.no_grad``) it is two plain GEMMs, the second accumulating into
    the output. ``inplace=True`` lets the sum overwrite ``base_out``: only for a caller that owns it and never reads
    it again (``LoRABranch``; DoRA reuses its base output, so it must not).
    """
    n_in = x.shape[-1]
    out_dtype = base_out.dtype
    if out_dtype != A.dtype:  # mixed precision: compute in the adapter's dtype on a fresh copy, cast back at the end
        base_out = base_out.to(A.dtype)
    inplace = inplace and base_out.is_contiguous()
    if p == 0.0 and not (
        torch.is_grad_enabled() and (x.requires_grad or base_out.requires_grad or A.requires_grad or B.requires_grad)
    ):
        out = add_up(base_out, torch.mm(A, x.reshape(-1, n_in).to(A.dtype).t()), B, scale, inplace)
    else:
        inplace = inplace and base_out._base is None  # autograd cannot rebase an in-place custom op on a view (GPT-2)
        out = _LoRALinear.apply(x, base_out, A, B, scale, p, inplace)  # casts x inside: the saved x is the layer's
    return out if out.dtype == out_dtype else out.to(out_dtype)
