"""Sibling LoRA layers (q/k/v, gate/up) share one A GEMM: exact against the per-layer path (methods/siblings.py)."""

import pytest
import torch
from tiny_models import perturb_adapters, tiny_llama

from lightning_lora import LoRA, inject
from lightning_lora.methods import siblings
from lightning_lora.methods.lora import LoRABranch


def _float64_norms(model):
    """HF's Llama RMSNorm computes in fp32 whatever the model dtype; torch's RMSNorm keeps float64 throughout, so the
    comparison below sees the two paths' own difference, not fp32 rounding in the norms."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child).__name__ == "LlamaRMSNorm":
                norm = torch.nn.RMSNorm(child.weight.shape[0], eps=child.variance_epsilon, dtype=child.weight.dtype)
                norm.weight.data.copy_(child.weight.data)
                setattr(module, name, norm)
    return model


def _model(mixed_ranks: bool, dropout: float = 0.0, checkpointing: bool = False, dtype=torch.float64):
    base = tiny_llama().to(dtype)
    model = inject(_float64_norms(base) if dtype == torch.float64 else base, LoRA(r=4, alpha=8.0, dropout=dropout))
    model.to(dtype)  # the adapters too
    perturb_adapters(model, std=0.3, seed=1)
    if mixed_ranks:  # k gets rank 3 and its own scale, up gets rank 6: siblings with different ranks and scales
        gen = torch.Generator().manual_seed(2)
        for name, module in model.named_modules():
            if isinstance(module, LoRABranch) and (".k_proj." in name or ".up_proj." in name):
                r = 3 if ".k_proj." in name else 6
                out_f, in_f = module.lora_B.shape[0], module.lora_A.shape[1]
                module.lora_A = torch.nn.Parameter(torch.randn(r, in_f, generator=gen, dtype=dtype) * 0.2)
                module.lora_B = torch.nn.Parameter(torch.randn(out_f, r, generator=gen, dtype=dtype) * 0.2)
                module.scale = 0.7 if r == 3 else 1.9
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _step(model, seed: int):
    gen = torch.Generator().manual_seed(seed)
    dtype = model.model.embed_tokens.weight.dtype
    embeds = torch.randn(2, 7, model.config.hidden_size, generator=gen).to(dtype).requires_grad_()
    labels = torch.randint(0, model.config.vocab_size, (2, 7), generator=gen)
    out = model(inputs_embeds=embeds, labels=labels)
    out.loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), embeds.grad, grads


def _run(monkeypatch, enabled: bool, steps: int = 3, **kw):
    calls = []
    apply = siblings._GroupDown.apply
    monkeypatch.setattr(siblings, "ENABLED", enabled)
    monkeypatch.setattr(siblings._GroupDown, "apply", lambda *a: calls.append(len(a) - 1) or apply(*a))
    model = _model(**kw)
    return [_step(model, seed) for seed in range(steps)], calls


def _assert_same(fused, ref, tol: float = 1e-6):
    for (logits, gx, grads), (logits0, gx0, grads0) in zip(fused, ref):
        torch.testing.assert_close(logits, logits0, atol=tol, rtol=tol)
        torch.testing.assert_close(gx, gx0, atol=tol, rtol=tol)
        assert grads.keys() == grads0.keys()
        for name in grads0:
            assert (grads[name] is None) == (grads0[name] is None), name
            if grads0[name] is not None:
                torch.testing.assert_close(grads[name], grads0[name], atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("mixed_ranks", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_siblings_match_the_per_layer_path(monkeypatch, mixed_ranks, checkpointing):
    fused, calls = _run(monkeypatch, True, mixed_ranks=mixed_ranks, checkpointing=checkpointing)
    ref, ref_calls = _run(monkeypatch, False, mixed_ranks=mixed_ranks, checkpointing=checkpointing)
    assert ref_calls == []
    # Step 1 observes, its backward commits; steps 2 and 3 fuse q/k/v and gate/up of both layers (and, with
    # checkpointing, again in every recompute).
    per_step = [3, 2, 3, 2]
    assert calls == per_step * (2 * (2 if checkpointing else 1)) or sorted(calls) == sorted(per_step * 2 * (1 + checkpointing))
    _assert_same(fused, ref)


def test_fp32_differs_only_by_rounding(monkeypatch):
    """In fp32 the two paths sum in another order: the same values up to rounding (a few ulps through the model)."""
    fused, calls = _run(monkeypatch, True, mixed_ranks=True, dtype=torch.float32)
    ref, _ = _run(monkeypatch, False, mixed_ranks=True, dtype=torch.float32)
    assert calls
    _assert_same(fused, ref, tol=1e-5)


def test_dropout_never_fuses(monkeypatch):
    fused, calls = _run(monkeypatch, True, mixed_ranks=False, dropout=0.1)
    assert calls == []


def test_a_member_that_does_not_come_gets_no_gradient(monkeypatch):
    monkeypatch.setattr(siblings, "ENABLED", True)
    model = _model(mixed_ranks=False)
    _step(model, 0)  # observe
    _step(model, 1)  # fused
    k_layer = model.model.layers[0].self_attn.k_proj
    k_layer.enabled = False
    logits, gx, grads = _step(model, 2)
    monkeypatch.setattr(siblings, "ENABLED", False)
    logits0, gx0, grads0 = _step(model, 2)
    _assert_same([(logits, gx, grads)], [(logits0, gx0, grads0)])
    assert grads["model.layers.0.self_attn.k_proj.adapters.default.lora_A"] is None


def test_different_inputs_never_fuse(monkeypatch):
    """Two layers called with equal but distinct tensors (or the same tensor changed in place) compute on their own."""
    monkeypatch.setattr(siblings, "ENABLED", True)
    model = _model(mixed_ranks=False, dtype=torch.float32)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 5, model.config.hidden_size)
    for _ in range(2):  # observe, then commit through a backward
        (attn.q_proj(x).sum() + attn.k_proj(x).sum()).backward()
    q_branch, k_branch = attn.q_proj.adapters["default"], attn.k_proj.adapters["default"]
    assert [r() for r in siblings._GROUPS[q_branch]] == [q_branch, k_branch]  # q and k form a group
    y = x.clone()
    got = attn.q_proj(x), attn.k_proj(y)
    ref = attn.q_proj.base_layer(x), attn.k_proj.base_layer(y)
    with torch.no_grad():
        for layer, out, base, inp in zip((attn.q_proj, attn.k_proj), got, ref, (x, y)):
            branch = layer.adapters["default"]
            expect = base + branch.scale * inp @ branch.lora_A.t() @ branch.lora_B.t()
            torch.testing.assert_close(out, expect, atol=1e-6, rtol=1e-6)
    q = attn.q_proj(x)
    x.mul_(2.0)  # in place: k must see the new values
    k = attn.k_proj(x)
    with torch.no_grad():
        branch = attn.k_proj.adapters["default"]
        expect = attn.k_proj.base_layer(x) + branch.scale * x @ branch.lora_A.t() @ branch.lora_B.t()
    torch.testing.assert_close(k, expect, atol=1e-6, rtol=1e-6)
