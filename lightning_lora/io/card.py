"""What a PEFT folder says about its model: ``task_type``, ``base_model_name_or_path`` and a ``README.md`` card.

``peft.AutoPeftModelForCausalLM.from_pretrained(folder)`` needs ``task_type: "CAUSAL_LM"`` and a loadable
``base_model_name_or_path``: the hub id when the base came from the local hub cache, else the folder (absolute), and
for a built-in alias its converted folder. The card (a Markdown file with the YAML header PEFT writes) gives the
base, the method, rank, alpha, targets, the run's data, steps and final validation loss/perplexity, and how to load
the adapter with PEFT, transformers and llama.cpp.
"""

from __future__ import annotations

import math
from pathlib import Path

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

    ``run`` may hold ``data`` (a description), ``steps``, ``val_loss`` (its perplexity is exp(val_loss)), and
    ``evaluation`` (a Markdown table, ``train/eval_report.py``: shown under "Evaluation"); ``facts`` are the method's
    own rows (``AdapterConfig.card_facts``: rank, alpha and scale, ...).
    """
    run = dict(run or {})
    base = peft_config.get("base_model_name_or_path") or "(unknown: pass base_model_name_or_path)"
    targets = peft_config.get("target_modules") or []
    val_loss = run.get("val_loss")
    ppl = math.exp(val_loss) if isinstance(val_loss, float) and val_loss < 700 else None
    rows = [
        ("base model", f"`{base}`"),
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
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: peft",
        "tags: [lightning_lora, " + method.split()[0].lower() + "]",
        "---",
        "",
        f"# {method} adapter for `{Path(base).name or base}`",
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
        "llama.cpp (adapter GGUF: `python -m lightning_lora export ... --format gguf`; merged model: add `--merged`):",
        "",
        "```bash",
        f"llama-cli -m base.gguf --lora {adapter_gguf}",
        "```",
        "",
    ]
    return "\n".join(lines)
