"""train/loss.py: the labeled-only chunked loss against Hugging Face's own ``model(..., labels=...).loss`` (the oracle),
its gradients, bf16 accumulation, gradient checkpointing, and that no full logits tensor is ever built."""

from __future__ import annotations

import pytest
import torch
from tiny_models import MODELS, perturb_adapters

from lightning_lora import LoRA, inject
from lightning_lora.train.head import head_swap_verdict
from lightning_lora.train.loss import causal_lm_loss

VOCAB = 128


def batch(seed: int = 0, rows: int = 3, length: int = 20) -> dict:
    """Random tokens; prompts (first 5-8 labels) masked, one row right-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -6:] = 0
    labels = ids.clone()
    for i in range(rows):
        labels[i, : 5 + i] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def adapted(kind: str, head: bool, seed: int = 0):
    model = MODELS[kind](seed)
    targets = "all-linear" if not head else (["lm_head", "q_proj", "v_proj"] if kind == "llama" else ["lm_head", "c_attn"])
    inject(model, LoRA(r=4, target_modules=targets))
    perturb_adapters(model, seed=seed)
    for m in model.modules():  # GPT-2's dropout would make two forwards differ
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    head_swap_verdict(model)  # the loss's one-time probe, run now so that tests counting calls see the loss's own
    return model.train()


def grads(model, loss) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("head", [False, True], ids=["frozen_head", "adapted_head"])
@pytest.mark.parametrize("chunk_size", [7, 512])
def test_loss_and_gradients_equal_hugging_face(kind, head, chunk_size):
    model, b = adapted(kind, head), batch()
    if kind == "gpt2":
        assert model.lm_head.base_layer.weight is model.transformer.wte.weight if head else True  # tied
    ref = model(**b).loss
    ours = causal_lm_loss(model, b["input_ids"], b["labels"], b["attention_mask"], chunk_size=chunk_size)
    assert ours.dtype == torch.float32
    assert abs(ours.item() - ref.item()) < 1e-5
    g_ref, g_ours = grads(model, ref), grads(model, ours)
    assert any("lm_head" in n for n in g_ours) == head
    for name in g_ref:
        assert torch.allclose(g_ours[name], g_ref[name], atol=1e-5, rtol=1e-4), name


def test_model_unchanged_after_the_call():
    model, b = adapted("gpt2", True), batch()
    head = model.get_output_embeddings()
    causal_lm_loss(model, b["input_ids"], b["labels"], b["attention_mask"])
    assert model.get_output_embeddings() is head
    assert model.lm_head is head


def test_never_builds_logits_for_all_positions():
    """No tensor with a vocab-wide last dim has more rows than one chunk (the labeled rows are fewer than positions)."""
    model, b = adapted("llama", True), batch(rows=4, length=40)
    seen = []

    def hook(module, args, out):
        seen.append(out.shape)

    handle = model.lm_head.register_forward_hook(hook)
    try:
        loss = causal_lm_loss(model, b["input_ids"], b["labels"], b["attention_mask"], chunk_size=16)
        loss.backward()
    finally:
        handle.remove()
    labeled = int((b["labels"][:, 1:] != -100).sum())
    assert seen and all(s[-1] == VOCAB and s[0] <= 16 for s in seen)
    # each chunk is run once in forward and once more (recomputed) in backward, never kept
    assert sum(s[0] for s in seen) == 2 * labeled


def test_plain_head_runs_each_chunk_once_and_keeps_no_logits(monkeypatch):
    """A plain linear head gets its gradients inside forward: one head matmul per chunk, none in backward."""
    model, b = adapted("llama", False), batch(rows=4, length=40)
    calls, head_weight = [], model.lm_head.weight
    linear = torch.nn.functional.linear

    def counting(x, weight, bias=None):
        if weight is head_weight:
            calls.append(x.shape[0])
        return linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", counting)
    loss = causal_lm_loss(model, b["input_ids"], b["labels"], b["attention_mask"], chunk_size=16)
    forward_calls = len(calls)
    loss.backward()
    labeled = int((b["labels"][:, 1:] != -100).sum())
    assert sum(calls) == labeled and all(n <= 16 for n in calls) and len(calls) == forward_calls


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_trainable_plain_head_with_bias_gets_hugging_face_gradients(kind):
    model, b = adapted(kind, False), batch()
    torch.manual_seed(1)
    model.lm_head = torch.nn.Linear(64, VOCAB, bias=True)  # untied, trained, with a bias
    ref = model(**b).loss
    ours = causal_lm_loss(model, b["input_ids"], b["labels"], b["attention_mask"], chunk_size=7)
    assert abs(ours.item() - ref.item()) < 1e-5
    g_ref, g_ours = grads(model, ref), grads(model, ours)
    assert {"lm_head.weight", "lm_head.bias"} <= set(g_ours)
    for name in g_ref:
        assert torch.allclose(g_ours[name], g_ref[name], atol=1e-5, rtol=1e-4), name


def test_plain_head_in_bf16_stays_close_to_hugging_face():
    model, b = adapted("llama", False), batch(rows=4, length=40)
    ref = model(**b).loss.item()
    model16 = model.to(torch.bfloat16)
    ours = causal_lm_loss(model16, b["input_ids"], b["labels"], b["attention_mask"], chunk_size=3)
    ours.backward()
    assert ours.dtype == torch.float32 and abs(ours.item() - ref) / ref < 2e-2
    assert all(p.grad.dtype == torch.bfloat16 for p in model16.parameters() if p.requires_grad)


def test_no_labeled_position_gives_zero_with_a_graph():
    model, b = adapted("llama", False), batch()
    loss = causal_lm_loss(model, b["input_ids"], torch.full_like(b["labels"], -100))
    assert loss.item() == 0.0 and loss.requires_grad


def test_bad_chunk_size_is_refused():
    model, b = adapted("llama", False), batch()
    with pytest.raises(ValueError, match="chunk_size"):
        causal_lm_loss(model, b["input_ids"], b["labels"], chunk_size=0)


def test_bf16_accumulates_in_fp32():
    """A bf16 model's loss is close to the fp32 model's; the sum over many chunks is fp32 (no bf16 rounding drift)."""
    model, b = adapted("llama", True), batch(rows=4, length=40)
    ref = model(**b).loss.item()
    model16 = model.to(torch.bfloat16)
    ours = causal_lm_loss(model16, b["input_ids"], b["labels"], b["attention_mask"], chunk_size=3)
    assert ours.dtype == torch.float32
    assert abs(ours.item() - ref) / ref < 2e-2
    hf16 = model16(**b).loss.float().item()  # HF upcasts logits too: both are one bf16 forward away from fp32
    assert abs(ours.item() - hf16) / ref < 2e-2


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_gradient_checkpointing_recomputes_adapters_and_matches(kind):
    model, b = adapted(kind, True), batch()
    ref_loss = model(**b).loss
    g_ref = grads(model, ref_loss)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    layer = next(m for n, m in model.named_modules() if n.endswith(("q_proj", "c_attn")) and hasattr(m, "adapters"))
    handle = layer.register_forward_hook(lambda *a: calls.append(1))
    try:
        ours = causal_lm_loss(model, b["input_ids"], b["labels"], b["attention_mask"])
        forward_calls = len(calls)
        g_ours = grads(model, ours)
    finally:
        handle.remove()
    assert len(calls) == 2 * forward_calls  # the adapted layer ran again in backward: recomputed, not kept
    assert abs(ours.item() - ref_loss.item()) < 1e-5
    for name in g_ref:
        assert torch.allclose(g_ours[name], g_ref[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.slow
def test_smollm2_loss_and_gradients_equal_hugging_face():
    """The real SmolLM2-135M (tied 49,152-word head), LoRA on every linear layer and on lm_head, fp32."""
    from lightning_lora.io.models import load_causal_lm

    model, tok = load_causal_lm("smollm2-135m-instruct")
    inject(model, LoRA(r=4, target_modules=["q_proj", "down_proj", "lm_head"]))
    perturb_adapters(model, std=0.02)
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -10:] = 0
    labels = ids.clone()
    labels[:, :12] = -100
    labels[mask == 0] = -100
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    ours = causal_lm_loss(model, ids, labels, mask, chunk_size=16)
    assert abs(ours.item() - ref.item()) < 1e-5
    g_ref, g_ours = grads(model, ref), grads(model, ours)
    for name in g_ref:
        assert torch.allclose(g_ours[name], g_ref[name], atol=1e-5, rtol=1e-4), name
