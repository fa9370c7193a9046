"""The Hugging Face families that llama.cpp runs, as one table: what ``convert_hf_to_gguf.py`` writes for each.

``GGUF_ARCHITECTURES`` maps ``config.model_type`` to a ``GGUFArch``: llama.cpp's architecture name, the
hyperparameter metadata, and the tensor plan. A family not in the table is refused by name (``arch_of``).

The tensor plan maps a Hugging Face parameter name to its GGUF tensors, each with a function on the output rows
(axis -2 of a weight, of a 3-D expert stack, or of a LoRA B; axis 0 of a bias). Row operations commute with a low-rank
update, P (W + s B A) = P W + s (P B) A, so one plan serves the merged model and an adapter (only B changes):

- llama-family q/k (llama, mistral, mixtral): llama.cpp rotates interleaved pairs, so within each head row
  2i + j takes row i + j hd/2 (the two rotary halves interleaved);
- fused experts ``mlp.experts.gate_up_proj`` (E, 2I, H): rows [:I] are ``ffn_gate_exps``, rows [I:] ``ffn_up_exps``;
  ``down_proj`` (E, H, I) is ``ffn_down_exps``. Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` stay fused.

Values the merged model alone changes: Gemma's RMSNorm computes x (1 + w) and llama.cpp's x w, so Gemma norms are
written as w + 1 (``norm_offset``); llama3 RoPE and Phi-3 longrope add frequency-factor tensors (``extra_tensors``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lightning_lora.io import gguf_hparams as hparams
from lightning_lora.io.gguf_hparams import require_gguf, rope_type

log = logging.getLogger(__name__)


def _gemma_check(pattern: int, layers_27b: int) -> Callable[[dict], str | None]:
    """llama.cpp's Gemma graphs scale queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 27B layer count)
    and place sliding layers by a fixed pattern (every ``pattern``-th layer full); the config must agree."""

    def check(hp: dict) -> str | None:
        n = hp["num_hidden_layers"]
        scale = hp["hidden_size"] // hp["num_attention_heads"] if n == layers_27b else hp.get("head_dim")
        if hp.get("query_pre_attn_scalar") != scale:
            return f"query_pre_attn_scalar {hp.get('query_pre_attn_scalar')}, but llama.cpp scales by 1/sqrt({scale})"
        wanted = ["sliding_attention" if i % pattern < pattern - 1 else "full_attention" for i in range(n)]
        if hp.get("layer_types") is not None and list(hp["layer_types"]) != wanted:
            return f"layer_types {hp['layer_types']}, but llama.cpp makes every {pattern}th layer full attention"
        return None

    return check


def _qwen_check(norm_topk: bool | None = None) -> Callable[[dict], str | None]:
    """Qwen graphs attend over the whole context; llama.cpp's Qwen3-MoE renormalizes the top-k router weights and its
    Qwen2-MoE does not (``norm_w`` of ``build_moe_ffn``): ``norm_topk_prob`` must say the same."""

    def check(hp: dict) -> str | None:
        if hp.get("use_sliding_window"):
            return "use_sliding_window is set, but llama.cpp's Qwen graphs attend over the whole context"
        if norm_topk is not None and bool(hp.get("norm_topk_prob")) != norm_topk:
            return (f"norm_topk_prob is {hp.get('norm_topk_prob')}, but llama.cpp's graph "
                    f"{'renormalizes' if norm_topk else 'does not renormalize'} the top-k router weights")  # fmt: skip
        return None

    return check


def _smollm3_check(hp: dict) -> str | None:
    """llama.cpp's SmolLM3 graph skips RoPE in every 4th layer (``n_no_rope_layer_step``)."""
    wanted = [int((i + 1) % 4 != 0) for i in range(hp["num_hidden_layers"])]
    if hp.get("no_rope_layers") is not None and list(hp["no_rope_layers"]) != wanted:
        return f"no_rope_layers {hp['no_rope_layers']}, but llama.cpp skips RoPE in every 4th layer exactly"
    return _llama_check(hp)


def _llama_check(hp: dict) -> str | None:
    if hp.get("sliding_window"):  # Mistral 7B v0.1: the same model up to the window
        log.warning("GGUF export: llama.cpp runs %s without its sliding window: outputs differ only beyond %d tokens.",
                    hp.get("model_type"), hp["sliding_window"])  # fmt: skip
    return None


@dataclass(frozen=True)
class GGUFArch:
    """How ``convert_hf_to_gguf.py`` writes one Hugging Face family (its ``conversion/<family>.py`` class)."""

    arch: str  # llama.cpp's architecture name, the value of general.architecture
    metadata: Callable[[dict], dict]  # config dict -> {GGUFWriter method: value}
    rope_types: tuple[str, ...] = ("default", "linear", "yarn")  # RoPE kinds the file expresses; others are refused
    rope_rows: bool = False  # q/k rows into llama.cpp's interleaved rotary order
    norm_offset: float = 0.0  # added to every "...norm.weight" of the merged model (Gemma: 1)
    drop_lm_head: bool = False  # the converter drops lm_head (Gemma: the output is token_embd)
    extra_tensors: Callable[[dict], dict] = field(default=lambda hp: {})  # merged model only
    check: Callable[[dict], str | None] = field(default=lambda hp: None)  # why llama.cpp would compute otherwise


