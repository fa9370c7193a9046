"""A merged model as one standalone GGUF file for llama.cpp: weights, hyperparameters, tokenizer.

Any family of ``GGUF_ARCHITECTURES`` (``io/gguf_arch.py``: names, row orders, norm offsets and metadata as llama.cpp's
``convert_hf_to_gguf.py`` writes them). Weights are written as f16, bf16 or q8_0 (``gguf.quants``; q8_0 needs rows
that are multiples of 32, other rows fall back to f16 as llama.cpp's converter does); biases, norms and the MoE
router (``ffn_gate_inp``) stay f32, as the converter keeps them. The tokenizer goes into the metadata as llama.cpp
reads it: a byte-level BPE (``gpt2`` model, as SmolLM2's, Llama 3's and Qwen's) with its tokens, token types, merges,
special ids, ``add_bos_token``, the pre-tokenizer type and the chat template, so ``llama-cli -m model.gguf`` runs on
its own.
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
from lightning_lora.io.gguf import hf_config
from lightning_lora.io.gguf_arch import apply_rows, arch_of, metadata, require_gguf, tensor_plan

log = logging.getLogger(__name__)

MODEL_DTYPES = ("f16", "bf16", "q8_0")


# llama.cpp's pre-tokenizer types by the regex of a ``Split`` before a ``ByteLevel(use_regex=False)`` (the regexes
# llama.cpp's src/llama-vocab.cpp quotes as "original regex from tokenizer.json" for each type): Qwen2 splits digits
# one by one, Llama 3 in groups of up to three.
_HEAD = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_TOKENIZER_REGEXES = {_HEAD + r"\p{N}" + _TAIL: "qwen2", _HEAD + r"\p{N}{1,3}" + _TAIL: "llama-bpe"}


def _pre_tokenizer(spec: dict | None) -> str:
    """llama.cpp's pre-tokenizer type for a tokenizer.json ``pre_tokenizer`` (the ones llama.cpp knows)."""
    parts = (spec or {}).get("pretokenizers") if (spec or {}).get("type") == "Sequence" else [spec or {}]
    kinds = [(p.get("type"), p.get("individual_digits"), p.get("use_regex", True)) for p in parts]
    if kinds == [("ByteLevel", None, True)]:
        return "gpt-2"
    if kinds == [("Digits", True, None), ("ByteLevel", None, True)]:
        return "smollm"
    if kinds == [("Split", None, True), ("ByteLevel", None, False)]:
        found = PRE_TOKENIZER_REGEXES.get((parts[0].get("pattern") or {}).get("Regex"))
        if found:
            return found
    log.warning("GGUF export: unknown pre-tokenizer %s; llama.cpp will use its default one.", spec)
    return "default"


def add_tokenizer(writer, tokenizer, vocab_size: int, config=None) -> None:
    """Write ``tokenizer`` (a fast byte-level BPE tokenizer) into ``writer``'s metadata, padded to ``vocab_size``; the
    model ``config``'s special token ids fill in those the tokenizer lacks (as the converter reads config.json)."""
    gguf = require_gguf()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(
            "GGUF export writes byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3); this tokenizer is "
            f"{type(tokenizer).__name__} with model {model.get('type')!r}. Convert with llama.cpp's "
            "convert_hf_to_gguf.py."
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
        if config is not None:
            config.to_json_file(Path(folder) / "config.json")
        special = gguf.SpecialVocab(Path(folder), load_merges=True, n_vocab=vocab_size)
        if special.chat_template is None and getattr(tokenizer, "chat_template", None):
            special.chat_template = tokenizer.chat_template
        probe = tokenizer("a").input_ids  # llama.cpp must add BOS/EOS exactly when this tokenizer does
        for kind in ("bos", "eos"):
            tid = getattr(tokenizer, f"{kind}_token_id", None)
            special.add_special_token[kind] = tid is not None and (probe[:1] if kind == "bos" else probe[-1:]) == [tid]
        special.add_to_gguf(writer, quiet=True)


def _f32(gguf_name: str, data) -> bool:
    """The tensors the converter keeps in f32 whatever the file type: vectors, norms, the MoE router, biases."""
    kept = gguf_name.endswith(("_norm.weight", "ffn_gate_inp.weight")) or not gguf_name.endswith(".weight")
    return data.ndim <= 1 or kept


def _tensor_data(gguf_name: str, weight: torch.Tensor, dtype: str):
    """``(array, raw_dtype)`` for GGUFWriter.add_tensor."""
    gguf = require_gguf()
    data = weight.detach().float().cpu().numpy()
    if _f32(gguf_name, data):
        return data.astype(np.float32), None
    if dtype == "f16" or (dtype == "q8_0" and data.shape[-1] % 32):
        return data.astype(np.float16), None
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    return gguf.quants.quantize(data, qtype), qtype


def write_model_gguf(model: nn.Module, tokenizer, path: str | os.PathLike, dtype: str = "f16") -> Path:
    """Write the merged (adapter-free) ``model`` of a ``GGUF_ARCHITECTURES`` family and its ``tokenizer`` as one GGUF
    at ``path`` (atomic).

    Raises:
        ValueError: adapters still on the model (merge first), another architecture, a tokenizer that is not a
            byte-level BPE, an unknown ``dtype``, or a tensor the llama.cpp architecture has no name for.
    """
    gguf = require_gguf()
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"GGUF model dtype must be one of {MODEL_DTYPES}, got {dtype!r}.")
    if adapter_names(model):
        raise ValueError(f"GGUF export of a model: it still has adapters {adapter_names(model)}; merge them first.")
    if tokenizer is None:
        raise ValueError("GGUF export of a model needs its tokenizer (llama.cpp runs the file on its own).")
    config = hf_config(model)
    spec, plan = arch_of(config), tensor_plan(config)
    tensors = {}
    for hf_name, weight in model.state_dict().items():
        for gguf_name, rows in plan(hf_name):
            data = apply_rows(rows, weight.detach().float())
            if spec.norm_offset and hf_name.endswith("norm.weight"):
                data = data + spec.norm_offset  # Gemma's RMSNorm scales by (1 + w), llama.cpp's by w
            tensors[gguf_name] = _tensor_data(gguf_name, data, dtype)
    for gguf_name, data in spec.extra_tensors(config.to_dict()).items():
        tensors[gguf_name] = _tensor_data(gguf_name, data, dtype)
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]  # fmt: skip
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), spec.arch)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(Path(str(getattr(model, "name_or_path", "") or "model")).name)
        for method, value in metadata(config).items():
            getattr(writer, method)(value)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, tokenizer, config.vocab_size, config)
        for name in sorted(tensors):
            data, raw_dtype = tensors[name]
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    log.debug("model GGUF (%s, %d tensors) written to %s", dtype, len(tensors), path)
    return Path(path)
