"""``python -m lightning_lora fit|validate|test --config configs/quickstart.yaml``: LightningCLI over ``LoRAModule``.

- ``model:`` holds ``LoRAModule``'s arguments; ``adapter:`` is given as ``class_path``/``init_args`` (LoRA, DoRA,
  VeRA), so ``--model.adapter.init_args.r 16`` overrides one field; ``optimizer:``/``lr_scheduler:`` likewise.
- ``data:`` takes any LightningDataModule by ``class_path`` (``lightning_lora.train.data.InstructionDataModule``, ...).
- ``auto_configure_optimizers=False``: LightningCLI's own ``--optimizer`` would build the optimizer from
  ``model.parameters()`` at parse time, before the model exists (REFERENCE section 4); ``model.optimizer`` is used.
- Runs of any length work: the last step validates (``ValidateAtEnd``), a ``last.ckpt`` is always written, also
  every ``checkpoint_every_n_steps`` steps and every ``checkpoint_every_minutes`` minutes (top-level keys; a
  ``RunCheckpoint`` unless the config has its own ``ModelCheckpoint``), and an integer ``val_check_interval`` counts
  steps across epochs (``check_val_every_n_epoch: null``), so it may exceed one epoch of a small data set.
- Resuming (``--ckpt_path .../version_N/checkpoints/last.ckpt``) logs and checkpoints into that same ``version_N``
  folder (``train/resume.py``); it resumes exactly, mid-epoch too.
- Ctrl-C / SIGTERM during ``fit`` write ``last.ckpt`` at the end of the step and print one line with its path and the
  command that resumes it; exit status 130 / 143 (``train/interrupts.py``). A run that fails before training a
  step or writing a checkpoint leaves no ``version_N`` folder behind.
- ``validate_before_fit`` (top level, default true) validates before ``fit`` (the restored adapter when resuming
  with ``--ckpt_path``); the before and after figures end up in the run summary printed at the end of ``fit``.
- Output: one progress bar in steps (``StepProgressBar``), learning rates logged per group (``LearningRateMonitor``),
  TensorBoard logs (Lightning's default logger when ``tensorboard`` is installed), errors on one line
  (``commands/errors.py``).
"""

from __future__ import annotations

import os
import shlex
import sys
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_lora.commands.errors import run_command
from lightning_lora.commands.threads import follows_load
from lightning_lora.io.lock import FolderLock
from lightning_lora.train.cpu_threads import FollowLoad
from lightning_lora.train.interrupts import Interrupted, Interrupts
from lightning_lora.train.module import LoRAModule, enable_adapter_subclass_mode
from lightning_lora.train.precision import auto_precision
from lightning_lora.train.progress import StepProgressBar
from lightning_lora.train.resume import NOT_EMPTY, RunCheckpoint, discard_empty_run, run_folder
from lightning_lora.train.summary import RunSummary, ValidateAtEnd

_COMMANDS = ("fit", "validate", "test")


def _flat(config) -> dict:
    """A parsed config (jsonargparse Namespace) as ``{dotted key: leaf value}``."""
    try:
        items = config.items(branches=False)
    except (AttributeError, TypeError):
        return {}
    return {k: v for k, v in items}


