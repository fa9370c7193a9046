"""What a PEFT folder says about its model: ``task_type``, ``base_model_name_or_path`` and a ``README.md`` card.

``peft.AutoPeftModelForCausalLM.from_pretrained(folder)`` needs ``task_type: "CAUSAL_LM"`` and a loadable
``base_model_name_or_path``: the hub id when the base came from the local hub cache, else the folder (absolute), and
for a built-in alias its converted folder. The card (a Markdown file with the YAML header PEFT writes) gives the
base by a portable id where one is known (the hub id, or the hub repository a built-in alias was made from; never a
path into this machine's cache), the method (QLoRA when the base was quantized), rank, alpha, targets, the run's
data, steps and final validation loss/perplexity, and how to load the adapter with PEFT, transformers and llama.cpp.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import yaml
from torch import nn

from lightning_lora.io.files import read_json
from lightning_lora.io.models import ALIASES, MARKER, resolve_model_path


def task_type_of(model: nn.Module) -> str | None:
    """``"CAUSAL_LM"`` for a Hugging Face causal LM (any ``*ForCausalLM`` transformers maps), else None."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover
        return None
    return "CAUSAL_LM" if type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) else None


def _from_path(path: str) -> str:
    """A snapshot folder of the hub cache (``.../models--org--name/snapshots/<rev>``) as its hub id, another folder
    as its absolute path, anything else unchanged."""
    p = Path(path).expanduser()
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        return "/".join(p.parent.parent.name.split("--")[1:])
    return str(p.resolve()) if p.is_dir() else path


def base_source(model: nn.Module | None = None, base_model: str | None = None) -> str | None:
    """Where the base came from: ``base_model`` (alias -> converted folder, folder -> absolute path, hub id kept),
    else the folder or hub id ``model`` was loaded from (its ``name_or_path``); None when unknown."""
    if base_model is not None:
        name = str(base_model)
        return str(resolve_model_path(name)) if name in ALIASES else _from_path(name)
    path = getattr(model, "name_or_path", None)
    return _from_path(str(path)) if path else None


def _alias_of(source: str | None) -> str | None:
    """The built-in alias whose converted folder ``source`` is (its marker names the alias's GGUF file), else None."""
    marker = Path(source) / MARKER if source else None
    if marker is None or not marker.is_file():
        return None
    origin = read_json(marker).get("file")
    return next((name for name, alias in ALIASES.items() if alias.file == origin), None)


def portable_base(source: str | None) -> str | None:
    """How a card names the base on any machine: a hub id as it is, a built-in alias's folder as the hub repository
    it was made from; None for a local folder (only this machine knows it)."""
    if not source:
        return None
    alias = _alias_of(source)
    if alias is not None:
        return ALIASES[alias].hub_id
    return None if Path(source).expanduser().exists() else source


def recorded_base(folders: list[str | os.PathLike]) -> str:
    """The base model adapter folders record (``base_model_name_or_path`` of their ``adapter_config.json``, at the
    root or in a subfolder of a multi-adapter folder); ``ValueError`` when none records one or they differ."""
    found: dict[str, str] = {}
    for folder in map(Path, folders):
        configs = [folder / "adapter_config.json"] if (folder / "adapter_config.json").is_file() else sorted(
            folder.glob("*/adapter_config.json"))  # fmt: skip
        base = next((b for c in configs if (b := read_json(c).get("base_model_name_or_path"))), None)
        if base:
            found[str(folder)] = base
    bases = set(found.values())
    if len(bases) == 1:
        return bases.pop()
    if not bases:
        raise ValueError(f"the adapter folders {[str(f) for f in folders]} do not record their base model "
                         "(base_model_name_or_path); pass --base_model.")  # fmt: skip
    raise ValueError(f"the adapter folders record different base models ({found}); pass --base_model to choose one.")


