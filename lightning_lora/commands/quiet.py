"""Quiet by default: every line a command shows is one its user needs.

Only the switches the libraries offer are used, and only in commands (``python -m lightning_lora ...``), before the
libraries are imported; the Python API changes nothing:

- Hugging Face progress bars ("Loading weights", "Writing model shards") and transformers' own messages:
  ``HF_HUB_DISABLE_PROGRESS_BARS=1`` and ``TRANSFORMERS_VERBOSITY=error`` (for child processes), and transformers'
  ``disable_progress_bar()`` / ``set_verbosity_error()`` (it is already imported); ``HF_HUB_DISABLE_PROGRESS_BARS=0``
  keeps them;
- Lightning's informational lines (litlogger/litmodels tips, "GPU available", "Seed set to"): the level of its
  rank-zero and seed loggers, WARNING; its warnings stay visible;
- bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" (it looks for an optional package and
  falls back): the level of that logger, ERROR;
- the ``_pytree`` deprecation Lightning triggers in torch: a ``warnings`` filter on that message.

``LIGHTNING_LORA_VERBOSE=1`` keeps everything. Our own library logs (``lightning_lora.*``) are shown at INFO
(``core/log.py``).
"""

from __future__ import annotations

import logging
import os
import warnings

VERBOSE_ENV = "LIGHTNING_LORA_VERBOSE"
_INFO_LOGGERS = ("lightning.fabric.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.seed", "lightning.pytorch.utilities.seed")  # fmt: skip
_NOISY_LOGGERS = {"bitsandbytes.backends.cpu.ops": logging.ERROR, "bitsandbytes.cextension": logging.ERROR}
_IGNORED_WARNINGS = (r".*isinstance\(treespec, LeafSpec\)` is deprecated.*", r".*LeafSpec.* is deprecated.*")


def quiet() -> None:
    """Apply the settings above (idempotent); call before importing transformers, Lightning or bitsandbytes."""
    if os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes"):
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] not in ("0", "false"):
        # the package import already loaded transformers: its switches, for the variables it has read
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    for name in _INFO_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name, level in _NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for pattern in _IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


__all__ = ["VERBOSE_ENV", "quiet"]
