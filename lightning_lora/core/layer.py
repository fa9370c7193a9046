"""The contract every adapter method implements, and the wrapper that puts adapters on a frozen layer.

``AdapterLayer`` wraps a frozen base layer of any registered kind (``kinds.py``: ``nn.Linear``, GPT-2 ``Conv1D``,
``nn.Embedding``, ``nn.Conv1d/2d/3d``, bitsandbytes ``Linear4bit``) and holds named adapter branches. Its output is

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

from lightning_lora.core.kinds import (  # noqa: F401  (re-exported: the layer helpers live with the kinds)
    LayerKind,
    dense_weight,
    in_out_features,
    is_linear_like,
    is_quantized,
    kind_named,
    kind_of,
    merged_base_layer,
)

METHODS: dict[str, type[AdapterConfig]] = {}  # method name -> config class; subclasses join on definition
ROLES = ("slow", "fast", "vector", "embedding")  # LoRA+ optimizer roles (train/optim.py)


@dataclasses.dataclass
class AdapterConfig:
    """The method contract: a config class carries everything its method knows (see docs/adding-a-method.md).

    A subclass that sets ``method`` joins ``METHODS`` by itself (``__init_subclass__``), wherever it is defined, and
    then works with every verb, PEFT files (its own ``peft_type``), ``combine`` (when additive), LoRA+ groups, the
    estimator, ``LoRAModule``, ``AdapterCallback`` and the CLI (``class_path``). It implements ``build`` and, for PEFT
    files, ``to_peft``/``from_peft``/``peft_suffixes``; the other hooks have defaults.
    """

    target_modules: str | list[str] = "all-linear"
    exclude_modules: str | list[str] | None = None
    dropout: float = 0.0

    method: ClassVar[str] = "adapter"
    peft_type: ClassVar[str | None] = None  # PEFT's ``peft_type`` of the files this method writes
    peft_suffixes: ClassVar[tuple[str, ...]] = ()  # every per-layer PEFT key suffix a branch may use
    peft_aliases: ClassVar[dict[str, str]] = {}  # older suffixes read as current ones

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "method" in vars(cls):
            METHODS[cls.method] = cls

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{self.method}: dropout must be in [0, 1), got {self.dropout}.")
        if isinstance(self.target_modules, (list, tuple)) and not self.target_modules:
            raise ValueError(f"{self.method}: target_modules is empty; give layer names, a pattern or 'all-linear'.")

    def _check_rank(self, r: int) -> None:
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"{self.method}: r (the rank) must be a positive integer, got {r!r}.")

    # -- layers ---------------------------------------------------------------------------------------------------
    @classmethod
    def supports(cls, kind: LayerKind) -> bool:
        """True if this method adapts layers of ``kind`` (default: the linear kinds, incl. a 4-bit base)."""
        return kind.linear

    @classmethod
    def examples(cls) -> list[AdapterConfig]:
        """Small configs of this method that the contract tests run on every kind it supports (default: ``cls()``)."""
        return [cls()]

    def shared_state(self, layers: list[nn.Module]) -> object:
        """State shared by all adapted layers of one adapter (VeRA's random projections); none by default."""
        return None

    def build(self, base_layer: nn.Module, shared: object) -> AdapterBranch:
        raise NotImplementedError

    # -- PEFT files -------------------------------------------------------------------------------------------------
    def to_peft(self, targets: list[str]) -> dict:
        """The ``adapter_config.json`` PEFT writes for this adapter on the layers ``targets``."""
        raise NotImplementedError(f"{self.method} has no PEFT format (to_peft is not implemented).")

    @classmethod
    def peft_supports(cls, kind: LayerKind) -> bool:
        """True where PEFT itself has this method on ``kind`` (the contract tests then check PEFT both ways)."""
        return cls.peft_type is not None and cls.supports(kind)

    @classmethod
    def from_peft(cls, peft_config: dict) -> AdapterConfig | None:
        """Our config for a PEFT ``adapter_config.json``, or None when the file is not this method's."""
        return None

    def shared_tensors(self, shared: object) -> dict[str, Tensor]:
        """The frozen tensors of ``shared_state`` by PEFT name (``vera_A``, ...); none by default."""
        return {}

    def peft_shared_tensors(self, shared: object) -> dict[str, Tensor]:
        """The shared tensors written into PEFT files as ``base_model.<name>`` (default: all of them)."""
        return self.shared_tensors(shared)

    def load_shared_tensors(self, shared: object, tensors: dict[str, Tensor], source: str) -> None:
        """Put shared tensors read from a file (names without ``base_model.``) into ``shared``, checking shapes."""
        if tensors:
            raise ValueError(f"{source}: unexpected shared tensors {sorted(tensors)} for a {self.method} adapter.")

    # -- estimate -----------------------------------------------------------------------------------------------------
    def activation_bytes(self, n_in: int, n_out: int, act_bytes: int, adapter_bytes: int) -> int:
        """Bytes per token that one adapted (n_in -> n_out) layer keeps for backward beyond its base layer
        (``commands/estimate.py``). Default: one output-wide tensor."""
        return act_bytes * n_out


class AdapterBranch(nn.Module):
    """One adapter on one layer. ``forward`` returns the layer's new output given the base output.

    ``kind`` is the base layer's ``LayerKind``; ``shared`` the adapter's ``shared_state`` (or None).
    """

    additive: ClassVar[bool] = True  # output = base + w * dW x, so runtime weighting and `cat` combination are exact

    def __init__(self, config: AdapterConfig, base_layer: nn.Module | None = None, shared: object = None):
        super().__init__()
        self.config = config
        kind = None if base_layer is None else kind_of(base_layer)
        self.kind_name = None if kind is None else kind.name  # a name, so modules stay picklable
        self.shared = shared

    @property
    def kind(self) -> LayerKind:
        return kind_named(self.kind_name)

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

    def factors(self) -> tuple[Tensor, Tensor]:
        """2-D (B', A') with ``B' @ A'`` = dW in LoRA's parameter orientation ((out, fan_in); (dim, vocab) for an
        embedding), for ``combine``. Raises ValueError for a method whose update is not additive."""
        raise ValueError(
            f"{self.config.method} adapters cannot be combined: their update is not an additive low-rank product "
            "(e.g. DoRA's magnitude rescales W + s B A row by row). Merge it alone or combine additive adapters."
        )

    def param_roles(self) -> dict[str, str]:
        """LoRA+ role of each own parameter (one of ``ROLES``): ``slow`` (lr), ``fast`` (lr * ratio), ``vector``
        (lr, no weight decay), ``embedding`` (embedding_lr). Default: 1-D tensors are vectors, the rest slow."""
        return {n: "vector" if p.ndim == 1 else "slow" for n, p in self.named_parameters(recurse=False)}


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
