"""train/lean.py and train/lean_swap.py: the lean RMSNorm, SwiGLU and rotary functions against Hugging Face's own
modules (the oracle), over the architecture matrix: the same loss and gradients (fp32, within 1e-6 of each
gradient's largest entry; they are in fact bitwise equal), every swapped block called, fewer bytes saved for
backward by exactly what the module docstring counts, refusals where a family's block is of another form."""

from __future__ import annotations

import collections
import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from architectures import ARCHS
from tiny_models import perturb_adapters, tiny_llama

import lightning_lora as ll
from lightning_lora.train import lean
from lightning_lora.train.attention import use_packed_attention
from lightning_lora.train.checkpointing import enable_checkpointing
from lightning_lora.train.lean_swap import use_lean_activations
from lightning_lora.train.loss import causal_lm_loss

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
# Blocks of another form, refused by their probe: (family, what is left as it is)
OTHER_FORMS = {("gpt_oss", "apply_rotary_pos_emb"), ("deepseek_v3", "apply_rotary_pos_emb")}  # halves, interleaved


def adapted(build, seed: int = 0):
    model = build()
    ll.inject(model, ll.LoRA(r=4, alpha=8))
    perturb_adapters(model, std=0.1, seed=seed)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    use_packed_attention(model)
    return model.train()


def loss_and_grads(model, ids=IDS, **kwargs):
    loss = causal_lm_loss(model, ids, ids, **kwargs)
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params)


def assert_same(ref, got, tol: float = 1e-6):
    assert abs(ref[0].item() - got[0].item()) <= tol * max(1.0, abs(ref[0].item()))
    for a, b in zip(ref[1], got[1]):
        assert (a - b).abs().max().item() <= tol * max(a.abs().max().item(), 1e-30)


@pytest.fixture
def counted(monkeypatch):
    """Calls of each lean autograd function."""
    calls = collections.Counter()
    for name in ("_RMSNorm", "_SwiGLU", "_Rotary"):
        cls = getattr(lean, name)
        monkeypatch.setattr(cls, "apply", (lambda f, n: lambda *a: calls.update([n]) or f(*a))(cls.apply, name))
    return calls


