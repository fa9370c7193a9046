"""MoE expert stacks in PEFT's files: ``target_parameters`` and the nesting of PEFT's ParamWrapper.

PEFT (0.21, ``LoraConfig(target_parameters=[...])``) wraps each targeted parameter of a module in a ``ParamWrapper``,
in the module's registration order, each wrapper around the previous one, so the last is outermost and a file holds
the pair of the i-th of k targeted stacks of experts module ``m`` under

    base_model.model.<m>.(base_layer.)^(k - i) lora_A.weight / lora_B.weight

e.g. Mixtral's ``...mlp.experts.base_layer.lora_A.weight`` (``gate_up_proj``) and ``...mlp.experts.lora_A.weight``
(``down_proj``). ``peft_paths`` gives each of our targets its path in a file, ``our_targets`` reads them back with the
file's ``target_parameters`` (which stacks are targeted, so how deep each one sits). PEFT refuses ``lora_dropout``
with ``target_parameters``; the files say 0 (dropout acts in training only: ``methods/lora_experts.py``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping

from torch import nn

from lightning_lora.core.experts import expert_stacks, parameter_matches, select_stacks, stacks_of

log = logging.getLogger(__name__)

NEST = ".base_layer"


def peft_paths(model: nn.Module, targets: Iterable[str]) -> dict[str, str]:
    """Each target's layer path in a PEFT file: itself, or for an expert stack its experts module, nested
    (module docstring) among the stacks of that module in ``targets``."""
    targets = list(targets)
    stacks = expert_stacks(model)
    chosen = set(targets)
    paths = {}
    for t in targets:
        if t not in stacks:
            paths[t] = t
            continue
        module, _ = stacks[t]
        prefix = t.rpartition(".")[0]
        mine = [f"{prefix}.{s}" for s in stacks_of(module) if f"{prefix}.{s}" in chosen]
        paths[t] = prefix + NEST * (len(mine) - 1 - mine.index(t))
    return paths


def target_parameters(model: nn.Module, stacks: Iterable[str]) -> list[str]:
    """``target_parameters`` as a file writes them: the shortest name suffixes (from ``experts.<stack>``) that
    select exactly ``stacks`` under PEFT's rule among the model's parameters, else the full names."""
    stacks = sorted(stacks)
    keys = set(expert_stacks(model)) | {n for n, _ in model.named_parameters()}
    for depth in (2, 3):
        names = sorted({".".join(s.split(".")[-depth:]) for s in stacks})
        if {k for k in keys if parameter_matches(k, names)} == set(stacks):
            return names
    return stacks


def add_to_config(file_config: dict, model: nn.Module, stacks: Mapping[str, object]) -> None:
    """Write the expert stacks of an adapter (name -> branch) into its PEFT config: ``target_parameters``,
    ``lora_dropout`` 0, and where PEFT would re-rank them, their own rank and alpha (below)."""
    if not stacks:
        return
    file_config["target_parameters"] = target_parameters(model, stacks)
    # On Qwen2-MoE-like model types (Qwen3-MoE, DeepSeek-V3, ...) PEFT 0.21 reads target_modules holding both
    # gate_proj and up_proj as transformers-v4 experts fused into gate_up_proj, and adds rank_pattern/alpha_pattern
    # keys doubling r and alpha there; a key of ours that matches first (PEFT: the first matching key wins) keeps
    # the stacks' own.
    modules = file_config.get("target_modules")
    leaves = {t.rpartition(".")[2] for t in modules} if isinstance(modules, list) else set()
    fused = {n: b for n, b in stacks.items() if n.endswith(".gate_up_proj")}
    if fused and {"gate_proj", "up_proj"} <= leaves:
        for field, value in (("rank_pattern", "r"), ("alpha_pattern", "alpha")):
            pinned = {re.escape(n): getattr(b, value) for n, b in fused.items()}
            file_config[field] = {**pinned, **(file_config.get(field) or {})}
    if file_config.get("lora_dropout"):
        log.warning(f"save_adapter: lora_dropout {file_config['lora_dropout']} is written as 0: PEFT refuses "
                    "dropout on MoE expert parameters (target_parameters) and it acts in training only.")
        file_config["lora_dropout"] = 0.0


# The leaf names that PEFT (0.19+, under transformers v5) reads in target_modules as the experts' transformers-v4
# names and re-maps to the expert stacks, per conversion pattern (PEFT's _MOE_TARGET_MODULE_MAPPING).
V4_EXPERT_NAMES = {"qwen2_moe": {"gate_proj", "up_proj", "down_proj"}, "mixtral": {"w1", "w2", "w3"}}


def peft_conversion_pattern(model: nn.Module) -> str | None:
    """The MoE conversion pattern (``qwen2_moe``, ``mixtral``) that transformers, and PEFT after it, apply to this
    model type, or None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN as patterns
    except ImportError:  # transformers v4: no conversion
        return None
    pattern = patterns.get(model_type, model_type)
    return pattern if pattern in V4_EXPERT_NAMES else None


def warn_peft_drops(model: nn.Module, modules: Iterable[str]) -> list[str]:
    """Warn (and return them) about adapted layers that PEFT will not load from our folder: on MoE model types that
    it converts (DeepSeek-V3, Qwen3-MoE, ...), PEFT re-maps target_modules named like the experts' old v4 names to
    the expert stacks, so the adapters of dense layers with those names (DeepSeek's dense and shared-expert MLPs) are
    dropped by ``PeftModel.from_pretrained`` without a word. Ours (``load_adapter``) and the merged export keep them."""
    pattern = peft_conversion_pattern(model)
    dropped = sorted(m for m in modules if pattern and m.rpartition(".")[2] in V4_EXPERT_NAMES[pattern])
    if dropped:
        log.warning(f"save_adapter: PEFT re-maps target_modules named {'/'.join(sorted(V4_EXPERT_NAMES[pattern]))} "
                    f"on {pattern}-like MoE models to the experts, so PeftModel will drop the adapters of "
                    f"{len(dropped)} dense layers (e.g. {dropped[0]!r}); load_adapter and the merged export keep "
                    "them. Exclude them (exclude_modules) if the folder is for PEFT.")
    return dropped


def our_targets(model: nn.Module, layers: Mapping[str, dict], peft_config: dict, source: str) -> dict[str, dict]:
    """``layers`` (a file's layer path -> tensors) with each expert stack's path renamed to its target name.

    Raises:
        ValueError: a ``target_parameters`` name selects no expert stack (``select_stacks``: e.g. a router's weight,
            which PEFT's all-linear adds on some MoE types), or the file's nesting does not fit the model.
    """
    names = list(peft_config.get("target_parameters") or [])
    if not names:
        return dict(layers)
    chosen = select_stacks(model, names, expert_stacks(model), f"{source}: target_parameters")
    paths = {p: t for t, p in peft_paths(model, chosen).items()}
    out = {}
    for path, tensors in layers.items():
        if path in paths:
            out[paths[path]] = tensors
            continue
        stripped = path
        while stripped.endswith(NEST):
            stripped = stripped[: -len(NEST)]
        if any(p.startswith(stripped + ".") or p == stripped for p in paths):
            raise ValueError(f"{source}: {path!r} does not match the expert stacks its target_parameters select "
                             f"({sorted(t for t in chosen if t.startswith(stripped + '.'))}).")
        out[path] = tensors
    return out
