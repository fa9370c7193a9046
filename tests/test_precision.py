"""precision: null picks the precision for the machine (train/precision.py); an NF4 base follows it (quant/nf4.py)."""

import pytest
import torch
from torch import nn

import lightning_lora as ll
from lightning_lora.train.precision import auto_precision


@pytest.mark.parametrize(("cuda", "bf16", "accelerator", "expected"), [
    (False, False, "auto", "32-true"), (True, True, "auto", "bf16-mixed"), (True, False, "gpu", "16-mixed"),
    (True, True, "cpu", "32-true")])  # fmt: skip
def test_auto_precision(monkeypatch, cuda, bf16, accelerator, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert auto_precision(accelerator) == expected


def test_nf4_compute_dtype_follows_the_runs_precision():
    model = ll.quantize(nn.Sequential(nn.Linear(64, 64)), ll.NF4(skip_modules=()))
    layer = model[0]
    x = torch.randn(2, 64)
    model(x)
    assert layer.compute_dtype == torch.float32  # 32-true
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16-mixed
        model(x)
    assert layer.compute_dtype == torch.bfloat16
    model(x)
    assert layer.compute_dtype == torch.float32
    model.to(torch.bfloat16)(x.to(torch.bfloat16))  # bf16-true: the input's dtype
    assert layer.compute_dtype == torch.bfloat16


def test_cli_resolves_a_null_precision(tmp_path, monkeypatch):
    import sys

    import lightning_lora.commands.cli as cli_module
    from lightning_lora.commands.cli import make_cli

    monkeypatch.setattr(sys, "argv", ["lightning_lora"])
    monkeypatch.setattr(cli_module, "auto_precision", lambda accelerator: "bf16-mixed")  # as on a GPU with bf16
    config = tmp_path / "c.yaml"
    config.write_text("trainer:\n  precision: null\n  logger: false\nmodel:\n  base_model: x\n")
    cli = make_cli(["--config", str(config)], run=False)
    assert cli.trainer.precision == "bf16-mixed"
    config.write_text(config.read_text().replace("null", "32-true"))  # a precision given stays
    assert make_cli(["--config", str(config)], run=False).trainer.precision == "32-true"
