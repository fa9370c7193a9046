"""The CLI end to end in subprocesses (tiny model folder, 2 steps, export, offline export) and in-process parsing of
the adapter's class_path/init_args overrides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_lora.commands.cli import make_cli
from tiny_assets import make_tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]


def _python(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "lightning_lora", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_fit_then_offline_export_in_subprocesses(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / "tiny")
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(24)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = _python(
        "fit", "--config", str(ROOT / "configs" / "lora.yaml"),
        "--model.base_model", str(model_dir), "--model.adapter.init_args.r", "16",
        "--data.init_args.source", "null", "--data.init_args.path", str(tmp_path / "pairs.jsonl"),
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.accelerator", "cpu",
        "--trainer.default_root_dir", str(tmp_path / "run"), "--model.export_dir", str(tmp_path / "export"),
        cwd=tmp_path,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert "before training: val_loss" in out and "after training: val_loss" in out
    assert f"merged model (Hugging Face format) written to {tmp_path / 'export' / 'merged'}" in out
    config = json.loads((tmp_path / "export" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 16  # the command-line override reached the adapter
    ckpts = sorted((tmp_path / "run").rglob("last.ckpt"))
    assert len(ckpts) == 1
    state = torch.load(ckpts[0], weights_only=True)["state_dict"]
    assert state and all(".adapters.default.lora_" in k for k in state)

    proc = _python("export", "--ckpt_path", str(ckpts[0]), "--export_dir", str(tmp_path / "offline"), cwd=tmp_path)
    written = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "written to" in ln]
    assert written == [f"lightning_lora: adapter (PEFT format) written to {tmp_path / 'offline' / 'adapter'}",
                       f"lightning_lora: merged model (Hugging Face format) written to {tmp_path / 'offline' / 'merged'}"]
    from lightning_lora.io.files import load_tensors

    a = load_tensors(tmp_path / "export" / "adapter" / "adapter_model.safetensors")
    b = load_tensors(tmp_path / "offline" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "offline" / "merged" / "config.json").is_file()


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI warns when sys.argv (pytest's here) and args= are both given."""
    monkeypatch.setattr(sys, "argv", ["lightning_lora"])


def _printed(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        make_cli(argv)
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


def test_adapter_class_path_overrides(capsys):
    base = ["fit", "--config", str(ROOT / "configs" / "lora.yaml")]
    out = _printed([*base, "--model.adapter.init_args.r", "16", "--print_config"], capsys)
    assert "class_path: lightning_lora.LoRA" in out and "r: 16" in out
    out = _printed([*base, "--model.adapter", "lightning_lora.DoRA", "--model.adapter.init_args.r", "4",
                    "--print_config"], capsys)  # fmt: skip
    assert "class_path: lightning_lora.DoRA" in out and "r: 4" in out
    out = _printed([*base, "--model.lr_ratio", "16", "--trainer.max_steps", "7", "--print_config"], capsys)
    assert "lr_ratio: 16.0" in out and "max_steps: 7" in out


def test_unknown_command_says_usage():
    from lightning_lora.commands.cli import main

    with pytest.raises(SystemExit, match="usage"):
        main(["train"])


def test_parse_only_keeps_a_value_that_equals_a_command_word(tmp_path):
    cli = make_cli(["fit", "--config", str(ROOT / "configs" / "lora.yaml"), "--model.adapter_name", "fit",
                    "--trainer.default_root_dir", str(tmp_path)], run=False)  # fmt: skip
    assert cli.model.adapter_name == "fit"


def test_parse_only_honours_the_trainer_options(tmp_path):
    """run=False has no subcommand level in the config: trainer options there must still decide the extra callbacks."""
    from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar

    cli = make_cli(["fit", "--config", str(ROOT / "configs" / "lora.yaml"), "--trainer.enable_progress_bar", "false",
                    "--trainer.enable_checkpointing", "false", "--trainer.logger", "false",
                    "--trainer.default_root_dir", str(tmp_path)], run=False)  # fmt: skip
    kinds = (ProgressBar, ModelCheckpoint)
    assert not any(isinstance(c, kinds) for c in cli.trainer.callbacks)
    assert cli.trainer.check_val_every_n_epoch is None  # an integer val_check_interval counts steps across epochs


@pytest.mark.parametrize("command", ["generate", "export", "estimate"])
def test_main_without_argv_reads_sys_argv(command, monkeypatch, capsys):
    import importlib

    monkeypatch.setattr(sys, "argv", ["lightning_lora", command, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"lightning_lora.commands.{command}").main(None)
    assert exit_info.value.code == 0 and f"lightning_lora {command}" in capsys.readouterr().out
