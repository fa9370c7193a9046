"""NF4 quantization (QLoRA, arXiv:2305.14314): config checks, which layers are replaced, storage bits, round-trip
error against a hand-written NF4 quantizer, odd widths on CPU, original weights, bitsandbytes optimizers."""

import functools
import math

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from lightning_lora import LoRA, inject  # noqa: E402
from lightning_lora.core.layer import dense_weight, is_quantized  # noqa: E402
from lightning_lora.train.memory import check_optimizer_supported, quant_state_tensors  # noqa: E402
from lightning_lora.quant.nf4 import NF4, nf4_rounding_error, original_weights, quantize, quantized_layer_names  # noqa: E402

# The 16 NF4 levels (QLoRA appendix E): quantiles of N(0, 1) normalized to [-1, 1], with an exact zero.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])


def nf4_reference(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """W -> absmax_b * nearest NF4 level of W / absmax_b, per block of the flattened (out, in) matrix."""
    blocks = w.reshape(-1, blocksize)
    absmax = blocks.abs().amax(1, keepdim=True)
    idx = (blocks / absmax).unsqueeze(-1).sub(NF4_LEVELS).abs().argmin(-1)
    return (NF4_LEVELS[idx] * absmax).reshape(w.shape)


def rel_rms(a, b):
    return float((a - b).norm() / b.norm())


def one_linear(out_f, in_f, nf4=None, seed=0, weight=None):
    """A one-layer model, quantized, and its original weight (nn.Linear's uniform init, or ``weight``)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_f, out_f))
    if weight is not None:
        with torch.no_grad():
            model[0].weight.copy_(weight)
    original = model[0].weight.detach().clone()
    return quantize(model, nf4 or NF4(skip_modules=())), original


# ---------------------------------------------------------------- config
@pytest.mark.parametrize("bad", [16, 48, 100, 8192, True, "64", 0])
def test_bad_blocksize_is_refused(bad):
    with pytest.raises(ValueError, match="blocksize must be one of"):
        NF4(blocksize=bad)


@pytest.mark.parametrize("bad", ["bfloat", "int8", "float64", 3, torch.int32])
def test_bad_compute_dtype_is_refused(bad):
    with pytest.raises(ValueError, match="NF4 compute_dtype=.* is not a dtype lightning_lora accepts"):
        NF4(compute_dtype=bad)


def test_dtypes_accept_strings_and_torch_dtypes():
    assert NF4(compute_dtype="bf16").compute_dtype == "bfloat16"
    assert NF4(compute_dtype=torch.float16).dtype_for("cpu") == torch.float16
    assert NF4(compute_dtype="torch.float32").dtype_for("cuda") == torch.float32
    assert NF4().dtype_for("cpu") == torch.float32 and NF4().dtype_for("cuda") == torch.bfloat16
    assert NF4(quant_storage="bf16").storage_dtype == torch.bfloat16 and NF4().storage_dtype == torch.uint8
    with pytest.raises(ValueError, match="quant_storage"):
        NF4(quant_storage="int4")
    assert NF4(skip_modules="lm_head").skip_modules == ("lm_head",)
    with pytest.raises(ValueError, match="skip_modules"):
        NF4(skip_modules=[""])


# ---------------------------------------------------------------- which layers
def test_quantize_replaces_eligible_linears_in_place():
    model = tiny_llama()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    out = quantize(model, NF4(blocksize=32))
    assert out is model
    for name in linears:
        layer = model.get_submodule(name)
        if name == "lm_head":
            assert type(layer) is nn.Linear
            continue
        assert isinstance(layer, bnb.nn.Linear4bit) and is_quantized(layer)
        state = layer.weight.quant_state
        assert state.quant_type == "nf4" and state.blocksize == 32 and state.nested
        assert not layer.weight.requires_grad
    before = {n: m for n, m in model.named_modules()}
    quantize(model, NF4(blocksize=32))  # already quantized: nothing changes
    assert {n: m for n, m in model.named_modules()} == before


def test_skip_modules_and_shapes_are_kept_with_a_log_line(caplog):
    model = tiny_llama()  # intermediate 96: down_proj's in_features is not a multiple of 64
    with caplog.at_level("INFO"):
        quantize(model, NF4(skip_modules=("lm_head", "v_proj")))
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert type(model.model.layers[1].self_attn.v_proj) is nn.Linear
    assert is_quantized(model.model.layers[1].self_attn.q_proj)
    assert "model.layers.0.mlp.down_proj" in caplog.text and "not a multiple of blocksize 64" in caplog.text
    assert "'model.layers.0.self_attn.v_proj': in skip_modules" in caplog.text


def test_gpt2_conv1d_is_not_quantized():
    model = tiny_gpt2()
    quantize(model, NF4())
    assert not any(is_quantized(m) for m in model.modules())  # c_attn, c_fc, ... are Conv1D; lm_head is skipped


def test_quantize_after_inject_is_refused_and_leaves_model_unchanged():
    model = inject(tiny_llama(), LoRA(r=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="quantize the base first, then inject"):
        quantize(model, NF4())
    assert not any(is_quantized(m) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- numerics and storage
def test_nf4_matches_a_hand_written_nf4_quantizer():
    model, w = one_linear(64, 256, NF4(double_quant=False, skip_modules=()))
    assert torch.allclose(dense_weight(model[0]), nf4_reference(w), atol=1e-6)


def test_round_trip_error_of_a_gaussian_matrix_is_nf4s():
    model, w = one_linear(512, 512, weight=torch.randn(512, 512, generator=torch.Generator().manual_seed(0)))
    err = rel_rms(dense_weight(model[0]), w)
    fp16 = rel_rms(w.half().float(), w)
    assert 0.07 < err < 0.11  # NF4, block 64: ~0.09 on Gaussian weights
    assert err > 50 * fp16  # fp16 keeps ~3e-4


@pytest.mark.parametrize("draw", ["gaussian", "uniform"])
def test_rounding_error_estimated_from_the_codes_alone(draw):
    model, w = one_linear(256, 512, weight=torch.randn(256, 512) if draw == "gaussian" else None)  # else uniform
    true = rel_rms(dense_weight(model[0]), w)
    assert abs(nf4_rounding_error(model[0]) - true) < 0.1 * true


@pytest.mark.parametrize("double_quant,bits", [(True, 4 + 8 / 64 + 32 / (64 * 256)), (False, 4 + 32 / 64)])
def test_storage_bits_per_parameter(double_quant, bits):
    model, w = one_linear(1024, 1024, NF4(double_quant=double_quant, skip_modules=()))
    tensors = quant_state_tensors(model[0])
    per_block = sum(t.numel() * t.element_size() for k, t in tensors.items() if k in ("data", "absmax", "state2.absmax"))
    assert per_block * 8 / w.numel() == pytest.approx(bits, abs=1e-9)  # 4.127 / 4.5 exactly
    total = sum(t.numel() * t.element_size() for t in tensors.values())  # + code tables and offset: per tensor
    assert total * 8 / w.numel() - bits < 0.01
    assert (math.isclose(bits, 4.126953125)) == double_quant


# ---------------------------------------------------------------- odd widths on CPU
WIDTHS = [(64, 64), (33, 64), (100, 128), (48, 64), (1, 64), (64, 33), (64, 96), (31, 31), (16, 1024)]


@pytest.mark.parametrize("out_f,in_f", WIDTHS)
def test_odd_widths_train_and_eval_or_are_skipped(out_f, in_f):
    model, w = one_linear(out_f, in_f)
    layer = model[0]
    if in_f % 64:
        assert type(layer) is nn.Linear  # kept: bitsandbytes' CPU kernel would misread its blocks
        return
    deq = dense_weight(layer).detach().clone()
    assert rel_rms(deq, w) < 0.12
    x = torch.randn(3, 5, in_f)
    want = x @ deq.t() + layer.bias.detach()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), want, atol=1e-5)  # eval: no fused-path assertion, fp32 result
    model.train()
    xg = x.clone().requires_grad_()
    y = model(xg)
    y.pow(2).sum().backward()
    assert torch.allclose(y, want, atol=1e-5)
    assert torch.allclose(xg.grad, 2 * want @ deq, atol=1e-4)  # gradient to the input flows through the 4-bit base
    assert torch.equal(dense_weight(layer), deq)  # eval did not repack the weight


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512", reason="the bug is in the AVX-512 kernel")
def test_why_rows_must_hold_whole_blocks():
    """Documents the bitsandbytes CPU bug quantize avoids: in_features 96, blocksize 64 -> ~2.5x the NF4 error."""
    torch.manual_seed(0)
    w = torch.randn(64, 96)
    q, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert rel_rms(bnb.functional.dequantize_4bit(q, state), w) > 0.15


# ---------------------------------------------------------------- original weights
def test_original_weights_from_folder_state_dict_and_module(tmp_path):
    source = tiny_llama()
    source.save_pretrained(tmp_path)
    model = quantize(tiny_llama(), NF4())
    names = quantized_layer_names(model)
    assert names and all(is_quantized(model.get_submodule(n)) for n in names)
    for given in (tmp_path, source.state_dict(), source):
        got = original_weights(given, names)
        assert set(got) == set(names)
        for n in names:
            assert torch.equal(got[n], source.get_submodule(n).weight)
    wrapped = original_weights(tmp_path, ["model." + names[0]])  # a wrapper's prefix is tolerated
    assert torch.equal(wrapped["model." + names[0]], source.get_submodule(names[0]).weight)
    with pytest.raises(ValueError, match="no weight for layer 'model.nope'"):
        original_weights(tmp_path, ["model.nope"])
    with pytest.raises(ValueError, match="no weight for layer"):  # a quantized model is no source of originals
        original_weights(model, names[:1])
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        original_weights(tmp_path / "missing", names)


def test_quantized_layer_names_after_inject_name_the_adapted_layer():
    model = quantize(tiny_llama(), NF4())
    names = quantized_layer_names(model)
    inject(model, LoRA(r=2))
    assert quantized_layer_names(model) == names


# ---------------------------------------------------------------- bitsandbytes optimizers
@pytest.mark.parametrize("name", ["AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "Lion8bit", "Adam"])
def test_bnb_optimizers_that_work_on_cpu_pass(name):
    check_optimizer_supported(getattr(bnb.optim, name), "cpu")


def test_bnb_optimizers_that_fail_on_cpu_give_a_clear_error():
    with pytest.raises(ValueError, match="AdEMAMix32bit .* does not work on cpu"):
        check_optimizer_supported(bnb.optim.AdEMAMix32bit, "cpu")
    with pytest.raises(ValueError, match="SGD8bit .*momentum"):
        check_optimizer_supported(bnb.optim.SGD8bit, "cpu")
    check_optimizer_supported(functools.partial(bnb.optim.SGD8bit, momentum=0.9), "cpu")
    # LightningCLI/jsonargparse hand the optimizer over as partial(call_helper, instantiator, cls, **init_args)
    as_cli = functools.partial(lambda _instantiator, cls, *a, **kw: cls(*a, **kw), object(), bnb.optim.SGD8bit, lr=0.1)
    with pytest.raises(ValueError, match="SGD8bit .*'lr': 0.1"):
        check_optimizer_supported(as_cli, "cpu")
    check_optimizer_supported(torch.optim.SGD, "cpu")  # not bitsandbytes: no trial needed


def test_adamw8bit_on_cpu_tracks_torch_adamw():
    """The 8-bit state is an approximation of AdamW's moments: same trajectory within a few percent."""
    def run(cls):
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(128, 64))
        opt, gen = cls([p], lr=1e-2, weight_decay=0.01), torch.Generator().manual_seed(1)
        for _ in range(5):
            p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return p.detach()

    start = run(lambda ps, **kw: torch.optim.SGD(ps, lr=0.0))
    ref, got = run(torch.optim.AdamW), run(bnb.optim.AdamW8bit)
    assert rel_rms(got - start, ref - start) < 0.1
