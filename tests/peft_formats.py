"""PEFT folders from the wild: a registry of the formats PEFT writes beyond plain LoRA (``modules_to_save``,
``trainable_token_indices``, ``bias``) x the tiny models they apply to. ``tests/test_peft_wild.py`` runs every
(format, model, method) both ways with PEFT as the oracle; a new format is one line here."""

from __future__ import annotations

import dataclasses

import torch
from tiny_models import LLAMA, tiny_gpt2
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification


def llama() -> LlamaForCausalLM:
    """Untied head; biases on attention and MLP (so ``bias`` has something to train)."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**LLAMA, attention_bias=True, mlp_bias=True)).eval()


def llama_tied() -> LlamaForCausalLM:
    """The head is the input embedding (SmolLM2's layout)."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**LLAMA, tie_word_embeddings=True)).eval()


def llama_classifier() -> LlamaForSequenceClassification:
    """A classifier: its ``score`` head is what PEFT's SEQ_CLS task saves whole."""
    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(**LLAMA, num_labels=3, pad_token_id=0)).eval()


MODELS = {"llama": llama, "llama_tied": llama_tied, "gpt2": tiny_gpt2, "llama_classifier": llama_classifier}
TARGETS = {"llama": ["q_proj", "v_proj"], "llama_tied": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
           "llama_classifier": ["q_proj", "v_proj"]}  # fmt: skip
TOKENS = [3, 5, 7]  # token ids the token formats train; the test input holds them


@dataclasses.dataclass(frozen=True)
class Format:
    """One PEFT format: ``LoraConfig`` fields per model (``fields[model]``), the models it applies to."""

    fields: dict

    def models(self) -> list[str]:
        return list(self.fields)


def _all(**fields) -> dict:
    return {m: fields for m in ("llama", "llama_tied", "gpt2")}


FORMATS = {
    "modules_to_save_head": Format(_all(modules_to_save=["lm_head"])),
    # PEFT's rule is str.endswith: "norm" selects the final norm and every layer's *_layernorm too
    "modules_to_save_norms": Format({"llama": {"modules_to_save": ["norm"]}, "gpt2": {"modules_to_save": ["ln_f"]}}),
    "modules_to_save_score": Format({"llama_classifier": {"task_type": "SEQ_CLS"}}),  # PEFT adds classifier, score
    "tokens": Format(_all(trainable_token_indices=TOKENS)),  # the input embedding (and a head tied to it)
    "tokens_by_layer": Format({"llama": {"trainable_token_indices": {"embed_tokens": TOKENS, "lm_head": [3, 9]}},
                               "llama_tied": {"trainable_token_indices": {"embed_tokens": TOKENS, "lm_head": TOKENS}},
                               "gpt2": {"trainable_token_indices": {"wte": TOKENS}}}),  # fmt: skip
    "bias_all": Format({"llama": {"bias": "all"}, "gpt2": {"bias": "all"}}),
    "bias_lora_only": Format({"llama": {"bias": "lora_only"}, "gpt2": {"bias": "lora_only"}}),
    "everything": Format({"llama": dict(modules_to_save=["lm_head"], trainable_token_indices=TOKENS, bias="all"),
                          "gpt2": dict(modules_to_save=["ln_f"], trainable_token_indices=TOKENS, bias="lora_only")}),
}
CASES = [(f, m) for f, spec in FORMATS.items() for m in spec.models()]
