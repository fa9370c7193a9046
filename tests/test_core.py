"""Contract tests of the adapter core over every supported layer type (Linear, GPT-2 Conv1D, Embedding)."""

import json

import pytest
import torch
from tiny_models import perturb_adapters, tiny_gpt2, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from transformers.pytorch_utils import Conv1D

import lightning_lora as ll
from lightning_lora.io import files
from lightning_lora.methods.lora import lora_linear

# (model factory, targets, layer type) - one case per supported layer type and architecture
CASES = {
    "llama-linear": (tiny_llama, ["q_proj", "v_proj", "down_proj"], torch.nn.Linear),
    "gpt2-conv1d": (tiny_gpt2, ["c_attn", "c_fc"], Conv1D),
    "llama-embedding": (tiny_llama, ["embed_tokens"], torch.nn.Embedding),
    "gpt2-embedding": (tiny_gpt2, ["wte"], torch.nn.Embedding),
}


@pytest.fixture(params=sorted(CASES))
def case(request):
    return CASES[request.param]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_identity_at_init(case, ids):
    make, targets, _ = case
    model = make()
    base = model(ids).logits
    ll.inject(model, ll.LoRA(r=4, alpha=8, target_modules=targets))
    assert torch.equal(model(ids).logits, base)


def test_only_adapters_get_gradients(case, ids):
    make, targets, kind = case
    model = make().train()
    ll.inject(model, ll.LoRA(r=4, target_modules=targets, dropout=0.1))
    perturb_adapters(model)
    model(ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert with_grad and all(".adapters.default.lora_" in n for n in with_grad)
    assert sum(isinstance(m, ll.AdapterLayer) and isinstance(m.base_layer, kind) for m in model.modules()) >= 1


def test_forward_matches_formula_linear():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 24)
    W, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    model = torch.nn.Sequential(layer)
    for rslora, scale in ((False, 12 / 4), (True, 12 / 2)):
        ll.inject(model, ll.LoRA(r=4, alpha=12, rslora=rslora, target_modules=["0"]), name=f"a{rslora}")
        ll.set_adapter(model, f"a{rslora}")
        branch = model[0].adapters[f"a{rslora}"]
        with torch.no_grad():
            branch.lora_B.normal_()
        x = torch.randn(3, 5, 16)
        expected = x @ W.T + b + scale * (x @ branch.lora_A.T) @ branch.lora_B.T
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_lora_function_gradients_with_dropout():
    """Backward of the fused branch equals autograd of the textbook formula, same dropout mask (seeded)."""
    torch.manual_seed(0)
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    base = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)

    def fused(x, base, A, B):
        torch.manual_seed(7)
        return lora_linear(x, base, A, B, 0.5, 0.3)

    assert torch.autograd.gradcheck(fused, (x, base, A, B))
    out = fused(x, base, A, B)
    kept = (out - base).abs().sum(1) > 0  # rows fully dropped produce no change: the mask is really applied
    torch.manual_seed(7)
    mask = torch.empty(x.shape, dtype=torch.bool).bernoulli_(0.7)
    reference = base + 0.5 * ((x * mask / 0.7) @ A.T) @ B.T
    torch.testing.assert_close(out, reference)
    assert kept.any()


def test_merge_parity_and_plain_layers_back(case, ids):
    make, targets, kind = case
    model = make()
    ll.inject(model, ll.LoRA(r=4, target_modules=targets))
    perturb_adapters(model)
    unmerged = model(ids).logits
    ll.merge(model)
    assert not any(isinstance(m, ll.AdapterLayer) for m in model.modules())
    assert (model(ids).logits - unmerged).abs().max() < 1e-5


