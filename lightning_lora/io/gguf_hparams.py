"""Hyperparameter metadata of each family, as llama.cpp's ``convert_hf_to_gguf.py`` writes it (``io/gguf_arch.py``).

Each function maps a Hugging Face config dict (``config.to_dict()``, what ``config.json`` holds) to
``{GGUFWriter method: value}``, ported from the converter's ``set_gguf_parameters`` of that family
(``conversion/base.py`` ``TextModel`` for the common part, ``llama.py``, ``qwen.py``, ``gemma.py``, ``phi.py``). The
RoPE helpers also give the frequency-factor tensors of llama3 RoPE (Llama 3.1) and Phi-3's longrope.
"""

from __future__ import annotations

import math

import torch


def require_gguf():
    try:
        import gguf
    except ImportError as err:  # pragma: no cover
        raise ModuleNotFoundError("GGUF export needs the 'gguf' package: pip install gguf") from err
    return gguf


def find_hparam(hp: dict, *keys: str):
    """The value of the first key present (as llama.cpp's ``find_hparam``: a present None counts)."""
    return next((hp[k] for k in keys if k in hp), None)


def rope_parameters(hp: dict) -> dict:
    """RoPE settings normalized as the converter's ``TextModel`` does (top-level thetas mirrored into the dict)."""
    rp = dict(hp.get("rope_parameters", hp.get("rope_scaling")) or {})
    if "full_attention" not in rp and "sliding_attention" not in rp:
        mirrored = {"rope_theta": ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta",
                                   "rotary_emb_base"),
                    "partial_rotary_factor": ("partial_rotary_factor", "rope_pct", "rope_percent"),
                    "original_max_position_embeddings": ("original_max_position_embeddings",)}  # fmt: skip
        local = find_hparam(hp, "local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta",
                      "rope_local_base_freq")  # fmt: skip
        if local is not None:
            rp["sliding_attention"] = {"rope_theta": local}
        for key, names in mirrored.items():
            if key not in rp and (value := find_hparam(hp, *names)) is not None:
                rp[key] = value
        if "rope_type" not in rp and rp.get("type") is not None:
            rp["rope_type"] = rp["type"]
    return rp


def rope_type(hp: dict) -> str:
    rp = rope_parameters(hp)
    return rp.get("full_attention", rp).get("rope_type") or "default"


def text(hp: dict) -> dict:
    """``TextModel.set_gguf_parameters``: {GGUFWriter method: value}."""
    gguf = require_gguf()
    out = {"add_block_count": hp["num_hidden_layers"]}
    for method, keys in (("add_context_length", ("max_position_embeddings", "n_ctx", "n_positions")),
                         ("add_embedding_length", ("hidden_size", "n_embd")),
                         ("add_feed_forward_length", ("prefix_dense_intermediate_size", "dense_intermediate_size",
                                                      "intermediate_size")),
                         ("add_head_count", ("num_attention_heads", "n_head")),
                         ("add_head_count_kv", ("num_key_value_heads", "n_kv_heads")),
                         ("add_layer_norm_rms_eps", ("rms_norm_eps", "norm_eps")),
                         ("add_expert_count", ("num_local_experts", "num_experts", "n_routed_experts")),
                         ("add_expert_used_count", ("num_experts_per_tok", "num_experts_per_token"))):  # fmt: skip
        if (value := find_hparam(hp, *keys)) is not None:
            out[method] = value
    rp = rope_parameters(hp)
    full = rp.get("full_attention", rp)
    kind, factor = full.get("rope_type"), full.get("factor")
    if kind == "linear" and factor is not None:
        out |= {"add_rope_scaling_type": gguf.RopeScalingType.LINEAR, "add_rope_scaling_factor": factor}
    elif kind == "yarn" and factor is not None:
        out |= {"add_rope_scaling_type": gguf.RopeScalingType.YARN, "add_rope_scaling_factor": factor,
                "add_rope_scaling_orig_ctx_len": full["original_max_position_embeddings"]}  # fmt: skip
        for method, key in (("add_rope_scaling_yarn_ext_factor", "extrapolation_factor"),
                            ("add_rope_scaling_yarn_attn_factor", "attention_factor"),
                            ("add_rope_scaling_yarn_beta_fast", "beta_fast"),
                            ("add_rope_scaling_yarn_beta_slow", "beta_slow")):  # fmt: skip
            if full.get(key) is not None:
                out[method] = full[key]
    if full.get("rope_theta") is not None:
        out["add_rope_freq_base"] = full["rope_theta"]
    if (local := rp.get("sliding_attention", {}).get("rope_theta")) is not None:
        out["add_rope_freq_base_swa"] = local
    if hp.get("head_dim") is not None:
        out |= {"add_key_length": hp["head_dim"], "add_value_length": hp["head_dim"]}
    return out


def llama(hp: dict) -> dict:
    rope_dim = hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]
    return text(hp) | {"add_vocab_size": hp["vocab_size"], "add_rope_dimension_count": rope_dim}


