"""Tiny on-disk Hugging Face assets, built offline: a causal LM folder with a working fast tokenizer.

``make_tiny_model_dir(path, arch)`` (``arch`` a key of ``FAMILIES``, or ``"gpt2"``) writes what
``AutoModelForCausalLM.from_pretrained(path)`` and ``AutoTokenizer.from_pretrained(path)`` read, with no network. The
tokenizer is a byte-level BPE (GPT-2 style, so every string round-trips and nothing is unknown) trained on the stdlib's
``pydoc_data.topics`` prose; special tokens are split out before pre-tokenization, so text tokenizes piecewise between
them (tests rely on that).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
    SmolLM3Config,
)

PAD, EOS = "<|pad|>", "<|end|>"
SPECIALS = [PAD, EOS, "<|system|>", "<|user|>", "<|assistant|>"]
VOCAB_SIZE = 384  # 256 bytes + specials + merges
MAX_POSITIONS = 512
SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=MAX_POSITIONS)
# model_type -> (config class, its extra arguments, rows of vocabulary padding beyond the tokenizer). Qwen pads its
# vocabulary (and transformers' Qwen2Tokenizer adds a token). Sizes that transformers' GGUF reader does not read back
# take the real models' values: Gemma's head_dim and query_pre_attn_scalar 256 (llama.cpp assumes that scale too),
# Qwen3's head_dim 128, Qwen3-MoE's moe_intermediate_size 768.
FAMILIES = {
    "llama": (LlamaConfig, {}, 0),
    "mistral": (MistralConfig, {}, 0),
    "mixtral": (MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2), 0),
    "qwen2": (Qwen2Config, dict(tie_word_embeddings=True), 8),
    "qwen2_moe": (Qwen2MoeConfig, dict(moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4,
                                       num_experts_per_tok=2), 8),
    "qwen3": (Qwen3Config, dict(head_dim=128), 8),
    "qwen3_moe": (Qwen3MoeConfig, dict(head_dim=128, moe_intermediate_size=768, num_experts=4, num_experts_per_tok=2,
                                       norm_topk_prob=True),
                  8),
    "gemma2": (Gemma2Config, dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=32), 0),
    "gemma3_text": (Gemma3TextConfig, dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=32), 0),
    "phi3": (Phi3Config, {}, 0),
    "smollm3": (SmolLM3Config, {}, 0),
    "granite": (GraniteConfig, dict(attention_multiplier=0.25, embedding_multiplier=2.0, residual_multiplier=0.5,
                                    logits_scaling=4.0), 0),
    "olmo2": (Olmo2Config, {}, 0),
}
# Each turn: "<|role|>\n" + content + "<|end|>\n"; the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@functools.lru_cache(maxsize=None)
def _tokenizer_json() -> str:
    """Train the byte-level BPE once per process (about 0.5 s) and return it serialized."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((topics[k] for k in sorted(topics)), trainer=trainer)
    return tok.to_str()


def make_tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()), pad_token=PAD, eos_token=EOS,
    )
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[2:]})
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


@functools.lru_cache(maxsize=None)
def _sentencepiece_model() -> bytes:
    """A SentencePiece BPE with byte fallback (as Llama 2's, Gemma's) trained on the same prose (about 0.3 s)."""
    import io

    import sentencepiece as spm
    from pydoc_data.topics import topics

    out = io.BytesIO()
    lines = [line for k in sorted(topics) for line in topics[k].splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, vocab_size=VOCAB_SIZE,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, pad_id=0, unk_id=1,
                                   bos_id=2, eos_id=3, user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
                                   minloglevel=2, num_threads=1)  # fmt: skip
    return out.getvalue()


def make_tiny_sentencepiece_tokenizer(path, tokenizer_class: str = "LlamaTokenizer"):
    """Write ``tokenizer.model`` and the Hugging Face files of a tiny SentencePiece tokenizer into ``path``."""
    from transformers import AutoTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(_sentencepiece_model())
    names = dict(pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    (path / "tokenizer_config.json").write_text(json.dumps(dict(tokenizer_class=tokenizer_class, **names)))
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return tok


def make_tiny_model_dir(path, arch: str = "llama", seed: int = 0, chat_template: bool = True,
                        tokenizer: str = "bpe", **overrides) -> Path:
    """Save a tiny causal LM (hidden 64, 2 layers) and its tokenizer into ``path``; return ``path``.

    The model's vocabulary size equals the tokenizer's (plus the family's padding); pad/eos ids are set in its config.
    ``chat_template=False`` saves a tokenizer without a chat template (for the plain "prompt\\nresponse" rendering).
    ``overrides`` replace arguments of the family's config class. ``tokenizer="sentencepiece"`` writes a SentencePiece
    tokenizer (Gemma's class for Gemma, else Llama's) instead of the byte-level BPE.
    """
    path = Path(path)
    if tokenizer == "sentencepiece":
        kind = "GemmaTokenizer" if arch.startswith("gemma") else "LlamaTokenizer"
        tok = make_tiny_sentencepiece_tokenizer(path, kind)
    else:
        tok = make_tiny_tokenizer(chat_template)
    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
               bos_token_id=tok.eos_token_id)
    if arch in FAMILIES:
        cls, extra, padding = FAMILIES[arch]
        config = cls(**(SHAPE | extra | ids | {"vocab_size": len(tok) + padding} | overrides))
    elif arch == "gpt2":
        config = GPT2Config(**(dict(n_embd=64, n_layer=2, n_head=4, n_positions=MAX_POSITIONS) | ids | overrides))
    else:
        raise ValueError(f"arch must be one of {sorted(FAMILIES)} or 'gpt2', got {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
