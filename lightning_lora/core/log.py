"""The library's one output channel: the ``lightning_lora`` logger (each module logs to a child of it).

As Lightning does for its own logger, a handler printing INFO and above is attached when the application has not
configured logging, and it passes records from global rank 0 only (the rank Lightning's launchers put in ``RANK`` /
``LOCAL_RANK``), so a line is printed once per run, not once per process. Only the commands print.
"""

from __future__ import annotations

import logging
import os

ROOT = "lightning_lora"


def global_rank() -> int:
    """This process's rank as launchers export it (0 when not distributed)."""
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


class RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return global_rank() == 0


def setup_logging() -> logging.Logger:
    """Give the ``lightning_lora`` logger level INFO and, if nothing handles the root logger, a rank-zero handler."""
    logger = logging.getLogger(ROOT)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if not logger.handlers and not logging.getLogger().hasHandlers():
        handler = logging.StreamHandler()
        handler.addFilter(RankZeroFilter())
        logger.addHandler(handler)
    return logger
