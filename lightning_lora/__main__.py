"""``python -m lightning_lora <command>``: fit / validate / test (LightningCLI), estimate, generate, export."""

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
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        sys.exit(
            "usage: python -m lightning_lora {" + ",".join(COMMANDS) + "} ...\n"
            "  e.g. python -m lightning_lora fit --config configs/quickstart.yaml"
        )
    # Each module's main(argv) gets the full argument list, the command first.
    importlib.import_module(COMMANDS[argv[0]]).main(argv)


if __name__ == "__main__":
    main()
