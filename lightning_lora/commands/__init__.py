"""The ``python -m lightning_lora`` commands: fit/validate/test (LightningCLI), export, generate, estimate."""