def granite(hp: dict) -> dict:
    """Llama's metadata without head_dim (the converter drops it), plus Granite's four multipliers."""
    hp = {k: v for k, v in hp.items() if k != "head_dim"}
    out = llama(hp)
    multipliers = {"add_attention_scale": "attention_multiplier", "add_embedding_scale": "embedding_multiplier",
                   "add_residual_scale": "residual_multiplier", "add_logit_scale": "logits_scaling"}
    for method, key in multipliers.items():
        if hp.get(key):
            out[method] = hp[key]
    return out


def olmo2(hp: dict) -> dict:
    out = text(hp)
    if "sliding_window" in hp:
        n = hp["num_hidden_layers"]
        types = hp.get("layer_types")
        out["add_sliding_window"] = hp["sliding_window"]
        out["add_sliding_window_pattern"] = ([t == "sliding_attention" for t in types] if types is not None
                                             else [(i + 1) % 4 != 0 for i in range(n)])  # fmt: skip
    return out


def qwen_moe(hp: dict) -> dict:
    out = text(hp)
    if hp.get("moe_intermediate_size") is not None:
        out["add_expert_feed_forward_length"] = hp["moe_intermediate_size"]
    if hp.get("shared_expert_intermediate_size") is not None:
        out["add_expert_shared_feed_forward_length"] = hp["shared_expert_intermediate_size"]
    return out


def gemma2(hp: dict) -> dict:
    return {"add_context_length": hp["max_position_embeddings"], "add_embedding_length": hp["hidden_size"],
            "add_block_count": hp["num_hidden_layers"], "add_feed_forward_length": hp["intermediate_size"],
            "add_head_count": hp["num_attention_heads"],
            "add_head_count_kv": hp.get("num_key_value_heads", hp["num_attention_heads"]),
            "add_layer_norm_rms_eps": hp["rms_norm_eps"], "add_key_length": hp["head_dim"],
            "add_value_length": hp["head_dim"], "add_attn_logit_softcapping": hp["attn_logit_softcapping"],
            "add_final_logit_softcapping": hp["final_logit_softcapping"],
            "add_sliding_window": hp["sliding_window"]}  # fmt: skip


def gemma3(hp: dict) -> dict:
    rp = rope_parameters(hp)
    out = text(hp) | {"add_context_length": hp.get("max_position_embeddings", 131072),
                       "add_head_count": hp.get("num_attention_heads", 8),
                       "add_layer_norm_rms_eps": hp.get("rms_norm_eps", 1e-6),
                       "add_key_length": hp.get("head_dim", 256), "add_value_length": hp.get("head_dim", 256),
                       "add_rope_freq_base": rp.get("full_attention", rp).get("rope_theta", 1_000_000.0),
                       "add_head_count_kv": hp.get("num_key_value_heads", 4)}  # fmt: skip
    if hp.get("final_logit_softcapping"):
        out["add_final_logit_softcapping"] = hp["final_logit_softcapping"]
    if hp.get("sliding_window_pattern") != 1:
        out["add_sliding_window"] = hp["sliding_window"]
    return out


def phi3(hp: dict) -> dict:
    rp = rope_parameters(hp)
    rope_dims = int(rp.get("partial_rotary_factor", 1.0) * hp["hidden_size"]) // hp["num_attention_heads"]
    out = {"add_context_length": find_hparam(hp, "n_positions", "max_position_embeddings"),
           "add_rope_scaling_orig_ctx_len": rp["original_max_position_embeddings"],
           "add_embedding_length": hp["hidden_size"], "add_feed_forward_length": hp["intermediate_size"],
           "add_block_count": hp["num_hidden_layers"], "add_head_count": hp["num_attention_heads"],
           "add_head_count_kv": hp["num_key_value_heads"], "add_layer_norm_rms_eps": hp["rms_norm_eps"],
           "add_rope_dimension_count": rope_dims, "add_rope_freq_base": rp.get("full_attention", rp)["rope_theta"],
           "add_sliding_window": hp.get("sliding_window") or 0}  # fmt: skip
    if rp.get("long_factor"):
        scale = out["add_context_length"] / rp["original_max_position_embeddings"]
        orig = rp["original_max_position_embeddings"]
        out["add_rope_scaling_attn_factors"] = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0
    return out


def llama3_rope_freqs(hp: dict) -> dict[str, torch.Tensor]:
    """Llama 3.1's RoPE: one factor per frequency (1 for short wavelengths, ``factor`` for long, smooth between)."""
    rp = rope_parameters(hp)
    rp = rp.get("full_attention", rp)
    if rp.get("rope_type", "").lower() != "llama3":
        return {}
    dim = hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]
    freqs = 1.0 / (rp.get("rope_theta", 10000.0) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rp.get("factor", 8.0), rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old_context = rp.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:  # float32 arithmetic, as the converter's (bit for bit)
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return {"rope_freqs.weight": torch.tensor(factors, dtype=torch.float32)}


def phi3_rope_factors(hp: dict) -> dict[str, torch.Tensor]:
    rp = rope_parameters(hp)
    if not rp.get("long_factor"):
        return {}
    return {"rope_factors_long.weight": torch.tensor(rp["long_factor"], dtype=torch.float32),
            "rope_factors_short.weight": torch.tensor(rp["short_factor"], dtype=torch.float32)}  # fmt: skip
