"""llama.cpp LoRA adapters as GGUF files, and the naming shared with the merged-model GGUF (``io/gguf_model.py``).

An adapter GGUF holds, per adapted linear layer, ``<base GGUF tensor name>.lora_a`` (r, in) and ``.lora_b``
(out, r), plus the metadata ``general.type = "adapter"``, ``general.architecture`` (the base's), ``adapter.type =
"lora"`` and ``adapter.lora.alpha``. llama.cpp applies ``W x + (alpha / r) B A x`` with r read from B's shape, so
LoRA (arXiv:2106.09685, s = alpha/r) writes alpha, and rsLoRA (arXiv:2312.03732, s = alpha/sqrt(r)) writes
alpha * sqrt(r). Names come from the ``gguf`` package's per-architecture tensor maps. llama.cpp stores llama-family
q/k weights with each head's rows permuted (interleaved rotary halves, ``convert_hf_to_gguf.py``); a row
permutation P of W = B A is P B A, so it is applied to B's rows. DoRA and VeRA have no llama.cpp form: merge first.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from lightning_lora.core.verbs import adapter_layers, check_known
from lightning_lora.io.files import atomic_file
from lightning_lora.methods.lora import LoRA

log = logging.getLogger(__name__)

LLAMA_FAMILY = ("llama",)  # Hugging Face model_type values written as GGUF architecture "llama"
ADAPTER_DTYPES = ("f32", "f16")


def require_gguf():
    try:
        import gguf
    except ImportError as err:  # pragma: no cover
        raise ModuleNotFoundError("GGUF export needs the 'gguf' package: pip install gguf") from err
    return gguf


def hf_config(model: nn.Module):
    """The Hugging Face config of a llama-family model; other architectures are refused by name."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in LLAMA_FAMILY:
        raise ValueError(
            f"GGUF export supports llama-family models (model_type {', '.join(LLAMA_FAMILY)}: SmolLM2, Llama); "
            f"{type(model).__name__} (model_type {model_type!r}) is not one. Export the PEFT folder or the merged "
            "Hugging Face folder instead."
        )
    return config


def tensor_namer(config):
    """A function: Hugging Face parameter name (``model.layers.0.self_attn.q_proj.weight``) -> GGUF tensor name
    (``blk.0.attn_q.weight``), raising ``ValueError`` for a name llama.cpp's llama architecture does not have."""
    gguf = require_gguf()
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)

    def name(hf_name: str) -> str:
        found = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise ValueError(f"GGUF export: {hf_name!r} has no tensor name in llama.cpp's llama architecture.")
        return found

    return name


def permute_qk(rows: torch.Tensor, hf_name: str, config) -> torch.Tensor:
    """llama.cpp's row order for q/k projections (identity for other layers): within each head of size hd, new row
    2i + j is old row i + j hd/2, i.e. the two rotary halves interleaved [0, hd/2, 1, hd/2 + 1, ...], as
    ``convert_hf_to_gguf.py`` permutes them (``heads`` = key/value heads for k)."""
    if ".q_proj." in hf_name + ".":
        heads = config.num_attention_heads
    elif ".k_proj." in hf_name + ".":
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    else:
        return rows
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def lora_pairs(model: nn.Module, name: str = "default") -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """``{target: (A, B)}`` of adapter ``name`` and the alpha llama.cpp needs (scale * r), after every check.

    Raises:
        ValueError: no such adapter; DoRA, VeRA or anything but plain LoRA/rsLoRA ("merge first: export gguf-merged");
            adapted layers that are not Linear (embeddings, convolutions); an adapted head tied to the embeddings.
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
    not_linear = [t for t, layer in layers.items() if not isinstance(layer.base_layer, nn.Linear)]
    if not_linear:
        raise ValueError(f"GGUF export: llama.cpp adapters cover Linear layers only, not {not_linear[:3]}; "
                         "merge first: export gguf-merged, or target only Linear layers.")  # fmt: skip
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and any(
        t == "lm_head" or t.endswith(".lm_head") for t in layers
    ):
        raise ValueError("GGUF export: the adapted lm_head is tied to the embeddings, which llama.cpp's base has as "
                         "one tensor; merge first: export gguf-merged.")  # fmt: skip
    pairs = {}
    for target, layer in layers.items():
        tensors = layer.adapters[name].peft_tensors()
        pairs[target] = (tensors["lora_A.weight"].detach(), tensors["lora_B.weight"].detach())
    scale = config.alpha / (config.r**0.5) if config.rslora else config.alpha / config.r
    return pairs, scale * config.r


def write_adapter_gguf(
    model: nn.Module, path: str | os.PathLike, name: str = "default", dtype: str = "f32"
) -> Path:
    """Write adapter ``name`` of the llama-family ``model`` as a llama.cpp LoRA adapter GGUF at ``path`` (atomic).

    Use it with ``llama-cli -m base.gguf --lora <path>`` (llama.cpp) over the same base.

    Raises:
        ValueError: see ``lora_pairs``; an architecture other than llama; ``dtype`` not f32 or f16.
    """
    gguf = require_gguf()
    if dtype not in ADAPTER_DTYPES:
        raise ValueError(f"GGUF adapter dtype must be one of {ADAPTER_DTYPES}, got {dtype!r}.")
    config = hf_config(model)
    pairs, alpha = lora_pairs(model, name)
    namer = tensor_namer(config)
    np_dtype = {"f32": "float32", "f16": "float16"}[dtype]
    tensors = {}
    for target, (A, B) in pairs.items():
        base = namer(target + ".weight")
        tensors[base + ".lora_a"] = A.float().cpu().numpy().astype(np_dtype)
        tensors[base + ".lora_b"] = permute_qk(B.float().cpu(), target, config).numpy().astype(np_dtype)
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for key in sorted(tensors):
            writer.add_tensor(key, tensors[key])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    log.debug("adapter GGUF (%d tensors, alpha %.6g) written to %s", len(tensors), alpha, path)
    return Path(path)
