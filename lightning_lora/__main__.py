"""``python -m lightning_lora <command>``: fit / validate / test (LightningCLI), estimate, generate, export, evaluate,
plot.

Every command is quiet by default (``commands/quiet.py``) and reports an error on one line, exit code 2
(``commands/errors.py``; ``LIGHTNING_LORA_TRACEBACK=1`` or ``--traceback`` shows the traceback).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "fit": "lightning_lora.commands.cli",
    "validate": "lightning_lora.commands.cli",
    "test": "lightning_lora.commands.cli",
    "estimate": "lightning_lora.commands.estimate",
    "generate": "lightning_lora.commands.generate",
    "export": "lightning_lora.commands.export",
    "evaluate": "lightning_lora.commands.evaluate",
    "plot": "lightning_lora.commands.plot",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        sys.exit(
            "usage: python -m lightning_lora {" + ",".join(COMMANDS) + "} ...\n"
            "  e.g. python -m lightning_lora fit --config configs/quickstart.yaml"
        )
    from lightning_lora.commands.quiet import quiet

    quiet()  # before transformers / Lightning / bitsandbytes are imported
    from lightning_lora.commands.errors import run_command

    # Each module's main(argv) gets the full argument list, the command first.
    run_command(importlib.import_module(COMMANDS[argv[0]]).main, argv)


if __name__ == "__main__":
    main()
