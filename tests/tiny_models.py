"""Tiny Hugging Face models built from a config (no download), with fixed seeds, and a helper to make adapters visible."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
GPT2 = dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**GPT2)).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def saved_bytes(model: torch.nn.Module, run) -> dict[int, int]:
    """Bytes autograd keeps for backward while ``run()`` runs ``model``: storage -> bytes, unique storages,
    parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return saved


def perturb_adapters(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """Give every trainable tensor a random value, so an adapter's effect is visible (its init is the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * std)


def adapted_for_training(kind: str):
    """A tiny model of ``kind`` with LoRA r 4 on its default targets, visible adapters, no dropout, in train mode."""
    from lightning_lora import LoRA, inject

    model = MODELS[kind](0)
    inject(model, LoRA(r=4))
    perturb_adapters(model)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model.train()


def unpacked_loss(model: torch.nn.Module, examples: list[dict]) -> torch.Tensor:
    """Hugging Face's mean loss over the labeled tokens of ``examples`` ({"input_ids", "labels"} 1-D), each run alone:
    the reference for packed rows."""
    total = count = 0
    for b in examples:
        n = int((b["labels"][1:] != -100).sum())
        total = total + model(input_ids=b["input_ids"][None], labels=b["labels"][None], use_cache=False).loss * n
        count += n
    return total / count


def q8_0(w: torch.Tensor) -> torch.Tensor:
    """Q8_0 as ggml defines it: blocks of 32 along a row, d = max|x| / 127 stored as f16, q = round(x / d)."""
    blocks = w.reshape(-1, 32)
    d = blocks.abs().amax(1, keepdim=True) / 127
    q = torch.round(blocks / torch.where(d == 0, torch.ones_like(d), d))
    return (q * d.half().float()).reshape(w.shape)


def rounded_copy(model: torch.nn.Module, dtype) -> torch.nn.Module:
    """A copy of ``model`` whose matrices (2-D and up) went through ``dtype`` (a torch dtype or "q8_0"): the
    reference for a GGUF file that stores them so."""
    import copy

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() >= 2:
                p.copy_(q8_0(p) if dtype == "q8_0" else p.to(dtype).float())
    return ref