def test_remove_restores_base_bit_for_bit(case, ids):
    make, targets, _ = case
    model = make()
    before, flags = snapshot(model), {n: p.requires_grad for n, p in model.named_parameters()}
    base = model(ids).logits
    ll.inject(model, ll.LoRA(r=4, target_modules=targets))
    perturb_adapters(model)
    ll.remove(model)
    assert_same_state(model, before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(model(ids).logits, base)


def test_save_load_round_trip_exact(case, ids, tmp_path):
    make, targets, _ = case
    model = make()
    ll.inject(model, ll.LoRA(r=4, alpha=6, target_modules=targets))
    perturb_adapters(model)
    ll.save_adapter(model, tmp_path / "a")
    fresh = make()
    ll.load_adapter(fresh, tmp_path / "a")
    assert torch.equal(fresh(ids).logits, model(ids).logits)
    for k, v in ll.adapter_state_dict(model).items():
        assert torch.equal(ll.adapter_state_dict(fresh)[k], v)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_loads_our_adapter(case, ids, tmp_path, rslora):
    make, targets, _ = case
    model = make()
    ll.inject(model, ll.LoRA(r=4, alpha=8, rslora=rslora, target_modules=targets))
    perturb_adapters(model)
    ll.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_rslora"] is rslora
    peft_model = PeftModel.from_pretrained(make(), tmp_path).eval()
    assert (peft_model(ids).logits - model(ids).logits).abs().max() < 1e-5


def test_we_load_peft_adapter(case, ids, tmp_path):
    make, targets, _ = case
    fan_in_fan_out = make is tiny_gpt2 and "wte" not in targets
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=fan_in_fan_out, init_lora_weights=False)
    peft_model = get_peft_model(make(), config).eval()  # init_lora_weights=False: random B, a visible effect
    peft_model.save_pretrained(tmp_path)
    model = make()
    ll.load_adapter(model, tmp_path)
    reference = peft_model(ids).logits
    assert (model(ids).logits - reference).abs().max() < 1e-5
    assert (reference - make()(ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("q_proj", {"q_proj"}),
        (["q_proj", "v_proj"], {"q_proj", "v_proj"}),
        ("*.mlp.*_proj", {"gate_proj", "up_proj", "down_proj"}),
        (r".*\.(k|o)_proj", {"k_proj", "o_proj"}),
        ("all-linear", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ],
)
def test_target_matching(spec, expected):
    model = tiny_llama()
    ll.inject(model, ll.LoRA(target_modules=spec))
    adapted = {n for n, m in model.named_modules() if isinstance(m, ll.AdapterLayer)}
    assert {n.rsplit(".", 1)[-1] for n in adapted} == expected
    assert len(adapted) == 2 * len(expected)  # both decoder layers, never lm_head


def test_exclude_modules():
    model = tiny_llama()
    ll.inject(model, ll.LoRA(target_modules="all-linear", exclude_modules=["layers.0.self_attn.q_proj", "*.mlp.*"]))
    adapted = {n for n, m in model.named_modules() if isinstance(m, ll.AdapterLayer)}
    assert "model.layers.0.self_attn.q_proj" not in adapted and "model.layers.1.self_attn.q_proj" in adapted
    assert not any(".mlp." in n for n in adapted)


# --- bad input: a clear error, and nothing changed ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "r (the rank) must be a positive integer"),
        (dict(r=-2), "positive integer"),
        (dict(alpha=0), "alpha must be > 0"),
        (dict(dropout=1.0), "dropout must be in [0, 1)"),
        (dict(dropout=-0.1), "dropout must be in [0, 1)"),
        (dict(target_modules=[]), "target_modules is empty"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        ll.LoRA(**kwargs)


def test_target_matching_nothing_lists_names():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="matches no layer") as err:
        ll.inject(model, ll.LoRA(target_modules=["qkv"]))
    assert "q_proj" in str(err.value) and "down_proj" in str(err.value)
    assert_same_state(model, before)
    assert not any(isinstance(m, ll.AdapterLayer) for m in model.modules())


def test_unsupported_layer_type_is_named():
    model = tiny_llama()
    with pytest.raises(ValueError, match="cannot adapt .*input_layernorm.*LlamaRMSNorm"):
        ll.inject(model, ll.LoRA(target_modules=["input_layernorm"]))
    assert not any(isinstance(m, ll.AdapterLayer) for m in model.modules())


def test_second_injection_same_name(ids):
    model = tiny_llama()
    ll.inject(model, ll.LoRA(target_modules=["q_proj"]))
    perturb_adapters(model)
    before, out = snapshot(model), model(ids).logits
    with pytest.raises(ValueError, match="already on the model"):
        ll.inject(model, ll.LoRA(target_modules=["v_proj"]))
    assert_same_state(model, before)
    assert torch.equal(model(ids).logits, out)


def test_adapter_with_wrong_shapes_changes_nothing(tmp_path):
    small = tiny_llama()
    ll.inject(small, ll.LoRA(r=4, target_modules=["q_proj"]))
    ll.save_adapter(small, tmp_path)
    weights = files.load_tensors(tmp_path / "adapter_model.safetensors")
    key = next(k for k in weights if k.endswith("layers.1.self_attn.q_proj.lora_B.weight"))
    weights[key] = torch.zeros(48, 4)  # another model's width
    files.save_tensors(weights, tmp_path / "adapter_model.safetensors")
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.q_proj.*\(48, 4\).*\(64, 4\)"):
        ll.load_adapter(model, tmp_path)
    assert_same_state(model, before)
    assert not any(isinstance(m, ll.AdapterLayer) for m in model.modules())


def test_missing_and_truncated_files(tmp_path):
    model = tiny_llama()
    ll.inject(model, ll.LoRA(r=4, target_modules=["q_proj"]))
    ll.save_adapter(model, tmp_path / "a")
    fresh = tiny_llama()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ll.load_adapter(fresh, tmp_path / "nowhere")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        ll.load_adapter(fresh, tmp_path / "a")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors does not exist"):
        ll.load_adapter(fresh, tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text('{"peft_type": "LO')
    with pytest.raises(ValueError, match="not valid JSON"):
        ll.load_adapter(fresh, tmp_path / "a")
    assert not any(isinstance(m, ll.AdapterLayer) for m in fresh.modules())


def test_merge_refuses_non_finite_and_changes_nothing(ids):
    model = tiny_llama()
    ll.inject(model, ll.LoRA(r=4, target_modules=["q_proj", "v_proj"]))
    perturb_adapters(model)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.adapters["default"].lora_B[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match="non-finite.*layers.1.self_attn.v_proj|layers.1.self_attn.v_proj.*non-finite"):
        ll.merge(model)
    assert all(torch.allclose(v, before[k], rtol=0, atol=0, equal_nan=True) for k, v in model.state_dict().items())
    assert isinstance(model.model.layers[0].self_attn.q_proj, ll.AdapterLayer)  # nothing merged, not even layer 0


# --- found in review -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [ll.LoRA(r=4), ll.LoRA(r=4, dropout=0.1), ll.DoRA(r=4), ll.VeRA(r=8)], ids=str)
def test_mixed_precision_autocast_trains(config, ids):
    """Under bf16 autocast (Lightning's bf16-mixed) the adapters compute in fp32 and backward runs."""
    model = tiny_llama().train()
    ll.inject(model, config)
    perturb_adapters(model, std=0.01)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_second_adapter_on_earlier_layers_keeps_the_active_one():
    model = tiny_llama()
    ll.inject(model, ll.LoRA(r=2, target_modules=["v_proj"]), "a")
    ll.inject(model, ll.LoRA(r=2, target_modules=["q_proj"]), "b")  # q_proj comes before v_proj in the model
    assert ll.active_adapters(model) == {"a": 1.0}
    trainable = {n.split(".adapters.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"a"}


def test_vera_under_inference_mode(ids):
    model = tiny_llama()
    ll.inject(model, ll.VeRA(r=8))
    perturb_adapters(model)
    with torch.no_grad():
        expected = model(ids).logits
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, expected)


def test_dora_injects_on_the_meta_device():
    with torch.device("meta"):
        model = tiny_llama()
    ll.inject(model, ll.DoRA(r=4))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


def test_dora_must_be_the_only_active_adapter(ids):
    model = tiny_llama()
    ll.inject(model, ll.LoRA(r=2, target_modules=["q_proj"]), "l")
    ll.inject(model, ll.DoRA(r=2, target_modules=["q_proj"]), "d")
    before = ll.active_adapters(model)
    with pytest.raises(ValueError, match="'d' \\(DoRA\\) must be the only active adapter"):
        ll.set_adapter(model, ["l", "d"])
    assert ll.active_adapters(model) == before
    ll.set_adapter(model, "d")  # alone it is fine, and merge equals forward
    perturb_adapters(model)
    out = model(ids).logits
    assert (ll.merge(model)(ids).logits - out).abs().max() < 1e-5
