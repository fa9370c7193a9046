"""LoRA and rsLoRA.

LoRA (Hu et al. 2021, arXiv:2106.09685, section 4.1): the frozen weight W (out x in) gets a trained low-rank update

    y = W x + s * B A dropout(x),   A: (r, in), B: (out, r),   s = alpha / r

A starts Kaiming-uniform (a = sqrt(5)), B at zero, so the model is unchanged at init. rsLoRA (Kalajdzievski 2023,
arXiv:2312.03732) uses s = alpha / sqrt(r), which keeps the update's scale stable as r grows.
On an embedding the roles flip (as in PEFT): y = E[ids] + s * (A^T[ids]) B^T with A: (r, vocab) zeros, B: (dim, r) normal.

The linear branch is one autograd function that saves only what backward needs: the input x (the base layer saves
the same tensor, so it costs nothing), the r-wide activation h = A dropout(x), and, with dropout, a 1-byte mask
instead of a dropped copy of x.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from lightning_lora.layers import AdapterBranch, AdapterConfig, in_out_features


@dataclasses.dataclass
class LoRA(AdapterConfig):
    """LoRA adapter config: rank ``r``, scaling ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).

    Example::

        inject(model, LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    """

    r: int = 8
    alpha: float = 16.0
    rslora: bool = False

    method: ClassVar[str] = "LoRA"
    supports: ClassVar[tuple] = (nn.Linear, Conv1D, nn.Embedding)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_rank(self.r)
        if not self.alpha > 0:
            raise ValueError(f"{self.method}: alpha must be > 0, got {self.alpha}.")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def build(self, base_layer: nn.Module, shared: object = None) -> LoRABranch:
        return LoRABranch(self, base_layer)

    def to_peft(self, targets: list[str]) -> dict:
        return {
            "peft_type": "LORA",
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.rslora,
            "use_dora": False,
            "target_modules": targets,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
            "task_type": None,
        }


class _LoRALinear(torch.autograd.Function):
    """out = base_out + s * (dropout(x) A^T) B^T for x (N, in), base_out (N, out)."""

    @staticmethod
    def forward(ctx, x: Tensor, base_out: Tensor, A: Tensor, B: Tensor, scale: float, p: float) -> Tensor:
        mask = None
        x_in = x
        if p > 0.0:
            mask = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)
            x_in = x * mask * (1.0 / (1.0 - p))
        h = x_in @ A.t()
        out = torch.addmm(base_out, h, B.t(), alpha=scale)
        ctx.scale, ctx.p = scale, p
        ctx.save_for_backward(x, mask, h, A, B)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, mask, h, A, B = ctx.saved_tensors
        scale, p = ctx.scale, ctx.p
        need_x, need_base, need_A, need_B = ctx.needs_input_grad[:4]
        grad_x = grad_A = grad_B = None
        grad_h = (grad_out @ B).mul_(scale) if (need_x or need_A) else None
        if need_A:
            x_in = x if mask is None else x * mask * (1.0 / (1.0 - p))
            grad_A = grad_h.t() @ x_in
        if need_B:
            grad_B = (grad_out.t() @ h).mul_(scale)
        if need_x:
            grad_x = grad_h @ A
            if mask is not None:
                grad_x.mul_(mask).mul_(1.0 / (1.0 - p))
        return grad_x, (grad_out if need_base else None), grad_A, grad_B, None, None


def lora_linear(x: Tensor, base_out: Tensor, A: Tensor, B: Tensor, scale: float, p: float) -> Tensor:
    """``base_out + scale * B A dropout_p(x)`` over any leading dims, in the adapter's dtype."""
    lead = base_out.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(A.dtype)
    out = _LoRALinear.apply(x2, base_out.reshape(-1, base_out.shape[-1]).to(A.dtype), A, B, scale, p)
    return out.reshape(*lead, out.shape[-1]).to(base_out.dtype)


class LoRABranch(AdapterBranch):
    """LoRA on one layer: parameters ``lora_A`` (r, in) and ``lora_B`` (out, r)."""

    def __init__(self, config: LoRA, base_layer: nn.Module):
        super().__init__(config)
        n_in, n_out = in_out_features(base_layer)
        self.embedding = isinstance(base_layer, nn.Embedding)
        self.scale = config.scaling
        self.p = config.dropout
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(config.r, n_in, device=device))
        self.lora_B = nn.Parameter(torch.empty(n_out, config.r, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.embedding:  # reversed init, as PEFT: A zeros, B normal
                nn.init.zeros_(self.lora_A)
                nn.init.normal_(self.lora_B)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B)

    def forward(self, x: Tensor, base_out: Tensor, base_layer: nn.Module, weight: float = 1.0) -> Tensor:
        if self.embedding:
            after_A = F.embedding(
                x, self.lora_A.t(), base_layer.padding_idx, base_layer.max_norm, base_layer.norm_type,
                base_layer.scale_grad_by_freq, base_layer.sparse,
            )  # fmt: skip
            return base_out + (after_A @ self.lora_B.t()).mul_(self.scale * weight).to(base_out.dtype)
        p = self.p if self.training else 0.0
        return lora_linear(x, base_out, self.lora_A, self.lora_B, self.scale * weight, p)

    def delta_weight(self, base_layer: nn.Module) -> Tensor:
        delta = (self.lora_B @ self.lora_A) * self.scale  # (out, in) or (dim, vocab)
        return delta.t() if self.embedding else delta

    def peft_tensors(self) -> dict[str, Tensor]:
        if self.embedding:
            return {"lora_embedding_A": self.lora_A, "lora_embedding_B": self.lora_B}
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}
