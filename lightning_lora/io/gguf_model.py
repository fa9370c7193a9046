"""A merged model as one standalone GGUF file for llama.cpp: weights, hyperparameters, tokenizer.

Any family of ``GGUF_ARCHITECTURES`` (``io/gguf_arch.py``: names, row orders, norm offsets and metadata as llama.cpp's
``convert_hf_to_gguf.py`` writes them). Weights are written as f16, bf16 or q8_0 (``gguf.quants``; q8_0 needs rows
that are multiples of 32, other rows fall back to f16 as llama.cpp's converter does); biases, norms and the MoE
routers (``ffn_gate_inp``, ``ffn_gate_inp_shexp``) stay f32, as the converter keeps them. The tokenizer (SentencePiece
or byte-level BPE, with its special ids and chat template: ``io/gguf_vocab.py``) goes into the metadata, so
``llama-cli -m model.gguf`` runs on its own.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lightning_lora.core.verbs import adapter_names
from lightning_lora.io.files import atomic_file
from lightning_lora.io.gguf import hf_config
from lightning_lora.io.gguf_arch import apply_rows, arch_of, metadata, require_gguf, tensor_plan
from lightning_lora.io.gguf_vocab import add_tokenizer

log = logging.getLogger(__name__)

MODEL_DTYPES = ("f16", "bf16", "q8_0")


def _f32(gguf_name: str, data) -> bool:
    """The tensors the converter keeps in f32 whatever the file type: vectors, norms, MoE routers, biases."""
    router = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")
    kept = gguf_name.endswith(("_norm.weight", *router)) or not gguf_name.endswith(".weight")
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
        ValueError: adapters still on the model (merge first), another architecture, a tokenizer that
            ``io/gguf_vocab.py`` cannot write, an unknown ``dtype``, or a tensor the llama.cpp architecture lacks.
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
        add_tokenizer(writer, tokenizer, config.vocab_size, config, spec.arch)
        for name in sorted(tensors):
            data, raw_dtype = tensors[name]
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    log.debug("model GGUF (%s, %d tensors) written to %s", dtype, len(tensors), path)
    return Path(path)
