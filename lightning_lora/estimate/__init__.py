"""The estimator: will an adapter fine-tune fit in GPU memory? Exact parameter counts on a meta-device model and bytes
by kind (``memory.py``, with the formulas), from preset or given model shapes (``presets.py``). A library layer
between the commands and training: ``python -m lightning_lora estimate`` (``commands/estimate.py``) parses and
prints; the maths models what ``train/`` does (its loss chunks, checkpointing modes, packing)."""

from lightning_lora.estimate.memory import estimate, nf4_bytes  # noqa: F401
from lightning_lora.estimate.presets import ALIASES, PRESETS, model_config  # noqa: F401
