"""train/probe.py and the probes that use it: gradient checkpointing, offloading and the loss head are kept only when
a 2-token step proves them (same logits and gradients within 1e-5, every layer recomputed, tensors offloaded); a
failing probe refuses with the model type and leaves the model as it was. The reference is the model's own step
before the swap. (The packed-attention probe is run over every architecture in test_architectures.py.)"""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_models import perturb_adapters, tiny_llama
from torch import nn

from lightning_lora import LoRA, inject
from lightning_lora.train import probe
from lightning_lora.train.checkpointing import _probe_offload, enable_checkpointing, offloading
from lightning_lora.train.head import head_swap_verdict
from lightning_lora.train.loss import causal_lm_loss


class Drifting(nn.Module):
    """A stateful activation: each call scales by one more, so a recomputation differs from the first forward (a
    module with hidden state, e.g. a counter, that checkpointing would silently change)."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.act, self.calls = act, 0

    def forward(self, x):
        self.calls += 1
        return self.act(x) * (1 + 0.1 * self.calls)


def adapted():
    model = tiny_llama()
    inject(model, LoRA(r=4))
    perturb_adapters(model)
    return model.train()


@pytest.mark.parametrize("mode", [True, "mlp"])
def test_checkpointing_is_proved_and_recomputes_every_layer(mode):
    model = adapted()
    enable_checkpointing(model, mode)
    found = probe.cached(model, f"gradient_checkpointing={mode!r}")
    assert found is not None and found.ok


@pytest.mark.parametrize("mode", [True, "mlp"])
def test_checkpointing_that_changes_the_step_is_refused_and_undone(mode):
    model = adapted()
    model.model.layers[1].mlp.act_fn = Drifting(model.model.layers[1].mlp.act_fn)
    with pytest.raises(ValueError, match=rf"^gradient_checkpointing={mode!r} is not proven for llama: a training step "
                                         r"changed \(logits"):
        enable_checkpointing(model, mode)
    assert not model.is_gradient_checkpointing  # put back as it was
    assert all("forward" not in layer.mlp.__dict__ for layer in model.model.layers)


def test_checkpointing_that_recomputes_nothing_is_refused(monkeypatch):
    model = adapted()
    monkeypatch.setattr(model, "gradient_checkpointing_enable", lambda **kw: None)  # a no-op "checkpointing"
    with pytest.raises(ValueError, match=r"only 0 of its 2 layers ran again in backward"):
        enable_checkpointing(model, True)


def test_offloading_is_proved_once_then_used():
    model = adapted()
    found = _probe_offload(model)  # on CPU the round trip through save_on_cpu still runs: same step, tensors packed
    assert found.ok
    assert isinstance(offloading(True, torch.device("cuda"), model), torch.autograd.graph.save_on_cpu)
    assert probe.cached(model, "activation offloading").ok


def test_offloading_that_changes_the_step_is_refused():
    model = adapted()
    model.model.layers[0].mlp.act_fn = Drifting(model.model.layers[0].mlp.act_fn)
    with pytest.raises(ValueError, match="^offload_activations is not proven for llama: a training step changed"):
        offloading(True, torch.device("cuda"), model)
    assert not isinstance(offloading(True, torch.device("cpu"), model), torch.autograd.graph.save_on_cpu)  # no swap


def test_loss_head_probe_refuses_a_rescaling_forward_and_falls_back(caplog):
    """A model whose forward multiplies the logits after the head: the probe sees its marker come back changed, the
    loss is then Hugging Face's own, and the reason is logged once."""
    model = adapted().eval()
    forward = model.forward

    def rescaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    model.forward = rescaled
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.INFO, logger="lightning_lora"):
        assert not head_swap_verdict(model)
        ours = causal_lm_loss(model, ids, ids)
        causal_lm_loss(model, ids, ids)
    ref = model(input_ids=ids, labels=ids).loss  # the fallback is Hugging Face's loss itself
    assert abs(ours.item() - ref.item()) < 1e-5
    assert caplog.text.count("the labeled-rows loss head not used for llama") == 1
    assert head_swap_verdict(adapted())  # the plain model keeps the chunked loss


def test_verdicts_are_cached_per_model():
    model, runs = nn.Linear(2, 2), []

    def check(m):
        runs.append(m)
        return probe.Verdict(False, "no")

    assert not probe.verdict(model, "k", check) and not probe.verdict(model, "k", check) and len(runs) == 1
    probe.forget(model, "k")
    probe.verdict(model, "k", check)
    assert len(runs) == 2 and probe.cached(nn.Linear(2, 2), "k") is None


def test_differs_reports_by_how_much():
    a = torch.zeros(3)
    assert probe.differs(a, a + 1e-6) is None
    assert "moved by 0.5" in probe.differs(a, a + 0.5)
    assert "shape" in probe.differs(a, torch.zeros(4))
    assert probe.differs(a, a * float("nan")) is not None
