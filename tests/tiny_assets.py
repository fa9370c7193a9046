"""Tiny on-disk Hugging Face assets, built offline: a causal LM folder (Llama or GPT-2) with a working fast tokenizer.

``make_tiny_model_dir(path)`` writes what ``AutoModelForCausalLM.from_pretrained(path)`` and
``AutoTokenizer.from_pretrained(path)`` read, with no network. The tokenizer is a byte-level BPE (GPT-2 style, so
every string round-trips and nothing is unknown) trained on the stdlib's ``pydoc_data.topics`` prose; special tokens
are split out before pre-tokenization, so text tokenizes piecewise between them (tests rely on that).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

PAD, EOS = "<|pad|>", "<|end|>"
SPECIALS = [PAD, EOS, "<|system|>", "<|user|>", "<|assistant|>"]
VOCAB_SIZE = 384  # 256 bytes + specials + merges
MAX_POSITIONS = 512
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


def make_tiny_model_dir(path, arch: str = "llama", seed: int = 0, chat_template: bool = True) -> Path:
    """Save a tiny causal LM (hidden 64, 2 layers) and its tokenizer into ``path``; return ``path``.

    The model's vocabulary size equals the tokenizer's; pad/eos ids are set in its config. ``chat_template=False``
    saves a tokenizer without a chat template (for the plain "prompt\\nresponse" rendering).
    """
    path = Path(path)
    tok = make_tiny_tokenizer(chat_template)
    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
               bos_token_id=tok.eos_token_id)
    if arch == "llama":
        config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS, **ids)
    elif arch == "gpt2":
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=MAX_POSITIONS, **ids)
    else:
        raise ValueError(f"arch must be 'llama' or 'gpt2', got {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
