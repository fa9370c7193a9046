"""Bad input and interruptions: clear errors, no half-changed model, no half-written files, no unpickling."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_models import perturb_adapters, tiny_gpt2, tiny_llama

import lightning_lora as ll
from lightning_lora.io import files


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unchanged(model, before):
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.fixture
def saved(tmp_path):
    model = tiny_llama()
    ll.inject(model, ll.LoRA(r=4, target_modules=["q_proj", "v_proj"]))
    perturb_adapters(model)
    ll.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def test_pickle_adapter_is_refused(tmp_path, saved):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "adapter_config.json").write_text((saved / "adapter_config.json").read_text())
    torch.save(files.load_tensors(saved / "adapter_model.safetensors"), folder / "adapter_model.bin")
    model = tiny_llama()
    with pytest.raises(ValueError, match="never unpickles"):
        ll.load_adapter(model, folder)
    assert not any(isinstance(m, ll.AdapterLayer) for m in model.modules())


def test_pickle_renamed_as_safetensors_is_refused(saved):
    weights = saved / "adapter_model.safetensors"
    torch.save(files.load_tensors(weights), weights)  # a pickle under the safetensors name
    with pytest.raises(ValueError, match="not a complete safetensors file"):
        ll.load_adapter(tiny_llama(), saved)


def test_name_in_use(saved):
    model = tiny_llama()
    ll.load_adapter(model, saved, name="task")
    before = state(model)
    with pytest.raises(ValueError, match="'task' is already on the model"):
        ll.load_adapter(model, saved, name="task")
    assert unchanged(model, before)


def test_other_method_and_unknown_method(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "BOFT"}))
    with pytest.raises(ValueError, match="peft_type 'BOFT' is not supported"):
        ll.load_adapter(tiny_llama(), saved)
    (saved / "adapter_config.json").write_text(json.dumps({"peft_type": "VERA", "r": 4, "projection_prng_key": 0}))
    model = tiny_llama()
    before = state(model)
    with pytest.raises(ValueError, match="layer 'model.layers.0.self_attn.q_proj' has tensors .*lora_A"):
        ll.load_adapter(model, saved)
    assert unchanged(model, before) and not any(isinstance(m, ll.AdapterLayer) for m in model.modules())


def test_adapter_for_another_architecture(saved):
    model = tiny_gpt2()
    before = state(model)
    with pytest.raises(ValueError, match="layers this GPT2LMHeadModel does not have.*self_attn.q_proj"):
        ll.load_adapter(model, saved)
    assert unchanged(model, before)


def test_method_cannot_adapt_embedding():
    model = tiny_llama()
    for config in (ll.DoRA(target_modules=["embed_tokens"]), ll.VeRA(target_modules=["embed_tokens"])):
        with pytest.raises(ValueError, match=r"cannot adapt 1 matched module.*embed_tokens \(Embedding\)"):
            ll.inject(model, config)
    assert not any(isinstance(m, ll.AdapterLayer) for m in model.modules())


def test_not_an_adapter_config():
    with pytest.raises(TypeError, match=r"must be an AdapterConfig \(LoRA, DoRA, VeRA"):
        ll.inject(tiny_llama(), {"r": 8})


def test_failed_save_keeps_previous_export(saved, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    model = tiny_llama()
    ll.inject(model, ll.LoRA(r=2, target_modules=["k_proj"]))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lightning_lora.io.peft.save_tensors", broken)
    with pytest.raises(OSError, match="disk full"):
        ll.save_adapter(model, saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["adapter"]  # no temporary left behind


def test_killed_export_keeps_previous(saved, tmp_path):
    """SIGKILL in the middle of writing a new export: the old folder is still complete and loadable."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from tiny_models import tiny_llama
        import lightning_lora as ll
        from lightning_lora.io import peft as peft_io
        model = tiny_llama()
        ll.inject(model, ll.LoRA(r=2, target_modules=["k_proj"]))
        real = peft_io.save_tensors
        def save_then_die(tensors, path, metadata=None):
            real(tensors, path, metadata)
            os.kill(os.getpid(), signal.SIGKILL)  # after the weights, before the folder is moved into place
        peft_io.save_tensors = save_then_die
        ll.save_adapter(model, {str(saved)!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    model = tiny_llama()
    ll.load_adapter(model, saved)  # the previous export, intact
    assert {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, ll.AdapterLayer)} == {"q_proj", "v_proj"}


def test_non_finite_loss_stops_the_run_naming_the_step(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lightning_lora.train.guards import FiniteLossGuard

    class Diverging(BoringModel):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)["loss"]
            return loss * float("nan") if self.global_step == 3 else loss

    model = Diverging()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    trainer = pl.Trainer(max_steps=10, callbacks=[FiniteLossGuard(), checkpoint], logger=False, enable_progress_bar=False)
    with pytest.raises(FloatingPointError, match=r"loss became nan at global step 3 .*Last good checkpoint: .*step=3\.ckpt"):
        trainer.fit(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"epoch=0-step={i}.ckpt" for i in (1, 2, 3)]
    weights = model.layer.weight.detach().clone()
    good = torch.load(tmp_path / "epoch=0-step=3.ckpt", weights_only=True)["state_dict"]["layer.weight"]
    assert torch.equal(weights, good)  # the NaN step changed nothing


def test_adapter_callback_and_lora_module_stop_on_non_finite_loss():
    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lightning_lora.train.callback import AdapterCallback
    from lightning_lora.train.guards import FiniteLossGuard
    from lightning_lora.train.module import LoRAModule

    class Diverging(BoringModel):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)["loss"]
            return loss * float("inf") if self.global_step == 2 else loss

    model = Diverging()
    trainer = pl.Trainer(max_steps=5, callbacks=[AdapterCallback(ll.LoRA(r=2, target_modules=["layer"]))],
                         logger=False, enable_progress_bar=False, enable_checkpointing=False)  # fmt: skip
    with pytest.raises(FloatingPointError, match="loss became inf at global step 2 .*none saved yet"):
        trainer.fit(model)
    assert any(isinstance(cb, FiniteLossGuard) for cb in LoRAModule("unused").configure_callbacks())


