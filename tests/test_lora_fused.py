"""The fused LoRA branch (lora.py: ``lora_linear``) against the formula y = W x + s B A (m * x / (1 - p)), in float64,
for values and all three gradients: with and without dropout, in place or not, with and without autograd."""

import pytest
import torch

from lightning_lora.methods.lora import lora_linear


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 7, dtype=torch.float64, generator=gen).requires_grad_()  # 70 elements: not a multiple of 8
    W = torch.randn(6, 7, dtype=torch.float64, generator=gen)
    A = torch.randn(3, 7, dtype=torch.float64, generator=gen).requires_grad_()
    B = torch.randn(6, 3, dtype=torch.float64, generator=gen).requires_grad_()
    return x, W, A, B


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_values_and_gradients_match_the_formula(p, inplace):
    x, W, A, B = _inputs()
    s = 0.7
    torch.manual_seed(1)
    out = lora_linear(x, x @ W.t(), A, B, s, p, inplace=inplace)
    torch.manual_seed(1)  # the kept-mask, drawn as the function draws it (Bernoulli(1 - p) per element of x)
    mask = torch.empty(10, 7, dtype=torch.bool).bernoulli_(1 - p).view(2, 5, 7) if p else torch.ones(2, 5, 7)
    if p:
        assert 0 < mask.sum() < mask.numel()
    ref = x @ W.t() + s * ((x * mask / (1 - p)) @ A.t()) @ B.t()
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, (x, A, B), g)
    want = torch.autograd.grad(ref, (x, A, B), g)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("inplace", [False, True])
def test_no_grad_path_adds_into_the_base_output_only_when_asked(inplace):
    x, W, A, B = _inputs(2)
    with torch.no_grad():
        base = x @ W.t()
        before = base.clone()
        out = lora_linear(x, base, A, B, 0.5, 0.0, inplace=inplace)
        ref = before + 0.5 * (x @ A.t()) @ B.t()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert (out is base) == inplace
    if not inplace:
        assert torch.equal(base, before)  # DoRA reuses its base output: the default must not touch it


def test_mixed_dtypes_compute_in_the_adapter_dtype_and_return_the_base_dtype():
    x, W, A, B = _inputs(3)
    with torch.no_grad():
        base = (x @ W.t()).float()
        out = lora_linear(x.float(), base, A, B, 0.5, 0.0, inplace=True)
        ref = x @ W.t() + 0.5 * (x @ A.t()) @ B.t()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-5)


def test_bf16_base_saves_the_layers_input_not_an_fp32_copy():
    """Adapters are fp32 over a bf16 base: backward must keep the bf16 input the base layer saves, not a cast copy."""
    import lightning_lora as ll

    model = torch.nn.Sequential(torch.nn.Linear(64, 32)).to(torch.bfloat16)
    ll.inject(model, ll.LoRA(r=4, target_modules=["0"]))
    x = torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = model(x)
    assert out.dtype == torch.bfloat16
    inputs = [t for t in saved if t.shape == x.shape]
    assert inputs and all(t.dtype == torch.bfloat16 for t in inputs)
    out.float().sum().backward()
    branch = model[0].adapters["default"]
    assert branch.lora_A.grad is not None and branch.lora_A.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
