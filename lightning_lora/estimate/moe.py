"""What ``estimate`` needs to know of MoE models: total vs active parameters, NF4 of the experts, MLP activations.

Read from the meta-device model (``memory.py``), per decoder layer with an experts module (``core/experts.py``), with
E experts of intermediate size I, k of them per token (``num_experts_per_tok``), hidden size h, a activation bytes:

- parameters: the stacks hold E experts, a token uses k: active = total - (1 - k/E) x (expert stack parameters).
- NF4: each expert of a stack is its own NF4 tensor (``quant/nf4_experts.py``): E tensors of (a, b) where the row b
  is a multiple of the block; ``memory.nf4_bytes`` each.
- activations per token of an MoE layer, replacing a dense MLP's a (h + 4m) (measured tensor by tensor with
  ``torch.autograd.graph.saved_tensors_hooks`` on Mixtral, Qwen3-MoE and gpt-oss, frozen base; the same for
  transformers' grouped_mm and for ``core/experts_dispatch.py``):

      a k (h + g I)          per routed token: its output y (the router's weight multiplies it) and the gate's
                             tensors, the gate_up output and act(gate): g = 3 for the gated SiLU, g = 6 for a
                             family's own gate (gpt-oss's clamped SwiGLU)
    + 4E + 36k               the router's fp32 probabilities and the routing indices
    + a 4 m_s                shared experts (a dense gated MLP of width m_s: DeepSeek-V3, Qwen2-MoE)

  An adapter on a stack adds its own (the branch's ``activation_bytes``: LoRA keeps, per routed token, the expert's
  input, which the frozen base does not keep, and its r-wide A x).
"""

from __future__ import annotations

import re

from torch import nn

from lightning_lora.core.experts import expert_stacks, experts_modules, stack_at, top_k
from lightning_lora.quant.nf4_experts import unsupported_stack


def expert_params(model: nn.Module) -> tuple[int, int]:
    """(parameters in expert stacks, of those the ones a token uses: k/E of each stack)."""
    total = active = 0
    for name, (module, _) in expert_stacks(model).items():
        stack = stack_at(model, name)
        n = stack.weight.numel()
        total += n
        active += n * top_k(module) // stack.num_experts
    return total, active


def nf4_expert_numels(model: nn.Module, blocksize: int = 64) -> list[int]:
    """The sizes of the NF4 tensors ``quantize`` makes of the expert stacks: one per expert, (a * b) each."""
    out = []
    for name in expert_stacks(model):
        weight = stack_at(model, name).weight
        if unsupported_stack(weight, blocksize) is None:
            out += [weight[0].numel()] * weight.shape[0]
    return out


def mlp_bytes(model: nn.Module, config, a: int) -> dict[int, int]:
    """Activation bytes per token of each MoE layer's MLP, by decoder layer index (module docstring); dense layers
    are not listed (``memory.py`` counts them)."""
    h = config.hidden_size
    out = {}
    modules = dict(model.named_modules())
    for name, experts in experts_modules(model).items():
        found = re.search(r"\.layers\.(\d+)\.", "." + name)
        if not found:
            continue
        k, block = top_k(experts), name.rpartition(".")[0]
        E = stack_at(model, f"{name}.down_proj").num_experts
        inter = stack_at(model, f"{name}.down_proj").in_out[0]
        own_gate = getattr(type(experts)._apply_gate, "__name__", "") != "_default_apply_gate"
        total = a * k * (h + (6 if own_gate else 3) * inter) + 4 * E + 36 * k
        for sub, module in modules.items():  # shared experts: a gated MLP beside the experts
            if sub.startswith(block + ".") and not sub.startswith(name) and isinstance(module, nn.Linear) and (
                    sub.endswith(".gate_proj")):
                total += a * 4 * module.out_features
        out[int(found.group(1))] = total
    return out
