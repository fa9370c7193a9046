"""Which layers of a model get an adapter.

A target spec is ``"all-linear"``, one string, or a list of strings. Each string selects a module whose full name
(as in ``model.named_modules()``) is equal to it, ends with ``"." + it`` (``"q_proj"``), matches it as a glob
(``"*.mlp.*_proj"``) or matches it as a regular expression over the whole name (``r".*\\.(q|v)_proj"``). These are
the rules of Hugging Face PEFT (exact/suffix for lists, full regex match for strings) plus globs.

MoE expert stacks (3-D parameters, ``core/experts.py``) are targets too: ``"all-linear"`` selects them, and
``target_parameters`` names them as PEFT does (a name equal to ``<experts module>.<parameter>`` or ending with
``"." + name``); ``target_modules`` names modules only. ``exclude_modules`` drops a stack by its name or its module's.

Per-layer options (PEFT's ``rank_pattern``/``alpha_pattern``) use PEFT's own rule, ``pattern_key``: a key is a
regular expression that must match the end of the name at a dot boundary, and the first matching key wins.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import re
from collections.abc import Callable, Iterable, Sequence

from torch import nn

from lightning_lora.core.experts import find_stacks, is_stack
from lightning_lora.core.kinds import KINDS, LayerKind, is_linear_like, kind_of
from lightning_lora.core.layer import AdapterLayer

log = logging.getLogger(__name__)
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


def pattern_key(patterns: Iterable[str], name: str) -> str | None:
    """The first key of ``patterns`` that selects the layer ``name`` under PEFT's per-layer rule (``peft.utils.other.
    get_pattern_key``): ``re.match(rf"(.*\\.)?({key})$", name)``, so ``"q_proj"`` selects every ``...q_proj``,
    ``"layers.0.self_attn.q_proj"`` one layer, and a key may be a regex. None when no key selects it."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def check_patterns(patterns: object, field: str, value_ok: Callable[[object], bool], what: str) -> None:
    """Raise ValueError naming ``field`` unless ``patterns`` is None or ``{regex: value}`` with valid values."""
    if patterns is None:
        return
    if not isinstance(patterns, dict):
        raise ValueError(f"{field} must be a mapping {{layer name pattern: {what}}}, got {patterns!r}.")
    for key, value in patterns.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{field}: keys are layer name patterns (strings), got {key!r}.")
        try:
            re.compile(key)
        except re.error as err:
            raise ValueError(f"{field}: {key!r} is not a valid regular expression ({err}).") from None
        if not value_ok(value):
            raise ValueError(f"{field}[{key!r}] must be {what}, got {value!r}.")


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
    supports: Callable[[LayerKind], bool] | None = None,
    method: str = "an adapter",
    target_parameters: Sequence[str] | None = None,
) -> list[str]:
    """Names of the modules selected by ``target_modules`` minus ``exclude_modules``, in model order, then the MoE
    expert stacks selected (``core/experts.py: find_stacks``).

    ``"all-linear"`` selects the linear kinds (``kinds.py``) but the output head, and the expert stacks; convs and
    embeddings are selected by name or pattern, expert stacks by ``target_parameters``. ``supports(kind)`` says which
    layer kinds ``method`` (the method's name, for messages) adapts.

    Raises:
        ValueError: nothing matches (the message lists layer names that could be targeted), a matched module is
            of a kind ``method`` cannot adapt, or its kind refuses it (e.g. a grouped conv).
    """
    excluded = _as_patterns(exclude_modules)
    modules = [(n, m) for n, m in adaptable_modules(model)
               if n and not any(name_matches(n, p) for p in excluded) and not is_stack(m)]
    stacks = find_stacks(model, target_parameters, target_modules == "all-linear",
                         lambda n: any(name_matches(n, p) for p in excluded), supports, method)
    base_of = {n: (m.base_layer if isinstance(m, AdapterLayer) else m) for n, m in modules}
    available = sorted({n.rsplit(".", 1)[-1] for n, _ in modules if _adaptable(base_of[n], supports)})
    if target_modules == "all-linear":
        heads = _output_head_names(model)
        chosen = [n for n, _ in modules if is_linear_like(base_of[n]) and n not in heads]
        if not chosen and not stacks:
            raise ValueError(
                f'target_modules="all-linear" matches no layer of {type(model).__name__}: it has no linear layer. '
                "Name the layers to adapt instead; layer names that can be targeted: "
                f"{', '.join(available[:30]) or '(none)'}."
            )
        _log_left_out(model, modules, base_of, chosen, supports)
    else:
        patterns = _as_patterns(target_modules)  # None or []: expert stacks only (target_parameters)
        chosen = [n for n, _ in modules if any(name_matches(n, p) for p in patterns)]
        unmatched = [p for p in patterns if not any(name_matches(n, p) for n, _ in modules)]
        if chosen and unmatched and not isinstance(target_modules, str):
            raise ValueError(unmatched_message(unmatched, model, [n for n, _ in modules], available))
    if not chosen and stacks and (target_modules == "all-linear" or not _as_patterns(target_modules)):
        return stacks
    if not chosen:
        close = _closest(_as_patterns(target_modules), [n for n, _ in modules], available)
        raise ValueError(
            f"target_modules={target_modules!r} matches no layer of {type(model).__name__}{close}. "
            f"Layer names that can be targeted: {', '.join(available[:30]) or '(none)'}. "
            'Use one of them (suffix match), a glob such as "*.q_proj", a regex, or "all-linear".'
        )
    bad = [(n, type(base_of[n]).__name__) for n in chosen if not _adaptable(base_of[n], supports)]
    if bad:
        shown = ", ".join(f"{n} ({t})" for n, t in bad[:5])
        raise ValueError(
            f"{method} cannot adapt {len(bad)} matched module(s): {shown}. It supports "
            f"{', '.join(_kind_names(supports))}; narrow target_modules (or add the others to exclude_modules)."
        )
    refused = [(n, kind_of(base_of[n]).refuse(base_of[n])) for n in chosen]
    refused = [(n, why) for n, why in refused if why]
    if refused:
        raise ValueError(f"{method} cannot adapt {refused[0][0]!r}: {refused[0][1]}.")
    return chosen + stacks


