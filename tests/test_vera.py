"""VeRA (arXiv:2310.11454) against y = Wx + lambda_b * (B_s (lambda_d * (A_s x))) with A and B regenerated here
exactly as PEFT draws them, and against PEFT as the oracle (files both ways)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, VeraConfig, get_peft_model
from safetensors.torch import load_file
from torch import nn

from tiny_models import perturb_adapters, tiny_gpt2, tiny_llama
from lightning_lora import VeRA, inject, load_adapter, merge, save_adapter, set_adapter

TOL = 1e-5


def projections(seed: int, r: int, max_in: int, max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's recipe: Kaiming-uniform (gain sqrt(2), fan-in) from a CPU generator, A (r, max_in) first, then B."""
    g = torch.Generator("cpu").manual_seed(seed)
    A = nn.init.kaiming_uniform_(torch.empty(r, max_in), a=0.0, nonlinearity="relu", generator=g)
    B = nn.init.kaiming_uniform_(torch.empty(max_out, r), a=0.0, nonlinearity="relu", generator=g)
    return A, B


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(20, 32)
        self.down = nn.Linear(32, 12, bias=False)

    def forward(self, x):
        return self.down(self.up(x))


def reference(x, W, b, A, B, lambda_d, lambda_b, weight=1.0):
    out = x @ W.t() + weight * lambda_b * ((lambda_d * (x @ A.t())) @ B.t())
    return out if b is None else out + b


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_forward_and_grads_match_formula(weight):
    net = inject(Net(), VeRA(r=8, seed=3, target_modules=["up", "down"]))
    set_adapter(net, {"default": weight})
    perturb_adapters(net, std=0.3)
    A, B = projections(3, 8, max_in=32, max_out=32)
    x = torch.randn(2, 5, 20, requires_grad=True)
    net(x).pow(2).sum().backward()

    up, down = net.up.adapters["default"], net.down.adapters["default"]
    params = [t.detach().clone().requires_grad_(True) for t in (up.lambda_d, up.lambda_b, down.lambda_d, down.lambda_b)]
    xr = x.detach().clone().requires_grad_(True)
    hidden = reference(xr, net.up.weight, net.up.bias, A[:, :20], B[:32], params[0], params[1], weight)
    ref = reference(hidden, net.down.weight, None, A[:, :32], B[:12], params[2], params[3], weight)
    ref.pow(2).sum().backward()
    assert (net(x) - ref).abs().max() < TOL
    ours = (up.lambda_d, up.lambda_b, down.lambda_d, down.lambda_b, x)
    for mine, theirs in zip(ours, params + [xr]):
        assert torch.allclose(mine.grad, theirs.grad, rtol=1e-4, atol=1e-5), (mine.grad - theirs.grad).abs().max()


def test_projections_are_pefts_and_shared_once():
    net = inject(Net(), VeRA(r=8, seed=5, target_modules=["up", "down"]))
    up, down = net.up.adapters["default"], net.down.adapters["default"]
    A, B = projections(5, 8, 32, 32)
    assert torch.equal(up.projections.A, A) and torch.equal(up.projections.B, B)
    assert up.projections is down.projections
    assert up.sliced()[0].data_ptr() == down.sliced()[0].data_ptr()  # one copy, sliced per layer
    assert not any("proj" in k for k in net.state_dict())  # not a buffer per layer


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_identity_at_init_and_merge(make, ids):
    base = make()(ids).logits
    model = inject(make(), VeRA(r=16))
    assert torch.equal(model(ids).logits, base)
    perturb_adapters(model)
    unmerged = model(ids).logits
    assert (unmerged - base).abs().max() > 1e-3
    merge(model)
    assert (model(ids).logits - unmerged).abs().max() < TOL


