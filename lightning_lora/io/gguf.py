"""llama.cpp LoRA adapters as GGUF files, and the supported families (``GGUF_ARCHITECTURES``, ``io/gguf_arch.py``).

An adapter GGUF holds, per adapted linear layer, ``<base GGUF tensor name>.lora_a`` (r, in) and ``.lora_b``
(out, r), plus the metadata ``general.type = "adapter"``, ``general.architecture`` (the base's), ``adapter.type =
"lora"`` and ``adapter.lora.alpha``. llama.cpp applies ``W x + (alpha / r) B A x`` with r read from B's shape, so
LoRA (arXiv:2106.09685, s = alpha/r) writes alpha, and rsLoRA (arXiv:2312.03732, s = alpha/sqrt(r)) writes
alpha * sqrt(r). Names and row orders come from the family's tensor plan (``io/gguf_arch.py``): a row operation P of
the base (llama-family q/k) is P W = (P B) A, so it is applied to B. DoRA and VeRA have no llama.cpp form: merge
first.

MoE expert stacks (``core/experts.py``: Mixtral, Qwen2-MoE, Qwen3-MoE) are adapted per expert, dW_e = s B_e A_e.
llama.cpp applies such an adapter inside its expert matmul (``build_lora_mm_id`` of ``src/llama-graph.cpp``:
``mul_mat_id(b, mul_mat_id(a, x, ids), ids)``, r read from ``b->ne[0]``), from ``<ffn_*_exps>.lora_a`` of numpy
shape (E, r, in) and ``.lora_b`` (E, out, r): expert e's A_e (PEFT's rows e r .. e r + r - 1) and B_e (PEFT's
columns e, e + E, ...). A fused ``gate_up_proj`` is split as its base is: its gate and up tensors share A_e and take
B_e's first and last I rows. llama.cpp's ``convert_lora_to_gguf.py`` cannot read PEFT's ``target_parameters`` files,
so these tensors are written here alone.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from lightning_lora.core.experts import expert_factors, is_stack
from lightning_lora.core.verbs import adapter_layers, check_known
from lightning_lora.io.files import atomic_file
from lightning_lora.io.gguf_arch import GGUF_ARCHITECTURES, apply_rows, arch_of, require_gguf, tensor_plan
from lightning_lora.methods.lora import LoRA

log = logging.getLogger(__name__)

ADAPTER_DTYPES = ("f32", "f16")
__all__ = ["GGUF_ARCHITECTURES", "gguf_support", "hf_config", "lora_pairs", "require_gguf", "write_adapter_gguf"]


def gguf_support(model_type: str) -> tuple[str, ...]:
    """The GGUF files written for a Hugging Face ``model_type``: ``("adapter", "merged")``, or ``()`` (refused).
    Both hold MoE experts: the adapter their per-expert pairs, the merged model the merged stacks."""
    return ("adapter", "merged") if model_type in GGUF_ARCHITECTURES else ()


def hf_config(model: nn.Module):
    """The Hugging Face config of a model whose family llama.cpp runs; other architectures are refused by name."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError(f"GGUF export needs a Hugging Face model; {type(model).__name__} has no config.")
    arch_of(config, type(model).__name__)
    return config


def lora_pairs(model: nn.Module, name: str = "default") -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """``{target: (A, B)}`` of adapter ``name`` and the alpha llama.cpp needs (scale * r), after every check: A (r, in)
    and B (out, r), or per expert (E, r, in) and (E, out, r) on an expert stack (its target is the parameter's name).

    Raises:
        ValueError: no such adapter; DoRA, VeRA or anything but plain LoRA/rsLoRA ("merge first: export gguf-merged");
            adapted layers that are neither Linear nor expert stacks (embeddings, convolutions); an adapted head tied
            to the embeddings.
    """
    layers = {t: layer for t, layer in adapter_layers(model).items() if name in layer.adapters}
    if not layers:
        check_known(model, name, "GGUF export")
    config = next(iter(layers.values())).adapters[name].config
    if type(config) is not LoRA:
        raise ValueError(
            f"GGUF export: llama.cpp adapters are plain LoRA; {type(config).__name__} cannot be expressed there. "
            "merge first: export gguf-merged (export the merged model as GGUF instead)."
        )
    not_linear = [t for t, layer in layers.items() if not (isinstance(layer.base_layer, nn.Linear) or is_stack(layer))]
    if not_linear:
        raise ValueError(f"GGUF export: llama.cpp adapters cover Linear layers and MoE expert stacks only, not "
                         f"{not_linear[:3]}; merge first: export gguf-merged, or target only those.")  # fmt: skip
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and any(
        t == "lm_head" or t.endswith(".lm_head") for t in layers
    ):
        raise ValueError("GGUF export: the adapted lm_head is tied to the embeddings, which llama.cpp's base has as "
                         "one tensor; merge first: export gguf-merged.")  # fmt: skip
    pairs, alpha = {}, None
    for target, layer in layers.items():
        branch = layer.adapters[name]
        tensors = branch.peft_tensors()
        A, B = tensors["lora_A.weight"].detach(), tensors["lora_B.weight"].detach()
        if is_stack(layer):  # PEFT's stacked (r E, in), (out, r E) -> per expert (E, r, in), (E, out, r)
            A, B = expert_factors(A, B, layer.base_layer.num_experts)
        effective = branch.scale * branch.r  # llama.cpp applies alpha / r with r read from B's shape
        alpha = effective if alpha is None else alpha
        pairs[target] = (A, B if effective == alpha else B * (effective / alpha))  # rank/alpha_pattern: into B
    return pairs, alpha


def write_adapter_gguf(
    model: nn.Module, path: str | os.PathLike, name: str = "default", dtype: str = "f32"
) -> Path:
    """Write adapter ``name`` of ``model`` (a family of ``GGUF_ARCHITECTURES``) as a llama.cpp LoRA adapter GGUF at
    ``path`` (atomic).

    Use it with ``llama-cli -m base.gguf --lora <path>`` (llama.cpp) over the same base.

    Raises:
        ValueError: see ``lora_pairs``; an architecture llama.cpp lacks; ``dtype`` not f32 or f16.
    """
    gguf = require_gguf()
    if dtype not in ADAPTER_DTYPES:
        raise ValueError(f"GGUF adapter dtype must be one of {ADAPTER_DTYPES}, got {dtype!r}.")
    config = hf_config(model)
    pairs, alpha = lora_pairs(model, name)
    plan = tensor_plan(config)
    np_dtype = {"f32": "float32", "f16": "float16"}[dtype]
    tensors = {}
    for target, (A, B) in pairs.items():
        pieces = plan(target if A.dim() == 3 else target + ".weight")  # an expert stack's target is its parameter
        if not pieces:
            raise ValueError(f"GGUF export: {target!r} is adapted, but llama.cpp's {arch_of(config).arch} base has "
                             "no such tensor (its output is the embedding); merge first: export gguf-merged.")  # fmt: skip
        for base, rows in pieces:
            tensors[base + ".lora_a"] = A.float().cpu().numpy().astype(np_dtype)
            tensors[base + ".lora_b"] = apply_rows(rows, B.float().cpu()).contiguous().numpy().astype(np_dtype)
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch_of(config).arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key in sorted(tensors):
            writer.add_tensor(key, tensors[key])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    log.debug("adapter GGUF (%d tensors, alpha %.6g) written to %s", len(tensors), alpha, path)
    return Path(path)
