"""Export a trained adapter: one writer per format, one table, one transaction.

``export(model, export_dir, exports=["peft", "merged", "gguf", "gguf-merged:q8_0"])`` writes, inside ``export_dir``:

| format | path | what |
|---|---|---|
| ``peft`` | ``adapter/`` | the adapter in PEFT's format (``io/peft.py``; SVD starts converted, ``io/init_export.py``) |
| ``merged`` | ``merged/`` | W' = W + s B A as a Hugging Face folder with the tokenizer (other models: ``model.safetensors``) |
| ``gguf`` | ``adapter.gguf`` | llama.cpp's LoRA adapter (``io/gguf.py``; LoRA and rsLoRA) |
| ``gguf-merged[:type]`` | ``merged-<type>.gguf`` | the merged model for llama.cpp, f16 (default), bf16 or q8_0 (``io/gguf_model.py``) |

A writer is ``write(job, path, option)``: it writes one format to ``path`` from the ``Job`` (the model, the adapter's
name, the merged model when the format needs it, the tokenizer, the card facts). A new format is one more row.

Before anything is written, every adapter tensor is checked for NaN/inf, and the merged model (or, when no merged
format is asked for, the adapted model) runs one probe batch (``io/finite.py``). All formats are then written into
one staging folder beside ``export_dir`` and swapped in at once (``io/transaction.py``): a failure at any point, or a
killed process, leaves the previous export exactly as it was; formats not asked for this time stay as they were.

The merged model is computed against the base re-loaded at high precision from ``base_model`` when given (a QLoRA run
thus merges losslessly into the fp weights), else against a copy of ``model``. Offline, from an adapter-only
checkpoint: ``python -m lightning_lora export`` (``io/checkpoint.py``, ``commands/export.py``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_lora.core.dtypes import parse_dtype
from lightning_lora.core.layer import is_quantized
from lightning_lora.core.verbs import adapter_names, adapter_state_dict, merge, remove, trained_map
from lightning_lora.io.card import base_source
from lightning_lora.io.files import save_tensors
from lightning_lora.io.finite import check_finite, probe
from lightning_lora.io.gguf import hf_config, lora_pairs, write_adapter_gguf
from lightning_lora.io.gguf_model import MODEL_DTYPES, write_model_gguf
from lightning_lora.io.init_export import merge_exact, save_for_original_base, svd_init
from lightning_lora.io.models import load_causal_lm
from lightning_lora.io.peft import load_adapter, save_adapter, save_adapters
from lightning_lora.io.tokens import match_vocabulary
from lightning_lora.io.transaction import check_folder_target, naming, staged

log = logging.getLogger(__name__)

DEFAULT_EXPORTS = ("peft", "merged")


@dataclasses.dataclass
class Job:
    """What the writers of one export read."""

    model: nn.Module  # the trained model, adapters on
    name: str  # the adapter exported (and merged)
    tokenizer: Any = None
    card: dict = dataclasses.field(default_factory=dict)  # save_adapter's card arguments
    dtype: str | None = None  # of the merged Hugging Face folder
    merged: nn.Module | None = None  # set before any writer with ``merged=True`` runs

    @property
    def several(self) -> bool:
        return len(adapter_names(self.model)) > 1

    @property
    def svd_start(self) -> str | None:
        return svd_init(self.model, self.name)


@dataclasses.dataclass(frozen=True)
class Format:
    """One row of ``FORMATS``: where a format goes in ``export_dir``, what it is called, how it is written."""

    path: str  # inside export_dir; "{option}" is replaced by the option
    label: str  # for messages; "{option}" likewise
    write: Callable[[Job, Path, str | None], None]
    merged: bool = False  # the writer reads job.merged
    options: tuple[str, ...] = ()  # accepted ":option" values, the first one the default
    check: Callable[[Job, str | None], None] | None = None  # raises before anything is written


def write_peft(job: Job, path: Path, option: str | None = None) -> None:
    """PEFT folder: every adapter in PEFT's layout when there are several; SVD starts converted for the original base."""
    if job.svd_start:
        save_for_original_base(job.model, path, job.name, **job.card)
    elif job.several:
        save_adapters(job.model, path, **job.card)
    else:
        save_adapter(job.model, path, job.name, **job.card)
    if job.tokenizer is not None and any(s.rows is not None for s in trained_map(job.model, job.name).values()):
        job.tokenizer.save_pretrained(path)  # trained token rows: their tokens (PEFT's advice for new tokens)


def save_merged(model: nn.Module, tokenizer, path: str | os.PathLike, dtype: str | None = None) -> Path:
    """Write a merged (adapter-free) model to the (new or empty) folder ``path``: ``save_pretrained`` plus the tokenizer for a
    Hugging Face model, else its state dict as ``model.safetensors``; ``dtype`` casts it first (default: as it is)."""
    path = Path(path)
    dtype = None if dtype is None else parse_dtype(dtype, auto=True)
    if dtype not in (None, "auto", torch.float32):
        model = model.to(dtype)
    path.mkdir(exist_ok=True)
    if callable(getattr(model, "save_pretrained", None)):  # a Hugging Face model
        model.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    else:
        save_tensors(model.state_dict(), path / "model.safetensors")
    return path


