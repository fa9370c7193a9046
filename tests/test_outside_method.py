"""A method defined outside the package (examples/loha.py, LoHa) works everywhere with no package change.

inject / merge / remove / save-load / PEFT both ways run in the contract matrix (tests/test_contract.py, rows
``LoHa0-*``); here: set_adapter, combine (exact, via its rank-r^2 Khatri-Rao factors), param_groups (its LoRA+
roles), estimate (API and CLI class path), LoRAModule, AdapterCallback and LightningCLI (class_path in YAML).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import perturb_adapters, tiny_llama

import lightning_lora as ll
from lightning_lora.core.layer import METHODS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from loha import LoHa


def loha_delta(branch) -> torch.Tensor:
    """The paper's formula (arXiv:2108.06098, section 3), written here: s (B1 A1) * (B2 A2) elementwise."""
    s = branch.config.alpha / branch.config.r
    return s * (branch.hada_w1_a @ branch.hada_w1_b) * (branch.hada_w2_a @ branch.hada_w2_b)


def test_registered_by_definition():
    assert METHODS["LoHa"] is LoHa


def test_set_adapter_and_combine_exact(ids):
    model = tiny_llama()
    ll.inject(model, LoHa(r=3, alpha=6.0, target_modules=["q_proj", "v_proj"]), "loha")
    ll.inject(model, ll.LoRA(r=2, target_modules=["q_proj"]), "lora")
    perturb_adapters(model)  # only the active adapter (loha) is trainable
    ll.set_adapter(model, "lora")
    perturb_adapters(model, seed=1)
    ll.set_adapter(model, {"loha": 0.5, "lora": -1.0})
    with torch.no_grad():
        mixed = model(ids).logits
    ll.combine(model, {"loha": 0.5, "lora": -1.0}, "mix")
    q = model.model.layers[0].self_attn.q_proj
    lora = q.adapters["lora"]
    expected = 0.5 * loha_delta(q.adapters["loha"]) - lora.scale * lora.lora_B @ lora.lora_A
    mix = q.adapters["mix"]
    assert mix.lora_A.shape[0] == 3 * 3 + 2  # LoHa's rank r^2 plus LoRA's r
    torch.testing.assert_close(mix.lora_B @ mix.lora_A * mix.scale, expected, rtol=1e-5, atol=1e-6)
    ll.set_adapter(model, "mix")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, mixed, rtol=1e-4, atol=1e-5)


def test_param_groups_follow_its_roles():
    model = tiny_llama()
    ll.inject(model, LoHa(r=2, target_modules=["q_proj"]))
    groups = {g["name"]: g for g in ll.param_groups(model, lr=1e-3, lr_ratio=16)}
    branch = model.model.layers[0].self_attn.q_proj.adapters["default"]
    fast = {id(p) for p in groups["lora_B"]["params"]}
    slow = {id(p) for p in groups["lora_A"]["params"]}
    assert id(branch.hada_w1_a) in fast and id(branch.hada_w2_a) in fast
    assert id(branch.hada_w1_b) in slow and id(branch.hada_w2_b) in slow
    assert groups["lora_B"]["lr"] == pytest.approx(16e-3)


def test_estimate_counts_it_by_api_and_cli_class_path(capsys):
    from lightning_lora.commands.estimate import main
    from lightning_lora.estimate import estimate

    res = estimate("smollm2-135m", LoHa(r=4, target_modules="all-linear"))
    h, m, layers, kv = 576, 1536, 30, 192  # SmolLM2-135M: hidden, MLP, layers, k/v width (3 heads x 64)
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, m), (h, m), (m, h)]
    assert res["trainable_params"] == layers * sum(2 * 4 * (i + o) for i, o in shapes)  # 2 pairs of r (in + out)
    main(["--model", "smollm2-135m", "--adapter", "loha.LoHa", "--r", "4", "--json"])
    assert json.loads(capsys.readouterr().out)["trainable_params"] == res["trainable_params"]


@pytest.mark.slow
def test_lora_module_and_cli_class_path(tmp_path, monkeypatch, capsys):
    from tiny_assets import make_tiny_model_dir

    from lightning_lora.commands.cli import make_cli

    model_dir = make_tiny_model_dir(tmp_path / "tiny")
    module = ll.LoRAModule(str(model_dir), adapter=LoHa(r=2, target_modules=["q_proj", "v_proj"]))
    module.configure_model()
    branches = [m for m in module.model.modules() if type(m).__name__ == "LoHaBranch"]
    assert branches and all(p.requires_grad for b in branches for p in b.parameters())
    ids = torch.randint(0, 100, (2, 8))
    module.model(input_ids=ids, labels=ids).loss.backward()
    assert all(b.hada_w2_b.grad is not None for b in branches)

    monkeypatch.setattr(sys, "argv", ["lightning_lora"])
    with pytest.raises(SystemExit):
        make_cli(["fit", "--config", str(ROOT / "configs" / "lora.yaml"), "--model.adapter", "loha.LoHa",
                  "--model.adapter.init_args.r", "3", "--print_config"])  # fmt: skip
    out = capsys.readouterr().out
    assert "class_path: loha.LoHa" in out and "r: 3" in out


@pytest.mark.slow
def test_adapter_callback_trains_and_exports_it(tmp_path):
    from lightning.pytorch import LightningModule, Trainer
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    class Net(LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(ll.param_groups(self, lr=1e-2, lr_ratio=4))

    data = DataLoader(TensorDataset(torch.randn(16, 8), torch.randint(0, 3, (16,))), batch_size=8)
    callback = ll.AdapterCallback(LoHa(r=2, target_modules="all-linear"), target="net", export_dir=str(tmp_path))
    model = Net()
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    Trainer(max_steps=2, callbacks=[callback], accelerator="cpu", logger=False, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False).fit(model, data)  # fmt: skip
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LOHA" and config["r"] == 2
    loaded = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    loaded.load_state_dict(before)
    ll.load_adapter(loaded, tmp_path / "adapter")
    trained = [m for m in loaded.modules() if type(m).__name__ == "LoHaBranch"]
    assert trained and any(b.hada_w2_b.abs().sum() > 0 for b in trained)  # it moved off its zero init
