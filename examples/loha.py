"""LoHa, a method defined outside lightning_lora: the worked example of docs/adding-a-method.md.

LoHa (Hyeon-Woo et al. 2022, FedPara, arXiv:2108.06098, section 3) writes the update as the Hadamard product of two
low-rank products:

    dW = s * (B1 A1) ⊙ (B2 A2),   B1, B2: (out, r),  A1, A2: (r, in),  s = alpha / r

so a rank-r LoHa reaches rank up to r^2 at the cost of 2 LoRAs. Init as PEFT: B1, A1, B2 Kaiming-uniform, A2 zeros
(dW = 0 at init). On disk it is PEFT's LOHA format (``hada_w1_a`` = B1, ``hada_w1_b`` = A1, ``hada_w2_a`` = B2,
``hada_w2_b`` = A2), so PEFT loads it and it loads PEFT's.

It is additive and factors exactly as a rank-r^2 product through row-wise Khatri-Rao (face-splitting) products:

    dW[i, l] = s * sum_{j,k} B1[i,j] B2[i,k] A1[j,l] A2[k,l] = (B' A')[i, l],
    B'[i, (j,k)] = s B1[i,j] B2[i,k],   A'[(j,k), l] = A1[j,l] A2[k,l]

which is all ``combine`` needs. Defining the class registers it (``AdapterConfig.__init_subclass__``); nothing in
the package changes. Use::

    import loha, lightning_lora as ll
    ll.inject(model, loha.LoHa(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))

or, in a LightningCLI YAML: ``adapter: {class_path: loha.LoHa, init_args: {r: 4}}``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_lora.core.kinds import LayerKind
from lightning_lora.core.layer import AdapterBranch, AdapterConfig


@dataclasses.dataclass
class LoHa(AdapterConfig):
    """LoHa adapter config: rank ``r`` of each of the two factors, scaling ``alpha / r``."""

    r: int = 4
    alpha: float = 8.0

    method: ClassVar[str] = "LoHa"
    peft_type: ClassVar[str] = "LOHA"
    peft_suffixes: ClassVar[tuple[str, ...]] = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_rank(self.r)
        if not self.alpha > 0:
            raise ValueError(f"LoHa: alpha must be > 0, got {self.alpha}.")

    @classmethod
    def examples(cls) -> list[LoHa]:
        return [cls(r=3, alpha=6.0)]

    @classmethod
    def supports(cls, kind: LayerKind) -> bool:
        return kind.linear  # the linear kinds: nn.Linear, GPT-2 Conv1D, NF4

    @classmethod
    def peft_supports(cls, kind: LayerKind) -> bool:
        return kind.name == "linear"  # PEFT's LoHa has no GPT-2 Conv1D or bitsandbytes layer

    def build(self, base_layer: nn.Module, shared: object, name: str) -> LoHaBranch:
        return LoHaBranch(self, base_layer)  # the layer's name decides nothing here (see docs/adding-a-method.md)

    def to_peft(self, targets: list[str], layers: Mapping[str, AdapterBranch]) -> dict:
        return {
            "peft_type": "LOHA", "r": self.r, "alpha": self.alpha, "rank_dropout": 0.0, "module_dropout": 0.0,
            "target_modules": targets, "use_effective_conv2d": False, "init_weights": True, "inference_mode": True,
            "modules_to_save": None, "task_type": None,
        }  # fmt: skip

    @classmethod
    def from_peft(cls, peft_config: dict) -> LoHa | None:
        if cls is not LoHa or peft_config.get("peft_type") != "LOHA":
            return None
        if peft_config.get("rank_dropout") or peft_config.get("use_effective_conv2d"):
            raise ValueError("LoHa: rank_dropout and use_effective_conv2d are not supported by this example.")
        return cls(r=int(peft_config["r"]), alpha=float(peft_config.get("alpha", 8)))



class LoHaBranch(AdapterBranch):
    """LoHa on one linear layer: ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in), ``hada_w2_a``, ``hada_w2_b``."""

    def __init__(self, config: LoHa, base_layer: nn.Module):
        super().__init__(config, base_layer)
        n_in, n_out = self.kind.in_out(base_layer)
        device, r = base_layer.weight.device, config.r
        self.scale = config.alpha / r
        self.p = config.dropout
        self.hada_w1_a = nn.Parameter(torch.empty(n_out, r, device=device))
        self.hada_w1_b = nn.Parameter(torch.empty(r, n_in, device=device))
        self.hada_w2_a = nn.Parameter(torch.empty(n_out, r, device=device))
        self.hada_w2_b = nn.Parameter(torch.empty(r, n_in, device=device))
        with torch.no_grad():
            for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            nn.init.zeros_(self.hada_w2_b)

    def delta_weight(self, base_layer: nn.Module | None = None) -> Tensor:
        """dW = s (B1 A1) ⊙ (B2 A2), (out, in)."""
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scale

    def forward(self, x: Tensor, base_out: Tensor, base_layer: nn.Module, weight: float = 1.0) -> Tensor:
        p = self.p if self.training else 0.0
        x = F.dropout(x, p) if p else x
        delta = F.linear(x.to(self.hada_w1_a.dtype), self.delta_weight() * weight)
        return base_out + delta.to(base_out.dtype)

    def peft_tensors(self) -> dict[str, Tensor]:
        return {n: getattr(self, n) for n in LoHa.peft_suffixes}

    def factors(self) -> tuple[Tensor, Tensor]:
        """Row-wise Khatri-Rao products (module docstring): B' (out, r^2), A' (r^2, in)."""
        out, r = self.hada_w1_a.shape
        B = (self.hada_w1_a[:, :, None] * self.hada_w2_a[:, None, :]).reshape(out, r * r) * self.scale
        A = (self.hada_w1_b[:, None, :] * self.hada_w2_b[None, :, :]).reshape(r * r, -1)
        return B, A

    def activation_bytes(self, act_bytes: int, adapter_bytes: int) -> int:
        """dW is built per layer (not per token); only a cast of the input to the adapter dtype is extra."""
        return adapter_bytes * self.in_out[0] if adapter_bytes != act_bytes else 0

    def param_roles(self) -> dict[str, str]:
        """LoRA+: the output-side factors (B1, B2) learn fast, the input-side ones (A1, A2) slow."""
        return {"hada_w1_a": "fast", "hada_w2_a": "fast", "hada_w1_b": "slow", "hada_w2_b": "slow"}