class LoRACLI(LightningCLI):
    """LightningCLI with ``validate_before_fit``, the run summary, and errors the command can put on one line."""

    def __init__(self, *args, **kwargs) -> None:
        self.summary = RunSummary()
        self.interrupts = Interrupts()
        self._new_run_dir: str | None = None  # the version folder this run creates (removed if it fails empty)
        self._lock: FolderLock | None = None  # fit: the export_dir's lock, from before the first validation
        raising = {"exit_on_error": False}  # parse errors raise, so the command can put them on one line
        kwargs.setdefault("parser_kwargs", {**raising, **{c: raising for c in (*_COMMANDS, "predict")}})
        if kwargs.get("run", True):  # Ctrl-C / SIGTERM end the command through Interrupted (train/interrupts.py)
            self.interrupts.install()
        try:
            super().__init__(*args, **kwargs)
        except BaseException as exc:
            trainer = getattr(self, "trainer", None)
            if trainer is not None and rank_zero_only.rank == 0:
                discard_empty_run(self._new_run_dir, trained=trainer.global_step > self.summary.start_step)
            if not isinstance(exc, Exception):
                raise
            config = getattr(self, "config", None)  # give commands/errors.py what it needs to name the config key
            sub = config.get("subcommand") if config is not None and hasattr(config, "get") else None
            exc.lightning_lora_config = _flat(config.get(sub) if sub else config) if config is not None else {}
            exc.lightning_lora_parser = getattr(self, "parser", None)
            raise
        finally:
            self.interrupts.uninstall()
            if self._lock is not None:
                self._lock.release()

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--validate_before_fit", type=bool, default=True,
            help="fit: validate once before training, so the summary compares perplexity before and after",
        )  # fmt: skip
        parser.add_argument("--checkpoint_every_n_steps", type=int | None, default=None,
                            help="fit: also write last.ckpt every this many steps (the configs: 10)")  # fmt: skip
        parser.add_argument("--checkpoint_every_minutes", type=float | None, default=10.0,
                            help="fit: also write last.ckpt when this many minutes passed since the last one")  # fmt: skip

    def before_instantiate_classes(self) -> None:
        trainer = (self.config[self.subcommand] if self.subcommand else self.config).get("trainer")
        if trainer is not None and trainer.get("precision") is None and trainer.get("plugins") is None:
            trainer["precision"] = auto_precision(trainer.get("accelerator"))  # precision: null = pick for this machine
            if trainer["precision"] != "32-true":
                print(f"precision: {trainer['precision']} (precision: null picks it for this GPU)")
        if trainer is not None and isinstance(trainer.get("val_check_interval"), int) \
                and trainer.get("check_val_every_n_epoch") == 1:  # fmt: skip
            trainer["check_val_every_n_epoch"] = None  # count steps across epochs: short data sets work too

    def instantiate_trainer(self, **kwargs):
        top = self.config_init[self.subcommand] if self.subcommand else self.config_init  # run=False: no subcommand level
        config = top.get("trainer", {})
        given = list(config.get("callbacks") or [])
        extra = [ValidateAtEnd(), self.summary, self.interrupts]
        if follows_load() and self.subcommand == "fit":  # the command chose the threads: use the cores left free
            extra.append(FollowLoad())
        checkpointing = config.get("enable_checkpointing", True) is not False
        if checkpointing and not any(isinstance(c, ModelCheckpoint) for c in given):
            extra.append(RunCheckpoint(every_n_steps=top.get("checkpoint_every_n_steps"),
                                       every_minutes=top.get("checkpoint_every_minutes")))  # fmt: skip
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
            extra.append(StepProgressBar())
        if config.get("logger", True) is not False and self.subcommand == "fit":
            extra.append(LearningRateMonitor(logging_interval="step"))
        resumed = run_folder(top.get("ckpt_path")) if self.subcommand == "fit" else None
        if resumed is not None and config.get("logger") in (None, True):  # resume into the run's own version folder
            kwargs.setdefault("logger", _default_logger(resumed))
            warnings.filterwarnings("ignore", message=NOT_EMPTY)  # any ModelCheckpoint: that folder is the run's
        trainer = super().instantiate_trainer(callbacks=given + extra, **kwargs)
        log_dir = trainer.log_dir if self.subcommand == "fit" and rank_zero_only.rank == 0 else None
        self._new_run_dir = log_dir if log_dir and not os.path.exists(log_dir) else None
        return trainer

    def before_fit(self) -> None:
        export_dir = getattr(self.model, "export_dir", None)
        if export_dir and rank_zero_only.rank == 0:  # a second fit into it refuses now, not after loading the model
            self._lock = FolderLock(export_dir).acquire()
        if self.config[self.subcommand].get("validate_before_fit"):
            ckpt_path = self.config[self.subcommand].get("ckpt_path")  # resuming: the restored adapter's figures
            results = self.trainer.validate(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path, verbose=False)
            self.summary.set_before(results[0] if results else {})
            if self.trainer.is_global_zero and self.summary.before:
                print("before training: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(self.summary.before.items())))

    def after_fit(self) -> None:
        if not self.trainer.is_global_zero:
            return
        lines = self.summary.summary_lines(self.trainer, getattr(self.model, "export_dir", None))
        after = ", ".join(f"{k} {v:.4f}" for k, v in sorted(self.summary.after.items()))
        print(("after training: " + after + "\n" if after else "") + "run summary:\n  " + "\n  ".join(lines))


def _default_logger(run_dir):
    """Lightning's default logger (TensorBoard, else CSV), writing into the existing ``run_dir`` (a version folder)."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return CSVLogger(save_dir=run_dir.parent.parent, name=run_dir.parent.name, version=run_dir.name)
    return TensorBoardLogger(save_dir=run_dir.parent.parent, name=run_dir.parent.name, version=run_dir.name)


def _shown(path: str) -> str:
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def resume_command(argv: list[str], checkpoint: str) -> str:
    """``python -m lightning_lora <argv>`` with ``--ckpt_path checkpoint`` in place of any earlier one."""
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            args.append(arg)
    return shlex.join(["python", "-m", "lightning_lora", *args, "--ckpt_path", _shown(checkpoint)])


def interrupted_line(stop: Interrupted, argv: list[str]) -> str:
    """The one line an interrupted command prints: what stopped, where the checkpoint is, how to resume."""
    if stop.checkpoint is None:
        given = next((a.split("=", 1)[1] if "=" in a else b for a, b in zip(argv, [*argv[1:], ""])
                      if a == "--ckpt_path" or a.startswith("--ckpt_path=")), None)  # fmt: skip
        if given:
            return f"interrupted ({stop.name}) before training resumed; resume with: {resume_command(argv, given)}"
        return f"interrupted ({stop.name}) before any checkpoint was written: nothing to resume"
    when = f"after step {stop.step}" if stop.step is not None else "before training"
    what = "saved" if stop.saved else "stopped at once; last checkpoint"
    return (f"interrupted ({stop.name}) {when}: {what} {_shown(stop.checkpoint)}; "
            f"resume with: {resume_command(argv, stop.checkpoint)}")  # fmt: skip
def names_model_class(argv: list[str]) -> bool:
    """Whether a ``--config`` file gives ``model:`` a ``class_path`` (``configs/dpo.yaml``: ``DPOModule``), or the
    command line does (``--model.class_path``): then any ``LoRAModule`` subclass is accepted; otherwise the model is
    ``LoRAModule`` and its arguments sit directly under ``model:``."""
    import yaml

    paths = [b for a, b in zip(argv, argv[1:]) if a == "--config"] + [a[9:] for a in argv if a.startswith("--config=")]
    for path in paths:
        try:
            config = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError):
            continue  # the parser reports it
        if isinstance(config, dict) and isinstance(config.get("model"), dict) and "class_path" in config["model"]:
            return True
    return any(a.startswith("--model.class_path") for a in argv)


def make_cli(argv: list[str], run: bool = True) -> LoRACLI:
    """The CLI object. ``run=False`` parses and instantiates without running a subcommand; a leading command word
    (``fit``, ...) is then dropped, and only that one: the same word later (a value) stays."""
    enable_adapter_subclass_mode()
    return LoRACLI(
        LoRAModule,
        subclass_mode_model=names_model_class(argv),
        datamodule_class=None,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        # args=None reads sys.argv (LightningCLI warns when both are given and equal)
        args=None if run and argv == sys.argv[1:] else argv if run else argv[1:] if argv[:1] in ([c] for c in _COMMANDS) else argv,
        run=run,
    )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in _COMMANDS:
        sys.exit("usage: python -m lightning_lora {fit,validate,test} --config CONFIG.yaml [--print_config] [overrides]")
    try:
        run_command(make_cli, argv)
    except Interrupted as stop:
        if rank_zero_only.rank == 0:
            print(interrupted_line(stop, argv), file=sys.stderr)
        sys.exit(stop.exit_code)


if __name__ == "__main__":
    main()
