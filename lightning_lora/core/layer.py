"""The contract every adapter method implements, and the wrapper that puts adapters on a frozen layer.

``AdapterLayer`` wraps a frozen base layer of any registered kind (``kinds.py``: ``nn.Linear``, GPT-2 ``Conv1D``,
``nn.Embedding``, ``nn.Conv1d/2d/3d``, bitsandbytes ``Linear4bit``) and holds named adapter branches. With the
active adapters a_1 .. a_n (weights w_i), in activation order, its output is

    f_0(x) = base(x);   f_i(x) = branch_i.wrap(x, f_{i-1}, w_i)  for the branches that act on the input side
    y = f(x);           y = branch_j(x, y, base, w_j)            for the others (LoRA/VeRA add w dW x; DoRA rescales)

A branch that wraps the base call (``wraps_base``, e.g. one that scales the input) calls the base once, on its own
transformed input: no second base GEMM. Every branch runs under the autocast state the base runs under; a method
that computes in its own dtype turns autocast off for itself (``own_precision``), as LoRA, DoRA and VeRA do.

Non-additive branches (``additive = False``: DoRA, input-side scaling) follow two rules, which ``set_adapter``
enforces: weight 1 only, and the only active adapter on the layers they adapt. ``factors()`` raises the branch's
own reason why it cannot be folded into a low-rank product, and ``combine``/``set_adapter`` show that reason.

Adapters are plain ``nn.Parameter`` tensors inside ``AdapterBranch`` modules, never ``nn.Linear`` children, so
Lightning's precision plugins that swap ``nn.Linear`` modules cannot touch them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import ClassVar

from torch import Tensor, nn

from lightning_lora.core.trained import check_fields
from lightning_lora.core.wrapper import AdapterLayer, in_own_precision, own_precision  # noqa: F401  (re-exported)
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
    files, ``to_peft``/``from_peft``/``peft_suffixes``; the other hooks have defaults. A second class under a name
    already taken is refused (re-defining the same class, e.g. a module reloaded, replaces it).

    Every config also carries ``modules_to_save``, ``trainable_token_indices`` and ``bias`` (PEFT's options for
    whole module copies, token rows and biases trained beside the method's tensors: ``core/trained.py``); they need
    nothing from a method.
    """

    target_modules: str | list[str] | None = "all-linear"
    exclude_modules: str | list[str] | None = None
    dropout: float = 0.0
    target_parameters: list[str] | None = None  # MoE expert stacks by name, as PEFT's (core/experts.py)
    # trained besides the method's branches, as PEFT names them (core/trained.py): whole modules, token rows, biases
    modules_to_save: list[str] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    bias: str = "none"

    method: ClassVar[str] = "adapter"
    peft_type: ClassVar[str | None] = None  # PEFT's ``peft_type`` of the files this method writes
    peft_suffixes: ClassVar[tuple[str, ...]] = ()  # every per-layer PEFT key suffix a branch may use
    peft_aliases: ClassVar[dict[str, str]] = {}  # older suffixes read as current ones

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "method" in vars(cls):
            taken = METHODS.get(cls.method)
            if taken is not None and _qualified(taken) != _qualified(cls):
                raise TypeError(f"method name {cls.method!r} is taken by {_qualified(taken)}; give "
                                f"{_qualified(cls)} another `method` name.")
            METHODS[cls.method] = cls

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{self.method}: dropout must be in [0, 1), got {self.dropout}.")
        params = self.target_parameters
        if params is not None and (isinstance(params, str) or not all(isinstance(p, str) and p for p in params)):
            raise ValueError(f"{self.method}: target_parameters must be a list of parameter names (e.g. "
                             f"['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']), got {params!r}.")
        if not self.target_modules and not params:
            raise ValueError(f"{self.method}: target_modules is empty; give layer names, a pattern or 'all-linear' "
                             "(or only target_parameters).")
        check_fields(self)

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

    # -- start (initialization) -----------------------------------------------------------------------------------
    @property
    def rewrites_base(self) -> bool:
        """True when this adapter's start rewrites the base weights (PiSSA's residual, LoftQ's quantization):
        ``inject``/``prepare`` then call each branch's ``start`` layer by layer (``core/start.py``). Default: False
        (the branch's own constructor initializes it; the base is untouched)."""
        return False

    def check_start(self, quantize: object = None) -> None:
        """The checks of this adapter's start that need no model (``quantize``: the quantization ``prepare`` was
        given, None for ``inject``); raise ValueError saying what to do. Default: none."""

    def original_base_note(self, quantized: bool) -> str:
        """A paragraph for the adapter folder's README when its start rewrote the base: which base the saved adapter
        belongs on (``quantized``: the trained base was quantized). Default: none."""
        return ""

    def shared_state(self, layers: list[nn.Module]) -> object:
        """State shared by all adapted layers of one adapter (VeRA's random projections); none by default."""
        return None

    def build(self, base_layer: nn.Module, shared: object, name: str) -> AdapterBranch:
        """The branch for the layer called ``name`` (its full name in the model, the key of the per-layer map:
        per-layer options such as ``rank_pattern`` are decided by it). A two-argument ``build(base_layer, shared)``
        of an older outside method still works (``build_branch``)."""
        raise NotImplementedError

    # -- PEFT files -------------------------------------------------------------------------------------------------
    def to_peft(self, targets: list[str], layers: Mapping[str, AdapterBranch]) -> dict:
        """The ``adapter_config.json`` PEFT writes for this adapter: ``targets`` is ``target_modules`` as PEFT writes
        it (suffixes when they select exactly these layers), ``layers`` the per-layer map, full layer name -> branch
        (per-layer options: ``rank_pattern``, ...). A one-argument ``to_peft(targets)`` still works (``peft_config_of``)."""
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

    # -- the model card ---------------------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        """The method's name as a card shows it (e.g. ``"LoRA (rsLoRA)"``); default: the class name."""
        return type(self).__name__

    def card_facts(self, layers: Mapping[str, AdapterBranch]) -> dict[str, str]:
        """Rows for the adapter's README card, ``{what: value}``, from the config and the per-layer map. Default:
        this method's own dataclass fields (not the common ``target_modules``/``exclude_modules``/``dropout``)."""
        common = {f.name for f in dataclasses.fields(AdapterConfig)}
        return {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in common}


