"""``python -m lightning_lora fit|validate|test --config configs/quickstart.yaml``: LightningCLI over ``LoRAModule``.

- ``model:`` holds ``LoRAModule``'s arguments; ``adapter:`` is given as ``class_path``/``init_args`` (LoRA, DoRA,
  VeRA), so ``--model.adapter.init_args.r 16`` overrides one field; ``optimizer:``/``lr_scheduler:`` likewise.
- ``data:`` takes any LightningDataModule by ``class_path`` (``lightning_lora.train.data.InstructionDataModule``, ...).
- ``auto_configure_optimizers=False``: LightningCLI's own ``--optimizer`` would build the optimizer from
  ``model.parameters()`` at parse time, before the model exists (REFERENCE section 4); ``model.optimizer`` is used.
- ``validate_before_fit: true`` (top level) runs ``trainer.validate`` before ``fit`` and prints its perplexity; the
  figures of the last validation are printed again at the end of ``fit``, so before and after are both on screen.
"""

from __future__ import annotations

import sys

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lightning_lora.train.module import LoRAModule, enable_adapter_subclass_mode

_COMMANDS = ("fit", "validate", "test")


class PrintValidation(Callback):
    """Print the validation metrics at the end of fit (after the last validation)."""

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
        if metrics:
            rank_zero_info("after training: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(metrics.items())))


class LoRACLI(LightningCLI):
    """LightningCLI with ``validate_before_fit`` and the adapter subclass mode."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--validate_before_fit", type=bool, default=False,
            help="fit: run validation once before training and print its perplexity",
        )  # fmt: skip

    def before_fit(self) -> None:
        if self.config[self.subcommand].get("validate_before_fit"):
            rank_zero_info("validation before training:")
            self.trainer.validate(self.model, datamodule=self.datamodule)
        self.trainer.callbacks.append(PrintValidation())


def make_cli(argv: list[str], run: bool = True) -> LoRACLI:
    """The CLI object. ``run=False`` parses and instantiates without running a subcommand; a leading command word
    (``fit``, ...) is then dropped, and only that one: the same word later (a value) stays."""
    enable_adapter_subclass_mode()
    return LoRACLI(
        LoRAModule,
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
    make_cli(argv)


if __name__ == "__main__":
    main()
