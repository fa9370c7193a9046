"""The ``python -m lightning_lora`` commands: fit/validate/test (LightningCLI), export, generate, estimate.

Only commands print; the library below them logs.
"""

from __future__ import annotations

import sys


def command_args(argv: list[str] | None, command: str) -> list[str]:
    """The arguments after the command word; ``argv`` None means ``sys.argv[1:]`` (as argparse does)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return argv[1:] if argv[:1] == [command] else argv
