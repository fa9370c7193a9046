"""lightning_lora: parameter-efficient fine-tuning (LoRA, rsLoRA, LoRA+, QLoRA, DoRA, VeRA) for PyTorch Lightning."""

from lightning_lora.commands.threads import apply_for_commands

apply_for_commands()  # python -m lightning_lora ...: CPU threads set before torch is imported (commands/threads.py)

from lightning_lora.compose import combine, per_sample_adapters
from lightning_lora.core.layer import AdapterConfig, AdapterLayer
from lightning_lora.core.log import setup_logging
from lightning_lora.core.verbs import (
    active_adapters,
    adapter_names,
    adapter_state_dict,
    delete_adapter,
    disable_adapters,
    inject,
    merge,
    remove,
    set_adapter,
)
from lightning_lora.io.models import original_weights  # nf4.original_weights that also resolves aliases
from lightning_lora.io.peft import load_adapter, load_adapters, save_adapter, save_adapters
from lightning_lora.methods.dora import DoRA
from lightning_lora.methods.lora import LoRA
from lightning_lora.methods.vera import VeRA
from lightning_lora.quant.nf4 import NF4, quantize
from lightning_lora.quant.prepare import prepare
from lightning_lora.train.optim import param_groups

setup_logging()

_LIGHTNING = {"LoRAModule": "lightning_lora.train.module", "AdapterCallback": "lightning_lora.train.callback"}


def __getattr__(name: str):
    """``LoRAModule`` and ``AdapterCallback`` import Lightning (seconds): load them on first use only."""
    if name in _LIGHTNING:
        import importlib

        return getattr(importlib.import_module(_LIGHTNING[name]), name)
    raise AttributeError(f"module 'lightning_lora' has no attribute {name!r}")


__all__ = [
    "AdapterCallback",
    "LoRAModule",
    "NF4",
    "original_weights",
    "quantize",
    "AdapterConfig",
    "AdapterLayer",
    "DoRA",
    "LoRA",
    "VeRA",
    "active_adapters",
    "adapter_names",
    "adapter_state_dict",
    "combine",
    "delete_adapter",
    "disable_adapters",
    "inject",
    "load_adapter",
    "load_adapters",
    "merge",
    "param_groups",
    "per_sample_adapters",
    "prepare",
    "remove",
    "save_adapter",
    "save_adapters",
    "set_adapter",
]
