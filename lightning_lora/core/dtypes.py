"""The one dtype parser: every ``dtype=`` argument in lightning_lora (YAML, CLI or Python) goes through ``parse_dtype``.

Accepted: a ``torch.dtype``, or a name with or without ``torch.``, in any case: ``float32``/``fp32``/``float``,
``bfloat16``/``bf16``, ``float16``/``fp16``/``half`` (and ``uint8`` where a caller allows it, for packed storage),
and ``"auto"`` where the caller allows it (``auto=True``: the checkpoint's or config's own dtype, decided later).
"""

from __future__ import annotations

import torch

FLOATS: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip
AUTO = "auto"


def parse_dtype(
    value: object, field: str = "dtype", extra: dict[str, torch.dtype] | None = None, auto: bool = False
) -> torch.dtype | str:
    """``value`` as a torch dtype, or ``"auto"`` when ``auto`` allows it.

    Raises:
        ValueError: naming ``field`` and the accepted names.
    """
    table = {**FLOATS, **(extra or {})}
    if isinstance(value, torch.dtype) and value in table.values():
        return value
    key = str(value).lower().removeprefix("torch.") if isinstance(value, (str, torch.dtype)) else None
    if auto and key == AUTO:
        return AUTO
    if key in table:
        return table[key]
    names = ", ".join(sorted({str(d).removeprefix("torch.") for d in table.values()}) + ([AUTO] if auto else []))
    raise ValueError(f"{field}={value!r} is not a dtype lightning_lora accepts; use one of {names} (or bf16, fp16, fp32).")


def dtype_name(
    value: object, field: str = "dtype", extra: dict[str, torch.dtype] | None = None, auto: bool = False
) -> str | None:
    """The canonical name (``"bfloat16"``, or ``"auto"``) of ``value`` (None stays None): what configs and checkpoints
    store."""
    return None if value is None else str(parse_dtype(value, field, extra, auto)).removeprefix("torch.")


def dtype_bytes(value: object, field: str = "dtype") -> int:
    """Bytes per element of the float dtype ``value`` (any accepted name)."""
    return parse_dtype(value, field).itemsize
