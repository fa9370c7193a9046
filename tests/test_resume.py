"""Exact resume, mid-epoch and at an epoch's end; runs that keep their work (interrupts, periodic and final
checkpoints, non-finite steps); one run per export_dir; no empty run folders.

The reference for every resumed run is the same run uninterrupted: the per-step training losses and the adapter must
be equal bit for bit, with adapter dropout on and the data shuffled (the loader's position and the RNGs restored).
"""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_lora import LoRA
from lightning_lora.commands.cli import interrupted_line
from lightning_lora.io.lock import FolderInUseError, FolderLock, lock_path
from lightning_lora.train.data import InstructionDataModule
from lightning_lora.train.interrupts import Interrupted, Interrupts
from lightning_lora.train.module import LoRAModule
from lightning_lora.train.resume import RunCheckpoint, rng_state, run_folder, set_rng_state
from lightning_lora.train.sampler import EpochSampler, ResumableLoader
from lightning_lora.train.summary import ValidateAtEnd
from tiny_assets import make_tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
             num_sanity_val_steps=0)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """Prompt/response pairs of varied lengths (so grouping by length reorders them)."""
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    rows = [{"prompt": "word " * (i % 7 + 1) + str(i), "response": "answer " * (i % 5 + 1) + str(i)} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------------- order and state
def test_epoch_sampler_is_seeded_whole_batches_split_over_ranks():
    lengths = [(i * 7) % 23 + 1 for i in range(30)]
    for lens in (None, lengths):
        one = EpochSampler(30, 4, seed=3, lengths=lens)
        batches = one.batches(0)
        assert sorted(i for b in batches for i in b) == list(range(30))  # a permutation, in batches of 4 and one of 2
        assert [len(b) for b in batches] == [4] * 7 + [2] and batches == one.batches(0) != one.batches(1)
        loader = ResumableLoader(list(range(30)), batch_size=4, sampler=one)
        one.set_epoch(0)
        assert [b.tolist() for b in loader] == batches  # the loader keeps every batch whole
        ranks = [EpochSampler(30, 4, seed=3, lengths=lens, num_replicas=3, rank=r) for r in range(3)]
        per_rank = [s.rank_batches(0) for s in ranks]
        assert [len(p) for p in per_rank] == [3, 3, 3]  # 8 batches padded to 9 by repeating the first
        assert [b for k in range(3) for b in (per_rank[0][k], per_rank[1][k], per_rank[2][k])] == batches + batches[:1]
        assert all(len(s) == sum(map(len, p)) for s, p in zip(ranks, per_rank))
    grouped = EpochSampler(30, 4, seed=3, lengths=lengths, num_replicas=2, rank=1).rank_batches(0)
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in grouped]
    assert max(spread) <= 3  # grouped by length on each rank (no second shuffle of a wrapping sampler)


