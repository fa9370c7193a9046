"""Errors on one line for the commands: ``error: <what> (<config key>): <how to fix>``, exit code 2, no traceback.

The library raises ordinary exceptions (the Python API keeps them); only a command shortens them, here:

- our own messages read "<what>. <how to fix>" (or "<what>; <how to fix>"): they are split at the first sentence;
- jsonargparse's errors (a key typo, a value of the wrong type) become the same line, and a typo gets the nearest
  valid key ("did you mean 'adapter'?", from ``difflib``) instead of the usage;
- the config key is the one whose name or value the message mentions (``model.adapter.init_args.r``);
- a renamed key gets its new form (``export_gguf`` -> ``exports``), and a checkpoint PyTorch refused to unpickle
  (``weights_only``) gets our one line (``io/checkpoint.pickle_refusal``), pinned to ``ckpt_path``.

``LIGHTNING_LORA_TRACEBACK=1`` in the environment, or ``--traceback`` on the command line, shows the full traceback.
"""

from __future__ import annotations

import difflib
import inspect
import os
import pickle
import re
import sys
from collections.abc import Callable, Iterable

from lightning_lora.io.checkpoint import pickle_refusal

TRACEBACK_ENV = "LIGHTNING_LORA_TRACEBACK"
TRACEBACK_FLAG = "--traceback"
EXIT_CODE = 2
_FIX_VERBS = ("use", "pass", "set", "add", "install", "lower", "check", "narrow", "load", "call", "run", "give",
              "rename", "remove", "convert", "delete", "pick", "put")  # fmt: skip
RENAMED_KEYS = {"export_gguf": ("exports", "use exports: [peft, merged, gguf, gguf-merged:q8_0] (any of them)")}


def wants_traceback(argv: Iterable[str]) -> bool:
    return TRACEBACK_FLAG in argv or os.environ.get(TRACEBACK_ENV, "").strip().lower() in ("1", "true", "yes")


def run_command(main: Callable[[list[str]], object], argv: list[str]) -> None:
    """Run ``main(argv)``; an exception becomes one ``error:`` line on stderr and exit code 2 (unless asked not to)."""
    show = wants_traceback(argv)
    if TRACEBACK_FLAG in argv:  # a flag for us, not for the command's parser (nested calls see the variable)
        os.environ[TRACEBACK_ENV] = "1"
        argv = [a for a in argv if a != TRACEBACK_FLAG]
        sys.argv = [a for a in sys.argv if a != TRACEBACK_FLAG]
    try:
        main(argv)
    except Exception as exc:  # noqa: BLE001 - the command's last line of defence
        if show:
            raise
        print(one_line(exc), file=sys.stderr)
        sys.exit(EXIT_CODE)


# --------------------------------------------------------------------------------------------------- formatting
def one_line(exc: BaseException) -> str:
    """``error: <what> (<config key>): <how to fix>`` for ``exc`` (its cause when a wrapper only repeats it)."""
    config = getattr(exc, "lightning_lora_config", None) or {}
    refused = _pickle_refusal(exc)
    if refused is not None:  # PyTorch's message is long and advises weights_only=False: never
        path = config.get("ckpt_path")
        what, fix = split_message(pickle_refusal(path, refused))
        return f"error: {what}{' (ckpt_path)' if path else ''}: {fix[:1].lower() + fix[1:]} (traceback: {TRACEBACK_ENV}=1)"
    outer = _squash(str(exc))
    typo = _typo(outer, getattr(exc, "lightning_lora_parser", None))
    exc = _innermost(exc)
    message = _squash(str(exc)) or type(exc).__name__
    known = typo or _required(outer) or _wrong_type(exc, outer)
    nested = _nested(outer) if known is None else None
    if known is not None:
        what, key, fix = known
    elif nested is not None:
        what, key = nested
        what, fix = split_message(what)
        if not fix:
            fix = ("give an importable class, e.g. lightning_lora.LoRA" if "has no attribute" in what
                   else f"change it in the config or with --{key} VALUE")  # fmt: skip
    else:
        what, fix = split_message(message)
        key = config_key(message, config)
        if not fix:
            fix = f"change it in the config or with --{key} VALUE" if key else _generic_fix(exc)
    if type(exc).__module__ not in ("builtins", "argparse") and not what.startswith(type(exc).__name__):
        what = f"{type(exc).__name__}: {what}"
    where = f" ({key})" if key else ""
    fix = fix[:1].lower() + fix[1:] if fix[1:2].islower() else fix
    return f"error: {what}{where}: {fix} (traceback: {TRACEBACK_ENV}=1)"


