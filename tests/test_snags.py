"""Snags a new user met (issue 24): each message or figure as it reads now, in a test that fails on the old one."""

import logging
import sys

import pytest
import torch
from tiny_models import tiny_llama

import lightning_lora as ll
from lightning_lora.commands.cli import make_cli
from lightning_lora.commands.errors import one_line
from lightning_lora.train.memory import format_report, memory_report
from lightning_lora.train.progress import StepProgressBar, eta_seconds


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning_lora"])


def _error(argv) -> str:
    with pytest.raises(Exception) as info:
        make_cli(argv, run=False)
    return one_line(info.value)


def test_fit_without_a_config_says_how_to_give_one():
    line = _error(["fit"])
    assert line.startswith("error: no value for model.base_model (model.base_model): pass a config, e.g. --config "
                           "configs/quickstart.yaml"), line
    assert "fit.model.base_model" not in line


def test_a_bad_number_names_its_key_and_the_value(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  base_model: x\n  optimizer:\n    class_path: torch.optim.AdamW\n"
                      "    init_args:\n      lr: 1e-3x\n")  # fmt: skip
    line = _error(["--config", str(config)])
    assert line.startswith("error: lr must be a float, got '1e-3x' (model.optimizer.init_args.lr): give a number"), line
    assert "Union" not in line and "Namespace" not in line


def test_quantize_says_the_base_is_nf4_already(caplog):
    model = tiny_llama()
    with caplog.at_level(logging.INFO, logger="lightning_lora"):
        ll.quantize(model, ll.NF4(skip_modules=()))
        ll.quantize(model, ll.NF4(skip_modules=()))  # as LoftQ's init leaves it: every layer NF4 already
    lines = [r.getMessage().splitlines()[0] for r in caplog.records if r.getMessage().startswith("quantize:")]
    assert lines == ["quantize: 13 linear layers to NF4 (blocksize 64, double_quant=True)",
                     "quantize: the base is NF4: 13 linear layers (blocksize 64, double_quant=True)"]


def test_eta_ignores_the_first_step():
    assert eta_seconds([], 39) is None  # after the first step: no estimate yet
    assert eta_seconds([2.0, 2.2, 30.0], 10) == pytest.approx(22.0)  # a step with a validation does not count

    class Trainer:
        global_step, is_global_zero, max_steps = 0, True, 40

    bar, trainer = StepProgressBar(), Trainer()
    bar.get_metrics = lambda trainer, module: {}
    bar.on_train_start(trainer, None)
    clock = iter([100.0, 102.0, 104.0])
    import lightning_lora.train.progress as progress

    progress.time.perf_counter, real = (lambda: next(clock)), progress.time.perf_counter
    try:
        for step in (1, 2, 3):  # the first step took 52 s (one-time work), the next ones 2 s each
            trainer.global_step = step
            bar.on_train_batch_end(trainer, None, None, None, step - 1)
            if step == 1:
                assert "eta=-" in str(bar._bar)
    finally:
        progress.time.perf_counter = real
    assert "eta=1:14" in str(bar._bar)  # 37 steps left x 2 s
    bar.on_train_end(trainer, None)


def test_memory_table_total_has_no_mixed_bits_and_points_at_the_rss(caplog):
    model = ll.inject(tiny_llama(), ll.LoRA(r=4))
    with caplog.at_level(logging.INFO, logger="lightning_lora"):
        report = memory_report(model, reference="the same weights with the adapter off")
    total_row = next(line for line in format_report(report).splitlines() if line.startswith("│ total"))
    assert "32.000" not in total_row and " - " in total_row and "tensors only" in total_row
    assert "reference model" in caplog.text and "MiB (RSS)" in caplog.text
    assert report["unquantized base"]["source"].startswith("largest: model.embed_tokens.weight")
    assert torch.is_tensor(next(model.parameters()))


def test_probe_tolerance_follows_the_logits_scale():
    """The quickstart's SmolLM2 over NF4 (logits up to ~20) moved by 6.1e-5 between packed and alone: rounding."""
    from lightning_lora.train.probe import differs

    logits = torch.linspace(-20, 20, 100)
    assert differs(logits, logits + 6.1e-5) is None
    assert differs(logits, logits + 1e-3) is not None
    small = torch.linspace(-0.5, 0.5, 100)  # below 1 the tolerance stays absolute
    assert differs(small, small + 2e-5) is not None and differs(small, small + 5e-6) is None
