"""The architecture registry: one line per model family, a tiny random model built from transformers' own config class
(hidden 64, 2 layers, vocab 128; nothing downloaded). ``tests/test_architectures.py`` runs every property over every
line, and ``scripts/arch_table.py`` turns the lines (and what the library reports for each) into the README table.

A new architecture is one new ``Arch(...)`` line. Its expectations default to "everything works"; a line states only
where the family differs, and the matrix fails when a statement stops being true:

- ``packing``: what packed rows get: ``"packed attention"`` (ours: per example, shared prefixes too),
  ``"own mask"`` (the model keeps its own attention and transformers' block-diagonal mask; no shared prefix), or
  ``"refused"`` (its own attention mixes packed examples and ours does not apply).
- ``loss_head``: False when the model changes its logits after the head, so ``causal_lm_loss`` uses Hugging Face's.
- ``peft_drops``: layer names (e.g. ``down_proj``) that PEFT 0.21, when it loads an adapter for this model type,
  re-maps to the fused expert parameters (its transformers v4 -> v5 conversion), so our adapters on dense layers of
  those names are lost in PEFT.
- ``expert_gap``: MoE experts (3-D parameters) are neither adapted by ``all-linear`` nor quantized by NF4 (a family
  whose experts module does not dispatch through transformers' ``ExpertsInterface``, e.g. Llama-4). The families here
  dispatch: their experts are adapted and quantized (``core/experts.py``); a test fails while a flag is stale.

Columns other streams add read the library, not this file: GGUF support comes from ``io/gguf.py`` (``gguf_files``).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

# Where a family has settings, they are its released models' (e.g. Gemma's query_pre_attn_scalar = head_dim,
# Qwen3-MoE's norm_topk_prob), so that what the matrix finds (e.g. GGUF support) holds for the real models.
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=64)
PACKING = ("packed attention", "own mask", "refused")


@dataclasses.dataclass(frozen=True)
class Arch:
    """One model family of the matrix (module docstring)."""

    name: str  # the Hugging Face model_type
    config: str  # the transformers config class
    fields: dict = dataclasses.field(default_factory=dict)  # replace TINY's (None drops a key)
    attn: str | None = None  # attn_implementation where transformers refuses sdpa
    packing: str = "packed attention"
    loss_head: bool = True
    expert_gap: bool = False
    peft_drops: tuple[str, ...] = ()  # layer names PEFT 0.21 re-maps to expert parameters on loading (see below)
    why: str = ""  # the reason for any expectation that is not the default, for the README table

    def __post_init__(self):
        assert self.packing in PACKING, self.packing

    def make_config(self, **overrides):
        import transformers

        fields = {k: v for k, v in {**TINY, **self.fields, **overrides}.items() if v is not None}
        if self.attn:
            fields["attn_implementation"] = self.attn
        return getattr(transformers, self.config)(**fields)

    def build(self, seed: int = 0, **overrides):
        """The tiny random model, in eval mode, the same weights for the same seed (``overrides``: config fields)."""
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        kwargs = {"attn_implementation": self.attn} if self.attn else {}
        return AutoModelForCausalLM.from_config(self.make_config(**overrides), **kwargs).eval()


def _available(arch: Arch) -> bool:
    import transformers

    return hasattr(transformers, arch.config)


GPT2_FIELDS = dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
NEOX_FIELDS = dict(num_key_value_heads=None, head_dim=None)

ARCHS = [a for a in (
    Arch("llama", "LlamaConfig"),
    Arch("mistral", "MistralConfig", packing="own mask", why="sliding-window attention"),
    Arch("qwen2", "Qwen2Config"),
    Arch("qwen3", "Qwen3Config"),
    Arch("qwen3_moe", "Qwen3MoeConfig", dict(num_experts=4, norm_topk_prob=True, **MOE)),
    Arch("mixtral", "MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    Arch("gpt_oss", "GptOssConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=8), attn="eager",
         packing="refused",
         why="eager attention with sinks; its masks ignore position_ids, so packed examples would see each other"),
    Arch("deepseek_v3", "DeepseekV3Config", dict(n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1,
                                                 n_group=1, topk_group=1, q_lora_rank=64, kv_lora_rank=64,
                                                 qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8,
                                                 num_key_value_heads=4, **MOE),
         peft_drops=("gate_proj", "up_proj", "down_proj"),
         why="PEFT 0.21 re-maps gate/up/down_proj to the experts (its v4 -> v5 conversion), so it drops our adapters "
             "on the dense and shared-expert MLPs"),
    Arch("gemma2", "Gemma2Config", dict(query_pre_attn_scalar=16), attn="eager", packing="own mask", loss_head=False,
         why="eager attention with soft-capping; logits soft-capped after the head"),
    Arch("gemma3_text", "Gemma3TextConfig", dict(query_pre_attn_scalar=16), packing="own mask", why="sliding-window layers"),
    Arch("phi3", "Phi3Config"),
    Arch("olmo2", "Olmo2Config"),
    Arch("granite", "GraniteConfig", dict(logits_scaling=8.0, embedding_multiplier=12.0, residual_multiplier=0.22,
                                          attention_multiplier=0.0625), loss_head=False,
         why="logits divided by logits_scaling after the head"),
    Arch("gpt2", "GPT2Config", GPT2_FIELDS, why="Conv1D layers, not nn.Linear: NF4 keeps them in floating point"),
    Arch("gpt_neox", "GPTNeoXConfig", NEOX_FIELDS),
    Arch("falcon", "FalconConfig", NEOX_FIELDS, packing="own mask",
         why="its attention does not dispatch through AttentionInterface (the probe refuses ours)"),
    Arch("smollm3", "SmolLM3Config"),
) if _available(a)]
BY_NAME = {a.name: a for a in ARCHS}


def gguf_files(model) -> tuple[str, ...]:
    """The GGUF files ``io/gguf.py`` writes for this model (``("adapter", "merged")``), or ``()`` when it refuses its
    family or its settings (naming them)."""
    from lightning_lora.io.gguf import gguf_support, hf_config

    try:
        hf_config(model)
    except ValueError:
        return ()
    return gguf_support(model.config.model_type)


def expert_tensors(model) -> dict[str, tuple]:
    """name -> shape of every 3-D floating-point parameter (MoE experts stored as (E, out, in) tensors)."""
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.ndim == 3 and p.is_floating_point()}


def experts_adapted(model, experts: dict) -> list[str]:
    """The expert tensors whose module holds a trainable parameter after ``inject`` (an adapter on the experts)."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    return [e for e in experts if any(t.startswith(e.rpartition(".")[0] + ".") for t in trainable)]


@functools.lru_cache(maxsize=None)
def nf4_report(name: str) -> dict:
    """What ``quantize(model, NF4())`` does to the tiny model: the linear layers it made NF4, those it kept with the
    reason its log line gives, and the expert tensors it left in floating point. Cached (the README table reads it)."""
    import logging

    from lightning_lora import NF4, quantize
    from lightning_lora.core.kinds import is_quantized

    model = BY_NAME[name].build()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("lightning_lora.quant.nf4")  # its log line, captured here and not printed
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        quantize(model, NF4())
    finally:
        logger.removeHandler(handler)
        logger.level, logger.propagate = saved
    lines = [line for r in records for line in r.getMessage().splitlines()]
    kept = {}
    for line in lines:
        if line.strip().startswith("kept '"):
            layer, _, reason = line.strip()[len("kept '"):].partition("': ")
            kept[layer] = reason
    return dict(quantized=sorted(n for n, m in model.named_modules() if is_quantized(m)), kept=kept,
                experts=sorted(expert_tensors(model)))
