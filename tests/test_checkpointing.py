"""train/checkpointing.py: recomputing only the MLPs gives the same loss and gradients as no checkpointing, keeps
fewer activations (the MLP's intermediate tensors, counted with autograd's saved-tensor hooks), and leaves the
model's modules and names as they were."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import LLAMA, MODELS, perturb_adapters

from lightning_lora import LoRA, inject
from lightning_lora.train.checkpointing import checkpoint_mlps, enable_checkpointing
from lightning_lora.train.head import head_swap_verdict
from lightning_lora.train.loss import causal_lm_loss
from lightning_lora.train.module import LoRAModule

VOCAB = 128


def adapted(kind: str):
    model = MODELS[kind](0)
    inject(model, LoRA(r=4, target_modules="all-linear"))
    perturb_adapters(model)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model.train()


def batch():
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :8] = -100
    return ids, labels


def loss_grads_and_saved(model):
    ids, labels = batch()
    saved = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = causal_lm_loss(model, ids, labels)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return loss, dict(zip(params, torch.autograd.grad(loss, list(params.values())))), sum(saved.values())


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_mlp_checkpointing_gives_the_same_loss_and_gradients_and_keeps_less(kind):
    ref_model, model = adapted(kind), adapted(kind)
    names = [n for n, _ in model.named_modules()]
    assert checkpoint_mlps(model) == 2
    assert [n for n, _ in model.named_modules()] == names  # nothing wrapped or renamed
    ref_loss, ref_grads, ref_saved = loss_grads_and_saved(ref_model)
    loss, grads, saved = loss_grads_and_saved(model)
    assert abs(loss.item() - ref_loss.item()) < 1e-6
    for name, g in ref_grads.items():
        assert torch.allclose(grads[name], g, atol=1e-6, rtol=1e-5), name
    # The MLP's intermediates are no longer kept: at least gate, act(gate) (or GPT-2's fc and act) and up, fp32,
    # of width m for 2 x 24 tokens in each of the 2 layers.
    m = LLAMA["intermediate_size"] if kind == "llama" else 4 * 64
    dropped = (2 if kind == "gpt2" else 3) * 2 * 24 * m * 4 * 2
    assert ref_saved - saved >= dropped


def test_the_mlp_runs_again_in_backward_only_when_training():
    model = adapted("llama")
    checkpoint_mlps(model)
    head_swap_verdict(model)  # the loss's one-time probe of the head runs its forwards now, not among those counted
    calls = []
    for layer in model.model.layers:
        layer.mlp.gate_proj.register_forward_hook(lambda *a: calls.append(1))
    ids, labels = batch()
    causal_lm_loss(model, ids, labels).backward()
    assert len(calls) == 2 * len(model.model.layers)  # forward + recompute
    calls.clear()
    with torch.no_grad():
        model(input_ids=ids)
    model.eval()
    causal_lm_loss(model, ids, labels).backward()
    assert len(calls) == 2 * len(model.model.layers)  # no recompute in eval mode or without autograd


def test_deepcopy_keeps_its_own_mlps():
    model = adapted("llama")
    checkpoint_mlps(model)
    twin = copy.deepcopy(model)
    assert twin.model.layers[0].mlp.forward.__self__ is twin.model.layers[0].mlp
    ids, labels = batch()
    assert torch.equal(causal_lm_loss(twin, ids, labels), causal_lm_loss(model, ids, labels))


def test_bad_modes_and_models_are_refused():
    with pytest.raises(ValueError, match="true, false or 'mlp'"):
        LoRAModule("smollm2-135m-instruct", gradient_checkpointing="attention")
    with pytest.raises(ValueError, match="no decoder layer with an .mlp"):
        checkpoint_mlps(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    model = adapted("llama")
    enable_checkpointing(model, "mlp")
    assert model.config.use_cache is False and not model.is_gradient_checkpointing


@pytest.mark.parametrize("mode", [True, "mlp"])
def test_offloaded_saved_tensors_round_trip_exactly(mode):
    """Offloading packs every saved tensor (checkpoint inputs, packed attention, the loss's kept gradient) to host
    memory and back; loss and gradients are those of a plain step. On CPU ``offloading`` itself does nothing, so the
    round trip is run here with ``save_on_cpu``'s own pack/unpack (a copy)."""
    from lightning_lora.train.attention import use_packed_attention
    from lightning_lora.train.checkpointing import offloading

    assert isinstance(offloading(True, torch.device("cuda")), torch.autograd.graph.save_on_cpu)
    assert not isinstance(offloading(True, torch.device("cpu")), torch.autograd.graph.save_on_cpu)
    assert not isinstance(offloading(False, torch.device("cuda")), torch.autograd.graph.save_on_cpu)
    ref, model = adapted("llama"), adapted("llama")
    enable_checkpointing(model, mode)
    for m in (ref, model):
        use_packed_attention(m)
    ids, labels = batch()
    position_ids = torch.cat([torch.arange(10), torch.arange(14)])[None].repeat(2, 1)  # two examples per row
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.autograd.graph.save_on_cpu(pin_memory=False):
        loss = causal_lm_loss(model, ids, labels, position_ids=position_ids)
    grads = torch.autograd.grad(loss, params)
    ref_loss = causal_lm_loss(ref, ids, labels, position_ids=position_ids)
    ref_grads = torch.autograd.grad(ref_loss, [p for p in ref.parameters() if p.requires_grad])
    assert abs(loss.item() - ref_loss.item()) < 1e-6
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-6, rtol=1e-5)
