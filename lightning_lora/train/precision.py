"""``precision: null`` in a config means: pick the precision for the machine the run lands on.

- a CUDA GPU with bf16 (Ampere and newer): ``bf16-mixed``: adapters and optimizer state stay fp32, matmuls run in
  bf16 under autocast, and an NF4 base with ``compute_dtype: null`` dequantizes to bf16 (``quant/nf4.py``);
- an older CUDA GPU: ``16-mixed`` (fp16 with loss scaling);
- anything else (CPU, where bf16 matmuls are emulated and no faster, MPS): ``32-true``.

The command (``commands/cli.py``) resolves it before building the Trainer and says what it chose.
"""

from __future__ import annotations

import torch


def auto_precision(accelerator: str | None = "auto") -> str:
    """The precision ``precision: null`` resolves to on this machine for ``accelerator`` (module docstring)."""
    name = str(accelerator or "auto").lower()
    on_cuda = name in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if not on_cuda:
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


__all__ = ["auto_precision"]
