"""Host memory a CPU run no longer needs, given back before training starts.

Two things stay resident after a model is loaded and quantized on the CPU, though training never reads them:

- **The checkpoint file's pages.** transformers maps a safetensors checkpoint into memory and, when its dtype is the
  one asked for, uses the mapped bytes as the parameters. After NF4 quantization replaces the linear weights, the
  embeddings and norms still point into that mapping, so the whole file stays mapped, and every page quantization
  read stays resident. ``own_file_mapped_tensors`` copies those few tensors into ordinary memory (same values, same
  ``Parameter`` objects), which lets the mapping go (only where they are a small part of it).
- **The C heap's free pages.** glibc keeps memory freed by loading, quantizing and the sanity check inside its heap,
  resident; ``release_free_heap`` returns every free page of the heap to the kernel (``malloc_trim(0)``,
  ``MADV_DONTNEED``); pages in use are untouched.

Neither changes a value the model computes. Measured on SmolLM2-135M QLoRA, 4 x 512 tokens, one process: resident
before the first step 1.29 -> 0.72 GiB, peak over five steps 4.55 -> 4.0 GiB (``benchmarks/e2e.py`` has the run).
Linux only (``/proc/self/maps``; ``malloc_trim`` with glibc); elsewhere both do nothing.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import functools
import logging
import platform
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_free_heap() -> bool:
    """``malloc_trim(0)`` on glibc (module docstring); True when the C library did it."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's file-backed memory mappings, sorted (Linux), else []."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    spans = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            spans.append((start, end))
    return sorted(spans)


def own_file_mapped_tensors(model: nn.Module) -> list[str]:
    """Copy the CPU parameters and buffers that point into a memory-mapped file into ordinary memory, in place
    (``.data`` swapped: the same ``Parameter`` objects, tied weights stay tied); returns their names.

    Only for a mapping whose tensors are less than half its size (a quantized base's embeddings and norms): that
    copy costs less than the mapping it lets go. A full-precision base that reads most of its file is left mapped.
    """
    mappings = _file_mappings()
    if not mappings:
        return []
    starts = [start for start, _ in mappings]
    by_mapping: dict[tuple[int, int], list[tuple[str, nn.Module, str, str, torch.Tensor]]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(module, kind).items():
                if t is None or id(t) in seen or t.device.type != "cpu" or t.is_meta:
                    continue
                seen.add(id(t))
                try:
                    ptr = t.untyped_storage().data_ptr()
                except RuntimeError:  # a wrapper without storage of its own (FSDP2's DTensor): not a mapped file
                    continue
                i = bisect.bisect_right(starts, ptr) - 1  # the mapping that starts at or before ptr, if any
                span = mappings[i] if i >= 0 and ptr < mappings[i][1] else None
                if span is not None:
                    full = f"{module_name}.{name}" if module_name else name
                    by_mapping.setdefault(span, []).append((full, module, kind, name, t))
    copied = []
    for (start, end), tensors in by_mapping.items():
        if 2 * sum(t.untyped_storage().nbytes() for *_, t in tensors) >= end - start:
            continue
        for full, module, kind, name, t in tensors:
            if kind == "_parameters":
                t.data = t.data.clone()
            else:
                module._buffers[name] = t.clone()
            copied.append(full)
    if copied:
        log.debug("copied %d tensors out of a memory-mapped checkpoint file: %s", len(copied), ", ".join(copied[:5]))
    return copied


def release_host_memory(model: nn.Module) -> None:
    """Both of the module docstring, in that order: a CPU run's model stops pinning its checkpoint file, then the heap
    gives back its free pages."""
    own_file_mapped_tensors(model)
    release_free_heap()


__all__ = ["own_file_mapped_tensors", "release_free_heap", "release_host_memory"]
