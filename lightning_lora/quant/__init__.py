"""Quantized frozen bases (QLoRA's NF4 via bitsandbytes)."""