def base_note(source: str | None) -> str:
    """A sentence for the card when the base folder was converted from a GGUF file (a built-in alias)."""
    marker = Path(source) / MARKER if source else None
    if marker is None or not marker.is_file():
        return ""
    origin = read_json(marker).get("file", "a GGUF file")
    return (f"This folder was converted from `{origin}`: its weights are that GGUF's dequantized ones (e.g. Q4_1), "
            "not the hub repository's original weights.")  # fmt: skip


def _fmt(value, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec) if isinstance(value, float) else str(value)


def model_card(peft_config: dict, method: str, run: dict | None = None, gguf_files: dict | None = None,
               facts: dict[str, str] | None = None) -> str:
    """The ``README.md`` text for a PEFT folder with ``peft_config`` (``adapter_config.json``'s content).

    ``run`` may hold ``data`` (a description), ``steps``, ``val_loss`` (its perplexity is exp(val_loss)),
    ``quantize`` (the base's quantization, e.g. ``"NF4"``: the method reads QLoRA) and ``evaluation`` (a Markdown
    table, ``train/eval_report.py``: shown under "Evaluation"); ``facts`` are the method's own rows
    (``AdapterConfig.card_facts``: rank, alpha and scale, ...).
    """
    run = dict(run or {})
    source = peft_config.get("base_model_name_or_path")
    portable = portable_base(source)
    alias = _alias_of(source)
    base = portable or (Path(source).name if source else "(unknown: pass base_model_name_or_path)")
    shown = f"`{portable}` (built-in alias `{alias}`)" if alias else f"`{portable}`" if portable else (
        f"the local folder `{source}`" if source else base)
    if run.get("quantize"):
        method = (f"QLoRA ({method} over an {run['quantize']} base)" if method.startswith("LoRA")
                  else f"{method} over an {run['quantize']} base")
    targets = peft_config.get("target_modules") or []
    val_loss = run.get("val_loss")
    ppl = math.exp(val_loss) if isinstance(val_loss, float) and val_loss < 700 else None
    rows = [
        ("base model", shown),
        ("method", method),
        *(facts or {}).items(),
        ("target modules", ", ".join(f"`{t}`" for t in targets)),
        ("data", _fmt(run.get("data"))),
        ("steps", _fmt(run.get("steps"))),
        ("final validation loss", _fmt(val_loss)),
        ("final validation perplexity", _fmt(ppl, ".3f") if ppl is not None else "n/a"),
    ]
    note = base_note(peft_config.get("base_model_name_or_path"))
    gguf_files = gguf_files or {}
    adapter_gguf = gguf_files.get("adapter", "adapter.gguf")
    tags = list(dict.fromkeys(["lightning_lora", method.split()[0].lower(), *(["qlora"] if run.get("quantize") else [])]))
    header = {**({"base_model": portable} if portable else {}), "library_name": "peft", "tags": tags}
    lines = [
        "---",  # YAML that the hub and llama.cpp's converters parse: dumped, so any base name stays one string
        yaml.safe_dump(header, sort_keys=False, default_flow_style=None, width=1 << 16).rstrip("\n"),
        "---",
        "",
        f"# {method} adapter for `{base}`",
        "",
        "Trained with lightning_lora. " + note,
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        *(["## Evaluation", "", run["evaluation"], ""] if run.get("evaluation") else []),
        "## Load it",
        "",
        "PEFT (offline if the base is local):",
        "",
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        'model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/folder")',
        "```",
        "",
        "transformers (with peft installed) or lightning_lora:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")  # base + adapter',
        "# or: import lightning_lora as ll; ll.load_adapter(base_model, \"path/to/this/folder\")",
        "```",
        "",
        "llama.cpp (adapter GGUF: `python -m lightning_lora export ... --exports gguf`; merged model: `--exports gguf-merged`):",
        "",
        "```bash",
        f"llama-cli -m base.gguf --lora {adapter_gguf}",
        "```",
        "",
    ]
    return "\n".join(lines)