def _pickle_refusal(exc: BaseException) -> BaseException | None:
    """The ``pickle.UnpicklingError`` of a ``weights_only`` load in ``exc``'s chain, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, pickle.UnpicklingError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _innermost(exc: BaseException) -> BaseException:
    """jsonargparse wraps an exception raised while instantiating a class in a Union dump: keep the real one."""
    seen = set()
    while exc.__cause__ is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if not (text.startswith(("Does not validate", "Parser key", "Problem with given class_path"))
                or "Problem with given class_path" in text):
            break
        exc = exc.__cause__
    return exc


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def split_message(message: str) -> tuple[str, str]:
    """``(what, how to fix)``: the message split at its first sentence, ``;`` or ``: <imperative verb>``."""
    cuts = [m.start() for m in re.finditer(r"\. (?=[A-Z\"'`(])", message)]
    cuts += [m.start() for m in re.finditer(r"; ", message)]
    cuts += [m.start() for m in re.finditer(r": (?=(" + "|".join(_FIX_VERBS) + r")\b)", message)]
    cuts = [c for c in cuts if 0 < c < len(message) - 2]
    if not cuts:
        return message.rstrip("."), ""
    cut = min(cuts)
    return message[:cut].rstrip("."), message[cut + 2 :].strip().rstrip(".")


def _nested(message: str) -> tuple[str, str] | None:
    """``(what, key)`` from jsonargparse's ``Parser key "a": Problem with given class_path 'C': Parser key "r": ...``."""
    parts = re.split(r'Parser key "([^"]+)": ', message)
    if len(parts) < 3:
        return None
    keys = []
    for i, (key, rest) in enumerate(zip(parts[1::2], parts[2::2])):
        keys.append(key)
        if rest.startswith("Problem with given class_path") and 2 * i + 3 < len(parts):
            keys.append("init_args")
    what = re.sub(r"^Problem with given class_path '[^']+': ", "", parts[-1]).strip()
    return what or message, ".".join(keys)


_TYPE_FIX = {"float": "give a number, e.g. 0.001 or 1e-3", "int": "give a whole number, e.g. 8",
             "bool": "give true or false", "str": "give a text value"}  # fmt: skip


def _required(message: str) -> tuple[str, str, str] | None:
    """``(what, key, fix)`` for "the following arguments are required: fit.model.base_model" (no config given)."""
    m = re.search(r"arguments are required: ([\w., -]+)", message)
    if not m:
        return None
    keys = [k.strip().split(".", 1)[-1] if k.strip().startswith(("fit.", "validate.", "test.")) else k.strip()
            for k in m.group(1).split(",")]  # fmt: skip
    return (f"no value for {', '.join(keys)}", keys[0], "pass a config, e.g. --config configs/quickstart.yaml "
            "(configs/ has one per method), or set it on the command line, e.g. --model.base_model smollm2-135m-instruct")


def _wrong_type(exc: BaseException, message: str) -> tuple[str, str, str] | None:
    """``(what, key, fix)`` for a value of the wrong type deep inside jsonargparse's union report (``lr: 1e-3x``):
    its innermost cause reads "Expected a <class 'float'>. Got value: 1e-3x"."""
    seen, deep = set(), exc
    while deep.__cause__ is not None and id(deep) not in seen:
        seen.add(id(deep))
        deep = deep.__cause__
    m = re.match(r"Expected a <class '(\w+)'>\. Got value: (.*)$", _squash(str(deep)))
    if not m:
        return None
    kind, value = m.groups()
    parts = re.split(r'Parser key "([^"]+)":', message)
    keys = []
    for i, (key, rest) in enumerate(zip(parts[1::2], parts[2::2])):
        keys.append(key)
        if 2 * i + 3 < len(parts) and ("callable class" in rest or "class_path" in rest):
            keys.append("init_args")  # a class given by class_path: its own arguments sit under init_args
    key = ".".join(keys) or None
    name = keys[-1] if keys else "a value"
    return f"{name} must be a {kind}, got {value!r}", key, _TYPE_FIX.get(kind, f"give a {kind}")


