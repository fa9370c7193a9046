"""PEFT folders from the wild, both ways, with PEFT 0.21 as the oracle: every format of ``peft_formats.py`` on every
tiny model it applies to, LoRA and DoRA. PEFT writes the folder (random trained values everywhere); we load it and
give PEFT's logits; we save it back (the same keys, the same options) and PEFT loads ours with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from peft_formats import CASES, FORMATS, MODELS, TARGETS, TOKENS
from safetensors.torch import load_file
from tiny_models import perturb_adapters

import lightning_lora as ll

peft = pytest.importorskip("peft")

IDS = torch.tensor([[1, *TOKENS, 9, 11, 4], [2, 9, *TOKENS, 8, 6]])


def logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


def pefts(fmt: str, model_name: str, dora: bool, tmp_path):
    """A PEFT model of ``fmt`` on ``model_name`` with every trainable tensor randomized, saved to ``tmp_path``."""
    fields = dict(FORMATS[fmt].fields[model_name])
    fields.setdefault("task_type", "CAUSAL_LM")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[model_name], use_dora=dora, **fields)
    theirs = peft.get_peft_model(MODELS[model_name](), config)
    perturb_adapters(theirs, std=0.2)
    theirs.save_pretrained(tmp_path)
    return theirs


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize(("fmt", "model_name"), CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_both_ways(fmt, model_name, dora, tmp_path):
    theirs = pefts(fmt, model_name, dora, tmp_path / "peft")
    base = logits(MODELS[model_name]())
    expected = logits(theirs)
    assert (expected - base).abs().max() > 1e-2  # the trained tensors change the output

    ours = MODELS[model_name]()
    ll.load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(logits(ours), expected, rtol=1e-5, atol=1e-5)

    ll.save_adapter(ours, tmp_path / "ours")
    written, given = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft"))
    assert sorted(written) == sorted(given)
    mine, peft_config = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "peft"))
    for key in ("trainable_token_indices", "bias"):
        assert mine.get(key) == peft_config.get(key), key
    names = [n for n, _ in MODELS[model_name]().named_modules()]  # PEFT ignores entries that select no module
    kept = [e for e in peft_config.get("modules_to_save") or [] if any(n.endswith(e) for n in names)]
    assert mine.get("modules_to_save") == (kept or None)
    again = peft.PeftModel.from_pretrained(MODELS[model_name](), tmp_path / "ours")
    torch.testing.assert_close(logits(again), expected, rtol=1e-5, atol=1e-5)


def test_the_matrix_covers_every_format_and_kind():
    assert {f for f, _ in CASES} == set(FORMATS)
    assert {m for _, m in CASES} == set(MODELS)


def _peft_name(ours: str, adapted: set[str]) -> str:
    """The PEFT parameter name (``base_model.model.`` and the adapter name dropped) of one of our trained tensors."""
    layer, _, rest = ours.partition(".trained.default.")
    if rest.startswith("copy."):
        return f"{layer}.modules_to_save.{rest[5:]}"
    if rest == "rows":
        return f"{layer}.token_adapter.trainable_tokens_delta"
    return f"{layer}.base_layer.bias" if layer in adapted else f"{layer}.bias"


GRADIENT_CASES = [("everything", "llama"), ("everything", "gpt2"), ("tokens", "llama_tied")]


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize(("fmt", "model_name"), GRADIENT_CASES, ids=[f"{f}-{m}" for f, m in GRADIENT_CASES])
def test_training_gives_pefts_gradients(fmt, model_name, dora, tmp_path):
    """One backward pass: every trained tensor (copies, rows, biases, under DoRA too) gets PEFT's gradient."""
    theirs = pefts(fmt, model_name, dora, tmp_path)
    ours = MODELS[model_name]()
    ll.load_adapter(ours, tmp_path)
    for model in (theirs, ours):
        model.train()
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0  # GPT-2's dropout would draw other masks in each model
        model(IDS, labels=IDS).loss.backward()
    grads = [{n.removeprefix("base_model.model.").replace(".default", ""): p.grad for n, p in theirs.named_parameters()
              if p.requires_grad}, {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}]  # fmt: skip
    adapted = {n.rsplit(".adapters.", 1)[0] for n in grads[1] if ".adapters." in n}
    trained = {n: g for n, g in grads[1].items() if ".trained." in n}
    assert trained and all(g is not None for g in trained.values())
    for name, grad in trained.items():
        torch.testing.assert_close(grad, grads[0][_peft_name(name, adapted)], rtol=1e-5, atol=1e-6, msg=name)


def test_several_adapters_with_their_own_copies_both_ways(tmp_path):
    ours = MODELS["llama"]()
    # (no bias: PEFT trains biases in place, shared by its adapters; ours are each adapter's own)
    ll.inject(ours, ll.LoRA(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    ll.inject(ours, ll.DoRA(r=4, target_modules=["v_proj"], modules_to_save=["lm_head"],
                            trainable_token_indices=TOKENS), "other")  # fmt: skip
    expected = {}
    for name, seed in (("default", 1), ("other", 2)):
        ll.set_adapter(ours, name)
        perturb_adapters(ours, std=0.2, seed=seed)
        expected[name] = logits(ours)
    ll.save_adapters(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(MODELS["llama"](), tmp_path)
    theirs.load_adapter(tmp_path / "other", adapter_name="other")
    again = MODELS["llama"]()
    assert ll.load_adapters(again, tmp_path) == ["default", "other"]
    for name in ("default", "other"):
        theirs.set_adapter(name)
        ll.set_adapter(again, name)
        torch.testing.assert_close(logits(theirs), expected[name], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits(again), expected[name], rtol=0, atol=0)
