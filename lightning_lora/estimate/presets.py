"""The model shapes ``estimate`` knows by name: published ``config.json`` values of Llama 2/3, SmolLM2, Mixtral-8x7B and
Qwen3-30B-A3B, and any local ``config.json`` or model folder; no weights are read."""

from __future__ import annotations

import json
from pathlib import Path

_LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu", rms_norm_eps=1e-5,
              tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
_L2 = dict(_LLAMA, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0)
_L3 = dict(_LLAMA, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
PRESETS: dict[str, dict] = {  # values from the models' published config.json files
    "llama-2-7b": dict(_L2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32),
    "llama-2-13b": dict(_L2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40),
    "llama-2-70b": dict(_L2, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8),
    "llama-3-8b": dict(_L3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8),
    "llama-3-70b": dict(_L3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8),
    "smollm2-135m": dict(_LLAMA, vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True),
}
PRESETS.update({  # MoE (estimate/moe.py): 46.7B total / 12.9B active and 30.5B / 3.3B as published
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                         num_experts_per_tok=2, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5,
                         tie_word_embeddings=False),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                          norm_topk_prob=True, max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6,
                          tie_word_embeddings=False),
})
ALIASES = {"smollm2-135m-instruct": "smollm2-135m", "llama-3.1-8b": "llama-3-8b"}  # 3.1: same shapes, longer RoPE


def model_config(model: str):
    """A transformers config from a preset name/alias, a ``config.json`` path or a local model folder."""
    from transformers import AutoConfig

    key = ALIASES.get(model.lower(), model.lower())
    if key in PRESETS:
        fields = dict(PRESETS[key])
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    path = Path(model)
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.is_file():
        fields = json.loads(path.read_text())
        if "model_type" not in fields:
            raise ValueError(f"{path} has no 'model_type'; it is not a transformers config.json.")
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    raise ValueError(
        f"unknown model {model!r}: not a preset and not a config.json or a folder holding one. "
        f"Presets: {', '.join(sorted([*PRESETS, *ALIASES]))}."
    )
