"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353).

The weight is split into a magnitude m (one per output row) and a direction; LoRA updates the direction:

    W' = m * (W + s B A) / n,   n = ||W + s B A||_row  (norm over the input dim, one per output)

m starts at ||W||_row, so W' = W at init. As the paper suggests (section 4.3) n is treated as a constant in backward
(detached), which saves memory at no accuracy cost. Applied to an input, with y0 = W x the base output without bias:

    y = (m / n) * (y0 + s B A dropout(x)) + bias

so the base output is reused and no (out x in) matrix is ever built: n comes from low-rank terms,

    n^2 = ||W||^2_row + 2 s <W, B A>_row + s^2 ||B A||^2_row,
    <W, B A>_row = rowsum((W A^T) * B),   ||B A||^2_row = rowsum((B (A A^T)) * B).

Deviation from PEFT: with dropout PEFT recomputes W dropout(x) for the magnitude term; here the (undropped) base
output is reused, as the formula above states. Without dropout (and in eval) both are identical.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from lightning_lora.layers import dense_weight
from lightning_lora.lora import LoRA, LoRABranch, lora_linear


@dataclasses.dataclass
class DoRA(LoRA):
    """DoRA adapter config; same fields as ``LoRA``. Adapts linear layers (``nn.Linear``, ``Conv1D``, NF4)."""

    method: ClassVar[str] = "DoRA"
    supports: ClassVar[tuple] = (nn.Linear, Conv1D)

    def build(self, base_layer: nn.Module, shared: object = None) -> DoRABranch:
        return DoRABranch(self, base_layer)

    def to_peft(self, targets: list[str]) -> dict:
        return {**super().to_peft(targets), "use_dora": True}


def row_norm(weight: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """||W + s B A||_row from low-rank terms, in fp32, without forming B A (see module docstring)."""
    W, A, B = weight.float(), A.float(), B.float()
    squared = W.pow(2).sum(1)
    squared += (2.0 * scale) * ((W @ A.t()) * B).sum(1)
    squared += (scale * scale) * ((B @ (A @ A.t())) * B).sum(1)
    return squared.clamp_min_(0.0).sqrt_()


class DoRABranch(LoRABranch):
    """DoRA on one layer: ``lora_A``, ``lora_B`` and the magnitude vector ``magnitude`` (out,)."""

    additive: ClassVar[bool] = False

    def __init__(self, config: DoRA, base_layer: nn.Module):
        super().__init__(config, base_layer)
        with torch.no_grad():  # the same computation as in forward, so m / n is exactly 1 at init
            norm = row_norm(dense_weight(base_layer), self.lora_A, self.lora_B, self.scale)
        self.magnitude = nn.Parameter(norm.to(self.lora_A.dtype))

    def forward(self, x: Tensor, base_out: Tensor, base_layer: nn.Module, weight: float = 1.0) -> Tensor:
        if weight != 1.0:
            raise ValueError("DoRA adapters cannot be weighted at run time (the magnitude is not additive).")
        with torch.no_grad():
            norm = row_norm(dense_weight(base_layer), self.lora_A, self.lora_B, self.scale)
        bias = base_layer.bias
        y0 = base_out if bias is None else base_out - bias
        p = self.p if self.training else 0.0
        direction = lora_linear(x, y0, self.lora_A, self.lora_B, self.scale, p)  # W x + s B A x
        factor = (self.magnitude / norm.to(self.magnitude.dtype)).to(direction.dtype)
        return base_out + (direction * factor - y0)  # = factor * direction + bias, exact at init

    def merged_weight(self, weight: Tensor, base_layer: nn.Module, scale: float = 1.0) -> Tensor:
        if scale != 1.0:
            raise ValueError("DoRA adapters cannot be merged with a weight other than 1.")
        combined = weight.float() + self.scale * (self.lora_B.float() @ self.lora_A.float())
        factor = self.magnitude.float() / combined.norm(dim=1)
        return (combined * factor[:, None]).to(weight.dtype)

    def delta_weight(self, base_layer: nn.Module) -> Tensor:
        weight = dense_weight(base_layer)
        return self.merged_weight(weight, base_layer) - weight

    def peft_tensors(self) -> dict[str, Tensor]:
        return {**super().peft_tensors(), "lora_magnitude_vector": self.magnitude}