def write_merged(job: Job, path: Path, option: str | None = None) -> None:
    save_merged(job.merged, job.tokenizer, path, job.dtype)


def write_gguf(job: Job, path: Path, option: str | None = None) -> None:
    write_adapter_gguf(job.model, path, job.name)


def write_gguf_merged(job: Job, path: Path, option: str | None = None) -> None:
    write_model_gguf(job.merged, job.tokenizer, path, option)


def check_gguf(job: Job, option: str | None) -> None:
    hf_config(job.model)  # a family of io/gguf_arch.py's GGUF_ARCHITECTURES; any other is refused by name
    if job.svd_start:
        raise ValueError(f"exports 'gguf': adapter {job.name!r} started from {job.svd_start!r} and trained on the base "
                         "it changed, which llama.cpp's base GGUF does not hold; export 'gguf-merged' instead.")  # fmt: skip
    lora_pairs(job.model, job.name)  # DoRA/VeRA: merge first
    for target, state in trained_map(job.model, job.name).items():
        raise ValueError(f"exports 'gguf': adapter {job.name!r} also trains {state.describe()} of {target!r}, which "
                         "a llama.cpp LoRA adapter cannot hold; export 'gguf-merged' instead.")  # fmt: skip


def check_gguf_merged(job: Job, option: str | None) -> None:
    hf_config(job.model)


FORMATS: dict[str, Format] = {
    "peft": Format("adapter", "adapter (PEFT format)", write_peft),
    "merged": Format("merged", "merged model (Hugging Face format)", write_merged, merged=True),
    "gguf": Format("adapter.gguf", "adapter GGUF (llama.cpp LoRA)", write_gguf, check=check_gguf),
    "gguf-merged": Format("merged-{option}.gguf", "merged model GGUF ({option})", write_gguf_merged, merged=True,
                          options=MODEL_DTYPES, check=check_gguf_merged),
}  # fmt: skip
_RENAMED = {"adapter": "gguf", **{t: f"gguf-merged:{t}" for t in MODEL_DTYPES}}  # the old export_gguf values


def parse_exports(exports: Iterable[str] | str | None) -> list[tuple[str, str | None]]:
    """``[(format, option)]`` from ``["peft", "gguf-merged:q8_0"]`` (or ``"peft,gguf"``), checked against
    ``FORMATS``; None means ``DEFAULT_EXPORTS``."""
    if exports is None:
        exports = DEFAULT_EXPORTS
    items = exports.split(",") if isinstance(exports, str) else [str(e) for e in exports]
    plan: list[tuple[str, str | None]] = []
    for item in (i.strip() for i in items if i.strip()):
        key, _, option = item.partition(":")
        fmt = FORMATS.get(key)
        if fmt is None:
            hint = f" ('{item}' is now '{_RENAMED[item]}')" if item in _RENAMED else ""
            spellings = [k + (f"[:{'|'.join(f.options)}]" if f.options else "") for k, f in FORMATS.items()]
            raise ValueError(f"exports: unknown format {item!r}{hint}; choose from {', '.join(spellings)}.")
        if option and option not in fmt.options:
            choices = ", ".join(f"{key}:{o}" for o in fmt.options) or key
            raise ValueError(f"exports: {item!r} has no option {option!r}; choose from {choices}.")
        entry = (key, option or (fmt.options[0] if fmt.options else None))
        if entry not in plan:
            plan.append(entry)
    return plan


def relative_path(key: str, option: str | None) -> str:
    """Where one format goes inside ``export_dir``, e.g. ``merged-q8_0.gguf``."""
    return FORMATS[key].path.format(option=option)


def label(key: str, option: str | None) -> str:
    """What messages call one format, e.g. ``merged model GGUF (q8_0)``."""
    return FORMATS[key].label.format(option=option)


def check_export_dir(export_dir: str | os.PathLike, exports: Iterable[str] | str | None = None) -> None:
    """Everything about ``export_dir``/``exports`` that can be checked before a run: a folder, known formats."""
    check_folder_target(Path(export_dir), swapped=True)
    parse_exports(exports)