def expected_blocks(model) -> collections.Counter:
    """What the model has of each block, found here independently: RMSNorm modules, SwiGLU MLPs, and with a rotary
    embedding module one rotation per decoder layer."""
    found = collections.Counter()
    for m in model.modules():
        name = type(m).__name__
        found["_RMSNorm"] += name.endswith("RMSNorm")
        silu = type(getattr(m, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")
        found["_SwiGLU"] += hasattr(m, "gate_proj") and hasattr(m, "up_proj") and silu
    if any(type(m).__name__.endswith("RotaryEmbedding") for m in model.modules()):
        found["_Rotary"] = model.config.num_hidden_layers
    return +found


@pytest.mark.parametrize("arch", ARCHS, ids=[a.name for a in ARCHS])
def test_lean_model_computes_the_same_and_calls_every_block(arch, counted):
    plain = adapted(arch.build)
    model = copy.deepcopy(plain)
    verdict = use_lean_activations(model)
    ref = loss_and_grads(plain)
    loss_and_grads(model)  # the first call also runs the library's one-time probes
    counted.clear()
    got = loss_and_grads(model)
    assert_same(ref, got)
    expected = expected_blocks(plain)
    if any(a == arch.name for a, _ in OTHER_FORMS):
        expected.pop("_Rotary")
    assert verdict.ok == bool(expected)
    assert counted == expected, (dict(counted), dict(expected))


def test_functions_equal_the_modules_bitwise_with_a_residual_stream():
    """Each form of RMSNorm (Llama, cast last: OLMo-2, Gemma's 1 + w), SwiGLU and RoPE (full, partial as Phi-3's)
    against transformers' own code, with x also feeding a residual add (the order autograd sums its gradients)."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.llama import modeling_llama
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
    from transformers.models.phi3 import modeling_phi3

    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(2, 5, 64, generator=g) * 3, torch.randn(2, 5, 64, generator=g)
    for cls, form in ((modeling_llama.LlamaRMSNorm, (0.0, False)), (Olmo2RMSNorm, (0.0, True)), (Gemma2RMSNorm, (1.0, True))):
        norm = cls(64)
        norm.weight.data = torch.randn(64, generator=g)
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        results = []
        for fn in (norm, lambda h: lean.rms_norm(h, norm.weight, eps, *form)):
            xi = x.clone().requires_grad_()
            y = fn(xi)
            gx, gw = torch.autograd.grad((y * dy).sum() + (xi * dy).sum(), (xi, norm.weight))
            results.append((y, gx, gw))
        assert all(torch.equal(a, b) for a, b in zip(*results)), cls.__name__

    gate, up, dp = (torch.randn(3, 7, 32, generator=g) for _ in range(3))
    results = []
    for fn in (lambda a, b: F.silu(a) * b, lean.swiglu):
        a, b = gate.clone().requires_grad_(), up.clone().requires_grad_()
        results.append((fn(a, b), *torch.autograd.grad((fn(a, b) * dp).sum(), (a, b))))
    assert all(torch.equal(p, q) for p, q in zip(*results))

    q, k = torch.randn(1, 4, 6, 16, generator=g), torch.randn(1, 2, 6, 16, generator=g)
    for module, width in ((modeling_llama, 16), (modeling_phi3, 8)):
        cos, sin = torch.randn(1, 6, width, generator=g), torch.randn(1, 6, width, generator=g)
        results = []
        for fn in (module.apply_rotary_pos_emb, lean.rotary):
            qi, ki = q.clone().requires_grad_(), k.clone().requires_grad_()
            oq, ok = fn(qi, ki, cos, sin)
            results.append((oq, ok, *torch.autograd.grad((oq * oq.detach()).sum() + (ok * 2).sum(), (qi, ki))))
        assert all(torch.equal(p, q) for p, q in zip(*results)), module.__name__


def saved_bytes(model) -> int:
    """Bytes autograd keeps for backward in one forward (storages counted once, parameters not counted)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lm_loss(model, IDS, IDS)
    return sum(seen.values())


def test_saved_bytes_drop_by_two_norm_outputs_silu_and_product_per_token_and_layer():
    plain = adapted(tiny_llama)
    model = copy.deepcopy(plain)
    use_lean_activations(model)
    saved_bytes(plain), saved_bytes(model)  # the first calls run the one-time probes
    c = plain.config
    per_token_layer = 2 * c.hidden_size + 2 * c.intermediate_size  # y of both norms, silu(gate), the product
    # but the first norm's input (the frozen embedding's output) needs no gradient: that norm keeps nothing, so its
    # output, which q/k/v's adapters keep, is no recipe
    per_token = c.num_hidden_layers * per_token_layer - c.hidden_size
    assert saved_bytes(plain) - saved_bytes(model) == IDS.numel() * per_token * 4


def test_lean_with_checkpointing_packing_and_a_shared_prefix():
    plain = adapted(tiny_llama)
    ids = torch.randint(3, 128, (1, 14), generator=torch.Generator().manual_seed(2))
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 3, 4, 5, 6, 0, 1, 2]])  # 2 examples sharing 3 tokens, a third
    ref = loss_and_grads(plain, ids, position_ids=position_ids)
    for mode in (True, "mlp"):
        model = copy.deepcopy(plain)
        enable_checkpointing(model, mode)
        assert use_lean_activations(model)
        assert_same(ref, loss_and_grads(model, ids, position_ids=position_ids))


def test_refusals_are_logged_and_the_family_elsewhere_unchanged(caplog, counted):
    class OddRMSNorm(torch.nn.Module):  # an RMSNorm of another form: a shift after the scale
        def __init__(self, norm):
            super().__init__()
            self.weight, self.variance_epsilon = norm.weight, norm.variance_epsilon

        def forward(self, x):
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) + 0.5

    model, other = adapted(tiny_llama), adapted(tiny_llama, seed=1)
    model.model.norm = OddRMSNorm(model.model.norm)
    with caplog.at_level(logging.INFO, logger="lightning_lora"):
        assert use_lean_activations(model)
    assert "OddRMSNorm: not one of the RMSNorm forms" in caplog.text and "forward" not in vars(model.model.norm)
    loss_and_grads(other)
    counted.clear()
    loss_and_grads(other)  # another llama without lean: the module-global rotary dispatcher leaves it alone
    assert not counted
    use_lean_activations(model, enabled=False)
    loss_and_grads(model)
    assert not counted and not any("forward" in vars(m) for m in model.modules())


def test_an_input_changed_in_place_after_the_forward_is_refused():
    model = adapted(tiny_llama)
    use_lean_activations(model)
    loss_and_grads(model)
    norm_inputs = []
    norm = model.model.layers[1].post_attention_layernorm
    handle = norm.register_forward_pre_hook(lambda m, args: norm_inputs.append(args[0]))
    with lean.saving_lean():
        loss = model(input_ids=IDS).logits.sum()
    handle.remove()
    with torch.no_grad():
        norm_inputs[0].add_(1.0)  # what the norm's output, kept by the MLP's adapters as a recipe, is rebuilt from
    with pytest.raises(RuntimeError, match="recomputed activation was modified"):
        loss.backward()
