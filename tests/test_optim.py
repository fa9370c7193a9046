"""LoRA+ optimizer groups (arXiv:2402.12354): which tensor learns at which rate, weight decay as asked, schedulers."""

from __future__ import annotations

import math

import pytest
import torch

from tiny_models import tiny_llama
from lightning_lora import DoRA, LoRA, VeRA, inject, param_groups, set_adapter


def by_name(groups: list[dict]) -> dict[str, dict]:
    return {g["name"]: g for g in groups}


def ids_of(params) -> set[int]:
    return {id(p) for p in params}


def named(model, suffix: str) -> set[int]:
    return {id(p) for n, p in model.named_parameters() if n.endswith(suffix)}


def test_lora_groups_b_fast_a_slow_embedding_own_lr():
    model = inject(tiny_llama(), LoRA(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"]))
    groups = by_name(param_groups(model, lr=1e-3, lr_ratio=16, weight_decay=0.1, embedding_lr=5e-4))
    assert set(groups) == {"lora_A", "lora_B", "embedding"}
    embed = {id(p) for n, p in model.named_parameters() if "embed_tokens" in n and p.requires_grad}
    assert ids_of(groups["lora_A"]["params"]) == named(model, "lora_A") - embed
    assert ids_of(groups["lora_B"]["params"]) == named(model, "lora_B") - embed
    assert ids_of(groups["embedding"]["params"]) == embed and len(embed) == 2
    assert groups["lora_A"]["lr"] == 1e-3 and groups["lora_B"]["lr"] == pytest.approx(16e-3)
    assert groups["embedding"]["lr"] == 5e-4
    assert all(g["weight_decay"] == 0.1 for g in groups.values())  # applied as asked (PEFT's helper drops it)


def test_embedding_lr_defaults_to_lr():
    model = inject(tiny_llama(), LoRA(r=4, target_modules=["embed_tokens"]))
    assert by_name(param_groups(model, lr=2e-4))["embedding"]["lr"] == 2e-4


@pytest.mark.parametrize("adapter,vectors", [(DoRA(r=4), "magnitude"), (VeRA(r=8), "lambda_")])
def test_vectors_learn_at_lr_without_decay(adapter, vectors):
    model = inject(tiny_llama(), adapter)
    groups = by_name(param_groups(model, lr=1e-3, lr_ratio=20, weight_decay=0.05))
    expected = {id(p) for n, p in model.named_parameters() if vectors in n}
    assert expected and ids_of(groups["vectors"]["params"]) == expected
    assert groups["vectors"]["lr"] == 1e-3 and groups["vectors"]["weight_decay"] == 0.0
    every = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in model.parameters() if p.requires_grad)  # each once, none lost


def test_unfrozen_non_adapter_parameter_goes_to_other():
    model = inject(tiny_llama(), LoRA(r=4))
    model.lm_head.weight.requires_grad_(True)
    groups = by_name(param_groups(model, lr=1e-3, weight_decay=0.01))
    assert ids_of(groups["other"]["params"]) == {id(model.lm_head.weight)}
    assert groups["other"]["lr"] == 1e-3 and groups["other"]["weight_decay"] == 0.01


@pytest.mark.parametrize("kwargs,word", [
    (dict(lr_ratio=0), "lr_ratio"), (dict(lr_ratio=-2.0), "lr_ratio"), (dict(lr_ratio=float("nan")), "lr_ratio"),
    (dict(lr_ratio=float("inf")), "lr_ratio"), (dict(lr_ratio="16"), "lr_ratio"), (dict(lr=0.0), "lr"),
    (dict(embedding_lr=-1.0), "embedding_lr"), (dict(weight_decay=-0.1), "weight_decay"),
])  # fmt: skip
def test_bad_arguments_raise_clear_errors(kwargs, word):
    model = inject(tiny_llama(), LoRA(r=4))
    with pytest.raises(ValueError, match=word):
        param_groups(model, **{"lr": 1e-3, **kwargs})


SCHEDULES = {
    "warmup-lambda": (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 4)),
                      lambda step: min(1.0, (step + 1) / 4)),
    "cosine": (lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10),
               lambda step: (1 + math.cos(math.pi * step / 10)) / 2),
}  # fmt: skip


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_scheduler_scales_every_group_from_its_own_base_lr(schedule):
    model = inject(tiny_llama(), LoRA(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"]), "lora")
    set_adapter(inject(model, VeRA(r=8, target_modules=["o_proj"]), "vera"), ["lora", "vera"])  # both train
    groups = param_groups(model, lr=1e-3, lr_ratio=16, embedding_lr=3e-4)
    base = {g["name"]: g["lr"] for g in groups}
    optimizer = torch.optim.AdamW(groups)
    make_scheduler, factor = SCHEDULES[schedule]
    scheduler = make_scheduler(optimizer)
    ids = torch.randint(0, 128, (2, 8))
    for step in range(1, 6):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        for g in optimizer.param_groups:
            assert g["lr"] == pytest.approx(base[g["name"]] * factor(step), rel=1e-6), (step, g["name"])
    assert {g["name"] for g in optimizer.param_groups} == {"lora_A", "lora_B", "embedding", "vectors"}


def test_lora_b_moves_ratio_times_faster_with_sgd():
    """One SGD step: the B update equals lr * ratio * grad, the A update lr * grad."""
    model = inject(tiny_llama(), LoRA(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(param_groups(model, lr=0.1, lr_ratio=8))
    ids = torch.randint(0, 128, (2, 8))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            lr = 0.8 if n.endswith("lora_B") else 0.1
            assert torch.allclose(before[n] - p.detach(), lr * p.grad, rtol=1e-3, atol=5e-7), n


def test_default_adamw_is_fused_on_cpu_and_follows_the_adamw_formula():
    """The default optimizer takes torch's fused step on CPU; three steps over LoRA+ groups (two learning rates,
    one with weight decay) give AdamW's update (Loshchilov & Hutter 2019), written out here, within 1e-6."""
    from lightning_lora.train.module import AdamW

    torch.manual_seed(0)
    model = inject(tiny_llama(), LoRA(r=4, target_modules=["q_proj", "v_proj"]))
    groups = param_groups(model, lr=1e-2, lr_ratio=4, weight_decay=0.1)
    optimizer = AdamW(groups)
    assert all(g["fused"] for g in optimizer.param_groups)
    b1, b2, eps = 0.9, 0.999, 1e-8
    expected = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            expected[p] = (p.detach().clone(), torch.zeros_like(p), torch.zeros_like(p), g["lr"], g["weight_decay"])
    for t in range(1, 4):
        grads = {p: torch.randn_like(p) for p in expected}
        for p, (w, m, v, lr, wd) in expected.items():
            p.grad = grads[p].clone()
            g = grads[p]
            w.mul_(1 - lr * wd)
            m.mul_(b1).add_((1 - b1) * g)
            v.mul_(b2).add_((1 - b2) * g * g)
            w.sub_(lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps))
        optimizer.step()
    for p, (w, *_rest) in expected.items():
        torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-6)


def test_default_adamw_leaves_an_unsupported_tensor_to_torch():
    from lightning_lora.train.module import AdamW

    optimizer = AdamW([torch.nn.Parameter(torch.zeros(3, device="meta"))])
    assert not optimizer.param_groups[0]["fused"]


def test_default_adamw_reads_a_group_given_as_a_generator_once():
    """Deciding on the fused step must not use up a group's parameters (``{"params": model.parameters()}``)."""
    from lightning_lora.train.module import AdamW

    model = inject(tiny_llama(), LoRA(r=4, target_modules=["q_proj"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = AdamW([{"params": (p for p in trainable)}, {"params": torch.nn.Parameter(torch.zeros(2))}])
    assert [len(g["params"]) for g in optimizer.param_groups] == [len(trainable), 1] and len(trainable) > 0
    assert all(g["fused"] for g in optimizer.param_groups)
