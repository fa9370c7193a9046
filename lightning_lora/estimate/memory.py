"""Will a fine-tune fit? Memory of an adapter fine-tune from architecture numbers (``python -m lightning_lora
estimate`` parses and prints; the maths is here).

Parameters are counted exactly: the model is built on the meta device (no memory, no download) from a preset, a
``config.json`` or a local Hugging Face folder (``presets.py``), and our own ``inject`` puts the real branches of any
registered method on it (``lora``, ``dora``, ``vera``, an outside method by name once its module is imported, or a
``module.Class`` path), so target matching and per-layer options are the library's, and the method is asked, layer by
layer, what it keeps for backward (``AdapterBranch.activation_bytes``). ``r`` is passed only to a method that has one.
Bytes by kind (GB = 1e9 bytes, GiB = 2**30):

- weights: every base parameter at ``--dtype``; with ``--quantize nf4`` the ``nn.Linear`` layers that ``"all-linear"``
  selects (not the output head) and ``quantize`` accepts (not GPT-2's Conv1D, no input width off the block) are NF4,
  block 64: 4 bits + one absmax per block, fp32 (4.5 bits/param) or, with
  double quantization (QLoRA, arXiv:2305.14314, section 3), 8-bit absmax + one fp32 per 256 blocks
  (4 + 8/64 + 32/(64*256) = 4.127 bits/param). Embeddings, norms and lm_head stay at ``--dtype``.
- adapters, gradients: trainable parameters at ``--adapter-dtype`` (default ``--dtype``, as the QLoRA reference code
  casts its LoRA modules to bf16); VeRA adds its shared frozen projections (r x max_in + max_out x r).
- optimizer: torch AdamW keeps exp_avg and exp_avg_sq in the parameter's dtype (2 x adapter bytes per param, plus a
  4-byte step per tensor); bitsandbytes AdamW8bit 2 bytes + fp32 absmax per 256-block per state; SGD (no momentum) 0.
- activations, per decoder layer and token, for a Llama block with SDPA/flash attention (no s^2 score matrix; eager
  attention would add 4 x heads x seq bytes per token), a = activation bytes (``--dtype``), counting the tensors
  autograd keeps for backward (the approach of Korthikanti et al., arXiv:2205.05198, section 4, redone for HF Llama
  and checked tensor by tensor with ``torch.autograd.graph.saved_tensors_hooks`` on CPU):

      8h + 8              two RMSNorms keep their input in fp32 (HF upcasts) and the fp32 1/rms
    + a (3h + 2 kv)       q/k/v input (norm output), q and k after RoPE, v (kv = kv_heads x head_dim), attention output
    + 4 heads             SDPA's fp32 logsumexp
    + a (h + 4m)          gate/up input (norm output); gate, silu(gate), up, product (m = intermediate size)
    + per adapted linear  its branch's own ``activation_bytes`` (the method contract): LoRA: a r; DoRA: a (r + out);
                          VeRA: a (2r + out), with each layer's own r; for LoRA/DoRA an adapter dtype other than
                          ``--dtype`` adds the input cast to it (in x adapter bytes)

  i.e. 8h + 8 + a (4h + 2kv + 4m) + 4 heads, ~366 kB per token per layer for Llama-2-70B in bf16. Lean activations
  (``train/lean.py``, ``LoRAModule(lean_activations=True)``, the default here; ``lean_activations=False`` for the
  above): an RMSNorm keeps its input in its own dtype and the fp32 1/rms (2 (a h + 4) for the two), the norm outputs
  that q/k/v and gate/up keep are rebuilt in backward (a 2h less; an MoE layer's router and experts still keep theirs),
  and a SwiGLU MLP keeps gate and up only (a 2m, not a 4m): 2 (a h + 4) + a (2h + 2kv + 2m) + 4 heads, ~185 kB for
  Llama-2-70B in bf16 (norms: config has ``rms_norm_eps``; SwiGLU: ``hidden_act`` silu). Without
  checkpointing all L layers are kept; with gradient checkpointing (every decoder layer) each layer's input (a h per
  token) plus one layer recomputed in backward. Always added: the final norm's input (4h + 4, lean a h + 4), RoPE's
  cos and sin (2 a head_dim per token, shared by the layers) and the loss's
  term. Hugging Face's loss (``--loss-chunk-size 0``) holds every position's logits: positions x vocab x 12 bytes,
  the peak of forward (logits at ``--dtype`` + fp32 copy + fp32 log-softmax) and of its backward (saved
  log-softmax + two fp32 gradients). The labeled-only loss of ``LoRAModule`` (``train/loss.py``, the default here)
  holds one chunk of ``--loss-chunk-size`` rows (256; at most the tokens) at a time, computing its gradient in
  forward: chunk x vocab x (4 + a) bytes (fp32 logits turned into their gradient in place, plus the ``--dtype``
  copy the matmul reads; 4 in fp32), plus the gathered labeled hidden states (a h per token, an upper bound: every
  token labeled), plus their gradient, kept until backward (a h per token). The loss runs after the last layer and
  before backward recomputes any layer, so with checkpointing the peak is the kept layer inputs and loss gradient +
  the larger of the two.
  Packing (``--packing``) lays examples end to end: batch x seq counts real tokens, and transformers' sdpa/eager
  path adds a block-diagonal boolean mask (batch x seq x seq bytes; none with a varlen flash-attention kernel).
  Assumed: no dropout (a mask adds 1 byte per adapted input); frozen embeddings (the first layer then keeps a little
  less: an upper bound).
- overhead: a fixed 0.5 GB for the CUDA context, cuBLAS workspace and allocator slack (``--overhead-gb``); the
  context alone is ~0.3-0.5 GB on recent GPUs with lazy module loading. Fragmentation beyond that is not modelled.

It fits when the total is at most ``--gpu-memory`` GB (1e9 bytes; note a "48 GB" card holds 48 GiB = 51.5 GB).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re

import torch
from torch import nn

from lightning_lora.core.dtypes import dtype_name, parse_dtype
from lightning_lora.core.experts import experts_modules
from lightning_lora.core.imports import method_class
from lightning_lora.core.kinds import in_out_features
from lightning_lora.core.layer import METHODS, AdapterConfig
from lightning_lora.core.targets import find_targets
from lightning_lora.core.verbs import inject, layer_map, remove
from lightning_lora.quant.nf4 import unsupported_shape
from lightning_lora.estimate import moe
from lightning_lora.estimate.presets import model_config
from lightning_lora.train.checkpointing import check_mode

OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
GB, GIB = 10**9, 2**30


@functools.lru_cache(maxsize=2)
def _meta_model(config_json: str) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = json.loads(config_json)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def adapter_names() -> list[str]:
    """The registered methods' names, lower case (``--adapter`` choices; a ``module.Class`` path also works)."""
    return [name.lower() for name in METHODS]


