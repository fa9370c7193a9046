"""(IA)^3 as a test-only outside method (Liu et al. 2022, arXiv:2205.05638, section 3.3), in PEFT's ``IA3`` format.

It uses the hooks of the method contract that the LoRA family leaves at their defaults, so the contract matrix
(tests/test_contract.py) runs them on every kind, with PEFT as the oracle:

- ``build`` decides by the layer's name: a layer matching ``feedforward_modules`` scales its input,
  y = W (l * x) + b, by wrapping the base call (``wraps_base``: one base GEMM); the others scale the output,
  y = l * (W x + b);
- ``to_peft`` writes ``feedforward_modules`` from the per-layer map;
- merge writes W' = W diag(l) (input side) or W' = diag(l) W and b' = l * b (output side: ``merged_bias``);
- it is not additive, and ``factors()`` says why in its own words.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_lora.core.kinds import LayerKind
from lightning_lora.core.layer import AdapterBranch, AdapterConfig
from lightning_lora.core.targets import name_matches


@dataclasses.dataclass
class IA3(AdapterConfig):
    """(IA)^3: a learned vector l per layer, on the input of ``feedforward_modules`` and on the output elsewhere."""

    feedforward_modules: str | list[str] | None = None

    method: ClassVar[str] = "IA3"
    peft_type: ClassVar[str] = "IA3"
    peft_suffixes: ClassVar[tuple[str, ...]] = ("ia3_l",)

    @classmethod
    def examples(cls) -> list[IA3]:
        return [cls(), cls(feedforward_modules=["layer"])]

    @classmethod
    def supports(cls, kind: LayerKind) -> bool:
        return kind.linear

    @classmethod
    def peft_supports(cls, kind: LayerKind) -> bool:
        return kind.name == "linear"

    def is_feedforward(self, name: str) -> bool:
        patterns = self.feedforward_modules
        if not patterns:
            return False
        if isinstance(patterns, str):
            return name_matches(name, patterns)
        return any(name == p or name.endswith("." + p) for p in patterns)  # PEFT's list rule

    def build(self, base_layer: nn.Module, shared: object, name: str) -> IA3Branch:
        return IA3Branch(self, base_layer, self.is_feedforward(name))

    def to_peft(self, targets: list[str], layers: Mapping[str, AdapterBranch]) -> dict:
        feedforward = sorted({n.rsplit(".", 1)[-1] for n, b in layers.items() if b.wraps_base})
        return {"peft_type": "IA3", "target_modules": targets, "feedforward_modules": feedforward,
                "fan_in_fan_out": False, "init_ia3_weights": True, "inference_mode": True, "modules_to_save": None,
                "task_type": None}  # fmt: skip

    @classmethod
    def from_peft(cls, peft_config: dict) -> IA3 | None:
        if cls is not IA3 or peft_config.get("peft_type") != "IA3":
            return None
        return cls(feedforward_modules=peft_config.get("feedforward_modules"))


class IA3Branch(AdapterBranch):
    """``ia3_l``: (in,) on the input side (a branch wrapping the base call), (out,) on the output side."""

    additive: ClassVar[bool] = False

    def __init__(self, config: IA3, base_layer: nn.Module, feedforward: bool):
        super().__init__(config, base_layer)
        n_in, n_out = self.kind.in_out(base_layer)
        self.wraps_base = feedforward
        self.ia3_l = nn.Parameter(torch.ones(n_in if feedforward else n_out, device=base_layer.weight.device))

    def wrap(self, x: Tensor, base: Callable[[Tensor], Tensor], base_layer: nn.Module, weight: float = 1.0) -> Tensor:
        return base((x.to(self.ia3_l.dtype) * self.ia3_l).to(x.dtype))

    def forward(self, x: Tensor, base_out: Tensor, base_layer: nn.Module, weight: float = 1.0) -> Tensor:
        return (base_out * self.ia3_l).to(base_out.dtype)

    def merged_weight(self, weight: Tensor, base_layer: nn.Module, scale: float = 1.0) -> Tensor:
        l = self.ia3_l.to(weight.dtype)
        return weight * (l[None, :] if self.wraps_base else l[:, None])

    def merged_bias(self, bias: Tensor | None, base_layer: nn.Module, scale: float = 1.0) -> Tensor | None:
        return bias if self.wraps_base or bias is None else bias * self.ia3_l.to(bias.dtype)

    def delta_weight(self, base_layer: nn.Module) -> Tensor:
        weight = self.kind.dense_weight(base_layer)
        return self.merged_weight(weight, base_layer) - weight

    def factors(self) -> tuple[Tensor, Tensor]:
        raise ValueError("(IA)^3 multiplies activations by a learned vector, so its update is a rescaling of W, not "
                         "a low-rank product that adds to it.")

    def peft_tensors(self) -> dict[str, Tensor]:
        return {"ia3_l": self.ia3_l.view(1, -1) if self.wraps_base else self.ia3_l.view(-1, 1)}
