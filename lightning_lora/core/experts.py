"""MoE experts as adapter targets: the stacked 3-D expert parameters of transformers' experts modules.

transformers 5 keeps the E experts of an MoE layer as stacked parameters of one experts module, run through
``transformers.integrations.moe`` (``use_experts_implementation``): Mixtral, Qwen3-MoE, DeepSeek-V3, ... hold
``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I); gpt-oss holds them transposed, (E, H, 2I) and (E, I, H), with
biases (E, 2I) and (E, H). Expert e maps its tokens x to ``W_e x (+ b_e)``.

A target is named ``<experts module>.<parameter>``, as PEFT's ``target_parameters`` names it. Once adapted, that
parameter's place on the experts module holds an ``ExpertLayer`` (an ``AdapterLayer``) whose base is an
``ExpertWeights`` stack around the very same parameter (or the NF4 stack of ``quant/nf4_experts.py``); ``remove`` puts
the parameter itself back. The experts' forward (``experts_dispatch.py``) calls each stack one expert at a time, so
adapters see expert e's tokens and add

    dW_e x = s B_e A_e dropout(x),     A_e: (r, in),  B_e: (out, r)

stored as PEFT's ParamWrapper stores them (``peft.tuners.lora.layer.ParamWrapper``): A (r E, in) holds the experts'
A_e one after the other (rows e r .. e r + r - 1); B (out, r E) interleaves them rank-major, PEFT reading it as
``B.reshape(out, r, E)``: expert e's columns are e, e + E, ..., e + (r - 1) E. ``expert_factors``/``stacked_factors``
convert between the two. A stack's dense weight (``dense_weight``, merges, ``original_weights``) keeps its own layout:
(E, out, in), or (E, in, out) when the module says ``is_transposed`` (gpt-oss), where dW_e is stored as (B_e A_e)^T.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_lora.core.kinds import LayerKind, kind_of, register_kind
from lightning_lora.core.wrapper import AdapterLayer

log = logging.getLogger(__name__)

STACKS = ("gate_up_proj", "up_proj", "down_proj")  # the names transformers' experts functions read, in __init__ order


def dispatches(module: nn.Module) -> bool:
    """True for an experts module set up by transformers' ``use_experts_implementation`` (its forward dispatches on
    ``config._experts_implementation``)."""
    return all(hasattr(module, a) for a in ("has_gate", "is_transposed", "_is_expert_parallel", "config"))


def experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The dispatching experts modules of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if dispatches(m)}


def top_k(experts: nn.Module) -> int:
    """Experts per token of an experts module (its config's ``num_experts_per_tok``)."""
    return int(getattr(experts.config, "num_experts_per_tok", None) or 1)


def stacks_of(module: nn.Module) -> list[str]:
    """The expert stacks of a dispatching experts module, in the order its ``__init__`` registers them."""
    return [s for s in STACKS if s in module._parameters or s in module._modules]


def expert_stacks(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Every expert stack of ``model``: ``"<experts module>.<stack>"`` -> (experts module, stack name). The stack
    itself is a 3-D parameter, an ``ExpertWeights``/NF4 stack, or an ``ExpertLayer`` around one."""
    return {f"{n}.{s}": (m, s) for n, m in experts_modules(model).items() for s in stacks_of(m)}


def foreign_expert_tensors(model: nn.Module) -> dict[str, str]:
    """3-D floating-point parameters outside dispatching experts modules (e.g. Llama-4's experts): name -> owner class.
    Nothing here can run them one expert at a time, so they are neither adapted nor quantized."""
    ours = set(expert_stacks(model))
    out = {}
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            if p.ndim == 3 and p.is_floating_point() and full not in ours:
                out[full] = type(module).__name__
    return out


def foreign_reason(owner: str) -> str:
    return (f"a 3-D parameter of {owner}, which does not dispatch through transformers' ExpertsInterface, so it "
            "cannot be run one expert at a time")


class ExpertWeights(nn.Module):
    """A stack of E expert matrices: the experts module's own 3-D parameter, (E, out, in) or, ``transposed``,
    (E, in, out). ``forward(x, expert)`` = x W_e^T (x W_e when transposed). ``top_k``: experts per token."""

    def __init__(self, weight: nn.Parameter, transposed: bool, top_k: int = 1):
        super().__init__()
        self.weight = weight
        self.transposed, self.top_k = bool(transposed), top_k

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    @property
    def in_out(self) -> tuple[int, int]:
        _, a, b = self.weight.shape
        return (a, b) if self.transposed else (b, a)

    def forward(self, x: Tensor, expert: int) -> Tensor:
        w = self.weight[expert]
        return x @ w if self.transposed else F.linear(x, w)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, in_out={self.in_out}, transposed={self.transposed}"


class ExpertView:
    """What an adapter branch sees as its base layer inside one expert's call: the stack and the expert index."""

    __slots__ = ("stack", "expert")

    def __init__(self, stack: nn.Module, expert: int):
        self.stack, self.expert = stack, expert

    @property
    def num_experts(self) -> int:
        return self.stack.num_experts

    def __getattr__(self, name: str):
        return getattr(self.stack, name)


class ExpertLayer(AdapterLayer):
    """An expert stack with adapter branches: ``forward(x, expert, tokens)`` is expert ``expert``'s projection of its
    tokens ``x`` with the active adapters; ``tokens = (indices, total)`` places them in the flattened batch, for a
    mixed batch (``per_sample_adapters``: batch row = index // (total // batch size))."""

    def forward(self, x: Tensor, expert: int, tokens: tuple[Tensor, int] | None = None) -> Tensor:
        stack = self.base_layer
        call = lambda h: stack(h, expert)  # noqa: E731
        if not self.enabled:
            return call(x)
        view = ExpertView(stack, expert)
        names = self.sample_adapters
        if names is None:
            return self.run(x, call, view)
        if tokens is None or tokens[1] % len(names):
            raise ValueError(f"mixed batch: {len(names)} adapter names do not divide the batch's tokens evenly.")
        rows = (tokens[0] // (tokens[1] // len(names))).tolist()
        return self.run_per_row(x, [names[r] for r in rows], call, view)


def expert_factors(A: Tensor, B: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """PEFT's stacked A (r E, in), B (out, r E) -> per-expert (E, r, in), (E, out, r) (module docstring)."""
    E = num_experts
    return A.reshape(E, -1, A.shape[-1]), B.reshape(B.shape[0], -1, E).permute(2, 0, 1)


def stacked_factors(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """Per-expert A (E, r, in), B (E, out, r) -> PEFT's stacked (r E, in), (out, r E); the inverse of
    ``expert_factors``."""
    E, r, n_in = A.shape
    return A.reshape(E * r, n_in), B.permute(1, 2, 0).reshape(B.shape[1], r * E)


def expert_pair(x: Tensor, A: Tensor, B: Tensor, view: ExpertView, p: float) -> Tensor:
    """B_e A_e dropout_p(x) for expert ``view.expert`` of a stack (unscaled): A_e is a block of A's rows, B_e every
    E-th column of B."""
    E, e = view.num_experts, view.expert
    r = A.shape[0] // E
    h = F.linear(F.dropout(x, p) if p else x, A[e * r : (e + 1) * r])
    return F.linear(h, B[:, e::E])


def _write_stack(stack: ExpertWeights, new_weight: Tensor, dtype: torch.dtype | None = None) -> ExpertWeights:
    """Write a merged stack (its own layout) into the stack's parameter, in place."""
    with torch.no_grad():
        stack.weight.copy_(new_weight)
    return stack


def stack_kind(**fields) -> LayerKind:
    """A layer kind for expert stacks (``fields`` override the dense stack's entries, e.g. for NF4)."""
    base = dict(
        name="experts",
        matches=lambda m: isinstance(m, ExpertWeights),
        in_out=lambda m: m.in_out,
        dense_weight=lambda m: m.weight,
        write_back=_write_stack,
        pair_shapes=lambda m, r: ((r * m.num_experts, m.in_out[0]), (m.in_out[1], r * m.num_experts)),
        apply_pair=expert_pair,
        bias=lambda m: None,  # a stack's biases stay on the experts module; no method here changes them
        experts=True,
        wrap=ExpertLayer,
        restore=lambda m: m.weight,
    )
    return LayerKind(**{**base, **fields})


EXPERTS_KIND = register_kind(stack_kind())


_ORDER = "_lightning_lora_parameter_order"  # an experts module's parameter names before a stack left them


def place(owner: nn.Module, name: str, value: object) -> None:
    """``setattr(owner, name, value)`` where a module may take a parameter's place and the parameter come back: it
    then comes back at its own position among ``owner``'s parameters (the state dict's order, PEFT's nesting)."""
    if isinstance(value, nn.Module) and name in owner._parameters:
        owner.__dict__.setdefault(_ORDER, list(owner._parameters))
        del owner._parameters[name]
    setattr(owner, name, value)
    order = owner.__dict__.get(_ORDER)
    if isinstance(value, nn.Parameter) and order:
        rank = {n: i for i, n in enumerate(order)}
        params = sorted(owner._parameters.items(), key=lambda kv: rank.get(kv[0], len(rank)))
        owner._parameters.clear()
        owner._parameters.update(params)


def stack_at(model: nn.Module, target: str) -> nn.Module:
    """The module at ``target``; a bare 3-D expert parameter there comes as an ``ExpertWeights`` around it."""
    module_name, _, stack = target.rpartition(".")
    owner = model.get_submodule(module_name)
    value = getattr(owner, stack, None)
    if isinstance(value, nn.Parameter) and dispatches(owner) and value.ndim == 3:
        return ExpertWeights(value, owner.is_transposed, top_k(owner))
    return model.get_submodule(target)


def is_stack(module: nn.Module) -> bool:
    """True for an expert stack (dense, NF4) or an ``ExpertLayer`` around one."""
    base = module.base_layer if isinstance(module, AdapterLayer) else module
    kind = kind_of(base)
    return kind is not None and kind.experts


def parameter_matches(key: str, names: Iterable[str]) -> bool:
    """PEFT's ``target_parameters`` rule: the key equals a name or ends with ``"." + name``."""
    return any(key == n or key.endswith("." + n) for n in names)


def select_stacks(model: nn.Module, names: Sequence[str], stacks: Iterable[str], where: str) -> list[str]:
    """The names of ``stacks`` that ``names`` select under PEFT's rule.

    Raises:
        ValueError: ``<where>: ...`` for a name that selects no expert stack, saying what it selects instead (a 3-D
            tensor of experts that do not dispatch, another parameter such as a router's weight, nothing) and
            listing the stacks.
    """
    stacks = list(stacks)
    chosen = [n for n in stacks if parameter_matches(n, names)]
    foreign = foreign_expert_tensors(model)
    for name in names:
        if any(parameter_matches(n, [name]) for n in chosen):
            continue
        hit = next((k for k in foreign if parameter_matches(k, [name])), None)
        other = next((k for k, _ in model.named_parameters() if parameter_matches(k, [name])), None)
        if hit:
            what = f"selects {hit!r}, {foreign_reason(foreign[hit])}"
        elif other:
            what = (f"selects {other!r}, which is no MoE expert stack (lightning_lora adapts those; PEFT's "
                    "all-linear also targets MoE routers through its transformers-v4 conversion)")
        else:
            what = "selects no parameter"
        shown = sorted({".".join(n.split(".")[-2:]) for n in stacks}) or ["none"]
        raise ValueError(f"{where}: {name!r} {what}. Expert stacks of {type(model).__name__}: {', '.join(shown)}.")
    return chosen


def find_stacks(
    model: nn.Module,
    target_parameters: Sequence[str] | None,
    all_linear: bool,
    excluded: Callable[[str], bool],
    supports: Callable[[LayerKind], bool] | None,
    method: str,
) -> list[str]:
    """The expert stacks an adapter targets: every one under ``all_linear`` (when ``method`` adapts them, else they
    are left out with a warning), and those ``target_parameters`` names (PEFT's rule). ``excluded(name)`` drops a
    stack by its own name or its experts module's.

    Raises:
        ValueError: a name in ``target_parameters`` selects no expert stack (``select_stacks``), or ``method``
            cannot adapt expert stacks.
    """
    stacks = [n for n in expert_stacks(model) if not excluded(n) and not excluded(n.rpartition(".")[0])]
    names = list(target_parameters or [])
    chosen = select_stacks(model, names, stacks, "target_parameters")
    foreign = foreign_expert_tensors(model)
    if all_linear:
        chosen = list(dict.fromkeys([*chosen, *stacks]))
    if not chosen:
        if all_linear and foreign:
            first = next(iter(foreign))
            log.warning(f'target_modules="all-linear" leaves out {len(foreign)} expert tensor(s) of '
                        f"{type(model).__name__} (e.g. {first}): {foreign_reason(foreign[first])}.")
        return []
    first = stack_at(model, chosen[0])
    kind = kind_of(first.base_layer if isinstance(first, AdapterLayer) else first)
    if supports is not None and not supports(kind):
        why = (f"{method} cannot adapt MoE expert stacks: PEFT's target_parameters format (its ParamWrapper) holds "
               "plain LoRA only, so such an adapter could be neither saved nor loaded anywhere")
        if names:
            raise ValueError(f"{why}; use LoRA for the experts, or drop target_parameters.")
        log.warning(f'target_modules="all-linear" leaves out the {len(chosen)} expert stacks of '
                    f"{type(model).__name__}: {why}.")
        return []
    if all_linear:
        experts = "/".join(map(str, sorted({stack_at(model, n).num_experts for n in chosen})))
        kinds = ", ".join(dict.fromkeys(n.rpartition(".")[2] for n in chosen))
        left = f"; left out, not dispatching: {len(foreign)} tensor(s) ({next(iter(foreign))})" if foreign else ""
        log.info(f'target_modules="all-linear" adapts the MoE experts too: {len(chosen)} expert stacks ({kinds}) '
                 f"of {experts} experts each{left}.")
    return chosen
