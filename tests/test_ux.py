"""What a user sees: short runs that end with a validation, a checkpoint and a summary; quiet output; errors on one
line; strict targets; own data by path; curves in TensorBoard and as a PNG; the small snags (labels, memory note).

The subprocess tests run ``python -m lightning_lora`` on the tiny on-disk model (tests/tiny_assets.py) without any
warning filter, and check the text a user would read. Independent runs go side by side to keep the wall time low.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_lora as ll
from lightning_lora.commands.errors import config_key, one_line, split_message
from tiny_assets import make_tiny_model_dir
from tiny_models import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("litlogger", "litmodels", "Tip:", "kernels", "Loading weights", "Writing model shards", "v_num",
         "tensorboardX", "LeafSpec", "_pytree", "configure_callbacks", "Epoch 0/")  # fmt: skip


def _start(*args: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "LIGHTNING_LORA_TRACEBACK")} | (env or {})
    return subprocess.Popen([sys.executable, "-m", "lightning_lora", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def _run(*args: str, cwd: Path, env: dict | None = None) -> tuple[int, str, str]:
    return _finish(_start(*args, cwd=cwd, env=env))


def _pairs(path: Path, n: int = 24) -> Path:
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(n)]
    rows[3] = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _fit_args(tmp_path: Path, model_dir: Path, data: Path, steps: int) -> list[str]:
    return ["fit", "--config", str(ROOT / "configs" / "own_data.yaml"), "--model.base_model", str(model_dir),
            "--data.init_args.source", str(data), "--data.init_args.max_length", "32", "--trainer.max_steps",
            str(steps), "--trainer.val_check_interval", "40", "--trainer.accelerator", "cpu",
            "--trainer.default_root_dir", str(tmp_path / "run"), "--model.export_dir", str(tmp_path / "export")]  # fmt: skip


def _figures(text: str, when: str) -> dict[str, float]:
    line = next(ln for ln in text.splitlines() if ln.startswith(f"{when} training:"))
    return {k: float(v) for k, v in re.findall(r"(val_\w+) ([\d.]+)", line)}


def _one_error_line(rc: int, out: str, err: str) -> str:
    text = out + err
    assert rc == 2, text[-3000:]
    assert "Traceback" not in text and "usage:" not in text, text[-3000:]
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, text[-3000:]
    return errors[0]


# ------------------------------------------------------------------------------------------------ subprocess runs
@pytest.mark.slow
def test_short_fit_from_a_jsonl_path_ends_with_validation_checkpoint_and_summary(tmp_path):
    """3 steps with val_check_interval 40: a validation, last.ckpt and the summary anyway; quiet; resume, plot,
    export with the wrong base."""
    model_dir = make_tiny_model_dir(tmp_path / "tiny")
    data = _pairs(tmp_path / "mine.jsonl")
    rc, out, err = _run(*_fit_args(tmp_path, model_dir, data, 3), cwd=tmp_path)
    text = out + err
    assert rc == 0, text[-4000:]
    assert not [ln for ln in text.splitlines() if any(n in ln for n in NOISE)], text
    assert text.count("memory by kind") == 1 and "step 3/3" in text
    before, after = _figures(text, "before"), _figures(text, "after")
    assert set(before) == set(after) == {"val_loss", "val_ppl"} and after["val_loss"] < before["val_loss"]
    summary = out[out.index("run summary:"):]  # stdout; the progress bar and logs go to stderr
    last = next((tmp_path / "run").rglob("last.ckpt"))
    log_dir = last.parent.parent
    for expected in ("steps 0 -> 3", "tokens/s", f"checkpoint  {last}", str(tmp_path / "export" / "adapter"),
                     f"tensorboard --logdir {log_dir}"):  # fmt: skip
        assert expected in summary, summary
    assert len([ln for ln in summary.splitlines() if ln.strip()]) <= 12  # one screen

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "val_loss", "val_ppl", "tokens_per_s", "lr-AdamW"} <= tags, tags

    # Side by side: resume to step 5 (its "before" is the restored adapter's), plot, export onto a wrong base.
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    config.intermediate_size = 2 * config.intermediate_size
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "wide")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp_path / "wide")
    resume = _start(*_fit_args(tmp_path, model_dir, data, 5), "--ckpt_path", str(last), cwd=tmp_path)
    plot = _start("plot", str(tmp_path / "run"), "--out", str(tmp_path / "curves.png"), cwd=tmp_path)
    export = _start("export", "--ckpt_path", str(last), "--export_dir", str(tmp_path / "x"), "--base_model",
                    str(tmp_path / "wide"), cwd=tmp_path)  # fmt: skip

    line = _one_error_line(*_finish(export))
    assert "mlp.gate_proj" in line and "(64, 8)" not in line and re.search(r"\(\d+, \d+\).*\(\d+, \d+\)", line), line
    assert not (tmp_path / "x").exists()  # nothing half-written
    rc, out, err = _finish(plot)
    assert rc == 0, out + err
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    rc, out, err = _finish(resume)
    assert rc == 0, (out + err)[-4000:]
    resumed = _figures(out + err, "before")
    assert resumed == pytest.approx(after, rel=1e-3), (resumed, after)  # the restored adapter, not the base
    assert "steps 3 -> 5" in out + err and "step 5/5" in out + err


@pytest.mark.slow
def test_cli_errors_take_one_line(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / "tiny")
    data = _pairs(tmp_path / "mine.jsonl")
    base = _fit_args(tmp_path, model_dir, data, 1)
    typo = tmp_path / "typo.yaml"
    typo.write_text((ROOT / "configs" / "own_data.yaml").read_text().replace("  adapter:", "  adaptor:"))
    cases = {
        "key typo": _start(*base[:2], str(typo), *base[3:], cwd=tmp_path),
        "bad value": _start(*base, "--model.adapter.init_args.r", "0", cwd=tmp_path),
        "target typo": _start(*base, "--model.adapter.init_args.target_modules", "[q_proj, vv_proj]", cwd=tmp_path),
        "traceback": _start(*base, "--model.adapter.init_args.r", "0", cwd=tmp_path,
                            env={"LIGHTNING_LORA_TRACEBACK": "1"}),
    }  # fmt: skip
    results = {name: _finish(proc) for name, proc in cases.items()}

    line = _one_error_line(*results["key typo"])
    assert "(model.adaptor)" in line and "did you mean 'adapter'?" in line
    line = _one_error_line(*results["bad value"])
    assert "r (the rank) must be a positive integer, got 0" in line and "(model.adapter.init_args.r)" in line
    line = _one_error_line(*results["target typo"])
    assert "'vv_proj'" in line and "did you mean 'v_proj'" in line and "(model.adapter.init_args.target_modules)" in line
    rc, out, err = results["traceback"]
    assert rc != 0 and "Traceback (most recent call last)" in err and "positive integer" in err
    assert not list((tmp_path / "run").rglob("*.ckpt"))  # no run got as far as writing anything


@pytest.fixture
def _no_pytest_argv(monkeypatch):
    """LightningCLI warns when sys.argv (pytest's here) and args= are both given."""
    monkeypatch.setattr(sys, "argv", ["lightning_lora"])


@pytest.mark.usefixtures("_no_pytest_argv")
@pytest.mark.parametrize(
    "override, expected",
    [
        (["--model.adapter.init_args.alpah", "16"], ("(model.adapter.init_args.alpah)", "did you mean 'alpha'?")),
        (["--trainer.max_stepz", "3"], ("(trainer.max_stepz)", "did you mean 'max_steps'?")),
        (["--data.init_args.source", "nope.jsonl"], ("nope.jsonl", "(data.init_args.source)")),
    ],
)
def test_parse_and_build_errors_in_one_line(override, expected):
    """The CLI object raises (the command shortens): the line names the key and the fix, without the usage."""
    from lightning_lora.commands.cli import make_cli

    args = ["fit", "--config", str(ROOT / "configs" / "own_data.yaml"), "--model.base_model", "unused", *override]
    with pytest.raises(Exception) as err:
        make_cli(args, run=False)
    line = one_line(err.value)
    assert line.startswith("error: ") and "\n" not in line and all(e in line for e in expected), line


# ------------------------------------------------------------------------------------------------ in-process units
def test_split_message_and_config_key():
    what, fix = split_message("bad.jsonl:2: not valid JSON (x). Each line must be one object.")
    assert (what, fix) == ("bad.jsonl:2: not valid JSON (x)", "Each line must be one object")
    assert split_message("Unknown source 'x': use one of ['a']") == ("Unknown source 'x'", "use one of ['a']")
    assert split_message("no fix here.") == ("no fix here", "")
    config = {"model.adapter.init_args.r": 0, "model.base_model": "/data/m", "data.init_args.source": "x.jsonl",
              "trainer.max_steps": 3, "seed_everything": 0}  # fmt: skip
    assert config_key("LoRA: r (the rank) must be a positive integer, got 0.", config) == "model.adapter.init_args.r"
    assert config_key("base_model='/data/m' is not a folder", config) == "model.base_model"
    assert config_key("x.jsonl:3: not valid JSON", config) == "data.init_args.source"
    assert config_key("something else entirely", config) is None


def test_one_line_for_a_library_error():
    err = ValueError("dtype='bf16' is not a torch dtype; use e.g. 'float32'.")
    err.lightning_lora_config = {"model.dtype": "bf16"}
    line = one_line(err)
    assert line.startswith("error: dtype='bf16' is not a torch dtype (model.dtype): use e.g. 'float32'") and "\n" not in line


def test_every_target_name_must_match():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"'vv_proj'.*did you mean 'v_proj'") as err:
        ll.inject(model, ll.LoRA(target_modules=["q_proj", "vv_proj"]))
    assert "'q_proj'" not in str(err.value).split("did you mean")[0]  # only the name that matches nothing is listed
    assert not any(isinstance(m, ll.AdapterLayer) for m in model.modules())  # nothing half-injected
    ll.inject(model, ll.LoRA(target_modules=["q_proj", "v_proj"]))  # both match: fine


