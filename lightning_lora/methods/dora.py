"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353).

The weight is split into a magnitude m (one per output row) and a direction; LoRA updates the direction:

    W' = m * (W + s B A) / n,   n = ||W + s B A||_row  (norm over the input dim, one per output)

m starts at ||W||_row, so W' = W at init. As the paper suggests (section 4.3) n is treated as a constant in backward
(detached), which saves memory at no accuracy cost. Applied to an input, with y0 = W x the base output without bias
and f = m / n:

    y = f * (y0 + s B A dropout(x)) + bias

so the base output is reused and no (out x in) matrix is ever built: n comes from low-rank terms,

    n^2 = ||W||^2_row + 2 s <W, B A>_row + s^2 ||B A||^2_row,
    <W, B A>_row = rowsum((W A^T) * B),   ||B A||^2_row = rowsum((B (A A^T)) * B),

with ||W||^2_row cached for dense bases (recomputed when the weight changes). One autograd function computes y and
saves only the input x (a recipe under lean activations, ``train/lean.py``), the r-wide h = A dropout(x), a 1-byte
dropout mask, and its own output y; the magnitude's gradient sum_tokens(g * (y0 + s B h)) / n equals
sum_tokens(g * (y - bias)) / m, so no (tokens, out) activation is kept besides y, which the next op (activation,
attention) often saves anyway.

Deviation from PEFT: with dropout PEFT recomputes W dropout(x) for the magnitude term; here the (undropped) base
output is reused, as the formula above states. Without dropout (and in eval) both are identical.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_lora.core.kinds import LayerKind, dense_weight
from lightning_lora.core.layer import AdapterBranch, in_own_precision, own_precision
from lightning_lora.methods.loftq import Quantize
from lightning_lora.methods.lora import LoRA, LoRABranch
from lightning_lora.methods.lora_fused import pack_bits, unpack_bits


@dataclasses.dataclass
class DoRA(LoRA):
    """DoRA adapter config; same fields as ``LoRA``. Adapts linear layers (``nn.Linear``, ``Conv1D``, NF4) and
    ``nn.Conv1d/2d/3d`` (magnitude per output channel, norm over (in, *kernel)), not embeddings, not MoE expert stacks
    (PEFT's ``target_parameters`` format holds plain LoRA only: such an adapter could be saved nowhere).

    Example::

        inject(model, DoRA(r=16, alpha=32, target_modules="all-linear"))
    """

    method: ClassVar[str] = "DoRA"
    peft_suffixes: ClassVar[tuple[str, ...]] = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
    peft_aliases: ClassVar[dict[str, str]] = {"lora_magnitude_vector.weight": "lora_magnitude_vector"}  # older PEFT

    @classmethod
    def supports(cls, kind: LayerKind) -> bool:
        return not kind.transposed and not kind.experts  # (out, fan_in) weights: not embeddings, not expert stacks

    def build(self, base_layer: nn.Module, shared: object = None, name: str = "") -> DoRABranch:
        return DoRABranch(self, base_layer, name)

    def check_start(self, quantize: object = None) -> None:
        if self.init == "loftq":
            raise ValueError("DoRA(init='loftq') is not supported (LoftQ fits an additive correction; neither paper nor "
                             "PEFT defines it for DoRA): use DoRA(init='pissa') or LoRA(init='loftq').")
        super().check_start(quantize)

    def to_peft(self, targets: list[str], layers: Mapping[str, AdapterBranch] | None = None) -> dict:
        return {**super().to_peft(targets, layers), "use_dora": True}

    @classmethod
    def from_peft(cls, peft_config: dict) -> DoRA | None:
        if cls is not DoRA or peft_config.get("peft_type") != "LORA" or not peft_config.get("use_dora"):
            return None
        return cls(**cls._peft_fields(peft_config))



def row_norm(weight: Tensor, A: Tensor, B: Tensor, scale: float, weight_sq: Tensor | None = None) -> Tensor:
    """||W + s B A||_row from low-rank terms, in fp32, without forming B A (see module docstring).

    ``weight_sq`` is ||W||^2_row if already known (fp32, shape (out,)).
    """
    W, A, B = weight.float(), A.float(), B.float()
    base_sq = W.pow(2).sum(1) if weight_sq is None else weight_sq
    cross = (2.0 * scale) * ((W @ A.t()) * B).sum(1)
    update_sq = (scale * scale) * ((B @ (A @ A.t())) * B).sum(1)
    squared = base_sq + cross + update_sq
    # The expansion's rounding error is a few ulps of its terms' magnitude ||W||^2 + |cross| + ||s B A||^2, so a row
    # the update largely cancels (n^2 below a tenth of that) loses digits: recompute those rows directly (relative
    # error then stays ~1e-6). Rare in practice (the update is small next to W), so the usual path costs nothing.
    cancelled = squared < 0.1 * (base_sq + cross.abs() + update_sq)
    if torch.compiler.is_compiling():  # a compiled graph has no data-dependent branch: the direct norm where needed
        return torch.where(cancelled, (W + scale * (B @ A)).pow(2).sum(1), squared).clamp_min(0.0).sqrt()
    if not squared.is_meta and cancelled.any():  # meta: shapes only (the estimator builds models there)
        rows = cancelled.nonzero().squeeze(1)
        squared[rows] = (W[rows] + scale * (B[rows] @ A)).pow(2).sum(1)
    return squared.clamp_min_(0.0).sqrt_()


