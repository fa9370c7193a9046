"""examples/vision_conv.py in reduced form: LoRA on a CNN's Conv2d and Linear layers through AdapterCallback."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
PATH = Path(__file__).resolve().parents[1] / "examples" / "vision_conv.py"


@pytest.mark.slow
def test_vision_example_adapts_convs_and_linears(capsys):
    spec = importlib.util.spec_from_file_location("vision_conv", PATH)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    res = example.main(["--base-epochs", "4", "--adapt-epochs", "4", "--r", "2"])
    model = res["model"]
    # trained share by the formula: conv r (in k k + out), linear r (in + out); the base is frozen
    layers = [model.conv1, model.conv2, model.fc1, model.fc2]
    bases = [m.base_layer for m in layers]
    expected = 2 * (1 * 9 + 16) + 2 * (16 * 9 + 32) + 2 * (512 + 64) + 2 * (64 + 5)
    assert res["trained"] == expected
    assert res["total"] == expected + sum(p.numel() for b in bases for p in b.parameters())
    assert res["after"] > res["before"]  # the adapter learned the new digits
    out = capsys.readouterr().out
    assert "digits 5-9 accuracy: before" in out and "parameters trained" in out
