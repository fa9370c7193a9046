"""The method contract's hooks beyond the matrix (tests/test_contract.py): options decided by the layer's name, a
branch wrapping the base call (one base call, the base's autocast), merge writing the bias, the registry's refusal
of a duplicate name, and outside methods written against the older two-argument ``build``."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from tiny_models import perturb_adapters, tiny_llama
from torch import nn

import lightning_lora as ll
from lightning_lora.core.kinds import merged_base_layer
from lightning_lora.core.layer import METHODS, AdapterConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ia3_method import IA3  # noqa: E402

FEEDFORWARD = IA3(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])


def count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_names_decide_the_side_and_peft_agrees(ids, tmp_path):
    """IA3's feedforward_modules is chosen by name at build; PEFT (the oracle) computes the same both ways."""
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    ll.inject(model, FEEDFORWARD)
    perturb_adapters(model, std=0.2)
    layers = model.model.layers[0]
    assert layers.mlp.down_proj.adapters["default"].wraps_base
    assert not layers.self_attn.v_proj.adapters["default"].wraps_base
    ll.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["feedforward_modules"] == ["down_proj"]
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        expected = model.eval()(ids).logits
        torch.testing.assert_close(theirs(ids).logits, expected, rtol=1e-5, atol=1e-5)
        mine = tiny_llama()
        ll.load_adapter(mine, tmp_path)
        torch.testing.assert_close(mine(ids).logits, expected, rtol=0, atol=0)


def test_a_wrapping_branch_calls_the_base_once_under_its_autocast():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8))
    ll.inject(net, IA3(target_modules=["0"], feedforward_modules=["0"]))
    perturb_adapters(net)
    layer, x = net[0], torch.randn(4, 16)
    calls = count_calls(layer.base_layer)
    scale = layer.adapters["default"].ia3_l.detach()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
        expected = nn.functional.linear(x * scale, layer.base_layer.weight, layer.base_layer.bias)
    assert calls == [1]
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)  # the same autocast GEMM as the base's
    with torch.no_grad():
        ll.set_adapter(net, "default")
        rows = [None, "default", None, "default"]
        alone = [net(x[i : i + 1]) if n else nn.functional.linear(x[i : i + 1], layer.base_layer.weight,
                 layer.base_layer.bias) for i, n in enumerate(rows)]  # fmt: skip
        with ll.per_sample_adapters(net.eval(), rows):
            torch.testing.assert_close(net(x), torch.cat(alone), rtol=1e-6, atol=1e-6)


def test_merge_writes_the_bias_through_the_kind_table(ids):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3, bias=False))
    ll.inject(net, IA3(target_modules="all-linear"))
    perturb_adapters(net, std=0.3)
    x = torch.randn(4, 6)
    l0 = net[0].adapters["default"].ia3_l.detach().clone()
    bias = net[0].base_layer.bias.detach().clone()
    with torch.no_grad():
        before = net(x)
        ll.merge(net)
        torch.testing.assert_close(net[0].bias, l0 * bias)  # b' = l * b, the formula
        torch.testing.assert_close(net(x), before, rtol=1e-6, atol=1e-6)
    assert net[2].bias is None  # a layer without a bias keeps none when the method leaves it alone
    with pytest.raises(ValueError, match="embedding layer has no bias"):
        merged_base_layer(nn.Embedding(4, 3), torch.zeros(4, 3), new_bias=torch.zeros(3))


def test_a_duplicate_method_name_is_refused():
    with pytest.raises(TypeError, match="method name 'LoRA' is taken by lightning_lora.methods.lora.LoRA"):

        @dataclasses.dataclass
        class MyLoRA(ll.LoRA):
            method: ClassVar[str] = "LoRA"

    assert METHODS["LoRA"] is ll.LoRA


def test_an_older_two_argument_build_still_works(ids, tmp_path):
    """An outside method written before build got the layer's name (and to_peft the per-layer map)."""

    @dataclasses.dataclass
    class Old(AdapterConfig):
        r: int = 2
        peft_type: ClassVar[str] = "LORA"

        def build(self, base_layer, shared=None):
            return ll.LoRA(r=self.r).build(base_layer, shared, "")

        def to_peft(self, targets):
            return ll.LoRA(r=self.r, alpha=16.0).to_peft(targets)

    model = tiny_llama()
    ll.inject(model, Old(target_modules=["q_proj"]))
    perturb_adapters(model)
    ll.save_adapter(model, tmp_path)
    other = tiny_llama()
    ll.load_adapter(other, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(other(ids).logits, model(ids).logits, rtol=0, atol=0)
