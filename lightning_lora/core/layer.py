"""The contract every adapter method implements, and the wrapper that puts adapters on a frozen layer.

``AdapterLayer`` wraps a frozen base layer (``nn.Linear``, bitsandbytes ``Linear4bit``, Hugging Face GPT-2 ``Conv1D``
or ``nn.Embedding``) and holds named adapter branches. Its output is

    y = base(x)                     then, for each active adapter a with weight w_a,
    y = branch_a(x, y, base, w_a)   (LoRA/VeRA add w_a * dW_a x; DoRA rescales, see ``dora.py``)

Adapters are plain ``nn.Parameter`` tensors inside ``AdapterBranch`` modules, never ``nn.Linear`` children, so
Lightning's precision plugins that swap ``nn.Linear`` modules cannot touch them.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES = (nn.Linear, Conv1D)  # bitsandbytes Linear4bit subclasses nn.Linear


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


def is_quantized(layer: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit layer (its weight is a ``Params4bit`` holding packed NF4 data)."""
    return getattr(getattr(layer, "weight", None), "quant_state", None) is not None or type(
        getattr(layer, "weight", None)
    ).__name__ == "Params4bit"


def in_out_features(layer: nn.Module) -> tuple[int, int]:
    """(in, out) of a linear-like layer; (num_embeddings, embedding_dim) of an embedding."""
    if isinstance(layer, nn.Embedding):
        return layer.num_embeddings, layer.embedding_dim
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    return layer.in_features, layer.out_features


def dense_weight(layer: nn.Module) -> Tensor:
    """The layer's weight as a dense (out, in) matrix ((vocab, dim) for an embedding); NF4 layers are dequantized."""
    weight = layer.weight
    if is_quantized(layer):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state).reshape(layer.out_features, layer.in_features)
    if isinstance(layer, Conv1D):
        return weight.t()
    return weight


def merged_base_layer(layer: nn.Module, new_weight: Tensor, dtype: torch.dtype | None = None) -> nn.Module:
    """The base layer with ``new_weight`` (same orientation as ``dense_weight``) written in.

    Dense layers are updated in place; a quantized layer becomes a plain ``nn.Linear`` (re-quantizing would destroy
    most of a small update, REFERENCE section 5), in ``dtype`` (default: the new weight's dtype).
    """
    if is_quantized(layer):
        dtype = dtype or new_weight.dtype
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = nn.Parameter(new_weight.detach().to(dtype), requires_grad=False)
        if layer.bias is not None:
            linear.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
        return linear
    weight = layer.weight
    with torch.no_grad():
        if isinstance(layer, Conv1D):
            weight.t().copy_(new_weight)
        elif new_weight.is_contiguous() and new_weight.dtype == weight.dtype and new_weight.device == weight.device:
            weight.data = new_weight.detach()  # the merged tensor is new: adopt it instead of copying it over
        else:
            weight.copy_(new_weight)
    return layer


@dataclasses.dataclass
class AdapterConfig:
    """Fields shared by every method. Subclasses add theirs and implement ``build``."""

    target_modules: str | list[str] = "all-linear"
    exclude_modules: str | list[str] | None = None
    dropout: float = 0.0

    method: ClassVar[str] = "adapter"
    supports: ClassVar[tuple] = LINEAR_TYPES

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{self.method}: dropout must be in [0, 1), got {self.dropout}.")
        if isinstance(self.target_modules, (list, tuple)) and not self.target_modules:
            raise ValueError(f"{self.method}: target_modules is empty; give layer names, a pattern or 'all-linear'.")

    def _check_rank(self, r: int) -> None:
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"{self.method}: r (the rank) must be a positive integer, got {r!r}.")

    def shared_state(self, layers: list[nn.Module]) -> object:
        """State shared by all adapted layers of one adapter (VeRA's random projections); none by default."""
        return None

    def build(self, base_layer: nn.Module, shared: object) -> AdapterBranch:
        raise NotImplementedError

    def to_peft(self, targets: list[str]) -> dict:
        """The ``adapter_config.json`` PEFT writes for this adapter on the layers ``targets``."""
        raise NotImplementedError


class AdapterBranch(nn.Module):
    """One adapter on one layer. ``forward`` returns the layer's new output given the base output."""

    additive: ClassVar[bool] = True  # output = base + w * dW x, so runtime weighting and `cat` combination are exact

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config

    def forward(self, x: Tensor, base_out: Tensor, base_layer: nn.Module, weight: float = 1.0) -> Tensor:
        raise NotImplementedError

    def delta_weight(self, base_layer: nn.Module) -> Tensor:
        """The dense change dW of the base weight, same orientation as ``dense_weight(base_layer)``."""
        raise NotImplementedError

    def merged_weight(self, weight: Tensor, base_layer: nn.Module, scale: float = 1.0) -> Tensor:
        """W' such that the base layer with weight W' computes what base + this adapter computes."""
        return weight + scale * self.delta_weight(base_layer).to(weight.dtype)

    def peft_tensors(self) -> dict[str, Tensor]:
        """This branch's tensors under PEFT's key suffixes (``lora_A.weight``, ...)."""
        raise NotImplementedError


class AdapterLayer(nn.Module):
    """A frozen base layer plus named adapter branches (see module docstring)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: dict[str, float] = {}  # adapter name -> weight
        self.enabled = True
        self.sample_adapters: list[str | None] | None = None  # one adapter name per batch row (mixed batches)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if not self.enabled:
            return out
        if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
            # Under mixed precision the adapters still compute in their own dtype: their autograd functions run
            # backward without autocast, so their forward must not be autocast either.
            with torch.autocast(x.device.type, enabled=False):
                return self._adapt(x, out)
        return self._adapt(x, out)

    def _adapt(self, x: Tensor, out: Tensor) -> Tensor:
        if self.sample_adapters is not None:
            return self._forward_per_sample(x, out)
        for name, weight in self.active.items():
            if name in self.adapters:
                out = self.adapters[name](x, out, self.base_layer, weight)
        return out

    def _forward_per_sample(self, x: Tensor, out: Tensor) -> Tensor:
        names = self.sample_adapters
        if len(names) != x.shape[0]:
            raise ValueError(f"mixed batch: {len(names)} adapter names for a batch of {x.shape[0]} samples.")
        for name in dict.fromkeys(n for n in names if n is not None and n in self.adapters):
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            out[rows] = self.adapters[name](x[rows], out[rows], self.base_layer, 1.0)
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "adapters"):
                raise
            return getattr(self.base_layer, name)  # weight, in_features, ... as the code around expects

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self.active}, enabled={self.enabled}"
