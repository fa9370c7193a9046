"""LoRAModule on a tiny on-disk Llama: training touches only the adapter, adapter-only checkpoints, exact resume,
validation perplexity against a hand-computed reference, PEFT as the oracle for the exported adapter and merge."""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_lora import LoRA
from lightning_lora.commands.export import export_checkpoint
from lightning_lora.train.module import LoRAModule
from tiny_assets import make_tiny_model_dir

QUIET = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama"))


def batches(n: int = 3, batch: int = 4, length: int = 12, seed: int = 0) -> list[dict]:
    """``n`` fixed batches of random tokens; the first 3 labels of each row are masked (-100), one row is padded."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, 300, (batch, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -4:] = 0
        labels = ids.clone()
        labels[:, :3] = -100
        labels[mask == 0] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def loader(data: list[dict]) -> DataLoader:
    return DataLoader(data, batch_size=None, shuffle=False)


def adapter_keys(state: dict) -> set[str]:
    return {k for k in state if ".adapters." in k}


def test_fit_changes_only_adapter_tensors(tiny_dir):
    seed_everything(0)
    module = LoRAModule(tiny_dir, adapter=LoRA(r=4), optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))
    module.configure_model()
    model = module.model
    module.configure_model()  # idempotent
    assert module.model is model and sum(".adapters.default.lora_A" in k for k in model.state_dict()) == 14
    before = {k: v.clone() for k, v in model.state_dict().items()}
    Trainer(max_steps=3, enable_checkpointing=False, **QUIET).fit(module, loader(batches()))
    after = model.state_dict()
    assert before.keys() == after.keys()
    trained = adapter_keys(before)
    for k in before:
        if k in trained:
            assert not torch.equal(before[k], after[k]), f"adapter tensor {k} did not train"
        else:
            assert torch.equal(before[k], after[k]), f"base tensor {k} changed"


def test_checkpoint_holds_only_adapter(tiny_dir, tmp_path):
    seed_everything(0)
    module = LoRAModule(tiny_dir, adapter=LoRA(r=4))
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    Trainer(max_steps=2, callbacks=[ckpt], **QUIET).fit(module, loader(batches(2)))
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    state = checkpoint["state_dict"]
    expected = {"model." + k for k in module.model.state_dict() if ".adapters." in k}
    assert set(state) == expected
    adapter_params = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    base_params = sum(p.numel() for p in module.model.parameters())
    assert sum(v.numel() for v in state.values()) == adapter_params < base_params / 10
    assert checkpoint["optimizer_states"][0]["state"]  # AdamW moments travel with it
    assert checkpoint["lightning_lora"]["base_model"] == tiny_dir
    # the file is adapter-sized: adapter + 2 Adam moments, far from the 4 bytes x base params of a full checkpoint
    assert os.path.getsize(tmp_path / "last.ckpt") < 3 * 4 * adapter_params + 200_000


def _run(tiny_dir, root, max_steps, ckpt_path=None):
    seed_everything(0)
    module = LoRAModule(
        tiny_dir, adapter=LoRA(r=4, dropout=0.0),
        optimizer=functools.partial(torch.optim.AdamW, lr=5e-3, weight_decay=0.01),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5),
    )  # fmt: skip
    ckpt = ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=3, save_top_k=-1)
    trainer = Trainer(max_steps=max_steps, callbacks=[ckpt], **QUIET)
    trainer.fit(module, loader(batches(3)), ckpt_path=ckpt_path)
    return module, trainer


def test_stop_and_resume_equals_uninterrupted_run(tiny_dir, tmp_path):
    full, _ = _run(tiny_dir, tmp_path / "full", 6)
    _run(tiny_dir, tmp_path / "part", 3)
    resumed, trainer = _run(tiny_dir, tmp_path / "resumed", 6, ckpt_path=tmp_path / "part" / "step=3.ckpt")
    assert trainer.global_step == 6
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(5e-3 * 0.5**3)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    keys = adapter_keys(a)
    assert keys
    for k in keys:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    moved = [k for k in keys if not torch.allclose(a[k], b[k].new_zeros(()), atol=0)]
    assert moved  # the comparison is not of untrained zeros


def test_validation_perplexity_matches_reference(tiny_dir):
    seed_everything(0)
    module = LoRAModule(tiny_dir, adapter=LoRA(r=4))
    data = batches(3, seed=5)
    trainer = Trainer(**QUIET)
    metrics = trainer.validate(module, loader(data), verbose=False)[0]
    # reference: token-weighted mean of next-token cross entropy over every unmasked label, then exp
    total, count = 0.0, 0
    with torch.no_grad():
        for b in data:
            logits = module.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            target = b["labels"][:, 1:]
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum",
                                     ignore_index=-100).item()  # fmt: skip
            count += int((target != -100).sum())
    assert metrics["val_loss"] == pytest.approx(total / count, rel=1e-5)
    assert metrics["val_ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_lora_plus_groups_take_lr_from_optimizer(tiny_dir):
    module = LoRAModule(tiny_dir, adapter=LoRA(r=4), lr_ratio=16,
                        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1))  # fmt: skip
    module.configure_model()
    groups = {g["name"]: g for g in module.configure_optimizers().param_groups}
    assert groups["lora_A"]["lr"] == pytest.approx(1e-3) and groups["lora_B"]["lr"] == pytest.approx(16e-3)
    assert groups["lora_A"]["weight_decay"] == pytest.approx(0.1)
    assert sum(len(g["params"]) for g in groups.values()) == 28


def test_export_loads_in_peft_and_merged_reloads(tiny_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    seed_everything(0)
    module = LoRAModule(tiny_dir, adapter=LoRA(r=4, alpha=8), export_dir=str(tmp_path / "export"),
                        optimizer=functools.partial(torch.optim.AdamW, lr=2e-2))  # fmt: skip
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    Trainer(max_steps=3, callbacks=[ckpt], **QUIET).fit(module, loader(batches()), loader(batches(1, seed=5)))
    ids = batches(1, seed=9)[0]["input_ids"]
    trained = module.model.eval()
    with torch.no_grad():
        ours = trained(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
        plain = base(input_ids=ids).logits
        oracle = peft.PeftModel.from_pretrained(base, tmp_path / "export" / "adapter").eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "merged").eval()(input_ids=ids).logits
    assert (ours - plain).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(oracle, ours, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged, oracle, rtol=0, atol=1e-5)
    assert (tmp_path / "export" / "merged" / "tokenizer_config.json").is_file()

    export_checkpoint(tmp_path / "last.ckpt", tmp_path / "offline")  # offline export from the adapter-only checkpoint
    with torch.no_grad():
        offline = AutoModelForCausalLM.from_pretrained(tmp_path / "offline" / "merged").eval()(input_ids=ids).logits
    torch.testing.assert_close(offline, oracle, rtol=0, atol=1e-5)
    card = (tmp_path / "offline" / "adapter" / "README.md").read_text()  # the run's facts came with the checkpoint
    assert "| steps | 3 |" in card and "| final validation loss | n/a |" not in card
    assert card == (tmp_path / "export" / "adapter" / "README.md").read_text()  # as the end-of-fit export says


@pytest.mark.slow
def test_real_smollm2_two_steps():
    pytest.importorskip("gguf")
    from lightning_lora.io.models import resolve_model_path

    try:
        resolve_model_path("smollm2-135m-instruct")
    except ModuleNotFoundError as err:
        pytest.skip(str(err))
    seed_everything(0)
    module = LoRAModule("smollm2-135m-instruct", adapter=LoRA(r=4, target_modules=["q_proj", "v_proj"]),
                        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3))  # fmt: skip
    tok = module.tokenizer
    enc = tok(["The capital of France is Paris.", "Lightning trains adapters."], padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    data = [{"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}] * 2
    trainer = Trainer(max_steps=2, enable_checkpointing=False, **QUIET)
    trainer.fit(module, loader(data))
    assert math.isfinite(float(trainer.callback_metrics["train_loss"]))
    trainable = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    assert trainable == 30 * 4 * (576 + 576) + 30 * 4 * (576 + 192)  # 30 layers, q: 576->576, v: 576->192


def test_validate_then_fit_with_validation(tiny_dir):
    """The CLI's validate_before_fit: trainer.validate (inference mode) followed by fit's own validation."""
    seed_everything(0)
    module = LoRAModule(tiny_dir, adapter=LoRA(r=4), optimizer=functools.partial(torch.optim.AdamW, lr=2e-2))
    trainer = Trainer(max_steps=4, val_check_interval=2, enable_checkpointing=False, **QUIET)
    before = trainer.validate(module, loader(batches(2, seed=3)), verbose=False)[0]["val_ppl"]
    trainer.fit(module, loader(batches(2, seed=3)), loader(batches(2, seed=3)))  # memorise the validation set
    assert float(trainer.callback_metrics["val_ppl"]) < before