@pytest.mark.parametrize("stop", [3, 8, 11])  # mid-epoch, at the epoch's end (8 batches), in the next epoch
def test_loader_state_restarts_after_the_batches_it_yielded(stop):
    def make():
        return ResumableLoader(list(range(30)), batch_size=4, sampler=EpochSampler(30, 4, seed=1))

    full, seen = make(), []
    for epoch in range(3):
        full.sampler.set_epoch(epoch)
        seen += [b.tolist() for b in full]
    part, state = make(), None
    for epoch in range(2):
        part.sampler.set_epoch(epoch)
        for k, batch in enumerate(part):
            if epoch * 8 + k + 1 == stop:
                state = part.state_dict()
                break
        if state is not None:
            break
    assert state == {"epoch": (stop - 1) // 8, "batches": (stop - 1) % 8 + 1}
    resumed = make()
    resumed.load_state_dict(state)
    rest = []
    for epoch in range(resumed.sampler.epoch, 3):  # Lightning sets the restored epoch, then the next ones
        resumed.sampler.set_epoch(epoch)
        rest += [b.tolist() for b in resumed]
    assert rest == seen[stop:]


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    torch.save({"rng": rng_state()}, tmp_path / "s.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    assert (torch.rand(3), random.random(), np.random.rand())[1:] == expected[1:]
    torch.manual_seed(1)
    torch.testing.assert_close(expected[0], torch.rand(3), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- exact resume (fit)
class Losses(Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _fit(tiny_dir, pairs, root, max_steps, *, packing, ckpt_path=None, every=None, callbacks=(), **kwargs):
    seed_everything(0)
    module = LoRAModule(tiny_dir, adapter=LoRA(r=4, dropout=0.2), **kwargs)
    data = InstructionDataModule(str(pairs), max_length=32, batch_size=4, val_fraction=0.1 if packing else 0.2,
                                 packing=packing)  # 36 or 32 training examples: 9 or 8 steps an epoch  # fmt: skip
    losses = Losses()
    saves = [ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=every, save_top_k=-1)] if every else []
    trainer = Trainer(max_steps=max_steps, limit_val_batches=0, callbacks=[losses, *saves, *callbacks],
                      default_root_dir=root, **QUIET)  # fmt: skip
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, losses.losses, trainer


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, pairs, tmp_path_factory):
    """8 steps, grouped by length, checkpointed at step 4 (mid-epoch): the reference of several tests."""
    root = tmp_path_factory.mktemp("uninterrupted")
    module, losses, _ = _fit(tiny_dir, pairs, root, 8, packing=False, every=4)
    return module, losses, root


@pytest.mark.parametrize("packing, stop", [(False, 4), (True, 9)], ids=["grouped-mid-epoch", "packed-epoch-end"])
def test_resumed_fit_equals_uninterrupted_step_for_step(tiny_dir, pairs, tmp_path, uninterrupted, packing, stop):
    if packing:
        full, full_losses, _ = _fit(tiny_dir, pairs, tmp_path, stop + 4, packing=packing, every=stop)
        root = tmp_path
    else:
        full, full_losses, root = uninterrupted
    resumed, losses, _ = _fit(tiny_dir, pairs, tmp_path / "resumed", stop + 4, packing=packing,
                              ckpt_path=root / f"step={stop}.ckpt")  # fmt: skip
    assert losses == full_losses[stop:]  # the same batches, the same dropout masks
    a, b = full.model.state_dict(), resumed.model.state_dict()
    keys = [k for k in a if ".adapters." in k]
    assert keys and all(torch.equal(a[k], b[k]) for k in keys)
    assert any(a[k].abs().max() > 0 for k in keys if k.endswith("lora_B"))


# ------------------------------------------------------------------------------------- interrupts and checkpoints
class SignalAt(Callback):
    def __init__(self, step, signum):
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step - 1:  # during step `step`
            os.kill(os.getpid(), self.signum)


def test_signal_during_a_step_saves_it_then_resume_is_exact(tiny_dir, pairs, tmp_path, uninterrupted):
    previous = signal.getsignal(signal.SIGTERM)
    checkpoint = RunCheckpoint(dirpath=tmp_path / "ckpt")
    with pytest.raises(Interrupted) as stop:
        _fit(tiny_dir, pairs, tmp_path / "a", 8, packing=False, callbacks=[Interrupts(), SignalAt(3, signal.SIGTERM),
             checkpoint])  # fmt: skip
    assert signal.getsignal(signal.SIGTERM) == previous  # Lightning restored the handlers
    assert (stop.value.signum, stop.value.step, stop.value.saved, stop.value.exit_code) == (signal.SIGTERM, 3, True, 143)
    assert Path(stop.value.checkpoint) == tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(stop.value.checkpoint, weights_only=True)["global_step"] == 3
    full, full_losses, _ = uninterrupted
    resumed, losses, _ = _fit(tiny_dir, pairs, tmp_path / "c", 8, packing=False, ckpt_path=stop.value.checkpoint)
    assert losses == full_losses[3:]
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if ".adapters." in k)


def test_run_checkpoint_every_n_steps_skips_validated_steps_and_saves_the_end(tiny_dir, pairs, tmp_path):
    class Saves(Callback):
        steps: list[int] = []

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            self.steps.append(trainer.global_step)

    checkpoint = RunCheckpoint(every_n_steps=2, dirpath=tmp_path, save_top_k=0)
    seed_everything(0)
    module = LoRAModule(tiny_dir, adapter=LoRA(r=4))
    data = InstructionDataModule(str(pairs), max_length=32, batch_size=4)
    trainer = Trainer(max_steps=7, val_check_interval=4, check_val_every_n_epoch=None, limit_val_batches=1,
                      callbacks=[Saves(), checkpoint], **QUIET)  # fmt: skip
    trainer.fit(module, data)
    # 2 and 6 by count; 4 validates (ModelCheckpoint saves after it only with top-k), 7 is the end
    assert Saves.steps == [2, 6, 7] and os.listdir(tmp_path) == ["last.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 7
    Saves.steps = []  # by time: every step is late after 1e-9 minutes; the last one is saved at the end
    trainer = Trainer(max_steps=3, limit_val_batches=0, callbacks=[Saves(), RunCheckpoint(every_minutes=1e-9,
                      dirpath=tmp_path / "t", save_top_k=0)], **QUIET)  # fmt: skip
    trainer.fit(LoRAModule(tiny_dir, adapter=LoRA(r=4)), InstructionDataModule(str(pairs), max_length=32, batch_size=4))
    assert Saves.steps == [1, 2, 3]


def test_non_finite_final_validation_fails_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_dir, pairs, tmp_path):
    boom = functools.partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda step: 1.0 if step < 2 else 1e30)
    checkpoint = RunCheckpoint(every_n_steps=1, dirpath=tmp_path)
    seed_everything(0)
    module = LoRAModule(tiny_dir, adapter=LoRA(r=4), lr_scheduler=boom, export_dir=str(tmp_path / "export"))
    trainer = Trainer(max_steps=3, val_check_interval=50, check_val_every_n_epoch=None, limit_val_batches=2,
                      callbacks=[ValidateAtEnd(), checkpoint], **QUIET)  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"validation loss became nan after global step 3 .*Last good "
                                                 r"checkpoint: .*last\.ckpt"):  # fmt: skip
        trainer.fit(module, InstructionDataModule(str(pairs), max_length=32, batch_size=4))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2 and all(torch.isfinite(v).all() for v in saved["state_dict"].values())
    assert not (tmp_path / "export").exists()  # nothing exported either


