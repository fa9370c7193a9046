"""Which layers of a model get an adapter.

A target spec is ``"all-linear"``, one string, or a list of strings. Each string selects a module whose full name
(as in ``model.named_modules()``) is equal to it, ends with ``"." + it`` (``"q_proj"``), matches it as a glob
(``"*.mlp.*_proj"``) or matches it as a regular expression over the whole name (``r".*\\.(q|v)_proj"``). These are
the rules of Hugging Face PEFT (exact/suffix for lists, full regex match for strings) plus globs.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence

from torch import nn

from lightning_lora.core.layer import AdapterLayer, is_linear_like

TargetSpec = str | Sequence[str]


def _as_patterns(spec: TargetSpec | None) -> list[str]:
    if spec is None:
        return []
    return [spec] if isinstance(spec, str) else list(spec)


def name_matches(name: str, pattern: str) -> bool:
    """True when ``pattern`` selects the module called ``name`` (exact, suffix, glob or full regex match)."""
    if name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head(s) that ``"all-linear"`` leaves alone (as PEFT does)."""
    heads = {name for name, _ in model.named_modules() if name == "lm_head" or name.endswith(".lm_head")}
    get_head = getattr(model, "get_output_embeddings", None)
    if callable(get_head):
        try:
            head = get_head()
        except (AttributeError, NotImplementedError):
            head = None
        heads |= {name for name, module in model.named_modules() if head is not None and module is head}
    return heads


def adaptable_modules(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """``named_modules`` without the internals of already adapted layers (their ``base_layer`` and branches)."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skip):
            continue
        if isinstance(module, AdapterLayer):
            skip.append(name + ".")
        yield name, module


def find_targets(
    model: nn.Module,
    target_modules: TargetSpec,
    exclude_modules: TargetSpec | None,
    supports: type | tuple | None = None,
    method: str = "LoRA",
) -> list[str]:
    """Names of the modules selected by ``target_modules`` minus ``exclude_modules``, in model order.

    Raises:
        ValueError: nothing matches (the message lists layer names that could be targeted), or a matched module is
            of a type ``method`` cannot adapt.
    """
    excluded = _as_patterns(exclude_modules)
    modules = [(n, m) for n, m in adaptable_modules(model) if n and not any(name_matches(n, p) for p in excluded)]
    base_of = {n: (m.base_layer if isinstance(m, AdapterLayer) else m) for n, m in modules}
    if target_modules == "all-linear":
        heads = _output_head_names(model)
        chosen = [n for n, _ in modules if is_linear_like(base_of[n]) and n not in heads]
    else:
        patterns = _as_patterns(target_modules)
        chosen = [n for n, _ in modules if any(name_matches(n, p) for p in patterns)]
    if not chosen:
        available = sorted({n.rsplit(".", 1)[-1] for n, m in modules if supports is None or isinstance(base_of[n], supports)})
        raise ValueError(
            f"target_modules={target_modules!r} matches no layer of {type(model).__name__}. "
            f"Layer names that can be targeted: {', '.join(available[:30]) or '(none)'}. "
            'Use one of them (suffix match), a glob such as "*.q_proj", a regex, or "all-linear".'
        )
    if supports is not None:
        bad = [(n, type(base_of[n]).__name__) for n in chosen if not isinstance(base_of[n], supports)]
        if bad:
            shown = ", ".join(f"{n} ({t})" for n, t in bad[:5])
            kinds = ", ".join(t.__name__ for t in (supports if isinstance(supports, tuple) else (supports,)))
            raise ValueError(
                f"{method} cannot adapt {len(bad)} matched module(s): {shown}. It supports {kinds}; "
                "narrow target_modules (or add the others to exclude_modules)."
            )
    return chosen


def compact_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """``targets`` as PEFT writes them: the layer-name suffixes (``["q_proj", "v_proj"]``) when PEFT's list rule
    (a name equal to a suffix or ending with ``"." + suffix``) selects exactly ``targets`` on ``model``; otherwise
    the full names, sorted. Adapted layers count by their own name, not their internals."""
    suffixes = sorted({t.rsplit(".", 1)[-1] for t in targets})
    names = [n for n, _ in adaptable_modules(model) if n]
    selected = {n for n in names if any(n == s or n.endswith("." + s) for s in suffixes)}
    return suffixes if selected == set(targets) else sorted(targets)
