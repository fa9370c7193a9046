"""AdapterCallback on ordinary LightningModules (not Hugging Face): injection at setup or after configure_model,
only the adapter trains under the user's own optimizer, adapter-only checkpoints (also with save_weights_only),
exact resume, merged export against the formula W + (alpha/r) B A; and the example script."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lora
from lightning_lora import LoRA
from lightning_lora.train.callback import AdapterCallback
from lightning_lora.io.files import load_tensors

QUIET = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
ROOT = Path(__file__).resolve().parents[1]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


class InInit(LightningModule):
    """Model built in __init__; optimizer over self.parameters() (frozen ones included)."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class InConfigureModel(InInit):
    """Model built in configure_model (idempotently), optimizer over the trainable parameters only."""

    def __init__(self):
        LightningModule.__init__(self)
        self.net = None
        self.calls = 0

    def configure_model(self):
        self.calls += 1
        if self.net is None:
            self.net = mlp()

    def configure_optimizers(self):
        return torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()), lr=0.5)


def data(n: int = 48) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()), batch_size=16, shuffle=False)


@pytest.mark.parametrize("cls,target", [(InInit, None), (InInit, "net"), (InConfigureModel, "net"), (InConfigureModel, None)])
def test_only_adapter_trains(cls, target):
    seed_everything(0)
    initial = {k: v.clone() for k, v in mlp().state_dict().items()}  # what the module draws after the same seed
    seed_everything(0)
    module = cls()
    callback = AdapterCallback(LoRA(r=2), target=target)
    trainer = Trainer(max_steps=4, enable_checkpointing=False, callbacks=[callback], **QUIET)
    trainer.fit(module, data())
    if isinstance(module, InConfigureModel):
        assert module.calls == 1
    state = module.net.state_dict()
    adapters = {k for k in state if ".adapters." in k}
    assert len(adapters) == 6  # 3 linears x (A, B)
    for k, v in state.items():
        if k in adapters:
            if k.endswith("lora_B"):
                assert v.abs().sum() > 0, f"{k} did not train"
        else:
            base_key = k.replace(".base_layer", "")
            assert torch.equal(v, initial[base_key]), f"base tensor {k} changed"


@pytest.mark.parametrize("weights_only", [False, True])
def test_checkpoint_holds_only_adapter(tmp_path, weights_only):
    seed_everything(0)
    module = InInit()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last", save_weights_only=weights_only)
    Trainer(max_steps=2, callbacks=[AdapterCallback(LoRA(r=2), target="net"), ckpt], **QUIET).fit(module, data())
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert set(state) == {k for k in module.state_dict() if ".adapters." in k}
    # a fresh module + callback loads it (strict_loading is off) and gets the same adapter
    fresh = InInit()
    trainer = Trainer(max_steps=2, callbacks=[AdapterCallback(LoRA(r=2), target="net")], default_root_dir=tmp_path,
                      enable_checkpointing=False, **QUIET)  # fmt: skip
    if not weights_only:
        trainer.fit(fresh, data(), ckpt_path=tmp_path / "last.ckpt")  # already at max_steps: restores, no step
        for k, v in state.items():
            torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0)


def _run(root, max_steps, ckpt_path=None):
    seed_everything(0)
    module = InConfigureModel()
    ckpt = ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=3, save_top_k=-1)
    trainer = Trainer(max_steps=max_steps, callbacks=[AdapterCallback(LoRA(r=2), target="net"), ckpt], **QUIET)
    trainer.fit(module, data(), ckpt_path=ckpt_path)
    return module


def test_resume_equals_uninterrupted(tmp_path):
    full = _run(tmp_path / "full", 6)
    _run(tmp_path / "part", 3)
    resumed = _run(tmp_path / "resumed", 6, ckpt_path=tmp_path / "part" / "step=3.ckpt")
    a, b = full.state_dict(), resumed.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert any(".lora_B" in k and a[k].abs().sum() > 0 for k in a)


@pytest.mark.parametrize("target", ["net", None])
def test_export_merged_matches_formula(tmp_path, target):
    seed_everything(0)
    module = InInit()
    base = {k: v.clone() for k, v in module.net.state_dict().items()}
    callback = AdapterCallback(LoRA(r=2, alpha=6), target=target, export_dir=str(tmp_path / "out"))
    Trainer(max_steps=3, enable_checkpointing=False, callbacks=[callback], **QUIET).fit(module, data())
    merged = load_tensors(tmp_path / "out" / "merged" / "model.safetensors")
    adapter = load_tensors(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    prefix = "" if target else "net."
    for i in (0, 2, 4):
        A = adapter[f"base_model.model.{prefix}{i}.lora_A.weight"]
        B = adapter[f"base_model.model.{prefix}{i}.lora_B.weight"]
        expected = base[f"{i}.weight"] + (6 / 2) * B @ A
        torch.testing.assert_close(merged[f"{prefix}{i}.weight"], expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(merged[f"{prefix}{i}.bias"], base[f"{i}.bias"], rtol=0, atol=0)
    assert isinstance(module.net[0], lightning_lora.AdapterLayer)  # the export merged a copy, not the module


def test_lora_plus_one_line():
    class Plus(InInit):
        def configure_optimizers(self):
            return torch.optim.AdamW(lightning_lora.param_groups(self, lr=1e-3, lr_ratio=16))

    module = Plus()
    trainer = Trainer(max_steps=1, enable_checkpointing=False, callbacks=[AdapterCallback(LoRA(r=2))], **QUIET)
    trainer.fit(module, data())
    groups = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}
    assert groups == {"lora_A": pytest.approx(1e-3), "lora_B": pytest.approx(16e-3)}


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"must be an AdapterConfig \(LoRA, DoRA, VeRA"):
        AdapterCallback(adapter={"r": 8})
    module = InInit()
    with pytest.raises(AttributeError, match="no module at 'model'"):
        AdapterCallback(target="model").target_module(module)


def test_existing_project_example(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("existing_project", ROOT / "examples" / "existing_project.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.chdir(tmp_path)
    result = example.main(export_dir=str(tmp_path / "export"), epochs=2, root=str(tmp_path / "runs"))
    assert result["after"] > result["before"] + 0.15
    assert result["trainable"] < result["total"] / 4
    assert (tmp_path / "export" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "export" / "merged" / "model.safetensors").is_file()