def adapter_config(adapter: str | AdapterConfig, r: int | None, target_modules) -> AdapterConfig:
    """An adapter config: ``adapter`` itself, or the method ``adapter`` names (``core/imports.method_class``) on
    ``target_modules``, with ``r`` when given (refused for a method that has no rank) or else the method's default."""
    if isinstance(adapter, AdapterConfig):
        return adapter
    try:
        cls = method_class(adapter)
    except ValueError as err:
        raise ValueError(str(err).replace("registered methods:", "choose one of")) from None
    fields = {f.name for f in dataclasses.fields(cls)}
    if r is not None and "r" not in fields:
        raise ValueError(f"{cls.method} has no rank r; leave --r out (its options: {', '.join(sorted(fields))}).")
    return cls(target_modules=target_modules, **({} if r is None else {"r": r}))


def count(config, adapter: AdapterConfig, act_bytes: int, adapter_bytes: int) -> dict:
    """Exact counts on a meta-device model with ``adapter`` injected (then removed again), and what each adapted
    layer's branch keeps for backward per token (``extra``: name -> bytes, asked of the branch)."""
    model = _meta_model(config.to_json_string(use_diff=False))
    base = sum(p.numel() for p in model.parameters())
    linears = [model.get_submodule(n) for n in find_targets(model, "all-linear", list(experts_modules(model)))]
    # what quantize() turns into NF4: nn.Linear (not GPT-2's Conv1D) of a shape bitsandbytes holds correctly
    quantizable = [m.weight.numel() for m in linears if isinstance(m, nn.Linear) and unsupported_shape(m, 64) is None]
    quantizable += moe.nf4_expert_numels(model)  # MoE experts: each its own NF4 tensor
    experts, active_experts = moe.expert_params(model)
    mlp = moe.mlp_bytes(model, config, act_bytes)
    inject(model, adapter)
    try:
        branches = layer_map(model, "default")
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        tensors = sum(1 for p in model.parameters() if p.requires_grad)
        shapes = {n: in_out_features(model.get_submodule(n).base_layer) for n in branches}
        extra = {n: b.activation_bytes(act_bytes, adapter_bytes) for n, b in branches.items()}
        ranks = {n: getattr(b, "r", None) for n, b in branches.items()}
        shared = next(iter(branches.values())).shared
        frozen = sum(t.numel() for t in adapter.shared_tensors(shared).values())  # VeRA's projections
    finally:
        remove(model)
    return dict(base=base, trainable=trainable, tensors=tensors, quantizable=quantizable, shapes=shapes, frozen=frozen,
                extra=extra, ranks=ranks, experts=experts, active=base - experts + active_experts, moe=mlp)