def test_a_non_finite_adapter_is_never_checkpointed(tiny_dir, pairs, tmp_path):
    class Poison(Callback):  # a step that leaves NaN in the adapter (before the checkpoint callback runs)
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == 2:
                with torch.no_grad():
                    next(p for n, p in pl_module.model.named_parameters() if n.endswith("lora_B"))[0, 0] = float("nan")

    with pytest.raises(FloatingPointError, match=r"adapter holds NaN/inf after global step 2 \(.*lora_B\)"):
        _fit(tiny_dir, pairs, tmp_path, 4, packing=False, callbacks=[Poison(), RunCheckpoint(every_n_steps=1,
             dirpath=tmp_path / "ckpt")])  # fmt: skip
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 1 and all(torch.isfinite(v).all() for v in saved["state_dict"].values())


# --------------------------------------------------------------------------------------------------------- locks
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_folder_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, caplog):
    folder = tmp_path / "export"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_path(folder).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename, "started": "t0"}))
        with pytest.raises(FolderInUseError, match=rf"in use by another run: pid {holder.pid} on .* started t0"):
            FolderLock(folder).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock_path(folder).write_text(json.dumps({"pid": _dead_pid(), "host": os.uname().nodename, "started": "t1"}))
    with caplog.at_level("WARNING", logger="lightning_lora.io.lock"):
        with FolderLock(folder) as lock:
            assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert "took over the stale lock" in caplog.text and not lock_path(folder).exists()


def test_second_fit_into_a_locked_export_dir_refuses_before_loading(tiny_dir, tmp_path):
    lock_path(tmp_path / "export").write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename}))
    module = LoRAModule(tiny_dir, adapter=LoRA(r=4), export_dir=str(tmp_path / "export"))
    with pytest.raises(FolderInUseError, match=f"in use by another run: pid {os.getppid()}"):
        Trainer(max_steps=1, **QUIET).fit(module, [])
    assert module.model is None and lock_path(tmp_path / "export").exists()  # refused before loading; lock kept


def test_run_folder_of_a_checkpoint(tmp_path):
    run = tmp_path / "lightning_logs" / "version_3"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert run_folder(run / "checkpoints" / "last.ckpt") is None  # no logger files: not a run folder
    (run / "hparams.yaml").write_text("{}")
    assert run_folder(run / "checkpoints" / "last.ckpt") == run
    assert run_folder(tmp_path / "nowhere.ckpt") is None


