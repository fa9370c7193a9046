"""Where the memory of an adapted (possibly NF4-quantized) model goes: parameters and bytes by kind.

Kinds: the quantized base (the real bytes of the packed 4-bit data plus its absmax / double-quantization state), the
unquantized base (every other parameter and buffer outside the adapters), the adapters, and the optimizer state
(measured from ``optimizer.state`` once populated, else estimated as Adam's two moments: 2 x trainable bytes).
QLoRA (arXiv:2305.14314, section 3) promises 4.127 bits per quantized parameter with double quantization.

The table counts tensors only. The process holds more (its resident set, RSS, is printed under the table): the
Python, torch and transformers runtime (several hundred MiB by themselves), the tokenizer and data, the gradients of
the adapters (as many bytes as the adapters), activations during a step, and allocator caches. The total row has no
bits/param: it mixes 4-bit and 32-bit tensors. The unquantized base names its largest tensor (e.g. the embeddings,
kept in high precision), and a second one of at least a quarter its size (an untied ``lm_head``).
"""

from __future__ import annotations

import io
import logging
import math
import os

import torch
from torch import Tensor, nn

from lightning_lora.core.layer import AdapterBranch, is_quantized
from lightning_lora.core.trained import Trained
from lightning_lora.train.optim import optimizer_class

log = logging.getLogger(__name__)
_TABLES = ("code", "state2.code", "offset")
KINDS = ("quantized base", "unquantized base", "adapters", "optimizer state")


def quant_state_tensors(layer: nn.Module | Tensor) -> dict[str, Tensor]:
    """Every tensor an NF4 layer's weight (or a 4-bit weight itself, e.g. one expert of an NF4 expert stack) is made
    of: packed data, absmax, and the double-quant state and code tables."""
    weight = layer.weight if isinstance(layer, nn.Module) else layer
    state = weight.quant_state
    out = {"data": weight.data, "absmax": state.absmax, "code": state.code}
    if getattr(state, "offset", None) is not None:
        out["offset"] = state.offset
    if getattr(state, "state2", None) is not None:
        out.update({"state2.absmax": state.state2.absmax, "state2.code": state.state2.code})
    return {k: v for k, v in out.items() if torch.is_tensor(v)}


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, log_table: bool = True,
                  reference: str | None = None) -> dict:  # fmt: skip
    """Parameters and bytes of ``model`` (and ``optimizer``) by kind; logs a table (and the process's RSS).

    ``reference`` (DPO, ``train/dpo.py``): a note for a "reference model" row of 0 bytes (the reference is the model
    with its adapter off).

    Returns:
        ``{kind: {"params": int, "bytes": int}}`` for each of ``KINDS`` plus ``"total"``; the optimizer entry also
        has ``"source"``: ``"measured"`` (from ``optimizer.state``) or ``"estimated (Adam: 2 x trainable bytes)"``.
        A quantized layer counts out x in parameters; its bias counts as unquantized base.
    """
    seen: set[tuple] = set()
    report = {kind: {"params": 0, "bytes": 0} for kind in KINDS}

    def add(kind: str, t: Tensor, params: int | None = None) -> None:
        t = t.to_local() if hasattr(t, "to_local") else t  # FSDP2 DTensor: this rank's shard
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        key = (key, t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() == 0 or key in seen:
            return
        seen.add(key)
        report[kind]["params"] += t.numel() if params is None else params
        report[kind]["bytes"] += _nbytes(t)

    for module in model.modules():
        if isinstance(module, (AdapterBranch, Trained)):  # trained copies, token rows, biases count as adapters
            for t in [*module.parameters(), *module.buffers()]:
                add("adapters", t)
    tables = 0  # bytes of the per-layer code tables and offsets
    for module in model.modules():
        if not is_quantized(module):
            continue
        for weight in module.parameters():  # a 4-bit linear holds one; an NF4 expert stack one per expert
            state = getattr(weight, "quant_state", None)
            if state is None:
                continue
            tensors = quant_state_tensors(weight)
            add("quantized base", tensors.pop("data"), params=math.prod(state.shape))
            for name, t in tensors.items():
                before = report["quantized base"]["bytes"]
                add("quantized base", t, params=0)
                if name in _TABLES:
                    tables += report["quantized base"]["bytes"] - before
    largest: list[tuple[int, str]] = []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        before = report["unquantized base"]["bytes"]
        add("unquantized base", t)
        if report["unquantized base"]["bytes"] > before:
            largest.append((report["unquantized base"]["bytes"] - before, name))
    if largest:
        ranked = sorted(largest, reverse=True)
        top = [t for t in ranked[:2] if 4 * t[0] >= ranked[0][0]]  # a second one only if comparable (untied lm_head)
        report["unquantized base"]["source"] = "largest: " + ", ".join(f"{n} ({b / 2**20:.1f} MiB)" for b, n in top)

    opt = report["optimizer state"]
    states = [v for s in (optimizer.state.values() if optimizer is not None else ()) for k, v in s.items() if k != "step"]
    if any(torch.is_tensor(v) for v in states):
        opt["source"] = "measured"
        for v in states:
            if torch.is_tensor(v):
                opt["params"] += v.numel()
                opt["bytes"] += _nbytes(v)
    else:
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt.update(params=2 * sum(p.numel() for p in trainable), bytes=2 * sum(_nbytes(p) for p in trainable),
                   source="estimated (Adam: 2 x trainable bytes)")
    quant = report["quantized base"]
    if quant["params"]:
        # QLoRA's 4.127 bits/param counts the 4-bit data, the 8-bit absmax per block of 64 and the fp32 absmax of the
        # double quantization per 256 blocks; bitsandbytes also keeps, per layer, two fp32 code tables (16 and 256
        # values) and an offset: on small layers that adds a few hundredths of a bit.
        quant["source"] = (f"{8 * (quant['bytes'] - tables) / quant['params']:.3f} as QLoRA counts; the rest: "
                           f"per-layer code tables and offsets ({tables:,} bytes)")  # fmt: skip
    report["total"] = {k: sum(report[kind][k] for kind in KINDS) for k in ("params", "bytes")}
    report["total"]["source"] = "tensors only (see below)"
    if reference is not None:
        report["reference model"] = {"params": 0, "bytes": 0, "source": reference}
    if log_table:
        rss = resident_mib()
        log.info(format_report(report).rstrip() + "\n" + (
            f"The process holds {rss:,.0f} MiB (RSS): the table counts only the model's tensors and the optimizer "
            "state; the runtime (Python, torch, transformers), the data, the adapters' gradients and a step's "
            "activations make the rest." if rss else ""))
    return report


def resident_mib() -> float | None:
    """This process's resident memory (RSS) in MiB, from /proc (None where there is no /proc)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def format_report(report: dict) -> str:
    """The report as a rich table (plain text)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="memory by kind")
    for col in ("kind", "params", "bytes", "MiB", "bits/param", "note"):
        table.add_column(col, justify="left" if col in ("kind", "note") else "right")
    for kind in (*KINDS, "reference model", "total"):
        row = report.get(kind)
        if row is None or (not row["params"] and kind not in ("total", "reference model")):  # e.g. no NF4 base
            continue
        bits = f"{8 * row['bytes'] / row['params']:.3f}" if row["params"] and kind in KINDS else "-"
        table.add_row(kind, f"{row['params']:,}", f"{row['bytes']:,}", f"{row['bytes'] / 2**20:.2f}", bits,
                      row.get("source", ""))
    buffer = io.StringIO()
    Console(file=buffer, width=110, no_color=True).print(table)
    return buffer.getvalue()


