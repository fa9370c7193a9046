"""LoRA on MoE expert stacks (``core/experts.py``): the factors' layout, merge and combination.

Each expert e of a stack gets its own rank-r pair, dW_e = s B_e A_e (Hu et al. 2021, arXiv:2106.09685, applied per
expert as PEFT's ``target_parameters`` does). The pairs are stored in PEFT's ParamWrapper layout, A (r E, in) and
B (out, r E) (``core/experts.py``), so the trained tensors, the optimizer state and the PEFT files are the same
tensors; the forward (the kind's ``expert_pair``) slices expert e's factors out of them. Per-expert views are
(E, out, r) and (E, r, in), so

    W'_e = W_e + w s B_e A_e   (one batched GEMM, ``baddbmm``; transposed on a transposed stack)

and ``factors()`` gives the batched pair for ``combine``, which concatenates and truncates it expert by expert.

Deviation from PEFT: its ParamWrapper refuses ``lora_dropout`` (it adds B A to the weight, so the dropout cannot act
on the adapter's input alone); here each expert's tokens reach the branch, so dropout acts as in LoRA. The PEFT files
then say ``lora_dropout: 0`` (``io/peft_experts.py``): dropout acts in training only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_lora.core.experts import expert_factors, stacked_factors


class ExpertFactors:
    """The expert-stack half of LoRA's branch (``methods/lora.py: ExpertLoRABranch``): LoRABranch's matrix methods,
    batched over the E experts."""

    def __init__(self, config, base_layer: nn.Module, name: str = ""):
        if config.rewrites_base:
            raise ValueError(f"{config.method}(init={config.init!r}) cannot start on the MoE expert stack {name!r}: "
                             "its start takes the SVD of one matrix, a stack holds one per expert. Exclude the experts "
                             "(exclude_modules=['experts']) or use init='default'.")
        super().__init__(config, base_layer, name)
        self.num_experts, self.top_k = base_layer.num_experts, base_layer.top_k

    def pair(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """(B, A) per expert: (E, out, r), (E, r, in), optionally cast."""
        A, B = expert_factors(self.lora_A, self.lora_B, self.num_experts)
        return (B, A) if dtype is None else (B.to(dtype), A.to(dtype))

    def merged_weight(self, weight: Tensor, base_layer: nn.Module, scale: float = 1.0) -> Tensor:
        """W_e + scale * s * B_e A_e for every expert, W (E, out, in); (E, in, out) on a transposed stack, whose
        update is (B_e A_e)^T = A_e^T B_e^T."""
        B, A = self.pair(weight.dtype)
        if base_layer.transposed:
            return torch.baddbmm(weight, A.transpose(1, 2), B.transpose(1, 2), alpha=scale * self.scale)
        return torch.baddbmm(weight, B, A, alpha=scale * self.scale)

    def delta_weight(self, base_layer: nn.Module) -> Tensor:
        B, A = self.pair()
        delta = torch.bmm(B, A) * self.scale
        return delta.transpose(1, 2) if base_layer.transposed else delta

    def factors(self) -> tuple[Tensor, Tensor]:
        B, A = self.pair()
        return B * self.scale, A

    def activation_bytes(self, act_bytes: int, adapter_bytes: int) -> int:
        """Per token, for each of its k experts: the expert's input, which the frozen stack does not keep (measured,
        ``estimate/moe.py``), and h = A_e x (r wide); an adapter dtype other than the activations' adds the cast."""
        n_in = self.in_out[0]
        return self.top_k * (act_bytes * (n_in + self.r) + (adapter_bytes * n_in if adapter_bytes != act_bytes else 0))

    @torch.no_grad()
    def load_factors(self, B: Tensor, A: Tensor) -> None:
        """Set per-expert B (E, out, r) and A (E, r, in)."""
        A2, B2 = stacked_factors(A, B)
        self.lora_A.copy_(A2)
        self.lora_B.copy_(B2)
