"""Every YAML in configs/ starts with a comment giving its run command and parses with that command's CLI parser."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

from lightning_lora.commands.cli import make_cli

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.y*ml"))
RUN = re.compile(r"^#.*python -m lightning_lora (\w+)\b.*--config (\S+)")


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI warns when sys.argv (pytest's here) and args= are both given."""
    monkeypatch.setattr(sys, "argv", ["lightning_lora"])


def test_there_are_configs():
    assert {"quickstart.yaml", "lora.yaml", "qlora.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path, capsys):
    first = path.read_text().splitlines()[0]
    match = RUN.match(first)
    assert match, f"{path.name}: the first line must be a comment with its run command, e.g. " \
                  f"'# Run: python -m lightning_lora fit --config configs/{path.name}'; got {first!r}"
    command, named = match.groups()
    assert Path(named).name == path.name, f"{path.name}: its run command names another file ({named})"
    assert isinstance(yaml.safe_load(path.read_text()), dict)
    if command not in ("fit", "validate", "test"):
        pytest.skip(f"{path.name} is for `{command}`, not a LightningCLI command")
    with pytest.raises(SystemExit) as exit_info:
        make_cli([command, "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    model = printed["model"].get("init_args", printed["model"])  # configs/dpo.yaml names its class (DPOModule)
    assert model["base_model"]