def check_optimizer_supported(optimizer: type | object, device: torch.device | str = "cpu", **options) -> None:
    """Raise a clear error if ``optimizer`` (a class, or a partial of one) cannot train on ``device``.

    bitsandbytes optimizers (8-bit state: ``AdamW8bit``, ``Lion8bit``, ...; paged: ``PagedAdamW``, ...) save
    optimizer memory, but not every one runs everywhere: with bitsandbytes 0.50.2 on CPU ``AdEMAMix32bit`` fails
    on every step, ``SGD``/``LARS`` variants need ``momentum > 0``, and paged ones fall back to unpaged state.
    Rather than keep a table that goes stale, this runs two steps of the optimizer with ``options`` on a scratch
    parameter on ``device`` (one 8192-element matrix, which takes the 8-bit path, and one small vector) and checks
    that they ran and gave finite values. Other optimizers (``torch.optim``) pass without a trial.

    Raises:
        ValueError: the optimizer fails or gives non-finite values there; the message names it, the device and why.
    """
    cls, bound = optimizer_class(optimizer)
    options = {**bound, **options}
    if not (isinstance(cls, type) and cls.__module__.startswith("bitsandbytes")):
        return
    import warnings

    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(128, 64, generator=gen).to(device)), nn.Parameter(torch.randn(16, generator=gen).to(device))]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Paged optimizers are not supported on CPU": they fall back, fine
            opt = cls(params, **{"lr": 1e-3, **options})
            for _ in range(2):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen).to(device)
                opt.step()
        ok = all(torch.isfinite(p).all() for p in params)
        why = "it gave non-finite parameters"
    except Exception as err:  # noqa: BLE001 - any failure means: not usable here
        ok, why = False, f"{type(err).__name__}: {err}"
    if not ok:
        raise ValueError(f"optimizer {cls.__name__} (bitsandbytes) does not work on {device.type} with options "
                         f"{options}: {why}. Pick another optimizer (e.g. bitsandbytes.optim.AdamW8bit or "
                         "torch.optim.AdamW), or fix its options.")
