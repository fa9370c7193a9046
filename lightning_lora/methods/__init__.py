"""Adapter methods, one file each: LoRA/rsLoRA, DoRA, VeRA. Each registers itself with the core's method registry."""
