"""NF4 for MoE expert stacks: each expert quantized as its own blocks, dequantized only when the router picks it.

A stack (E, a, b) (``core/experts.py``: (E, out, in), or (E, in, out) transposed) becomes E bitsandbytes
``Params4bit``, one per expert, each with its own blocks, absmax constants and double quantization (QLoRA,
arXiv:2305.14314, section 3: 4.127 bits per weight at block 64). The experts' forward (``core/experts_dispatch.py``)
calls ``stack(x, e)`` for the experts the router picked only, and only expert e is dequantized, inside an autograd
function that keeps nothing of the weight for backward but the 4-bit expert itself: backward dequantizes it again,

    y = x W_e^T,   dL/dx = (dL/dy) W_e        (W_e = dequant(Q_e), frozen)

so training memory holds 4-bit experts, never a full-precision copy of the ones used. Merges write a plain stack
(never re-quantized, as for NF4 linears); ``original_weights`` reads the high-precision stacks by their names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_lora.core.dtypes import parse_dtype
from lightning_lora.core.experts import (
    ExpertWeights,
    expert_stacks,
    foreign_expert_tensors,
    foreign_reason,
    place,
    stack_kind,
    top_k,
)
from lightning_lora.core.kinds import register_kind
from lightning_lora.quant.nf4_layer import rounding_error_sq, warn_merge_without_originals


class NF4ExpertWeights(nn.Module):
    """An expert stack in NF4: ``experts[e]`` is expert e's ``Params4bit`` of shape (a, b) as stored in the original
    (E, a, b) stack. ``forward(x, expert)`` = x W_e^T (x W_e when transposed), W_e dequantized for this call only."""

    def __init__(self, weight: Tensor, transposed: bool, nf4, device: torch.device | str | None = None,
                 top_k: int = 1):
        import bitsandbytes as bnb  # lazy: importing bitsandbytes takes seconds

        super().__init__()
        device = torch.device(device) if device is not None else weight.device
        self.transposed, self.top_k = bool(transposed), top_k
        self.shape = tuple(weight.shape)
        self.blocksize = nf4.blocksize
        self.compute_dtype = parse_dtype(nf4.compute_dtype) if nf4.compute_dtype else None
        self.original_dtype = weight.dtype
        self.experts = nn.ParameterList(
            bnb.nn.Params4bit(w.detach().contiguous(), requires_grad=False, blocksize=nf4.blocksize,
                              compress_statistics=nf4.double_quant, quant_type="nf4",
                              quant_storage=nf4.storage_dtype).to(device)  # Params4bit quantizes on its first move
            for w in weight.unbind(0)
        )

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    @property
    def in_out(self) -> tuple[int, int]:
        _, a, b = self.shape
        return (a, b) if self.transposed else (b, a)

    @property
    def weight(self) -> Tensor:
        """Expert 0's 4-bit data (for its device; ``dense`` is the whole stack)."""
        return self.experts[0]

    def expert(self, e: int, dtype: torch.dtype | None = None) -> Tensor:
        """Expert e dequantized, (a, b)."""
        import bitsandbytes.functional as bnbf

        p = self.experts[e]
        w = bnbf.dequantize_4bit(p.data, p.quant_state).reshape(self.shape[1:])
        return w if dtype is None else w.to(dtype)

    def dense(self) -> Tensor:
        """The whole stack dequantized, (E, a, b)."""
        return torch.stack([self.expert(e) for e in range(self.num_experts)])

    def forward(self, x: Tensor, expert: int) -> Tensor:
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        else:
            dtype = self.compute_dtype or (x.dtype if x.is_floating_point() else torch.float32)
        return _ExpertMatmul.apply(x.to(dtype), self, expert)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, in_out={self.in_out}, transposed={self.transposed}, nf4"


class _ExpertMatmul(torch.autograd.Function):
    """y = x W_e^T (x W_e transposed) with W_e dequantized in forward and again in backward (module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, stack: NF4ExpertWeights, e: int) -> Tensor:
        ctx.stack, ctx.e = stack, e
        w = stack.expert(e, x.dtype)
        return x @ w if stack.transposed else F.linear(x, w)

    @staticmethod
    def backward(ctx, grad: Tensor):
        w = ctx.stack.expert(ctx.e, grad.dtype)
        return (grad @ w.t() if ctx.stack.transposed else grad @ w), None, None


def _plain_stack(stack: NF4ExpertWeights, new_weight: Tensor, dtype: torch.dtype | None = None) -> ExpertWeights:
    """A plain stack holding the merged weight (never re-quantized: REFERENCE section 5)."""
    weight = nn.Parameter(new_weight.detach().to(dtype or new_weight.dtype), requires_grad=False)
    return ExpertWeights(weight, stack.transposed)


def _rounding_error(stack: NF4ExpertWeights) -> float:
    """``nf4_rounding_error`` of the whole stack, each expert its own blocks: ||W - W_q|| / ||W_q||."""
    err2 = norm2 = 0.0
    for e in range(stack.num_experts):
        w = stack.expert(e).detach().float().reshape(-1)
        err2 += float(rounding_error_sq(w, stack.blocksize))
        norm2 += float(w.pow(2).sum())
    return (err2 / norm2) ** 0.5 if norm2 > 0 else 0.0


NF4_EXPERTS = register_kind(stack_kind(
    name="nf4_experts",
    matches=lambda m: isinstance(m, NF4ExpertWeights),
    dense_weight=lambda m: m.dense(),
    write_back=_plain_stack,
    restore=lambda m: m,  # the NF4 stack is the experts module's own after ``quantize``
    quantized=True,
    rounding_error=_rounding_error,
    warn_rounding=warn_merge_without_originals,
))  # fmt: skip


def unsupported_stack(weight: Tensor, blocksize: int) -> str | None:
    """Why bitsandbytes cannot hold this (E, a, b) stack's experts in NF4 correctly on every device, or None."""
    if weight.numel() == 0:
        return "it has no weights"
    if weight.shape[-1] % blocksize:
        return (f"its rows of {weight.shape[-1]} are not a multiple of blocksize {blocksize} (bitsandbytes' CPU "
                "dequantize kernel misreads blocks that straddle rows)")
    return None


def plan_stacks(model: nn.Module, nf4) -> tuple[list[tuple[str, nn.Module, str]], dict[str, str]]:
    """The expert stacks ``quantize`` turns into NF4, as (name, experts module, stack), and those it keeps, with why
    (NF4's ``skip_modules``, a shape bitsandbytes mishandles, experts that do not dispatch).

    Raises:
        ValueError: a stack's weights are on the meta device.
    """
    plan, kept = [], {}
    for name, (owner, stack) in expert_stacks(model).items():
        weight = getattr(owner, stack)
        if not isinstance(weight, nn.Parameter):
            continue  # already NF4
        why = "in skip_modules" if nf4.skips(name) else unsupported_stack(weight, nf4.blocksize)
        if why is None and weight.is_meta:
            raise ValueError(f"quantize: {name!r} has its weights on the meta device; load the weights first.")
        if why:
            kept[name] = why
        else:
            plan.append((name, owner, stack))
    kept.update({name: foreign_reason(owner) for name, owner in foreign_expert_tensors(model).items()})
    return plan, kept


def quantize_stacks(plan: list[tuple[str, nn.Module, str]], nf4, device: torch.device | str | None) -> None:
    """Replace each planned stack by its NF4 stack, one at a time (memory: one stack above the model)."""
    for _, owner, stack in plan:
        place(owner, stack, NF4ExpertWeights(getattr(owner, stack), owner.is_transposed, nf4, device, top_k(owner)))
