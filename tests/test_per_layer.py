"""Per-layer options: PEFT's ``rank_pattern``/``alpha_pattern`` for LoRA and DoRA, both ways, with PEFT as the
oracle (its matching rule ``peft.utils.other.get_pattern_key``, its layers' r and scaling, its logits)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import perturb_adapters, tiny_llama

import lightning_lora as ll
from lightning_lora.core.targets import pattern_key
from lightning_lora.core.verbs import layer_map

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANKS = {"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 6, "mlp.*_proj": 3}
ALPHAS = {"down_proj": 3.0, "model.layers.0.self_attn.k_proj": 12.0}


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


def test_the_matching_rule_is_pefts():
    from peft.utils.other import get_pattern_key

    names = [n for n, _ in tiny_llama().named_modules() if n]
    patterns = [["q_proj"], ["proj"], ["self_attn.q_proj", "q_proj"], [r"layers\.1\..*"], ["layers.0.mlp.up_proj"],
                ["mlp.*_proj", "down_proj"], ["o_proj$"], ["model"], ["(k|v)_proj"]]  # fmt: skip
    for keys in patterns:
        table = dict.fromkeys(keys, 1)
        for name in names:
            assert table.get(get_pattern_key(keys, name)) == table.get(pattern_key(keys, name)), (keys, name)


@pytest.mark.parametrize("fields", [{}, {"use_dora": True}, {"use_rslora": True}], ids=["lora", "dora", "rslora"])
def test_we_load_pefts_patterns(fields, ids, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, rank_pattern=RANKS, alpha_pattern=ALPHAS,
                             init_lora_weights=False, **fields)  # fmt: skip
    theirs = peft.get_peft_model(tiny_llama(), config)
    theirs.save_pretrained(tmp_path)
    ours = tiny_llama()
    ll.load_adapter(ours, tmp_path)
    for name, branch in layer_map(ours, "default").items():
        module = theirs.base_model.model.get_submodule(name)
        assert branch.r == module.r["default"] and branch.scale == pytest.approx(module.scaling["default"]), name
    assert {b.r for b in layer_map(ours, "default").values()} == {2, 3, 4, 6}
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", [ll.LoRA, ll.DoRA])
def test_peft_loads_our_patterns_as_written(method, ids, tmp_path):
    model = tiny_llama()
    ll.inject(model, method(r=4, alpha=8, target_modules=TARGETS, rank_pattern=RANKS, alpha_pattern=ALPHAS))
    perturb_adapters(model, std=0.05)
    ll.save_adapter(model, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["rank_pattern"] == RANKS and written["alpha_pattern"] == ALPHAS  # round-trips as given
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(theirs, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    again = tiny_llama()
    ll.load_adapter(again, tmp_path)
    torch.testing.assert_close(logits(again, ids), logits(model, ids), rtol=0, atol=0)
    card = (tmp_path / "README.md").read_text()
    assert "| rank r | 2 to 6 per layer |" in card and "| alpha | 3 to 12 per layer (scale 1.0000 to 4.0000) |" in card


def test_per_layer_values_not_given_as_patterns_are_written_one_key_a_layer(ids, tmp_path):
    """PiSSA's rank-2r conversion doubles each layer's rank: the per-layer map is written as exact keys."""
    model = tiny_llama()
    ll.inject(model, ll.LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                             init="pissa"))  # fmt: skip
    perturb_adapters(model, std=0.05)
    ll.save_adapter(model, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["r"] == 8 and written["rank_pattern"] == {r"model\.layers\.0\.self_attn\.v_proj": 4,
                                                             r"model\.layers\.1\.self_attn\.v_proj": 4}  # fmt: skip
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)  # on the original weights
    torch.testing.assert_close(logits(theirs, ids), logits(model, ids), rtol=0, atol=1e-4)


@pytest.mark.parametrize("fields, message", [
    (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\] must be a positive integer"),
    (dict(rank_pattern={"q_proj(": 2}), "not a valid regular expression"),
    (dict(alpha_pattern={"q_proj": "high"}), r"alpha_pattern\['q_proj'\] must be a number > 0"),
    (dict(rank_pattern=["q_proj"]), "must be a mapping"),
])
def test_bad_patterns_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        ll.LoRA(**fields)


def test_gguf_pairs_keep_each_layers_scale():
    """llama.cpp applies one alpha / r (r from B's shape): a per-layer scale is folded into B, exactly."""
    from lightning_lora.io.gguf import lora_pairs

    model = tiny_llama()
    ll.inject(model, ll.LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                             alpha_pattern={"layers.1.self_attn.q_proj": 3.0}))  # fmt: skip
    perturb_adapters(model)
    pairs, alpha = lora_pairs(model)
    for name, branch in layer_map(model, "default").items():
        A, B = pairs[name]
        torch.testing.assert_close(alpha / A.shape[0] * B @ A, branch.scale * branch.lora_B @ branch.lora_A)
