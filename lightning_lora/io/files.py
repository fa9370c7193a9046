"""Safe file handling: atomic writes (temporary name, then rename) and safetensors-only reading.

An interrupted write never leaves a half-written file or folder where a complete one was: the new content goes to
a temporary sibling and replaces the old one in one rename only once it is complete (``transaction.py``). Tensors
with NaN/inf values are never written (``finite.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lightning_lora.io.finite import check_finite
from lightning_lora.io.transaction import apply_umask, check_folder_target, naming, private_name, remove_stale, staged


def atomic_dir(path: str | os.PathLike) -> contextlib.AbstractContextManager[Path]:
    """Yield an empty staging folder beside ``path``; on success it replaces ``path`` in one step (``transaction.py``:
    umask modes, errors naming the path and the cause, leftovers of killed writes removed)."""
    return staged(path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to ``path`` (created empty); on success it gets mode 0o666 minus the umask
    and is renamed onto ``path``."""
    path = Path(path)
    check_folder_target(path.parent)
    with naming(path, path=path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path)
        tmp = private_name(path, "tmp")
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        with naming(path, path=path):
            yield tmp
            apply_umask(tmp)
            os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write ``tensors`` as safetensors (contiguous CPU copies), atomically; a NaN/inf value is refused, naming its
    tensor (``finite.py``), and nothing is written."""
    check_finite(tensors, str(path))
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_file(path) as tmp:
        save_file(data, str(tmp), metadata=metadata or {"format": "pt"})


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing, truncated or non-safetensors file gets an error that says so."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{path} is not a complete safetensors file ({err}); it may be truncated or of another format. "
            "Re-export it; pickle-based files are never loaded."
        ) from err


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); it may be truncated.") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}.")
    return data


def write_json(data: dict, path: str | os.PathLike) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
