"""The second worked example, examples/fourierft.py (FourierFT, arXiv:2405.03003), defined outside the package, with
a per-layer option decided by the layer's name (``n_frequency_pattern``). inject / merge / remove / save-load / PEFT
both ways run in the contract matrix (tests/test_contract.py, rows ``FourierFT0-*``); here: the names, PEFT as the
oracle on a model, the update against the paper's formula, runtime weights, combine's refusal in its words, estimate."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import perturb_adapters, tiny_llama

import lightning_lora as ll
from lightning_lora.core.layer import METHODS
from lightning_lora.core.verbs import layer_map

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from fourierft import FourierFT  # noqa: E402

PATTERN = {"v_proj": 8, r"layers\.1\.self_attn\.q_proj": 12}
CONFIG = FourierFT(n_frequency=20, scaling=40.0, target_modules=["q_proj", "v_proj"], n_frequency_pattern=PATTERN)


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


def idft2_real(spectrum: torch.Tensor) -> torch.Tensor:
    """Re(IDFT2(F)) from the definition: (1 / (m n)) sum_{j,l} F[j,l] exp(2 pi i (j u / m + l v / n)), in float64."""
    m, n = spectrum.shape
    em = torch.exp(2j * math.pi * torch.outer(torch.arange(m), torch.arange(m)).double() / m)
    en = torch.exp(2j * math.pi * torch.outer(torch.arange(n), torch.arange(n)).double() / n)
    return (em @ spectrum.to(torch.complex128) @ en).real / (m * n)


def test_registered_by_definition():
    assert METHODS["FourierFT"] is FourierFT


def test_names_decide_the_frequencies_and_peft_agrees_both_ways(ids, tmp_path):
    peft = pytest.importorskip("peft")
    model = ll.inject(tiny_llama(), CONFIG)
    counts = {n: b.fourierft_spectrum.numel() for n, b in layer_map(model, "default").items()}
    assert counts == {"model.layers.0.self_attn.q_proj": 20, "model.layers.0.self_attn.v_proj": 8,
                      "model.layers.1.self_attn.q_proj": 12, "model.layers.1.self_attn.v_proj": 8}  # fmt: skip
    perturb_adapters(model, std=0.05)
    ll.save_adapter(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["n_frequency_pattern"] == PATTERN
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    torch.testing.assert_close(logits(theirs, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    made = peft.get_peft_model(tiny_llama(), peft.FourierFTConfig(n_frequency=20, scaling=40.0, init_weights=False,
                               target_modules=["q_proj", "v_proj"], n_frequency_pattern=PATTERN))  # fmt: skip
    made.save_pretrained(tmp_path / "theirs")
    loaded = ll.load_adapter(tiny_llama(), tmp_path / "theirs")
    torch.testing.assert_close(logits(loaded, ids), logits(made, ids), rtol=1e-5, atol=1e-5)


def test_the_update_is_the_papers_formula_and_weights_apply_at_run_time(ids):
    model = ll.inject(tiny_llama(), CONFIG)
    perturb_adapters(model, std=0.05)
    branch = model.model.layers[1].self_attn.q_proj.adapters["default"]
    grid = torch.zeros(64, 64, dtype=torch.float64)
    grid[branch.entries[0], branch.entries[1]] = branch.fourierft_spectrum.detach().double()
    torch.testing.assert_close(branch.delta_weight().double(), 40.0 * idft2_real(grid), rtol=1e-5, atol=1e-7)
    ll.set_adapter(model, {"default": 0.5})  # additive: a run-time weight scales dW
    half = logits(model, ids)
    with torch.no_grad():
        for b in layer_map(model, "default").values():
            b.fourierft_spectrum.mul_(0.5)
    ll.set_adapter(model, "default")
    torch.testing.assert_close(logits(model, ids), half, rtol=1e-5, atol=1e-6)


def test_combine_refuses_in_its_own_words():
    model = ll.inject(tiny_llama(), CONFIG)
    with pytest.raises(ValueError, match="FourierFT adapters cannot be combined: FourierFT's update is a dense spectral"):
        ll.combine(model, {"default": 1.0}, "as_lora")


def test_estimate_asks_it_by_name():
    from lightning_lora.estimate import estimate

    res = estimate("smollm2-135m", "fourierft", target_modules=["q_proj", "v_proj"])
    assert res["r"] is None and res["trainable_params"] == 30 * 2 * 1000  # n_frequency per adapted layer
