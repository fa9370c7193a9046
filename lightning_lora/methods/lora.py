"""LoRA and rsLoRA.

LoRA (Hu et al. 2021, arXiv:2106.09685, section 4.1): the frozen weight W (out x in) gets a trained low-rank update

    y = W x + s * B A dropout(x),   A: (r, in), B: (out, r),   s = alpha / r

A starts Kaiming-uniform (a = sqrt(5)), B at zero, so the model is unchanged at init. rsLoRA (Kalajdzievski 2023,
arXiv:2312.03732) uses s = alpha / sqrt(r), which keeps the update's scale stable as r grows.
On an embedding the roles flip (as in PEFT): y = E[ids] + s * (A^T[ids]) B^T with A: (r, vocab) zeros, B: (dim, r) normal.

The linear branch is one autograd function that saves only what backward needs: the input x (a frozen base does not keep
it; under lean activations a norm or SwiGLU output is kept as its recipe, ``train/lean.py``), the r-wide activation h =
A dropout(x), and, with dropout, the kept-mask packed 8 per byte instead of a dropped copy of x. It adds into the base
output in place (one ``addmm_``, no (N, out) temporaries); without autograd (eval, ``torch.no_grad``) it is two plain
GEMMs.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_lora.core.kinds import LayerKind, kind_of
from lightning_lora.core.layer import AdapterBranch, AdapterConfig, in_own_precision
from lightning_lora.core.targets import check_patterns, pattern_key
from lightning_lora.methods import lora_init
from lightning_lora.methods.loftq import Quantize
from lightning_lora.methods.lora_experts import ExpertFactors
from lightning_lora.methods.lora_fused import lora_linear


@dataclasses.dataclass
class LoRA(AdapterConfig):
    """LoRA adapter config: rank ``r``, scaling ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).

    ``rank_pattern``/``alpha_pattern`` (PEFT's): per-layer r and alpha, ``{layer name pattern: value}``, matched by
    PEFT's rule (``core/targets.py: pattern_key``: a regex matching the end of the layer's name at a dot, first key
    wins); other layers take ``r``/``alpha``. ``init`` picks the start (``lora_init.py``).

    Example::

        inject(model, LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 16}))
    """

    r: int = 8
    alpha: float = 16.0
    rslora: bool = False
    init: str = "default"  # "default" | "gaussian" | "pissa" | "loftq": see lora_init.py
    pissa_niter: int | None = None  # PiSSA: None = exact SVD; k = randomized SVD with k subspace iterations
    loftq_iters: int = 1  # LoftQ: alternating steps Q = NF4(W - s B A), (B, A) = top-r SVD of W - Q
    rank_pattern: dict[str, int] | None = None  # per-layer r, PEFT's rank_pattern
    alpha_pattern: dict[str, float] | None = None  # per-layer alpha, PEFT's alpha_pattern

    method: ClassVar[str] = "LoRA"
    peft_type: ClassVar[str] = "LORA"
    peft_suffixes: ClassVar[tuple[str, ...]] = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_rank(self.r)
        if not self.alpha > 0:
            raise ValueError(f"{self.method}: alpha must be > 0, got {self.alpha}.")
        check_patterns(self.rank_pattern, f"{self.method} rank_pattern", _is_rank, "a positive integer")
        check_patterns(self.alpha_pattern, f"{self.method} alpha_pattern", _is_alpha, "a number > 0")
        lora_init.check_init(self)

    def rank_for(self, name: str) -> int:
        """r of the layer called ``name`` (``rank_pattern``, else ``r``)."""
        key = pattern_key(self.rank_pattern or {}, name)
        return self.r if key is None else int(self.rank_pattern[key])

    def alpha_for(self, name: str) -> float:
        """alpha of the layer called ``name`` (``alpha_pattern``, else ``alpha``)."""
        key = pattern_key(self.alpha_pattern or {}, name)
        return self.alpha if key is None else float(self.alpha_pattern[key])

    @classmethod
    def supports(cls, kind: LayerKind) -> bool:
        return True  # every kind in the table: linear, GPT-2 Conv1D, embedding, conv1d/2d/3d, NF4

    @classmethod
    def examples(cls) -> list[LoRA]:
        return [cls(r=4, alpha=8.0), cls(r=4, alpha=8.0, rslora=True),
                cls(r=4, alpha=8.0, rank_pattern={"lay.r": 3}, alpha_pattern={"layer": 5.0})]  # fmt: skip

    def build(self, base_layer: nn.Module, shared: object = None, name: str = "") -> LoRABranch:
        if kind_of(base_layer).experts:  # an MoE expert stack: one pair per expert (lora_experts.py)
            return ExpertLoRABranch(self, base_layer, name)
        return LoRABranch(self, base_layer, name)

    # -- start ------------------------------------------------------------------------------------------------------
    @property
    def rewrites_base(self) -> bool:
        return self.init in lora_init.REWRITING

    def check_start(self, quantize: object = None) -> None:
        lora_init.check_start(self, quantize)

    def original_base_note(self, quantized: bool) -> str:
        return lora_init.note(self, quantized)

    # -- card -------------------------------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        return type(self).__name__ + (" (rsLoRA)" if self.rslora else "")

    def card_facts(self, layers: Mapping[str, AdapterBranch]) -> dict[str, str]:
        """Rank and alpha with the scale they give (per-layer ranges under ``rank_pattern``/``alpha_pattern``)."""
        def spread(values: list, spec: str = "g", note: str = "") -> str:
            low, high = format(min(values), spec), format(max(values), spec)
            return low if low == high else f"{low} to {high}{note}"

        per_layer = [(b.r, b.alpha, b.scale) for b in layers.values()]
        per_layer = per_layer or [(self.r, self.alpha, self.scale_for(self.r, self.alpha))]
        r, alpha, scale = zip(*per_layer)
        return {"rank r": spread(r, note=" per layer"),
                "alpha": f"{spread(alpha, note=' per layer')} (scale {spread(scale, '.4f')})"}

    def scale_for(self, r: int, alpha: float) -> float:
        """The scaling s of a rank-r layer: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return alpha / (math.sqrt(r) if self.rslora else r)

    # -- PEFT files -------------------------------------------------------------------------------------------------
    @classmethod
    def from_peft(cls, peft_config: dict) -> LoRA | None:
        if cls is not LoRA or peft_config.get("peft_type") != "LORA" or peft_config.get("use_dora"):
            return None
        return cls(**cls._peft_fields(peft_config))

    @staticmethod
    def _peft_fields(peft_config: dict) -> dict:
        return dict(
            r=int(peft_config["r"]),
            alpha=float(peft_config.get("lora_alpha", 8)),
            dropout=float(peft_config.get("lora_dropout", 0.0)),
            rslora=bool(peft_config.get("use_rslora", False)),
            rank_pattern=dict(peft_config.get("rank_pattern") or {}) or None,
            alpha_pattern=dict(peft_config.get("alpha_pattern") or {}) or None,
        )

    def to_peft(self, targets: list[str], layers: Mapping[str, AdapterBranch] | None = None) -> dict:
        """PEFT's ``LoraConfig``; per-layer r and alpha from the per-layer map, as ``rank_pattern``/``alpha_pattern``
        (written only when some layer differs from ``r``/``alpha``)."""
        config = {
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
        layers = layers or {}
        for field, given, value, default in (("rank_pattern", self.rank_pattern, "r", self.r),
                                             ("alpha_pattern", self.alpha_pattern, "alpha", self.alpha)):  # fmt: skip
            pattern = per_layer_pattern(given, {n: getattr(b, value) for n, b in layers.items()}, default)
            if pattern:
                config[field] = pattern
        return config



PEFT_PAIRS = {"linear": ("lora_A.weight", "lora_B.weight"), "embedding": ("lora_embedding_A", "lora_embedding_B")}


def _is_rank(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_alpha(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def per_layer_pattern(given: dict | None, values: Mapping[str, float], default: float) -> dict:
    """The pattern to write for per-layer ``values`` (layer name -> value): the config's own ``given`` pattern when it
    gives exactly these values on these layers (it round-trips as written), else one exact key per layer that
    differs from ``default`` (``re.escape``: a key is a regex). Empty when every layer has ``default``."""
    if given and all(values[n] == (given[k] if (k := pattern_key(given, n)) is not None else default) for n in values):
        return dict(given)
    return {re.escape(n): v for n, v in values.items() if v != default}


class LoRABranch(AdapterBranch):
    """LoRA on one layer: parameters ``lora_A`` and ``lora_B`` shaped by the layer kind (``kinds.py``): (r, in) and
    (out, r) on linear kinds, (r, in, *k) and (out, r, 1, ...) on convs (PEFT's layout)."""

    def __init__(self, config: LoRA, base_layer: nn.Module, name: str = ""):
        super().__init__(config, base_layer)
        kind = self.kind
        self.r, self.alpha = config.rank_for(name), config.alpha_for(name)  # this layer's (rank_pattern, alpha_pattern)
        shape_A, shape_B = kind.pair_shapes(base_layer, self.r)
        self.fused = kind.linear  # (..., in) -> (..., out): the fused GEMM path
        self.scale = config.scale_for(self.r, self.alpha)
        self.p = config.dropout
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(shape_A, device=device))
        self.lora_B = nn.Parameter(torch.empty(shape_B, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        lora_init.reset(self)  # "default" / "gaussian"; "pissa" and "loftq" overwrite A and B in start()

    def start(self, base_layer: nn.Module, quantize: Quantize | None) -> nn.Module:
        return lora_init.start(self, base_layer, quantize)

    def refuse_start(self, base_layer: nn.Module) -> str | None:
        return lora_init.refuse_start(self, base_layer)

    def for_original_base(self, base_layer: nn.Module) -> LoRABranch:
        return lora_init.for_original_base(self, base_layer)

    @in_own_precision  # the adapter's own dtype under mixed precision (the base runs autocast)
    def forward(self, x: Tensor, base_out: Tensor, base_layer: nn.Module, weight: float = 1.0) -> Tensor:
        p = self.p if self.training else 0.0
        if self.fused:
            return lora_linear(x, base_out, self.lora_A, self.lora_B, self.scale * weight, p, inplace=True)
        x = x.to(self.lora_A.dtype) if x.is_floating_point() else x
        delta = self.kind.apply_pair(x, self.lora_A, self.lora_B, base_layer, p)
        return base_out + delta.mul_(self.scale * weight).to(base_out.dtype)

    def pair(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """(B, A) as 2-D matrices (out, r), (r, fan_in), optionally cast."""
        B, A = self.lora_B.reshape(self.lora_B.shape[0], -1), self.lora_A.reshape(self.lora_A.shape[0], -1)
        return (B, A) if dtype is None else (B.to(dtype), A.to(dtype))

    def merged_weight(self, weight: Tensor, base_layer: nn.Module, scale: float = 1.0) -> Tensor:
        """W + scale * s * B A in one fused GEMM (no dense delta temporary)."""
        B, A = self.pair(weight.dtype)
        if self.kind.transposed:
            return torch.addmm(weight, A.t(), B.t(), alpha=scale * self.scale)
        return torch.addmm(weight, B, A, alpha=scale * self.scale)

    def delta_weight(self, base_layer: nn.Module) -> Tensor:
        B, A = self.pair()
        delta = (B @ A) * self.scale  # (out, fan_in) or (dim, vocab)
        return delta.t() if self.kind.transposed else delta

    def peft_tensors(self) -> dict[str, Tensor]:
        name_A, name_B = PEFT_PAIRS.get(self.kind.peft_layer, PEFT_PAIRS["linear"])
        return {name_A: self.lora_A, name_B: self.lora_B}

    def factors(self) -> tuple[Tensor, Tensor]:
        B, A = self.pair()
        return B * self.scale, A

    @torch.no_grad()
    def load_factors(self, B: Tensor, A: Tensor) -> None:
        """Set B (out, r) and A (r, fan_in) as 2-D matrices (conv kinds: reshaped to (out, r, 1, ...), (r, in, *k))."""
        self.lora_B.copy_(B.reshape(self.lora_B.shape))
        self.lora_A.copy_(A.reshape(self.lora_A.shape))

    def activation_bytes(self, act_bytes: int, adapter_bytes: int) -> int:
        """h = A x (r wide, this layer's r); an adapter dtype other than the activations' adds the input cast."""
        return act_bytes * self.r + (adapter_bytes * self.in_out[0] if adapter_bytes != act_bytes else 0)

    def param_roles(self) -> dict[str, str]:
        if self.kind.reversed_init:  # embedding adapters: their own learning rate
            return {"lora_A": "embedding", "lora_B": "embedding"}
        return {"lora_A": "slow", "lora_B": "fast"}


class ExpertLoRABranch(ExpertFactors, LoRABranch):
    """LoRA on an MoE expert stack: one rank-r pair per expert, in PEFT's stacked layout (``lora_experts.py``)."""