class AdapterBranch(nn.Module):
    """One adapter on one layer. ``forward`` returns the layer's new output given the base output.

    ``kind`` is the base layer's ``LayerKind``; ``shared`` the adapter's ``shared_state`` (or None).
    """

    additive: ClassVar[bool] = True  # output = base + w * dW x, so runtime weighting and `cat` combination are exact
    wraps_base: bool = False  # the layer calls ``wrap`` (the branch calls the base) instead of ``forward``
    started_from: str | None = None  # the start that rewrote this branch's base ("PiSSA", "LoftQ", ...), if any

    def __init__(self, config: AdapterConfig, base_layer: nn.Module | None = None, shared: object = None):
        super().__init__()
        self.config = config
        kind = None if base_layer is None else kind_of(base_layer)
        self.kind_name = None if kind is None else kind.name  # a name, so modules stay picklable
        self.in_out = None if kind is None else kind.in_out(base_layer)  # (in, out) of the layer it adapts
        self.shared = shared

    @property
    def kind(self) -> LayerKind:
        return kind_named(self.kind_name)

    def forward(self, x: Tensor, base_out: Tensor, base_layer: nn.Module, weight: float = 1.0) -> Tensor:
        raise NotImplementedError

    def wrap(self, x: Tensor, base: Callable[[Tensor], Tensor], base_layer: nn.Module, weight: float = 1.0) -> Tensor:
        """For ``wraps_base`` branches: the layer's output, calling ``base`` (the base layer's call, or the next
        wrapping branch's) once on whatever input the method needs, e.g. ``base(x * l)`` for input-side scaling."""
        return self(x, base(x), base_layer, weight)

    def start(self, base_layer: nn.Module, quantize: Callable[[Tensor], nn.Module] | None) -> nn.Module:
        """For a config that ``rewrites_base``: initialize this branch from ``base_layer`` and return the base layer
        to train on (``base_layer`` itself, changed in place, or a new one; ``quantize(weight)`` gives the quantized
        layer ``prepare`` asked for, None where this layer stays in high precision). A branch whose start rewrote the
        base sets ``started_from``. Called before the branch is attached, one layer at a time."""
        return base_layer

    def refuse_start(self, base_layer: nn.Module) -> str | None:
        """Why ``start`` cannot run on ``base_layer`` (e.g. a rank above min(in, out)), or None."""
        return None

    def for_original_base(self, base_layer: nn.Module) -> AdapterBranch:
        """A branch that computes, on the base as it was before ``start``, what this one computes on the base it
        trained on (PiSSA: the rank-2r conversion); ``save_adapter`` writes it. Default: this branch."""
        return self

    def delta_weight(self, base_layer: nn.Module) -> Tensor:
        """The dense change dW of the base weight, same orientation as ``dense_weight(base_layer)``."""
        raise NotImplementedError

    def merged_weight(self, weight: Tensor, base_layer: nn.Module, scale: float = 1.0) -> Tensor:
        """W' such that the base layer with weight W' (and bias ``merged_bias``) computes what base + this adapter
        computes."""
        return weight + scale * self.delta_weight(base_layer).to(weight.dtype)

    def merged_bias(self, bias: Tensor | None, base_layer: nn.Module, scale: float = 1.0) -> Tensor | None:
        """The bias b' that goes with ``merged_weight`` (e.g. l * b for output scaling); ``bias`` itself (the same
        object) when the method leaves the bias alone, which is the default: merge then writes no bias."""
        return bias

    def peft_tensors(self) -> dict[str, Tensor]:
        """This branch's tensors under PEFT's key suffixes (``lora_A.weight``, ...)."""
        raise NotImplementedError

    def factors(self) -> tuple[Tensor, Tensor]:
        """2-D (B', A') with ``B' @ A'`` = dW in LoRA's parameter orientation ((out, fan_in); (dim, vocab) for an
        embedding; batched (E, out, r), (E, r, in) on an MoE expert stack), for ``combine``. A method whose update
        is no low-rank product raises ValueError with its own reason (one sentence, shown by ``combine`` and
        ``set_adapter``)."""
        raise ValueError(f"a {self.config.method} update is not an additive low-rank product B A.")

    def activation_bytes(self, act_bytes: int, adapter_bytes: int) -> int:
        """Bytes per token this branch keeps for backward beyond its base layer, with activations of ``act_bytes``
        and adapter tensors of ``adapter_bytes`` per element (the estimator asks every branch: it knows its kind,
        its layer's shape and name, and its own sizes). Default: one output-wide tensor. An older outside method's
        config-level ``activation_bytes(n_in, n_out, act_bytes, adapter_bytes)`` is still used."""
        n_in, n_out = self.in_out
        legacy = getattr(self.config, "activation_bytes", None)
        return act_bytes * n_out if legacy is None else legacy(n_in, n_out, act_bytes, adapter_bytes)

    def param_roles(self) -> dict[str, str]:
        """LoRA+ role of each own parameter (one of ``ROLES``): ``slow`` (lr), ``fast`` (lr * ratio), ``vector``
        (lr, no weight decay), ``embedding`` (embedding_lr). Default: 1-D tensors are vectors, the rest slow."""
        return {n: "vector" if p.ndim == 1 else "slow" for n, p in self.named_parameters(recurse=False)}


def build_branch(config: AdapterConfig, base_layer: nn.Module, shared: object, name: str) -> AdapterBranch:
    """``config.build(base_layer, shared, name)``; an older outside method's ``build(base_layer, shared)`` also works."""
    if _positional(type(config).build) >= 4:
        return config.build(base_layer, shared, name)
    return config.build(base_layer, shared)


def peft_config_of(config: AdapterConfig, targets: list[str], layers: Mapping[str, AdapterBranch]) -> dict:
    """``config.to_peft(targets, layers)``; an older outside method's ``to_peft(targets)`` also works."""
    if _positional(type(config).to_peft) >= 3:
        return config.to_peft(targets, layers)
    return config.to_peft(targets)


@functools.lru_cache(maxsize=None)
def _positional(fn: Callable) -> int:
    """How many positional arguments ``fn`` takes (self included); a large number for ``*args``."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 99
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
