"""A merged llama-family model as one standalone GGUF file for llama.cpp: weights, hyperparameters, tokenizer.

Weights are written as f16, bf16 or q8_0 (``gguf.quants``; q8_0 needs rows that are multiples of 32, other rows fall
back to f16 as llama.cpp's converter does); 1-D tensors (norms) stay f32. q/k rows take llama.cpp's per-head rotary
order (``io/gguf.py``). The tokenizer goes into the metadata as llama.cpp reads it: a byte-level BPE (``gpt2``
model, as SmolLM2's and Llama 3's) with its tokens, token types, merges, special ids, ``add_bos_token``, the
pre-tokenizer type and the chat template, so ``llama-cli -m model.gguf`` runs on its own.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lightning_lora.core.verbs import adapter_names
from lightning_lora.io.files import atomic_file
from lightning_lora.io.gguf import hf_config, permute_qk, require_gguf, tensor_namer

log = logging.getLogger(__name__)

MODEL_DTYPES = ("f16", "bf16", "q8_0")


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ValueError(f"GGUF export: rope scaling {kind!r} is not supported yet (plain RoPE only).")
    theta = getattr(config, "rope_theta", None) or params.get("rope_theta")
    return float(theta if theta is not None else 10000.0)


def _pre_tokenizer(spec: dict | None) -> str:
    """llama.cpp's pre-tokenizer type for a tokenizer.json ``pre_tokenizer`` (the regexes llama.cpp knows)."""
    parts = (spec or {}).get("pretokenizers") if (spec or {}).get("type") == "Sequence" else [spec or {}]
    kinds = [(p.get("type"), p.get("individual_digits"), p.get("use_regex", True)) for p in parts]
    if kinds == [("ByteLevel", None, True)]:
        return "gpt-2"
    if kinds == [("Digits", True, None), ("ByteLevel", None, True)]:
        return "smollm"
    log.warning("GGUF export: unknown pre-tokenizer %s; llama.cpp will use its default one.", spec)
    return "default"


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """Write ``tokenizer`` (a fast byte-level BPE tokenizer) into ``writer``'s metadata, padded to ``vocab_size``."""
    gguf = require_gguf()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(
            "GGUF export writes byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3); this tokenizer is "
            f"{type(tokenizer).__name__} with model {model.get('type')!r}. Convert with llama.cpp's convert_hf_to_gguf.py."
        )
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise ValueError(f"GGUF export: the tokenizer has {len(vocab)} tokens but the model only {vocab_size}.")
    by_id = {i: t for t, i in vocab.items()}
    added = {i: tok for i, tok in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as folder:  # SpecialVocab reads merges, special ids, chat template from files
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(Path(folder), load_merges=True, n_vocab=vocab_size)
        if special.chat_template is None and getattr(tokenizer, "chat_template", None):
            special.chat_template = tokenizer.chat_template
        probe = tokenizer("a").input_ids  # llama.cpp must add BOS/EOS exactly when this tokenizer does
        for kind in ("bos", "eos"):
            tid = getattr(tokenizer, f"{kind}_token_id", None)
            special.add_special_token[kind] = tid is not None and (probe[:1] if kind == "bos" else probe[-1:]) == [tid]
        special.add_to_gguf(writer, quiet=True)


def _tensor_data(weight: torch.Tensor, dtype: str):
    """``(array, raw_dtype)`` for GGUFWriter.add_tensor: f32 for 1-D tensors, else ``dtype``."""
    gguf = require_gguf()
    data = weight.detach().float().cpu().numpy()
    if data.ndim == 1:
        return data.astype(np.float32), None
    if dtype == "f16" or (dtype == "q8_0" and data.shape[-1] % 32):
        return data.astype(np.float16), None
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    return gguf.quants.quantize(data, qtype), qtype


def write_model_gguf(model: nn.Module, tokenizer, path: str | os.PathLike, dtype: str = "f16") -> Path:
    """Write the (merged, adapter-free) llama-family ``model`` and its ``tokenizer`` as one GGUF at ``path`` (atomic).

    Raises:
        ValueError: adapters still on the model (merge first), another architecture, a tokenizer that is not a
            byte-level BPE, an unknown ``dtype``, or a tensor llama.cpp's llama architecture has no name for.
    """
    gguf = require_gguf()
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"GGUF model dtype must be one of {MODEL_DTYPES}, got {dtype!r}.")
    if adapter_names(model):
        raise ValueError(f"GGUF export of a model: it still has adapters {adapter_names(model)}; merge them first.")
    if tokenizer is None:
        raise ValueError("GGUF export of a model needs its tokenizer (llama.cpp runs the file on its own).")
    config = hf_config(model)
    namer = tensor_namer(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    tied = getattr(config, "tie_word_embeddings", False)
    tensors = {}
    for hf_name, weight in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd for the output when output.weight is absent
        tensors[namer(hf_name)] = _tensor_data(permute_qk(weight.detach().float(), hf_name, config), dtype)
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]  # fmt: skip
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(Path(str(getattr(model, "name_or_path", "") or "model")).name)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(heads)
        writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(_rope_theta(config))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, tokenizer, config.vocab_size)
        for name in sorted(tensors):
            data, raw_dtype = tensors[name]
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    log.debug("model GGUF (%s, %d tensors) written to %s", dtype, len(tensors), path)
    return Path(path)
