"""DoRA (arXiv:2402.09353) against the formula y = m * (W + sBA) / ||W + sBA||_row x + b with the norm computed
directly and detached (paper section 4.3), and against PEFT as the oracle (files both ways)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tiny_models import perturb_adapters, tiny_gpt2, tiny_llama
from lightning_lora import DoRA, inject, load_adapter, merge, save_adapter

TOL = 1e-5


class Net(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def weight_of(layer: nn.Module) -> torch.Tensor:
    return layer.weight.t() if isinstance(layer, Conv1D) else layer.weight


def reference(x, W, b, A, B, m, s):
    """The DoRA formula written out: the norm of the full (out, in) matrix, detached."""
    combined = W + s * (B @ A)
    norm = torch.linalg.norm(combined, dim=1).detach()
    out = x @ ((m / norm)[:, None] * combined).t()
    return out if b is None else out + b


def make_layer(kind: str, n_in: int = 20, n_out: int = 24, bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    if kind == "conv1d":
        layer = Conv1D(n_out, n_in)
        nn.init.normal_(layer.weight, std=0.2)
        nn.init.normal_(layer.bias, std=0.2)
        return layer
    return nn.Linear(n_in, n_out, bias=bias)


@pytest.mark.parametrize("kind,bias", [("linear", True), ("linear", False), ("conv1d", True)])
def test_forward_and_grads_match_formula_with_detached_norm(kind, bias):
    net = Net(make_layer(kind, bias=bias))
    W = weight_of(net.proj).detach().clone()
    b = None if net.proj.bias is None else net.proj.bias.detach().clone()
    inject(net, DoRA(r=4, alpha=6, target_modules=["proj"]))
    perturb_adapters(net, std=0.3)
    branch = net.proj.adapters["default"]
    with torch.no_grad():
        branch.magnitude[:3] = 0.0  # rows that output only the bias still need a correct gradient
    x = torch.randn(2, 5, 20, requires_grad=True)
    net(x).pow(2).sum().backward()

    A, B, m = (t.detach().clone().requires_grad_(True) for t in (branch.lora_A, branch.lora_B, branch.magnitude))
    xr = x.detach().clone().requires_grad_(True)
    ref = reference(xr, W, b, A, B, m, 6 / 4)
    ref.pow(2).sum().backward()
    assert (net(x) - ref).abs().max() < TOL
    for ours, theirs in ((branch.lora_A, A), (branch.lora_B, B), (branch.magnitude, m), (x, xr)):
        assert torch.allclose(ours.grad, theirs.grad, rtol=1e-4, atol=1e-5), (ours.grad - theirs.grad).abs().max()


def test_norm_is_detached_not_differentiated():
    """With a norm that receives gradient the B gradient differs: the test above can tell the two apart."""
    net = Net(make_layer("linear"))
    W, b = net.proj.weight.detach().clone(), net.proj.bias.detach().clone()
    inject(net, DoRA(r=4, alpha=8, target_modules=["proj"]))
    perturb_adapters(net, std=0.3)
    branch = net.proj.adapters["default"]
    x = torch.randn(6, 20)
    net(x).pow(2).sum().backward()
    B = branch.lora_B.detach().clone().requires_grad_(True)
    combined = W + 2.0 * (B @ branch.lora_A.detach())
    attached = x @ ((branch.magnitude.detach() / combined.norm(dim=1))[:, None] * combined).t() + b
    attached.pow(2).sum().backward()
    assert not torch.allclose(branch.lora_B.grad, B.grad, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_identity_at_init_is_bit_exact(make, ids):
    base = make()(ids).logits
    model = inject(make(), DoRA(r=4, alpha=8))
    assert torch.equal(model(ids).logits, base)
    for name, m in model.named_parameters():
        if name.endswith("magnitude"):
            layer = model.get_submodule(name.rsplit(".adapters.", 1)[0]).base_layer
            assert torch.allclose(m, weight_of(layer).norm(dim=1), rtol=1e-6)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_merge_matches_unmerged_and_formula(make, ids):
    model = inject(make(), DoRA(r=4, alpha=8, target_modules="all-linear"))
    perturb_adapters(model)
    unmerged = model(ids).logits
    layer = next(m for n, m in model.named_modules() if n.endswith(("q_proj", "c_attn")))
    br = layer.adapters["default"]
    W = weight_of(layer.base_layer).detach().clone()
    combined = W + br.scale * (br.lora_B @ br.lora_A)
    expected = (br.magnitude / combined.norm(dim=1))[:, None] * combined
    merged_layer_name = next(n for n, m in model.named_modules() if m is layer)
    merge(model)
    assert (model(ids).logits - unmerged).abs().max() < TOL
    assert (weight_of(model.get_submodule(merged_layer_name)) - expected).abs().max() < TOL


def test_weight_change_invalidates_cached_norm():
    net = Net(make_layer("linear"))
    inject(net, DoRA(r=4, alpha=8, target_modules=["proj"]))
    perturb_adapters(net)
    x = torch.randn(4, 20)
    net(x)  # fills the cache of ||W||^2
    with torch.no_grad():
        net.proj.base_layer.weight.mul_(1.7)
    br = net.proj.adapters["default"]
    W, b = net.proj.base_layer.weight, net.proj.base_layer.bias
    assert (net(x) - reference(x, W, b, br.lora_A, br.lora_B, br.magnitude, br.scale)).abs().max() < TOL


def test_eval_ignores_dropout_and_train_applies_it():
    net = Net(make_layer("linear"))
    inject(net, DoRA(r=4, alpha=8, dropout=0.5, target_modules=["proj"]))
    perturb_adapters(net, std=0.3)
    br = net.proj.adapters["default"]
    x = torch.randn(8, 20)
    ref = reference(x, net.proj.base_layer.weight, net.proj.base_layer.bias, br.lora_A, br.lora_B, br.magnitude, 2.0)
    net.eval()
    assert (net(x) - ref).abs().max() < TOL
    net.train()
    assert (net(x) - ref).abs().max() > 1e-3


# PEFT both ways for DoRA (Linear, GPT-2 Conv1D, Conv1d/2d/3d, NF4): tests/test_contract.py.


def test_save_load_round_trip_is_exact(ids, tmp_path):
    model = inject(tiny_llama(), DoRA(r=4, alpha=8, rslora=True))
    perturb_adapters(model)
    save_adapter(model, tmp_path)
    loaded = load_adapter(tiny_llama(), tmp_path)
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    theirs = {n: p for n, p in loaded.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def nf4_linear(n_in: int = 64, n_out: int = 96) -> nn.Module:
    import bitsandbytes as bnb

    torch.manual_seed(0)
    dense = nn.Linear(n_in, n_out)
    layer = bnb.nn.Linear4bit(n_in, n_out, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4", blocksize=64)
    layer.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")


def test_over_nf4_identity_then_formula_on_dequantized_weight():
    import bitsandbytes.functional as bnbf

    net = Net(nf4_linear()).train()
    x = torch.randn(3, 7, 64)
    base = net(x).detach()
    inject(net, DoRA(r=4, alpha=8, target_modules=["proj"]))
    assert torch.equal(net(x), base)
    perturb_adapters(net)
    q = net.proj.base_layer
    W = bnbf.dequantize_4bit(q.weight.data, q.weight.quant_state).reshape(96, 64)
    br = net.proj.adapters["default"]
    out = net(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(br.magnitude.grad).all()
    assert (out - reference(x, W, q.bias, br.lora_A, br.lora_B, br.magnitude, 2.0)).abs().max() < 1e-4


def test_dropout_backward_matches_autograd_with_the_same_mask():
    """gradcheck of the fused DoRA function with dropout (the mask is re-drawn identically from the seed)."""
    from lightning_lora.methods.dora import dora_linear

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, dtype=torch.float64, generator=gen).requires_grad_()
    base = torch.randn(6, 5, dtype=torch.float64, generator=gen).requires_grad_()
    A = torch.randn(3, 8, dtype=torch.float64, generator=gen).requires_grad_()
    B = torch.randn(5, 3, dtype=torch.float64, generator=gen).requires_grad_()
    m = (torch.rand(5, dtype=torch.float64, generator=gen) + 0.5).requires_grad_()
    norm = torch.rand(5, dtype=torch.float64, generator=gen) + 0.5

    def fused(x, base, A, B, m):
        torch.manual_seed(3)
        return dora_linear(x, base, A, B, m, norm, None, 0.5, 0.3)

    assert torch.autograd.gradcheck(fused, (x, base, A, B, m))
    torch.manual_seed(3)
    mask = torch.empty(x.shape, dtype=torch.bool).bernoulli_(0.7)
    expected = (m / norm) * (base + 0.5 * ((x * mask / 0.7) @ A.t()) @ B.t())
    torch.testing.assert_close(fused(x, base, A, B, m), expected)
