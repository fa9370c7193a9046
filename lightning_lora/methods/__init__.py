"""Adapter methods, one file each: LoRA/rsLoRA (``lora.py``, its starts in ``lora_init.py`` with ``pissa.py`` and
``loftq.py``), DoRA, VeRA. Importing this package registers the built-in methods with the core's registry
(``core/layer.py: METHODS``); ``lightning_lora/__init__.py`` imports it, so they are always there."""

from lightning_lora.methods import dora, lora, vera  # noqa: F401  (defining the classes registers them)