def test_dropout_only_in_train():
    net = inject(Net(), VeRA(r=8, dropout=0.5, target_modules=["up"]))
    perturb_adapters(net, std=0.5)
    x = torch.randn(16, 20)
    A, B = projections(0, 8, 20, 32)
    br = net.up.adapters["default"]
    expected = reference(x, net.up.weight, net.up.bias, A, B, br.lambda_d, br.lambda_b)
    assert (net.eval().up(x) - expected).abs().max() < TOL
    assert (net.train().up(x) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("save_projection", [False, True])
def test_files_hold_vectors_and_seed_unless_projections_asked(save_projection, ids, tmp_path):
    model = inject(tiny_llama(), VeRA(r=16, seed=7, save_projection=save_projection))
    perturb_adapters(model)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["projection_prng_key"] == 7
    assert config["save_projection"] is save_projection
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    suffixes = {k.rsplit(".", 1)[-1] for k in tensors}
    assert suffixes == ({"vera_lambda_b", "vera_lambda_d", "vera_A", "vera_B"} if save_projection else {"vera_lambda_b", "vera_lambda_d"})
    if save_projection:
        A, B = projections(7, 16, 96, 96)  # the widest adapted layer in and out: the MLP (96)
        assert torch.equal(tensors["base_model.vera_A"], A) and torch.equal(tensors["base_model.vera_B"], B)
    loaded = load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("save_projection", [False, True])
def test_peft_loads_our_vera(make, save_projection, ids, tmp_path):
    model = inject(make(), VeRA(r=16, seed=11, save_projection=save_projection))
    perturb_adapters(model)
    save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(make(), tmp_path).eval()
    assert (peft_model(ids).logits - model(ids).logits).abs().max() < TOL


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_we_load_peft_vera(make, ids, tmp_path):
    targets = ["q_proj", "v_proj", "up_proj"] if make is tiny_llama else ["c_attn", "c_fc"]
    config = VeraConfig(r=16, target_modules=targets, projection_prng_key=4, fan_in_fan_out=make is tiny_gpt2)
    peft_model = get_peft_model(make(), config)
    perturb_adapters(peft_model)
    peft_model.eval().save_pretrained(tmp_path)
    model = load_adapter(make(), tmp_path)
    assert (model(ids).logits - peft_model(ids).logits).abs().max() < TOL


def test_over_nf4_identity_and_formula():
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    dense = nn.Linear(64, 96)
    layer = bnb.nn.Linear4bit(64, 96, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4", blocksize=64)
    layer.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    net = nn.Sequential()
    net.add_module("proj", layer.to("cpu"))
    x = torch.randn(3, 7, 64)
    base = net(x).detach()
    inject(net, VeRA(r=32, target_modules=["proj"]))
    assert torch.equal(net(x), base)
    perturb_adapters(net)
    q, br = net.proj.base_layer, net.proj.adapters["default"]
    W = bnbf.dequantize_4bit(q.weight.data, q.weight.quant_state).reshape(96, 64)
    A, B = projections(0, 32, 64, 96)
    out = net(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(br.lambda_d.grad).all()
    assert (out - reference(x, W, q.bias, A, B, br.lambda_d, br.lambda_b)).abs().max() < 1e-4


class TwoReaders(nn.Module):
    """Two layers reading the same input tensor (as q, k, v do): they share one projection u = A x."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(20, 16), nn.Linear(20, 24)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], -1)


def test_shared_input_projection_gives_formula_and_follows_changes():
    net = inject(TwoReaders(), VeRA(r=8, target_modules=["a", "b"]))
    perturb_adapters(net, std=0.3)
    A, B = projections(0, 8, 20, 24)
    a, b = net.a.adapters["default"], net.b.adapters["default"]

    def expected(x):
        return torch.cat([reference(x, net.a.weight, net.a.bias, A, B[:16], a.lambda_d, a.lambda_b),
                          reference(x, net.b.weight, net.b.bias, A, B, b.lambda_d, b.lambda_b)], -1)  # fmt: skip

    x = torch.randn(5, 20, requires_grad=True)
    net(x).pow(2).sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    expected(xr).pow(2).sum().backward()
    assert torch.allclose(x.grad, xr.grad, rtol=1e-4, atol=1e-5)  # both layers' gradients reach x
    with torch.no_grad():
        net(x)
        x.mul_(-2.0)  # same tensor object, new content
        assert (net(x) - expected(x)).abs().max() < TOL
        y = x.detach().clone()
        assert (net(y) - expected(y)).abs().max() < TOL


def test_gradient_checkpointing_gives_the_same_gradients(ids):
    grads = []
    for checkpointing in (False, True):
        model = inject(tiny_llama(), VeRA(r=16))
        perturb_adapters(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6) for k in grads[0])
