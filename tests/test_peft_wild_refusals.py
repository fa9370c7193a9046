"""Bad PEFT folders with modules_to_save, token rows and biases: one error naming the file and the key, and the
model exactly as it was; base weights PEFT saves beside an adapter are accepted only where they are this model's."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft_formats import MODELS, TOKENS
from safetensors.torch import load_file, save_file
from test_peft_wild import logits, pefts

import lightning_lora as ll

pytest.importorskip("peft")
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """PEFT's folder of LoRA with modules_to_save (lm_head), token rows and bias "all" on the tiny Llama."""
    path = tmp_path_factory.mktemp("peft")
    pefts("everything", "llama", False, path)
    return path


def edited(folder, tmp_path, tensors=None, config=None):
    """A copy of ``folder`` with its tensors and/or config changed by the given functions."""
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    if tensors:
        data = load_file(out / WEIGHTS)
        tensors(data)
        save_file(data, out / WEIGHTS, metadata={"format": "pt"})
    if config:
        data = json.loads((out / CONFIG).read_text())
        config(data)
        (out / CONFIG).write_text(json.dumps(data))
    return out


HEAD, ROWS = "base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
BIAS = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias"


def _set(key, value):
    return lambda data: data.__setitem__(key, value)


CASES = {
    "missing copy": (dict(tensors=lambda d: d.pop(HEAD)), rf"{WEIGHTS}: {HEAD} is missing; the config trains a copy"),
    "missing bias": (dict(tensors=lambda d: d.pop(BIAS)), rf"{BIAS} is missing; the config trains the bias"),
    "rows of another shape": (dict(tensors=_set(ROWS, torch.zeros(2, 64))),
                              rf"{ROWS} has shape \(2, 64\) but the model needs \(3, 64\)"),
    "unexpected tensor": (dict(tensors=_set("base_model.model.model.norm.weight", torch.ones(64))),
                          r"unexpected tensor 'base_model.model.model.norm.weight'"),
    "token id outside": (dict(config=lambda c: c.update(trainable_token_indices=[3, 500, 7])),
                         rf"{CONFIG}: trainable_token_indices: token id 500 is outside 'model.embed_tokens'"),
    "bad bias option": (dict(config=lambda c: c.update(bias="some")), rf"{CONFIG}: LoRA: bias must be"),
    "tied copies": (dict(config=lambda c: c.update(ensure_weight_tying=True)), "ensure_weight_tying with modules_to_save"),
    "non-finite rows": (dict(tensors=_set(ROWS, torch.full((3, 64), float("nan")))),
                        rf"tensor '{ROWS}' holds 192 NaN/inf value\(s\)"),
    "other base rows": (dict(tensors=_set("base_model.model.model.embed_tokens.token_adapter.base_layer.weight",
                                          torch.zeros(128, 64))), "carries base weights that differ from this model's"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_folder_is_refused_naming_the_key_and_the_model_is_unchanged(case, folder, tmp_path):
    changes, message = CASES[case]
    bad = edited(folder, tmp_path, **changes)
    model, reference = MODELS["llama"](), MODELS["llama"]()
    with pytest.raises(ValueError, match=message) as err:
        ll.load_adapter(model, bad)
    assert str(bad) in str(err.value)
    assert not any(isinstance(m, ll.AdapterLayer) for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_saved_base_rows_that_the_adapter_trains_may_differ(folder, tmp_path):
    """A resized vocabulary's new rows are trained ones: PEFT's saved embedding may differ there, nowhere else."""
    weight = MODELS["llama"]().model.embed_tokens.weight.detach().clone()
    weight[TOKENS] = 7.0
    ok = edited(folder, tmp_path, tensors=_set("base_model.model.model.embed_tokens.token_adapter.base_layer.weight",
                                               weight))  # fmt: skip
    model, reference = MODELS["llama"](), MODELS["llama"]()
    ll.load_adapter(model, ok)
    ll.load_adapter(reference, folder)
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=0)