def _adaptable(module: nn.Module, supports: Callable[[LayerKind], bool] | None) -> bool:
    kind = kind_of(module)
    return kind is not None and (supports is None or supports(kind))


def _kind_names(supports: Callable[[LayerKind], bool] | None) -> list[str]:
    return [k.name for k in KINDS if supports is None or supports(k)]


def compact_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """``targets`` as PEFT writes them: the layer-name suffixes (``["q_proj", "v_proj"]``) when PEFT's list rule
    (a name equal to a suffix or ending with ``"." + suffix``) selects exactly ``targets`` on ``model``; otherwise
    the full names, sorted. Adapted layers count by their own name, not their internals."""
    suffixes = sorted({t.rsplit(".", 1)[-1] for t in targets})
    names = [n for n, _ in adaptable_modules(model) if n]
    selected = {n for n in names if any(n == s or n.endswith("." + s) for s in suffixes)}
    return suffixes if selected == set(targets) else sorted(targets)


def _closest(patterns: list[str], names: list[str], available: list[str]) -> str:
    """`` (closest: ...)`` for each pattern that looks like a misspelt layer name, else ``""``."""
    leaves = available  # suggest only layers the method can adapt
    hints = []
    for p in patterns:
        close = difflib.get_close_matches(p.rsplit(".", 1)[-1], leaves, n=3, cutoff=0.5)
        if close:
            hints.append(f"{p!r}: did you mean {' or '.join(repr(c) for c in close)}?")
    return f" ({'; '.join(hints)})" if hints else ""


def unmatched_message(unmatched: list[str], model: nn.Module, names: list[str], available: list[str]) -> str:
    """The error for names in an explicit ``target_modules`` list that select no layer (a typo trains nothing)."""
    shown = ", ".join(repr(p) for p in unmatched)
    return (
        f"target_modules names {shown}, which match{'es' if len(unmatched) == 1 else ''} no layer of "
        f"{type(model).__name__}{_closest(unmatched, names, available)}. Every name in the list must select at least "
        f"one layer: fix or remove it (layer names that can be targeted: {', '.join(available[:30]) or '(none)'})."
    )


def _log_left_out(model: nn.Module, modules: list, base_of: dict, chosen: list[str], supports) -> None:
    """``all-linear`` adapts linear layers only: say which other adaptable layers (e.g. convolutions) it leaves out."""
    chosen_set = set(chosen)
    left = {}
    for n, _ in modules:
        base = base_of[n]
        kind = kind_of(base)
        if n in chosen_set or kind is None or is_linear_like(base) or kind.name == "embedding":
            continue
        left.setdefault(type(base).__name__, []).append(n)
    for kind, names in left.items():
        can = _adaptable(base_of[names[0]], supports)
        log.warning(
            f'target_modules="all-linear" adapts the {len(chosen)} linear layers of {type(model).__name__} and leaves '
            f"out its {len(names)} {kind} layer(s) (e.g. {names[0]}); "
            + ("name them in target_modules to adapt them too." if can else "this method cannot adapt them.")
        )