def test_all_linear_on_convolutions(caplog):
    convs = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1))
    with pytest.raises(ValueError, match="has no linear layer") as err:
        ll.inject(convs, ll.LoRA())
    assert "all-linear" not in str(err.value).split(":", 1)[1]  # no advice to use what just failed
    mixed = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 4))
    with caplog.at_level(logging.WARNING, logger="lightning_lora"):
        ll.inject(mixed, ll.LoRA())
    assert "leaves out its 1 Conv2d layer" in caplog.text  # not silently linear-only


def test_source_accepts_a_file_path(tmp_path):
    from lightning_lora.train.data import InstructionDataModule
    from tiny_assets import make_tiny_tokenizer

    data = InstructionDataModule(source=str(_pairs(tmp_path / "mine.jsonl", 10)), tokenizer=make_tiny_tokenizer(),
                                 val_fraction=0.2)  # fmt: skip
    data.setup()
    assert len(data.train_set) + len(data.val_set) == 10
    with pytest.raises(ValueError, match="neither a built-in data set .*nor an existing file"):
        InstructionDataModule(source="missing.jsonl")


def test_sample_jsonl_reads():
    from lightning_lora.train.data import read_jsonl

    convs = read_jsonl(ROOT / "examples" / "data" / "sample.jsonl")
    kinds = {len(c) == 2 and c[0]["role"] == "user" for c in convs}
    assert len(convs) >= 8 and kinds == {True, False}  # both forms: prompt/response and messages