def _generic_fix(exc: BaseException) -> str:
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return "check the path"
    if isinstance(exc, ImportError):
        return "install the missing package"
    return "check the command line and the config"


def config_key(message: str, config: dict) -> str | None:
    """The config key the message is about: its last part named as a word, or its (string) value quoted in it."""
    best, best_score = None, 0
    for key, value in config.items():
        name = key.rsplit(".", 1)[-1]
        named = re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", message) is not None
        named = named and (len(name) > 2 or re.search(rf"(?<![\w.-]){re.escape(name)} (\(|must|=|is)", message))
        text = str(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else ""
        shown = len(text) >= 3 and text not in ("auto", "cpu", "None", "null", "true", "false") and text in message
        score = 2 * bool(named) + bool(shown) + (len(text) / 1000 if shown else 0)
        if (named or shown) and score > best_score:
            best, best_score = key, score
    return best


# ------------------------------------------------------------------------------------------------------ key typos
def _typo(message: str, parser) -> tuple[str, str, str] | None:
    """``(what, key, fix)`` for jsonargparse's "unknown key" errors, with the nearest valid key."""
    m = (re.search(r"does not accept option '([^']+)'", message) or re.search(r"Key '([^']+)' is not expected", message)
         or re.search(r"nrecognized arguments: --([\w.]+)", message))
    group = re.search(r"Group '([^']+)' does not accept option '([^']+)'", message)
    if m or group:
        wrong = f"{group.group(1)}.{group.group(2)}" if group else m.group(1)
        valid = sorted(_parser_keys(parser))
        return _suggest(wrong, valid)
    m = re.search(r"Parser key \"([^\"]+)\": Problem with given class_path '([^']+)': Option '([^']+)' is not accepted",
                  message)  # fmt: skip
    if m:
        group, class_path, option = m.groups()
        valid = _init_args(class_path)
        what, _, fix = _suggest(option, valid)
        return f"{class_path} has no option '{option}'", f"{group}.init_args.{option}", fix
    return None


def _suggest(wrong: str, valid: list[str]) -> tuple[str, str, str]:
    """The first part of the dotted key ``wrong`` that is not valid, and the nearest valid names at that level."""
    parts = wrong.split(".")
    split = [k.split(".") for k in valid]
    for depth, part in enumerate(parts):
        level = sorted({k[depth] for k in split if len(k) > depth and k[:depth] == parts[:depth]})
        if part in level:
            continue
        key = ".".join(parts[: depth + 1])
        if part in RENAMED_KEYS and RENAMED_KEYS[part][0] in level:
            return f"'{part}' was replaced by '{RENAMED_KEYS[part][0]}'", key, RENAMED_KEYS[part][1]
        close = difflib.get_close_matches(part, level, n=3, cutoff=0.6)
        if close:
            others = f" (or {', '.join(repr(c) for c in close[1:])})" if close[1:] else ""
            fix = f"did you mean '{close[0]}'?{others}"
        else:
            fix = f"valid keys here: {', '.join(level[:25]) or '(none)'}"
        return f"unknown key '{part}'", key, fix
    return f"unknown key '{wrong}'", wrong, "check its spelling"


def _parser_keys(parser) -> set[str]:
    """Every key a (LightningCLI) parser accepts, from the chosen subcommand's parser when there is one."""
    if parser is None:
        return set()
    keys: set[str] = set()
    subcommands = getattr(parser, "_subcommands_action", None)
    parsers = list(subcommands._name_parser_map.values()) if subcommands is not None else [parser]
    for p in parsers:
        for action in p._actions:
            dest = getattr(action, "dest", "")
            if dest and dest not in ("help", "config", "print_config"):
                keys.add(dest)
    return keys


def _init_args(class_path: str) -> list[str]:
    from lightning_lora.core.imports import import_class  # only on an error: this module stays free of torch

    try:
        cls = import_class(class_path)
        return [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    except (ValueError, TypeError):
        return []


__all__ = ["EXIT_CODE", "TRACEBACK_ENV", "config_key", "one_line", "run_command", "split_message"]