def nf4_bytes(numel: int, double_quant: bool = True, blocksize: int = 64) -> int:
    """Bytes bitsandbytes stores for one NF4 tensor: packed 4-bit data, an absmax per block (fp32, or with double
    quantization uint8 + an fp32 absmax per 256 blocks + an fp32 offset) and the code tables (16 / 256 fp32)."""
    blocks = math.ceil(numel / blocksize)
    absmax = blocks + 4 * math.ceil(blocks / 256) + 4 + 1024 if double_quant else 4 * blocks
    return math.ceil(numel / 2) + absmax + 64


def logits_bytes(config, batch: int, seq: int, a: int, loss_chunk_size: int) -> int:
    """The loss's peak (module docstring): every position's logits x 12 bytes (Hugging Face's, ``loss_chunk_size``
    0), or one chunk's x (4 + a) plus the gathered labeled rows and their kept gradient (``train/loss.py``)."""
    tokens = batch * seq
    if loss_chunk_size <= 0:
        return tokens * 12 * config.vocab_size
    per_logit = 4 + (a if a != 4 else 0)
    return min(loss_chunk_size, tokens) * per_logit * config.vocab_size + 2 * tokens * a * config.hidden_size


def activation_bytes(config, extra: dict[str, int], batch: int, seq: int, a: int, checkpointing: bool,
                     loss_chunk_size: int = 0, packing: bool = False, offload: bool = False,
                     moe_mlp: dict[int, int] | None = None, lean: bool = True) -> int:
    """Peak activation bytes kept for backward on the device (formula in the module docstring); ``extra`` holds each
    adapted layer's own bytes per token (``count``), ``moe_mlp`` the MLP bytes per token of MoE layers (``moe.py``),
    ``lean`` the lean activations of ``train/lean.py``."""
    h, m, L, heads = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = head_dim * (getattr(config, "num_key_value_heads", None) or heads)
    moe_mlp = moe_mlp or {}
    lean_norm = lean and hasattr(config, "rms_norm_eps")  # train/lean_swap.py swaps RMSNorms, SiLU-gated MLPs
    lean_mlp = lean and getattr(config, "hidden_act", None) in ("silu", "swish")
    norm = a * h + 4 if lean_norm else 4 * h + 4  # one norm's kept input and fp32 1/rms
    # the MLP's own intermediates (gate, act(gate), up, product; lean: gate, up; an MoE layer's: moe.py, its input
    # kept), dropped by "mlp" checkpointing; attention: q/k/v's input (norm output), q, k, v, attention output
    dense_mlp = a * (2 if lean_mlp else 4) * m
    mlp = [moe_mlp[i] - (0 if lean_norm else a * h) if i in moe_mlp else dense_mlp for i in range(L)]
    attention = a * (2 * h + 2 * kv) + (0 if lean_norm else 2 * a * h)  # + gate/up's input (norm output)
    per_layer = [2 * norm + attention + own + 4 * heads for own in mlp]
    for name, own in extra.items():
        found = re.search(r"\.layers\.(\d+)\.", "." + name)
        if found:
            per_layer[int(found.group(1))] += own
            if ".mlp." in "." + name:
                mlp[int(found.group(1))] += own
    tokens = batch * seq
    loss = logits_bytes(config, batch, seq, a, loss_chunk_size)
    mask = batch * seq * seq if packing else 0
    norm_and_mask = tokens * (norm + 2 * a * head_dim) + mask  # the final norm's input, RoPE's cos and sin
    if offload:  # saved tensors live in host memory; one layer's come back (with checkpointing: its input too)
        return mask + max(tokens * (max(per_layer) + a * h), loss)
    if checkpointing == "mlp":  # each MLP keeps its input (already counted); backward recomputes one MLP at a time
        return tokens * (sum(per_layer) - sum(mlp)) + norm_and_mask + max(tokens * max(mlp), loss)
    if checkpointing:
        kept_loss_grad = tokens * a * h if loss_chunk_size > 0 else 0  # the rows' gradient, until backward
        return tokens * L * a * h + norm_and_mask + kept_loss_grad + max(tokens * max(per_layer), loss - kept_loss_grad)
    return tokens * sum(per_layer) + norm_and_mask + loss