# ----------------------------------------------------------------------------------------------- the command line
class SignalOnce(Callback):
    """SIGINT to this process during step ``step``, once (a marker file remembers it)."""

    def __init__(self, step: int = 3, marker: str = "fired"):
        self.step, self.marker = step, marker

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step - 1 and not Path(self.marker).exists():
            Path(self.marker).touch()
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_saves_and_prints_the_resume_command_that_continues_in_the_same_folder(
        tiny_dir, pairs, tmp_path, capsys, monkeypatch):  # fmt: skip
    """``python -m lightning_lora fit`` (in this process): SIGINT during step 3 -> last.ckpt at step 3, one line with
    it and the resume command, exit 130 (it was 1, silently); that command continues in the same version folder,
    without Lightning's warnings about it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning_lora"])

    def fit(name: str, marker: str) -> list[str]:
        return _tiny_fit(tiny_dir, pairs, Path(name), "--model.adapter.init_args.dropout", "0.2", "--trainer.max_steps",
                         "6", "--validate_before_fit", "false", "--trainer.limit_val_batches", "1", "--model.export_dir",
                         "null", "--trainer.callbacks+=test_resume.SignalOnce", "--trainer.callbacks.marker",
                         marker)  # fmt: skip

    handler = signal.getsignal(signal.SIGINT)
    code, text = _main(fit("cut", "fired"), capsys)
    assert code == 130 and "Traceback" not in text, text[-3000:]
    assert signal.getsignal(signal.SIGINT) == handler  # the command put pytest's handler back
    lines = [ln for ln in text.splitlines() if ln.startswith("interrupted")]
    saved = "cut/lightning_logs/version_0/checkpoints/last.ckpt"
    assert lines == [f"interrupted (SIGINT) after step 3: saved {saved}; resume with: python -m lightning_lora "
                     f"{' '.join(fit('cut', 'fired'))} --ckpt_path {saved}"]  # fmt: skip
    assert torch.load(saved, weights_only=True)["global_step"] == 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, text = _main(lines[0].split("resume with: python -m lightning_lora ", 1)[1].split(), capsys)
    assert code in (0, None), text[-3000:]
    shown = [str(w.message) for w in caught]
    assert not [m for m in shown if "dirpath has changed" in m or "not empty" in m], shown
    assert os.listdir("cut/lightning_logs") == ["version_0"]  # the same run folder
    assert torch.load(saved, weights_only=True)["global_step"] == 6  # (exactness: the tests above)


def test_interrupted_line_and_resume_command():
    argv = ["fit", "--config", "c.yaml", "--ckpt_path", "old.ckpt", "--x", "a b"]
    assert (interrupted_line(Interrupted(signal.SIGTERM, "r/last.ckpt", 7, saved=True), argv)
            == "interrupted (SIGTERM) after step 7: saved r/last.ckpt; resume with: python -m lightning_lora fit "
               "--config c.yaml --x 'a b' --ckpt_path r/last.ckpt")  # fmt: skip
    assert interrupted_line(Interrupted(signal.SIGINT), argv[:3]) == \
        "interrupted (SIGINT) before any checkpoint was written: nothing to resume"
    assert interrupted_line(Interrupted(signal.SIGINT), argv).endswith("--x 'a b' --ckpt_path old.ckpt")


def _main(argv: list[str], capsys) -> tuple[int, str]:
    from lightning_lora.commands.cli import main

    code = None
    try:
        main(argv)
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _tiny_fit(tiny_dir, pairs, root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(ROOT / "configs" / "own_data.yaml"), "--model.base_model", tiny_dir,
            "--data.init_args.source", str(pairs), "--data.init_args.max_length", "32", "--trainer.accelerator", "cpu",
            "--trainer.default_root_dir", str(root), "--model.export_dir", str(root / "export"),
            "--trainer.enable_progress_bar", "false", *extra]  # fmt: skip


def test_exploding_last_step_fails_on_one_line_naming_it(tiny_dir, pairs, tmp_path, capsys, monkeypatch):
    """The issue's `--trainer.max_steps 1 --model.optimizer.init_args.lr 1e30`: it used to end with exit 0, 'after -'
    and a NaN export."""
    monkeypatch.setattr(sys, "argv", ["lightning_lora"])
    code, text = _main(_tiny_fit(tiny_dir, pairs, tmp_path, "--trainer.max_steps", "1",
                                 "--model.optimizer.init_args.lr", "1e30"), capsys)  # fmt: skip
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "validation loss became nan after global step 1" in errors[0], text
    assert "none saved yet" in errors[0] and not (tmp_path / "export").exists()
    assert not lock_path(tmp_path / "export").exists()  # the lock went with the run


def test_second_fit_command_refuses_before_loading_and_names_the_holder(tiny_dir, pairs, tmp_path, capsys,
                                                                        monkeypatch):  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["lightning_lora"])
    holder = {"pid": os.getppid(), "host": os.uname().nodename, "started": "2026-12-03 07:00:00 +0000"}
    lock_path(tmp_path / "export").write_text(json.dumps(holder))
    code, text = _main(_tiny_fit(tiny_dir, pairs, tmp_path), capsys)
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1 and f"in use by another run: pid {os.getppid()}" in errors[0], text
    assert "before training" not in text and not list(tmp_path.rglob("version_*"))  # refused before validating


def test_failed_run_leaves_no_empty_version_folder(tiny_dir, pairs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning_lora"])
    code, text = _main(_tiny_fit(tiny_dir, pairs, tmp_path, "--model.adapter.init_args.target_modules",
                                 "[nothing_proj]"), capsys)  # fmt: skip
    assert code == 2 and "nothing_proj" in text, text
    assert not list(tmp_path.rglob("version_*")) and not lock_path(tmp_path / "export").exists()