class _DoRALinear(torch.autograd.Function):
    """y = f * (base_out - bias + s * (dropout(x) A^T) B^T) + bias, f = m / n, for x (N, in), base_out (N, out)."""

    @staticmethod
    def forward(ctx, x, base_out, A, B, magnitude, norm, bias, scale: float, p: float):
        bits, x_in = None, x
        if p > 0.0:  # the mask is kept packed 8 per byte (as in lora.py), the dropped input only as a temporary
            mask = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)
            x_in = x * mask * (1.0 / (1.0 - p))
            bits = pack_bits(mask)
        hT = A @ x_in.t()  # r-wide products with r as rows, N the contiguous axis (see lora_fused.py)
        factor = magnitude / norm
        if bias is None:
            out = torch.addmm(base_out, hT.t(), B.t(), alpha=scale).mul_(factor)
        else:  # f * (y0 + s B h) - y0 + base_out: bit-exact base_out when f = 1 and B = 0 (init)
            y0 = base_out - bias
            out = torch.addmm(y0, hT.t(), B.t(), alpha=scale).mul_(factor).sub_(y0).add_(base_out)
        # Rows whose direction cannot be read back from out accurately keep their own columns: m = 0 (out is the
        # bias alone) and, with a bias, |f| < 1/16 (out - bias would cancel digits). Rare in training: f starts at 1.
        hard = magnitude == 0 if bias is None else factor.abs() < 0.0625
        rows = hard.nonzero().flatten() if bool(hard.any()) else None
        kept = None
        if rows is not None:
            y0 = base_out[:, rows] if bias is None else base_out[:, rows] - bias[rows]
            kept = torch.addmm(y0, hT.t(), B[rows].t(), alpha=scale) / norm[rows]
        ctx.scale, ctx.p = scale, p
        ctx.save_for_backward(x, bits, hT, A, B, magnitude, factor, bias, out, rows, kept)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        with own_precision(grad_out):  # backward called inside an autocast block: still the adapter's dtype
            return _DoRALinear._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        x, bits, hT, A, B, magnitude, factor, bias, out, rows, kept = ctx.saved_tensors
        scale, p = ctx.scale, ctx.p
        mask = None if bits is None else unpack_bits(bits, x.shape)
        need_x, need_base, need_A, need_B, need_m = ctx.needs_input_grad[:5]
        grad_x = grad_A = grad_B = grad_m = grad_bias = None
        if ctx.needs_input_grad[6]:  # a trained bias (core/trained.py): out = f (base_out - b) + b + ..., so 1 - f
            grad_bias = (grad_out * (1.0 - factor)).sum(0)
        grad_dir = grad_out * factor  # gradient w.r.t. the direction y0 + s B h (and so w.r.t. base_out)
        if need_x or need_A:
            grad_hT = (B.t() @ grad_dir.t()).mul_(scale)
            if need_A:
                grad_A = grad_hT @ (x if mask is None else x * mask * (1.0 / (1.0 - p)))
            if need_x:
                grad_x = grad_hT.t() @ A
                if mask is not None:
                    grad_x.mul_(mask).mul_(1.0 / (1.0 - p))
        if need_B:
            grad_B = (hT @ grad_dir).mul_(scale).t().contiguous()
        if need_m:
            # sum_tokens g * direction / n = sum_tokens g * (out - bias) / m
            grad_m = (grad_out * (out if bias is None else out - bias)).sum(0).div_(magnitude)
            if rows is not None:
                grad_m[rows] = (grad_out[:, rows] * kept).sum(0)
        return grad_x, (grad_dir if need_base else None), grad_A, grad_B, grad_m, None, grad_bias, None, None


def dora_linear(x, base_out, A, B, magnitude, norm, bias, scale: float, p: float) -> Tensor:
    """``m / n * (base_out - bias + scale * B A dropout_p(x)) + bias`` over any leading dims, in the adapter's dtype."""
    lead, dtype = base_out.shape[:-1], A.dtype
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    base2 = base_out.reshape(-1, base_out.shape[-1]).to(dtype)
    bias = None if bias is None else bias.to(dtype)  # a frozen base's bias gets no gradient; a trained one does
    out = _DoRALinear.apply(x2, base2, A, B, magnitude, norm.to(dtype), bias, scale, p)
    return out.reshape(*lead, out.shape[-1]).to(base_out.dtype)