KILLABLE_FIT = """
import functools, json, os, signal, sys
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
import lightning_lora as ll
from lightning_lora.train.data import InstructionDataModule
from lightning_lora.train.module import LoRAModule
from lightning_lora.train.resume import RunCheckpoint

mode, tiny, root = sys.argv[1:4]
seed_everything(0)
data = os.path.join(root, "pairs.jsonl")
with open(data, "w") as fh:  # 12 training examples of varied lengths: 3 batches an epoch, shuffled, grouped by length
    for i in range(14):
        fh.write(json.dumps({"prompt": "word " * (i % 5 + 1), "response": "answer " * (i % 3 + 1) + str(i)}) + "\\n")


class KillAt(Callback):
    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == 7:  # mid-epoch, after the checkpoint at step 6
            os.kill(os.getpid(), signal.SIGKILL)


module = LoRAModule(tiny, adapter=ll.LoRA(r=4, dropout=0.2), optimizer=functools.partial(torch.optim.AdamW, lr=5e-3))
checkpoint = RunCheckpoint(every_n_steps=3, dirpath=os.path.join(root, "ckpt"))
trainer = Trainer(max_steps=9, callbacks=[checkpoint] + ([KillAt()] if mode == "kill" else []), logger=False,
                  enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", limit_val_batches=0)
resume = os.path.join(root, "ckpt", "last.ckpt") if mode == "resume" else None
trainer.fit(module, InstructionDataModule(data, max_length=32, batch_size=4, val_fraction=0.1), ckpt_path=resume)
ll.save_adapter(module.model, os.path.join(root, "adapter"))
"""


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    """Shuffled, length-grouped data and adapter dropout: the resumed run must see the same batches and masks."""
    from tiny_assets import make_tiny_model_dir

    tiny = str(make_tiny_model_dir(tmp_path / "tiny"))
    script = tmp_path / "fit.py"
    script.write_text(KILLABLE_FIT)

    def run(mode, root):
        return subprocess.run([sys.executable, str(script), mode, tiny, str(root)], capture_output=True, timeout=600)

    (tmp_path / "full").mkdir()
    (tmp_path / "interrupted").mkdir()
    full = run("full", tmp_path / "full")
    assert full.returncode == 0, full.stderr.decode()[-3000:]
    killed = run("kill", tmp_path / "interrupted")
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-3000:]
    assert not (tmp_path / "interrupted" / "adapter").exists()
    resumed = run("resume", tmp_path / "interrupted")
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    a = files.load_tensors(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = files.load_tensors(tmp_path / "interrupted" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[key], b[key]) for key in a)  # bit for bit
    assert any(k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a)  # it really trained


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        ("model:\n  base_model: x\n  rank: 8\n", "rank"),  # unknown key: named
        ("model:\n  base_model: x\n  adapter:\n    class_path: lightning_lora.LoRA\n    init_args:\n      r: eight\n", "eight"),
        ("model:\n  base_model: x\n  adapter:\n    class_path: lightning_lora.LoRA\n    init_args:\n      r: 0\n", "positive integer"),
        ("model:\n  base_model: x\n  adapter:\n    class_path: lightning_lora.Adapterz\n", "Adapterz"),
        ("model:\n  base_model: x\n  lr_ratio: -1\n", "lr_ratio must be > 0"),
    ],
)
def test_bad_yaml_is_reported_with_the_offending_key(tmp_path, capsys, yaml_text, expected):
    from lightning_lora.commands.cli import make_cli

    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    from argparse import ArgumentError

    from lightning_lora.commands.errors import one_line

    with pytest.raises((ArgumentError, ValueError)) as err:  # parse errors raise: the command shortens them
        make_cli(["--config", str(config)], run=False)  # parse and instantiate, as `fit` does before training
    line = one_line(err.value)  # what the command prints
    assert expected in line and "\n" not in line, line