_LLAMA_ROPES = dict(rope_types=("default", "linear", "yarn", "llama3"), rope_rows=True,
                    extra_tensors=hparams.llama3_rope_freqs)  # the converter's LlamaModel and its subclasses
_LLAMA = GGUFArch("llama", hparams.llama, check=_llama_check, **_LLAMA_ROPES)
GGUF_ARCHITECTURES: dict[str, GGUFArch] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,  # convert_hf_to_gguf.py writes Mistral and Mixtral as llama.cpp's "llama"
    "mixtral": _LLAMA,
    "qwen2": GGUFArch("qwen2", hparams.text, check=_qwen_check()),
    "qwen3": GGUFArch("qwen3", hparams.text, check=_qwen_check()),
    "qwen2_moe": GGUFArch("qwen2moe", hparams.qwen_moe, check=_qwen_check(norm_topk=False)),
    "qwen3_moe": GGUFArch("qwen3moe", hparams.qwen_moe, check=_qwen_check(norm_topk=True)),
    "gemma2": GGUFArch("gemma2", hparams.gemma2, rope_types=("default",), norm_offset=1.0, drop_lm_head=True,
                       check=_gemma_check(2, layers_27b=46)),
    "gemma3_text": GGUFArch("gemma3", hparams.gemma3, rope_types=("default", "linear"), norm_offset=1.0,
                            drop_lm_head=True, check=_gemma_check(6, layers_27b=62)),
    "smollm3": GGUFArch("smollm3", hparams.llama, check=_smollm3_check, **_LLAMA_ROPES),
    "granite": GGUFArch("granite", hparams.granite, check=_llama_check, **_LLAMA_ROPES),
    "olmo2": GGUFArch("olmo2", hparams.olmo2),
    "phi3": GGUFArch("phi3", hparams.phi3, rope_types=("default", "longrope"), extra_tensors=hparams.phi3_rope_factors),
}


def arch_of(config, owner: str = "the model") -> GGUFArch:
    """The table's entry for ``config`` (of ``owner``, named in errors). A family llama.cpp's converter lacks, a RoPE it
    does not write, or settings its graph would compute otherwise (``GGUFArch.check``) are refused by name."""
    model_type = getattr(config, "model_type", None)
    spec = GGUF_ARCHITECTURES.get(model_type)
    if spec is None:
        raise ValueError(
            f"GGUF export: {owner} (model_type {model_type!r}) is not a family it writes; it writes "
            f"{', '.join(sorted(GGUF_ARCHITECTURES))}. Export the PEFT folder or the merged Hugging Face folder "
            "instead."
        )
    hp = config.to_dict()
    kind = rope_type(hp)
    if kind not in spec.rope_types:
        raise ValueError(f"GGUF export of {model_type}: RoPE type {kind!r} is not written by llama.cpp's converter "
                         f"for this family (it writes {', '.join(spec.rope_types)}).")  # fmt: skip
    if (why := spec.check(hp)) is not None:
        raise ValueError(f"GGUF export of {model_type}: {why}; llama.cpp would compute another model. Export the "
                         "merged Hugging Face folder instead.")  # fmt: skip
    return spec


def _interleave_rope(heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def rows(t: torch.Tensor) -> torch.Tensor:
        *lead, out, cols = t.shape
        return t.reshape(*lead, heads, 2, out // heads // 2, cols).transpose(-3, -2).reshape(t.shape)

    return rows


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def tensor_plan(config) -> Callable[[str], list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]]:
    """A function: Hugging Face parameter name -> ``[(GGUF name, rows)]`` (empty for a tensor the converter drops),
    raising ``ValueError`` for a name the family's llama.cpp architecture has no tensor for."""
    gguf = require_gguf()
    spec = arch_of(config)
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == spec.arch)
    tmap = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads

    def name(hf_name: str) -> str:
        found = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise ValueError(f"GGUF export: {hf_name!r} has no tensor name in llama.cpp's {spec.arch} architecture.")
        return found

    def plan(hf_name: str):
        if hf_name == "lm_head.weight" and (spec.drop_lm_head or getattr(config, "tie_word_embeddings", False)):
            return []  # llama.cpp uses token_embd for the output when output.weight is absent
        if hf_name.endswith(".experts.gate_up_proj"):  # (E, 2I, H): gate rows first, then up rows
            stem = hf_name.removesuffix("gate_up_proj")
            return [(name(stem + "gate_proj.weight"), lambda t: t[..., : t.shape[-2] // 2, :]),
                    (name(stem + "up_proj.weight"), lambda t: t[..., t.shape[-2] // 2 :, :])]  # fmt: skip
        if hf_name.endswith(".experts.down_proj"):
            return [(name(hf_name + ".weight"), _same)]
        rows = _same
        if spec.rope_rows and (".q_proj." in hf_name or ".k_proj." in hf_name):
            rows = _interleave_rope(heads if ".q_proj." in hf_name else kv_heads)
        return [(name(hf_name), rows)]

    return plan


def apply_rows(rows: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    """``rows`` on the output rows of ``t`` (a bias's only axis, else axis -2)."""
    return rows(t[:, None])[:, 0] if t.dim() == 1 else rows(t)


def metadata(config) -> dict:
    """{GGUFWriter method: value} of ``config``'s hyperparameters, as the converter writes them."""
    return arch_of(config).metadata(config.to_dict())