def estimate(model: str = "llama-2-70b", adapter: str | AdapterConfig = "lora", r: int | None = None,
             target_modules="all-linear",
             quantize: str | None = None, double_quant: bool = True, batch_size: int = 1, seq_len: int = 2048,
             gradient_checkpointing: bool = False, gpu_memory: float | None = None, dtype: str = "bf16",
             adapter_dtype: str | None = None, optimizer: str = "adamw", overhead_gb: float = 0.5,
             loss_chunk_size: int = 256, packing: bool = False, offload_activations: bool = False,
             lean_activations: bool = True) -> dict:
    """Parameter counts and bytes by kind (see the module docstring); ``fits`` is None without ``gpu_memory`` (GB).

    ``adapter`` is a config or a method's name or class path; ``r`` only for a method with a rank (None: its default).
    ``dtype`` (weights, activations) and ``adapter_dtype`` take any dtype name (``bf16``, ``bfloat16``, ...); ``auto``
    reads the model config's own dtype.
    """
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r <= 0):
        raise ValueError(f"r (the rank) must be a positive integer, got {r!r}.")
    if batch_size <= 0 or seq_len <= 0:
        raise ValueError(f"batch size and sequence length must be positive, got {batch_size} x {seq_len}.")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}.")
    if quantize not in (None, "none", "nf4"):
        raise ValueError(f"unknown quantization {quantize!r}; use nf4 (or leave it out).")
    quantize = None if quantize == "none" else quantize
    config, cfg = model_config(model), adapter_config(adapter, r, target_modules)
    dtype = _dtype(dtype, config, "dtype")
    adapter_dtype = dtype if adapter_dtype is None else _dtype(adapter_dtype, config, "adapter_dtype")
    a, ab = dtype.itemsize, adapter_dtype.itemsize
    c = count(config, cfg, a, ab)
    r = getattr(cfg, "r", None)
    quantized = sum(c["quantizable"]) if quantize else 0
    weights = (c["base"] - quantized) * a + sum(nf4_bytes(n, double_quant) for n in c["quantizable"] if quantize)
    adapters = (c["trainable"] + c["frozen"]) * ab
    states = {"adamw": 2 * c["trainable"] * ab + 4 * c["tensors"],
              "adamw8bit": 2 * c["trainable"] + 8 * math.ceil(c["trainable"] / 256), "sgd": 0}[optimizer]
    if loss_chunk_size < 0:
        raise ValueError(f"loss chunk size must be >= 0 (0: Hugging Face's unchunked loss), got {loss_chunk_size}.")
    check_mode(gradient_checkpointing)
    act = {ckpt: activation_bytes(config, c["extra"], batch_size, seq_len, a, ckpt, loss_chunk_size, packing,
                                  moe_mlp=c["moe"], lean=lean_activations)
           for ckpt in (False, True, "mlp")}  # fmt: skip
    on_device = act[gradient_checkpointing]
    if offload_activations:
        on_device = activation_bytes(config, c["extra"], batch_size, seq_len, a, gradient_checkpointing,
                                     loss_chunk_size, packing, offload=True, moe_mlp=c["moe"], lean=lean_activations)
    kinds = dict(weights_bytes=weights, adapter_bytes=adapters, gradient_bytes=c["trainable"] * ab,
                 optimizer_bytes=states, activation_bytes=on_device,
                 overhead_bytes=int(overhead_gb * GB))
    total = sum(kinds.values())
    notes = [note] if (note := _naive_note(config, c)) else []
    if gpu_memory is not None and 0 <= gpu_memory * GB - total < 0.05 * gpu_memory * GB:
        notes.append(f"Tight: under 5% headroom in {gpu_memory:g} GB; allocator fragmentation and backward transients "
                     "are not modelled (shorter sequences, --optimizer adamw8bit or a smaller r give room).")
    return dict(
        model=model, adapter=adapter if isinstance(adapter, str) else cfg.method, r=r, target_modules=target_modules,
        quantize=quantize, double_quant=bool(quantize) and double_quant, dtype=dtype_name(dtype),
        adapter_dtype=dtype_name(adapter_dtype), optimizer=optimizer,
        batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=gradient_checkpointing,
        base_params=c["base"], active_params=c["active"], expert_params=c["experts"],
        trainable_params=c["trainable"], adapted_layers=len(c["shapes"]),
        quantized_params=quantized, **kinds, activation_bytes_no_checkpointing=act[False],
        activation_bytes_checkpointing=act[True], activation_bytes_mlp_checkpointing=act["mlp"],
        offload_activations=offload_activations, offloaded_bytes=act[gradient_checkpointing] - on_device,
        loss_chunk_size=loss_chunk_size, packing=packing, lean_activations=lean_activations,
        logits_bytes=logits_bytes(config, batch_size, seq_len, a, loss_chunk_size),
        logits_bytes_unchunked=logits_bytes(config, batch_size, seq_len, a, 0), total_bytes=total,
        gpu_memory_bytes=None if gpu_memory is None else int(gpu_memory * GB),
        fits=None if gpu_memory is None else total <= gpu_memory * GB, notes=notes,
    )




