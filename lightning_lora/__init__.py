"""lightning_lora: parameter-efficient fine-tuning (LoRA, rsLoRA, LoRA+, QLoRA, DoRA, VeRA) for PyTorch Lightning."""

from lightning_lora.dora import DoRA
from lightning_lora.inject import (
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
from lightning_lora.layers import AdapterConfig, AdapterLayer
from lightning_lora.lora import LoRA
from lightning_lora.optim import param_groups
from lightning_lora.peft_io import load_adapter, save_adapter
from lightning_lora.vera import VeRA

__all__ = [
    "AdapterConfig",
    "AdapterLayer",
    "DoRA",
    "LoRA",
    "VeRA",
    "active_adapters",
    "adapter_names",
    "adapter_state_dict",
    "delete_adapter",
    "disable_adapters",
    "inject",
    "load_adapter",
    "merge",
    "param_groups",
    "remove",
    "save_adapter",
    "set_adapter",
]
