"""The experts forward that runs adapted and NF4 expert stacks, selected for a model only after a probe proves it.

transformers' experts modules dispatch their forward on ``config._experts_implementation`` (``ExpertsInterface``:
"eager", "grouped_mm", ...), the way attention dispatches through ``AttentionInterface``. ``experts_forward`` is
registered there under ``NAME``. It is the families' eager loop, op for op, with each projection asked of its stack:

    for each expert e the router picked, with its tokens x and routing weights w:
        h = P_up(e, x) (+ b_up,e);   a = gate(h) (the module's ``_apply_gate``) or act(h)
        y = P_down(e, a) (+ b_down,e);   out[tokens] += w * y          (``index_add_``, as eager; its backward
                                                                       keeps only the indices)

where P(e, .) is a bare 3-D parameter's W_e (as eager), an ``ExpertWeights``/NF4 stack (NF4 dequantizes expert e
only, so only the experts the router picked) or an ``ExpertLayer`` (the stack plus its active adapters).

``use_experts_dispatch(model)`` selects it for a model once: a probe runs the model on 16 fixed tokens with the
family's eager experts and with ours, and keeps ours only if every experts module called it (call count) and the
outputs agree within 1e-5. Otherwise it raises a one-line ValueError naming the model type and the reason, and the
model keeps its implementation. Eager is the reference because it is each family's own definition (transformers'
grouped/batched kernels are tested against it); on float32 models grouped_mm agrees with it to ~1e-7.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_lora.core.experts import ExpertLayer, experts_modules

NAME = "lightning_lora_experts"
TOLERANCE = 1e-5
_PROBE_TOKENS = 16
_calls: dict[int, int] | None = None  # experts module id -> calls, while a probe counts


def experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """transformers' experts signature: (tokens, H) states, (tokens, k) expert indices and weights -> (tokens, H)."""
    if _calls is not None:
        _calls[id(self)] = _calls.get(id(self), 0) + 1
    if self._is_expert_parallel:
        raise RuntimeError(f"{type(self).__name__}: lightning_lora's experts forward does not run expert-parallel "
                           "modules; load the model without expert parallelism.")
    out = torch.zeros_like(hidden_states)
    total = hidden_states.shape[0]
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)  # (E, k, tokens)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
    up = "gate_up_proj" if self.has_gate else "up_proj"
    for e in hit:
        top_k_pos, token_idx = torch.where(mask[e])
        tokens = (token_idx, total)
        h = _project(self, up, e, hidden_states[token_idx], tokens)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        y = _project(self, "down_proj", e, h, tokens)
        if self.has_post_expert_norm:
            y = self.post_expert_norm(y)
        y = y * top_k_weights[token_idx, top_k_pos, None]
        out = _AddRows.apply(out, token_idx, y.to(out.dtype))
    return out


class _AddRows(torch.autograd.Function):
    """``out.index_add_(0, index, rows)``, eager's op, whose backward keeps the index only (torch's own keeps
    ``rows`` as well: one hidden-wide tensor per routed token and layer)."""

    @staticmethod
    def forward(ctx, out: Tensor, index: Tensor, rows: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.mark_dirty(out)
        return out.index_add_(0, index, rows)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        return grad, None, grad.index_select(0, index)


def _project(module: nn.Module, name: str, e: int, x: Tensor, tokens: tuple[Tensor, int]) -> Tensor:
    """Expert ``e``'s projection ``name`` of its tokens ``x`` (+ its bias), whatever holds the stack."""
    stack = getattr(module, name)  # a module shares its config, so its stacks may be anyone's (PEFT's included)
    if isinstance(stack, nn.Module):
        y = stack(x, e, tokens) if isinstance(stack, ExpertLayer) else stack(x, e)
    else:
        w = stack[e]
        y = x @ w if module.is_transposed else F.linear(x, w)
    if module.has_bias:
        y = y + getattr(module, f"{name}_bias")[e]
    return y


def _register() -> None:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(NAME, experts_forward)


def runs_our_experts(model: nn.Module) -> bool:
    """True when every experts module of ``model`` runs ``experts_forward``."""
    experts = experts_modules(model).values()
    return bool(experts) and all(m.config._experts_implementation == NAME for m in experts)


def use_experts_dispatch(model: nn.Module) -> None:
    """Select ``experts_forward`` for every experts module of ``model``, after the probe (module docstring).

    Raises:
        ValueError: ``MoE experts of <model type>: <why>``: no Hugging Face model around the experts to probe, a
            module that never called it, or outputs that moved. The model keeps its own implementation.
    """
    experts = experts_modules(model)
    if not experts or runs_our_experts(model) or next(model.parameters()).is_meta:
        return  # nothing to do, done, or shapes only (the estimator's meta model: nothing can run, nothing to prove)
    _register()
    top = next((m for m in model.modules() if _is_hf(m)), None)
    kind = getattr(getattr(top, "config", None), "model_type", None) or type(model).__name__
    if top is None:
        raise ValueError(f"MoE experts of {kind}: the probe that proves lightning_lora's experts forward needs the "
                         "Hugging Face model around them (a PreTrainedModel); pass that model.")
    configs = {id(m.config): m.config for m in experts.values()}
    before = {key: c._experts_implementation_internal for key, c in configs.items()}
    why = _probe(top, experts, configs)
    if why:
        for key, config in configs.items():
            config._experts_implementation_internal = before[key]
        raise ValueError(f"MoE experts of {kind}: lightning_lora's experts forward is not used, so its experts can "
                         f"be neither adapted nor quantized: {why}. Exclude them (exclude_modules=['experts'], NF4 "
                         "skip_modules=('lm_head', 'experts')).")


def _probe(top: nn.Module, experts: dict[str, nn.Module], configs: dict) -> str | None:
    global _calls
    config = top.config.get_text_config() if hasattr(top.config, "get_text_config") else top.config
    high = min(int(getattr(config, "vocab_size", 2) or 2), 1000)
    param = next(top.parameters())
    ids = torch.randint(0, high, (1, _PROBE_TOKENS), generator=torch.Generator().manual_seed(0)).to(param.device)
    with torch.no_grad(), _eval(top):
        _select(configs, "eager")
        reference = _output(top, ids)
        _select(configs, NAME)
        _calls = {}
        try:
            ours = _output(top, ids)
            calls = _calls
        finally:
            _calls = None
    idle = [n for n, m in experts.items() if not calls.get(id(m))]
    if idle:
        return f"{len(idle)} of {len(experts)} experts modules never called it (e.g. {idle[0]})"
    diff = (reference.float() - ours.float()).abs().max().item()
    if not diff <= TOLERANCE:
        return f"the outputs moved by {diff:.2g} (> {TOLERANCE:g}) on a {_PROBE_TOKENS}-token probe"
    return None


def _select(configs: dict, name: str) -> None:
    for config in configs.values():
        config._experts_implementation_internal = name


def _output(model: nn.Module, ids: Tensor) -> Tensor:
    out = model(input_ids=ids, use_cache=False)
    for field in ("logits", "last_hidden_state"):
        if getattr(out, field, None) is not None:
            return getattr(out, field)
    return out[0]


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _is_hf(module: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(module, PreTrainedModel)
