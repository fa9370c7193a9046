"""``python -m lightning_lora fit|validate|test --config configs/quickstart.yaml``: LightningCLI over ``LoRAModule``.

- ``model:`` holds ``LoRAModule``'s arguments; ``adapter:`` is given as ``class_path``/``init_args`` (LoRA, DoRA,
  VeRA), so ``--model.adapter.init_args.r 16`` overrides one field; ``optimizer:``/``lr_scheduler:`` likewise.
- ``data:`` takes any LightningDataModule by ``class_path`` (``lightning_lora.train.data.InstructionDataModule``, ...).
- ``auto_configure_optimizers=False``: LightningCLI's own ``--optimizer`` would build the optimizer from
  ``model.parameters()`` at parse time, before the model exists (REFERENCE section 4); ``model.optimizer`` is used.
- Runs of any length work: the last step validates (``ValidateAtEnd``), a ``last.ckpt`` is always written
  (``ModelCheckpoint(save_last=True)`` unless the config has its own), and an integer ``val_check_interval`` counts
  steps across epochs (``check_val_every_n_epoch: null``), so it may exceed one epoch of a small data set.
- ``validate_before_fit`` (top level, default true) validates before ``fit`` (the restored adapter when resuming
  with ``--ckpt_path``); the before and after figures end up in the run summary printed at the end of ``fit``.
- Output: one progress bar in steps (``StepProgressBar``), learning rates logged per group (``LearningRateMonitor``),
  TensorBoard logs (Lightning's default logger when ``tensorboard`` is installed), errors on one line
  (``commands/errors.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI

from lightning_lora.commands.errors import run_command
from lightning_lora.train.module import LoRAModule, enable_adapter_subclass_mode
from lightning_lora.train.precision import auto_precision
from lightning_lora.train.progress import StepProgressBar
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
        raising = {"exit_on_error": False}  # parse errors raise, so the command can put them on one line
        kwargs.setdefault("parser_kwargs", {**raising, **{c: raising for c in (*_COMMANDS, "predict")}})
        try:
            super().__init__(*args, **kwargs)
        except Exception as exc:  # give commands/errors.py what it needs to name the config key
            config = getattr(self, "config", None)
            sub = config.get("subcommand") if config is not None and hasattr(config, "get") else None
            exc.lightning_lora_config = _flat(config.get(sub) if sub else config) if config is not None else {}
            exc.lightning_lora_parser = getattr(self, "parser", None)
            raise

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--validate_before_fit", type=bool, default=True,
            help="fit: validate once before training, so the summary compares perplexity before and after",
        )  # fmt: skip

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
        config = (self.config_init[self.subcommand] if self.subcommand else self.config_init).get("trainer", {})  # run=False: no subcommand level
        given = list(config.get("callbacks") or [])
        extra = [ValidateAtEnd(), self.summary]
        checkpointing = config.get("enable_checkpointing", True) is not False
        if checkpointing and not any(isinstance(c, ModelCheckpoint) for c in given):
            extra.append(ModelCheckpoint(save_last=True))
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
            extra.append(StepProgressBar())
        if config.get("logger", True) is not False and self.subcommand == "fit":
            extra.append(LearningRateMonitor(logging_interval="step"))
        return super().instantiate_trainer(callbacks=given + extra, **kwargs)

    def before_fit(self) -> None:
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
    run_command(make_cli, argv)


if __name__ == "__main__":
    main()