def export(
    model: nn.Module,
    export_dir: str | os.PathLike,
    name: str = "default",
    exports: Sequence[str] | str | None = None,
    *,
    base_model: str | None = None,
    tokenizer=None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    in_place: bool = False,
    run: dict | None = None,
    share: Iterable[object] = (),
    probe_input: Any = None,
    runs_alone: bool = True,
) -> dict[str, Path]:
    """Write the ``exports`` of adapter ``name`` of ``model`` into ``export_dir`` as one transaction (module
    docstring); return ``{format spec: path}``, e.g. ``{"peft": out/adapter, "gguf-merged:q8_0": out/merged-q8_0.gguf}``.

    With several adapters on the model, ``peft`` holds all of them in PEFT's layout ("default" at the root, the
    others in subfolders named after them); the merged formats merge ``name``.

    Args:
        exports: format specs (``FORMATS``); default ``["peft", "merged"]``.
        base_model: source of the base (alias, folder, hub id): the merge is done on a fresh high-precision copy.
            None merges a deep copy of ``model`` (or ``model`` itself with ``in_place=True``).
        tokenizer: saved with the merged model and read by ``gguf-merged`` (default: the source's, if any).
        dtype: dtype of the merged Hugging Face folder (default float32).
        run: facts for the adapter's model card (``data``, ``steps``, ``val_loss``, ``quantize``).
        share: objects ``model`` refers to that its copy must hold as None (e.g. the training loop driving it).
        probe_input: the probe batch for a model that is not a Hugging Face language model (none: no probe).
        runs_alone: False when ``model`` cannot run a forward on its own (sharded): the probe then runs on the merged
            model, built from ``base_model`` even when no merged format is asked for.

    Raises:
        ValueError: an unknown format, a non-finite adapter tensor or probe output, a format the adapter or the
            architecture cannot take (named); nothing is written.
        OSError: writing failed (the message names the path and the cause); the previous export is unchanged.
    """
    export_dir = Path(export_dir)
    plan = parse_exports(exports)
    check_folder_target(export_dir, swapped=True)
    run = dict(run or {})
    if any(is_quantized(m) for m in model.modules()):
        run.setdefault("quantize", "NF4")
    job = Job(model, name, tokenizer, {"base_model_name_or_path": base_source(model, base_model), "run": run}, dtype)
    check_finite(adapter_state_dict(model, None if job.several else name), f"export of adapter {name!r}",
                 "Nothing was written; check the training run that produced it (a learning rate too high?).")  # fmt: skip
    for key, option in plan:
        if FORMATS[key].check is not None:
            FORMATS[key].check(job, option)
    needs_merged = any(FORMATS[k].merged for k, _ in plan) or not runs_alone
    if needs_merged and base_model is None and tokenizer is None and any(k == "gguf-merged" for k, _ in plan):
        raise ValueError("exports 'gguf-merged' needs the tokenizer: pass tokenizer= (or base_model=) to export.")
    paths: dict[str, Path] = {}
    with staged(export_dir, carry=True) as stage:

        def write(key: str, option: str | None) -> None:
            rel = relative_path(key, option)
            with naming(export_dir, stage, stage / rel):
                FORMATS[key].write(job, stage / rel, option)
            paths[f"{key}:{option}" if option else key] = export_dir / rel

        for key, option in plan:  # the adapter's own formats first: an in-place merge removes the adapter
            if not FORMATS[key].merged:
                write(key, option)
        if needs_merged:
            peft_dir = None
            if base_model is not None and not job.svd_start:  # the merge re-reads the adapter from its PEFT files
                peft_dir = stage / relative_path("peft", None) if "peft" in paths else stage / ".scratch"
                if "peft" not in paths:
                    with naming(export_dir, stage, peft_dir):
                        write_peft(job, peft_dir)
            job.merged = _merged_model(job, base_model, peft_dir, trust_remote_code, in_place, share)
            if (stage / ".scratch").exists():
                shutil.rmtree(stage / ".scratch")
        probed = job.merged if job.merged is not None else model
        if not probe(probed, probe_input, "the merged model" if job.merged is not None else f"the model with adapter {name!r}"):
            log.info("export: no probe batch for %s (give probe_input, e.g. example_input_array): only its tensors "
                     "were checked for NaN/inf", type(probed).__name__)  # fmt: skip
        for key, option in sorted(plan, key=lambda e: e[0] == "merged"):  # the HF folder last: it may cast
            if FORMATS[key].merged:
                write(key, option)
    for spec, path in paths.items():
        key, _, option = spec.partition(":")
        log.info("%s written to %s", label(key, option or None), path)
    return paths


def _merged_model(job: Job, base_model: str | None, peft_dir: Path | None, trust_remote_code: bool, in_place: bool,
                  share: Iterable[object]) -> nn.Module:  # fmt: skip
    """The model with adapter ``job.name`` merged in (module docstring); sets ``job.tokenizer`` from the source."""
    fresh = None
    if base_model is not None:
        fresh, source_tokenizer = load_causal_lm(base_model, dtype="float32", trust_remote_code=trust_remote_code)
        job.tokenizer = job.tokenizer if job.tokenizer is not None else source_tokenizer
        match_vocabulary(fresh, job.model)  # a run that added tokens (io/tokens.py) trained on the resized base
    if job.svd_start:  # the trained base (residual, LoftQ's Q) plus the adapter, written into the base
        return merge_exact(job.model, job.name, fresh if fresh is not None else remove(_copy(job.model, share)))
    if fresh is not None:
        several = job.several and job.name != "default"
        load_adapter(fresh, peft_dir / job.name if several else peft_dir, job.name)
        return merge(fresh)
    return merge(job.model if in_place else _copy(job.model, share))


def _copy(model: nn.Module, share: Iterable[object]) -> nn.Module:
    return copy.deepcopy(model, {id(obj): None for obj in share if obj is not None})


__all__ = ["DEFAULT_EXPORTS", "FORMATS", "Format", "Job", "check_export_dir", "export", "label", "parse_exports",
           "relative_path", "save_merged"]  # fmt: skip
