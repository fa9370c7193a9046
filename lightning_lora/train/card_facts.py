"""The run facts an export's model card gives (``io/card.py``): the data, the steps, the final validation loss."""

from __future__ import annotations

from typing import Any


def describe_data(datamodule: Any) -> str | None:
    """``InstructionDataModule(source='chatterbot', 2100 train / 233 val examples)``-style text, or None."""
    if datamodule is None:
        return None
    where = getattr(datamodule, "path", None) or getattr(datamodule, "source", None)
    sizes = [f"{len(s)} {k}" for k, s in (("train", getattr(datamodule, "train_set", None)),
                                         ("val", getattr(datamodule, "val_set", None))) if s is not None]  # fmt: skip
    details = ", ".join(([f"{where!r}"] if where else []) + ([" / ".join(sizes) + " examples"] if sizes else []))
    return f"{type(datamodule).__name__}({details})"


def run_facts(trainer: Any) -> dict:
    """``{"data", "steps", "val_loss"}`` from a Trainer (at the end of fit, or when it saves a checkpoint, which
    keeps them for an offline export's card); ``val_loss`` None if never validated, ``{}`` without a Trainer."""
    if trainer is None:
        return {}
    val = trainer.callback_metrics.get("val_loss")
    return {"data": describe_data(getattr(trainer, "datamodule", None)), "steps": trainer.global_step,
            "val_loss": None if val is None else float(val)}  # fmt: skip