class DoRABranch(LoRABranch):
    """DoRA on one layer: ``lora_A``, ``lora_B`` and the magnitude vector ``magnitude`` (out,)."""

    additive: ClassVar[bool] = False

    def __init__(self, config: DoRA, base_layer: nn.Module, name: str = ""):
        super().__init__(config, base_layer, name)
        self._weight_sq: tuple[tuple, Tensor] | None = None  # (key of the weight it was computed from, ||W||^2_row)
        with torch.no_grad():  # the same computation as in forward, so m / n is exactly 1 at init
            norm = self.norm(base_layer)
        self.magnitude = nn.Parameter(norm.to(self.lora_A.dtype))

    @torch.no_grad()
    def norm(self, base_layer: nn.Module) -> Tensor:
        """n = ||W + s B A||_row in fp32, detached; ||W||^2_row is cached while a dense weight stays the same."""
        weight = dense_weight(base_layer)
        B, A = self.pair()
        if self.kind.quantized or torch.compiler.is_compiling():  # compiled: no cache keyed on a data pointer
            return row_norm(weight, A, B, self.scale)
        raw = base_layer.weight
        key = (raw.data_ptr(), raw._version, raw.device, raw.dtype, tuple(raw.shape))
        if self._weight_sq is None or self._weight_sq[0] != key:
            self._weight_sq = (key, weight.float().pow(2).sum(1))
        return row_norm(weight, A, B, self.scale, self._weight_sq[1])

    @in_own_precision
    def forward(self, x: Tensor, base_out: Tensor, base_layer: nn.Module, weight: float = 1.0) -> Tensor:
        if weight != 1.0:
            raise ValueError("DoRA adapters cannot be weighted at run time (the magnitude is not additive).")
        p = self.p if self.training else 0.0
        if self.fused and not torch.compiler.is_compiling():  # compiled: plain autograd, no data-dependent rows
            return dora_linear(
                x, base_out, self.lora_A, self.lora_B, self.magnitude, self.norm(base_layer), base_layer.bias,
                self.scale, p,
            )  # fmt: skip
        return self._forward_unfused(x, base_out, base_layer, p)

    def _forward_unfused(self, x: Tensor, base_out: Tensor, base_layer: nn.Module, p: float) -> Tensor:
        """Any kind with ``apply_pair`` (convs): f * (y0 + s B A dropout(x)) - y0 + base_out, f = m / n broadcast
        over the kind's channel dim; plain autograd (n detached)."""
        dtype, dim = self.lora_A.dtype, self.kind.channel_dim
        shape = [1] * base_out.dim()
        shape[dim] = -1
        factor = (self.magnitude / self.norm(base_layer).to(dtype)).view(shape)
        base = base_out.to(dtype)
        bias = base_layer.bias
        y0 = base if bias is None else base - bias.to(dtype).view(shape)  # a trained bias: its gradient is exact
        direction = y0 + self.kind.apply_pair(x.to(dtype), self.lora_A, self.lora_B, base_layer, p) * self.scale
        out = factor * direction if bias is None else factor * direction - y0 + base
        return out.to(base_out.dtype)

    def merged_weight(self, weight: Tensor, base_layer: nn.Module, scale: float = 1.0) -> Tensor:
        if scale != 1.0:
            raise ValueError("DoRA adapters cannot be merged with a weight other than 1.")
        B, A = self.pair(torch.float32)
        combined = weight.float() + self.scale * (B @ A)
        factor = self.magnitude.float() / combined.norm(dim=1)
        return (combined * factor[:, None]).to(weight.dtype)

    def delta_weight(self, base_layer: nn.Module) -> Tensor:
        weight = dense_weight(base_layer)
        return self.merged_weight(weight, base_layer) - weight

    def start(self, base_layer: nn.Module, quantize: Quantize | None) -> nn.Module:
        """LoRA's start, then the magnitude of the new base + s B0 A0, so DoRA is still the identity at init."""
        new = super().start(base_layer, quantize)
        with torch.no_grad():
            self.magnitude.copy_(self.norm(new).to(self.magnitude.dtype))
        return new

    def for_original_base(self, base_layer: nn.Module) -> DoRABranch:
        converted = super().for_original_base(base_layer)
        if converted is not self:  # the same direction W_res + s B A = W + s (B A - B0 A0), so the same magnitude
            with torch.no_grad():
                converted.magnitude.copy_(self.magnitude.detach())
        return converted

    def factors(self) -> tuple[Tensor, Tensor]:
        raise ValueError("DoRA's magnitude rescales W + s B A row by row, so its update is no low-rank product and a "
                         "weighted sum of DoRA updates is no DoRA; merge it alone or combine additive adapters.")

    def peft_tensors(self) -> dict[str, Tensor]:
        shape = self.kind.peft_vector_shape(self.magnitude.shape[0])
        return {**super().peft_tensors(), "lora_magnitude_vector": self.magnitude.view(shape)}

    def activation_bytes(self, act_bytes: int, adapter_bytes: int) -> int:
        """LoRA's plus the output y (out wide), which the magnitude's gradient reads."""
        return super().activation_bytes(act_bytes, adapter_bytes) + act_bytes * self.in_out[1]

    def param_roles(self) -> dict[str, str]:
        return {**super().param_roles(), "magnitude": "vector"}