def _dtype(value: object, config, field: str) -> torch.dtype:
    """``value`` as a float dtype (the one parser); ``auto`` is the model config's own dtype."""
    parsed = parse_dtype(value, field, auto=True)
    if parsed != "auto":
        return parsed
    stated = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if stated is None:
        raise ValueError(f"{field}=auto: the model's config states no dtype; give one (bf16, fp16, fp32).")
    return parse_dtype(stated, f"{field} (auto: the config's)")


def _naive_note(config, c: dict) -> str | None:
    """Why the popular "layers x 2 x hidden x r" figure is wrong here, when every adapted layer has the same rank r."""
    ranks = set(c["ranks"].values())
    if len(ranks) != 1 or None in ranks or c["experts"]:  # MoE: a pair per expert, not per matrix
        return None
    r, h, shapes = ranks.pop(), config.hidden_size, c["shapes"]
    pairs = sum(r * (n_in + n_out) for n_in, n_out in shapes.values())  # a rank-r pair per adapted layer
    if c["trainable"] < pairs or all(s == (h, h) for s in shapes.values()):
        return None
    by_shape: dict[str, list[str]] = {}
    for name, (n_in, n_out) in shapes.items():
        by_shape.setdefault(f"{n_in}x{n_out}", []).append(name.rsplit(".", 1)[-1])
    listed = ", ".join(f"{','.join(dict.fromkeys(v))} {k}" for k, v in by_shape.items())
    return (f"Why not {2 * h * r * len(shapes):,}? That popular figure ({len(shapes)} matrices x 2 x {h} x {r}) "
            f"treats every adapted matrix as {h} x {h}; the real (in x out) shapes are {listed}, and a rank-r adapter "
            f"on in x out has r (in + out) parameters: {c['trainable']:,} here.")
