"""The methods end to end: LoRA/rsLoRA scaling against the formula, and a few-step fit of DoRA, VeRA and LoRA+ through
``LoRAModule`` and through ``AdapterCallback`` (only the adapter moves, LoRA+ rates reach the optimizer)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader

from tiny_models import tiny_llama
from lightning_lora import DoRA, LoRA, VeRA, inject, param_groups
from lightning_lora.train.callback import AdapterCallback
from lightning_lora.train.module import LoRAModule
from tiny_assets import make_tiny_model_dir

QUIET = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
             enable_checkpointing=False)  # fmt: skip
METHODS = {"dora": (DoRA(r=4, alpha=8), None), "vera": (VeRA(r=16), None), "loraplus": (LoRA(r=4, alpha=8), 16.0)}


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_scaling_matches_formula(rslora):
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("proj", nn.Linear(20, 24))
    W, b = net.proj.weight.detach().clone(), net.proj.bias.detach().clone()
    inject(net, LoRA(r=4, alpha=6, rslora=rslora, target_modules=["proj"]))
    branch = net.proj.adapters["default"]
    with torch.no_grad():
        branch.lora_B.normal_()
    x = torch.randn(3, 20)
    s = 6 / (math.sqrt(4) if rslora else 4)
    expected = x @ W.t() + b + s * (x @ branch.lora_A.t()) @ branch.lora_B.t()
    assert (net(x) - expected).abs().max() < 1e-5


def batches(n: int = 3, vocab: int = 128, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, vocab, (4, 12), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def check_only_adapter_moved(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for k in before:
        if ".adapters." in k:
            assert not torch.equal(before[k], after[k]), f"adapter tensor {k} did not train"
        else:
            assert torch.equal(before[k], after[k]), f"base tensor {k} changed"


def check_loraplus_rates(optimizer: torch.optim.Optimizer, lr: float, ratio: float) -> None:
    rates = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert rates["lora_A"] == pytest.approx(lr) and rates["lora_B"] == pytest.approx(lr * ratio)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama"))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_fit_through_lora_module(method, tiny_dir):
    seed_everything(0)
    adapter, ratio = METHODS[method]
    module = LoRAModule(tiny_dir, adapter=adapter, lr_ratio=ratio,
                        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))  # fmt: skip
    module.configure_model()
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = Trainer(max_steps=3, **QUIET)
    trainer.fit(module, DataLoader(batches(vocab=300), batch_size=None))
    check_only_adapter_moved(before, module.model.state_dict())
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    if ratio is not None:
        check_loraplus_rates(trainer.optimizers[0], 1e-2, ratio)


class Own(LightningModule):
    """A user's module: its own model, step and optimizer (LoRA+ by the documented one line)."""

    def __init__(self, lr_ratio: float | None):
        super().__init__()
        self.model = tiny_llama()
        self.lr_ratio = lr_ratio

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        if self.lr_ratio is not None:
            return torch.optim.AdamW(param_groups(self, lr=1e-2, lr_ratio=self.lr_ratio))
        return torch.optim.AdamW(filter(lambda p: p.requires_grad, self.parameters()), lr=1e-2)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_fit_through_adapter_callback(method):
    seed_everything(0)
    adapter, ratio = METHODS[method]
    module = Own(ratio)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = Trainer(max_steps=3, callbacks=[AdapterCallback(adapter, target="model")], **QUIET)
    trainer.fit(module, DataLoader(batches(), batch_size=None))
    after = module.model.state_dict()
    assert {k.replace("base_layer.", "") for k in after if ".adapters." not in k} == set(before)
    unwrapped = {k.replace("base_layer.", ""): v for k, v in after.items() if ".adapters." not in k}
    assert all(torch.equal(before[k], unwrapped[k]) for k in before), "a base tensor changed"
    init = {k: v for k, v in inject(tiny_llama(), adapter).state_dict().items() if ".adapters." in k}
    moved = [k for k in init if not torch.equal(init[k], after[k])]
    assert moved and all(("lora_A" in k or "magnitude" in k or "lambda" in k or "lora_B" in k) for k in moved)
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    if ratio is not None:
        check_loraplus_rates(trainer.optimizers[0], 1e-2, ratio)


@pytest.mark.parametrize("adapter", [DoRA(r=4, alpha=8), VeRA(r=16)], ids=["dora", "vera"])
def test_over_quantized_llama_identity_then_finite_training_step(adapter, ids):
    """QDoRA / QVeRA: inject over ``quantize(model, NF4())``; unchanged at init, finite loss and gradients."""
    from lightning_lora.quant.nf4 import NF4, quantize

    model = quantize(tiny_llama(), NF4())
    base = model(ids).logits
    inject(model, adapter)
    assert torch.equal(model(ids).logits, base)
    model.train()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    loss = model(ids, labels=ids).loss
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and trainable and all(torch.isfinite(p.grad).all() for p in trainable)
    assert (model.eval()(ids).logits - base).abs().max() > 1e-4
