"""Property-based tests over random layer shapes, ranks, alphas and methods (hypothesis)."""

import os
import tempfile

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import lightning_lora as ll

widths = st.integers(min_value=1, max_value=40)


@st.composite
def cases(draw):
    dims = draw(st.lists(widths, min_size=2, max_size=4))
    kinds = draw(st.lists(st.sampled_from(["linear", "conv1d"]), min_size=len(dims) - 1, max_size=len(dims) - 1))
    method = draw(st.sampled_from(["lora", "rslora", "dora", "vera"]))
    r = draw(st.integers(min_value=1, max_value=16))
    alpha = draw(st.floats(min_value=0.1, max_value=64.0))
    dropout = draw(st.sampled_from([0.0, 0.1]))
    seed = draw(st.integers(min_value=0, max_value=2**16))
    return dims, kinds, method, r, alpha, dropout, seed


def build(dims, kinds, seed):
    torch.manual_seed(seed)
    layers = [nn.Linear(a, b) if k == "linear" else Conv1D(b, a) for a, b, k in zip(dims, dims[1:], kinds)]
    for layer in layers:
        if isinstance(layer, Conv1D):
            nn.init.normal_(layer.weight, std=0.2)
            nn.init.normal_(layer.bias, std=0.2)
    return nn.Sequential(*layers).eval()


def config(method, r, alpha, dropout):
    if method == "vera":
        return ll.VeRA(r=r, dropout=dropout, seed=r)
    cls = ll.DoRA if method == "dora" else ll.LoRA
    return cls(r=r, alpha=alpha, dropout=dropout, rslora=method == "rslora", target_modules="all-linear")


def adapted(case):
    dims, kinds, method, r, alpha, dropout, seed = case
    model = build(dims, kinds, seed)
    ll.inject(model, config(method, r, alpha, dropout))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model, torch.randn(5, dims[0], generator=gen)


@settings(max_examples=int(os.environ.get("LL_EXAMPLES", 40)), deadline=None)
@given(cases())
@example(([1, 6], ["linear"], "dora", 6, 62.0, 0.0, 5143))  # DoRA: an update cancelling 96% of a row's norm
def test_merge_equals_unmerged(case):
    model, x = adapted(case)
    with torch.no_grad():
        expected = model(x)
        ll.merge(model)
        merged = model(x)
    scale = 1.0 + expected.abs().max().item()
    assert (merged - expected).abs().max().item() <= 1e-5 * scale
    assert not any(isinstance(m, ll.AdapterLayer) for m in model.modules())


@settings(max_examples=int(os.environ.get("LL_EXAMPLES", 25)), deadline=None)
@given(cases())
def test_save_load_is_exact(case):
    model, x = adapted(case)
    dims, kinds, method, r, alpha, dropout, seed = case
    with tempfile.TemporaryDirectory() as folder:
        ll.save_adapter(model, folder)
        fresh = build(dims, kinds, seed)
        ll.load_adapter(fresh, folder)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@settings(max_examples=int(os.environ.get("LL_EXAMPLES", 40)), deadline=None)
@given(cases())
def test_remove_restores_base_bit_for_bit(case):
    dims, kinds, method, r, alpha, dropout, seed = case
    model = build(dims, kinds, seed)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ll.inject(model, config(method, r, alpha, dropout))
    ll.remove(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert all(p.requires_grad for p in model.parameters())