def test_generate_labels_adapters_by_name():
    from lightning_lora.commands.generate import adapter_label

    assert adapter_label("runs/chat/export/adapter") == "chat"
    assert adapter_label("out/export") == "out"
    assert adapter_label("adapters/docs_v2") == "docs_v2"


def test_memory_note_counts_what_qlora_counts():
    """QLoRA's 4 + 8/64 + 32/(64*256) bits/param, once the per-layer code tables are set apart."""
    from lightning_lora.train.memory import memory_report

    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024))
    ll.quantize(model, ll.NF4())
    note = memory_report(model, log_table=False)["quantized base"]["source"]
    bits = float(note.split()[0])
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=5e-4), note


@pytest.mark.slow
def test_original_weights_resolves_the_alias():
    from safetensors import safe_open

    from lightning_lora.io.models import resolve_model_path

    pytest.importorskip("gguf")
    name = "model.layers.0.self_attn.q_proj"
    try:
        folder = resolve_model_path("smollm2-135m-instruct")
    except (ModuleNotFoundError, ValueError) as err:
        pytest.skip(f"SmolLM2 not installed: {err}")
    got = ll.original_weights("smollm2-135m-instruct", [name])[name]
    with safe_open(str(next(Path(folder).glob("*.safetensors"))), framework="pt") as f:
        assert torch.equal(got, f.get_tensor(name + ".weight"))


def test_validate_at_end_and_last_checkpoint_for_a_run_shorter_than_the_interval(tmp_path):
    """max_steps 3 < val_check_interval 40: the last step still validates, and last.ckpt is written after it."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lightning_lora.train.summary import RunSummary, ValidateAtEnd

    class Counting(BoringModel):
        validated_at: list[int] = []

        def on_validation_epoch_end(self):
            self.validated_at.append(self.trainer.global_step)

    summary = RunSummary()
    callbacks = [ValidateAtEnd(), summary, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)]
    trainer = Trainer(max_steps=3, val_check_interval=40, check_val_every_n_epoch=None, limit_val_batches=2,
                      num_sanity_val_steps=0, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=callbacks)  # fmt: skip
    trainer.fit(Counting())
    assert Counting.validated_at == [3] and (tmp_path / "ckpt" / "last.ckpt").is_file()
    assert trainer.global_step == 3 and summary.steps == 3 and summary.last_loss is not None
    assert "steps 0 -> 3" in summary.summary_lines(trainer)[0]
