"""Conversations read from JSONL files and built-in sources, checked where they are read.

A conversation is a list of ``{"role", "content"}`` turns, roles ``system``, ``user`` and ``assistant``. A JSONL line
is ``{"prompt", "response"}`` (one user turn, one assistant turn) or ``{"messages": [...]}``; other keys are ignored.

What the reader does with a line that does not fit, and why:

- **dropped, counted in one warning** (with the first few ``file:line``): a *missing value*, i.e. a prompt, response
  or content that is ``null`` or NaN (pandas writes missing cells so), or an assistant turn that is empty. Exports
  of real data have such holes here and there, and the rest of the file is what the user wants to train on. A file
  in which every line is dropped is an error.
- **an error** ``file:line: what is wrong`` (nothing is trained): everything that says the file is not in the format
  the user thinks it is: a byte that is not UTF-8, a line that is not a JSON object, keys that are neither form,
  an unknown role (``wizard``; ``human``/``gpt``/``model`` get a "did you mean"), a value that is not text
  (``true``, a list, an object), a conversation whose first turn after the system turns is not the user's, or one
  with no assistant turn. Numbers are taken as their text (``"response": 4`` trains on ``4``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)
Conversation = list[dict[str, str]]
ROLES = ("system", "user", "assistant")
ROLE_HINTS = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "ai": "assistant",
              "chatbot": "assistant", "assistent": "assistant", "sys": "system", "prompt": "user"}
CHATTERBOT_PIP = "pip install --no-deps chatterbot-corpus==1.3.3"
SHOWN = 3  # dropped lines named in the warning


class Missing(Exception):
    """A line with a missing value: dropped and counted, not an error (see the module docstring)."""


def decode_utf8(data: bytes, path: str | Path) -> str:
    """``data`` as text (a leading BOM dropped); a byte that is not UTF-8 raises ``ValueError`` naming ``path:line``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        p = Path(path)
        raise ValueError(f"{path}:{line}: not UTF-8 (byte 0x{data[err.start]:02x} at byte {column} of the line). "
                         f"Save the file as UTF-8 (from Latin-1: iconv -f latin1 -t utf-8 {p.name} > "
                         f"{p.stem}.utf8{p.suffix}).") from None
    return text.removeprefix("\ufeff")


def jsonl_conversations(path: str | Path) -> list[tuple[str, Conversation]]:
    """``(where, conversation)`` for every usable line of a JSONL file, ``where`` being ``"file:line"``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    out, dropped, total = [], [], 0
    for lineno, line in enumerate(decode_utf8(path.read_bytes(), path).split("\n"), 1):
        if not line.strip():
            continue
        total += 1
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg}). Each line must be one object.") from None
        try:
            out.append((where, conversation(row, where)))
        except Missing as why:
            dropped.append(f"line {lineno}: {why}")
    if dropped:
        shown = "; ".join(dropped[:SHOWN]) + ("; ..." if len(dropped) > SHOWN else "")
        if not out:
            raise ValueError(f"{path}: all {total} lines have a missing value ({shown}).")
        log.warning(f"{path}: dropped {len(dropped)} of {total} lines with a missing value ({shown}).")
    return out


def read_jsonl(path: str | Path) -> list[Conversation]:
    """The conversations of a JSONL file (see the module docstring for what is dropped and what is an error)."""
    return [conv for _, conv in jsonl_conversations(path)]


def conversation(row, where: str) -> Conversation:
    """One JSON value as a checked conversation; raises ``ValueError`` (``where: ...``) or ``Missing``."""
    if isinstance(row, dict) and "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list):
            raise ValueError(f"{where}: 'messages' must be a list of {{'role', 'content'}}, got "
                             f"{type(msgs).__name__}.")
        conv = [_turn(m, k, where) for k, m in enumerate(msgs)]
    elif isinstance(row, dict) and "prompt" in row and "response" in row:
        conv = [{"role": "user", "content": _text(row["prompt"], "prompt", where)},
                {"role": "assistant", "content": _text(row["response"], "response", where)}]
    else:
        got = sorted(row) if isinstance(row, dict) else f"a JSON {type(row).__name__}"
        raise ValueError(f"{where}: expected keys 'prompt' and 'response', or 'messages' (a list of {{'role', "
                         f"'content'}} with at least one 'assistant' turn); got {got}.")
    roles = [m["role"] for m in conv]
    if "assistant" not in roles:
        raise ValueError(f"{where}: the conversation has no 'assistant' turn, so there is nothing to learn; add the "
                         "reply or remove the line.")
    if next(r for r in roles if r != "system") != "user":
        raise ValueError(f"{where}: the conversation starts with an 'assistant' turn; after any 'system' turns the "
                         "first turn must be the user's (add the user's message, or remove the line).")
    for k, m in enumerate(conv):
        if m["role"] == "assistant" and not m["content"].strip():
            raise Missing("response is empty" if "messages" not in row else f"messages[{k}] (assistant) is empty")
    return conv


def _turn(m, k: int, where: str) -> dict[str, str]:
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise ValueError(f"{where}: messages[{k}] must be an object with 'role' and 'content', got "
                         f"{sorted(m) if isinstance(m, dict) else type(m).__name__}.")
    role = m["role"]
    if role not in ROLES:
        hint = ROLE_HINTS.get(str(role).lower())
        raise ValueError(f"{where}: messages[{k}] has role {role!r}; roles must be 'system', 'user' or 'assistant'"
                         + (f" (did you mean {hint!r}?)." if hint else "."))
    return {"role": role, "content": _text(m["content"], f"messages[{k}].content", where)}


def _text(value, key: str, where: str) -> str:
    if value is None:
        raise Missing(f"{key} is null")
    if isinstance(value, float) and not math.isfinite(value):
        raise Missing(f"{key} is {value}")
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{where}: {key} must be text, got a JSON {type(value).__name__} ({json.dumps(value)[:40]}).")


def chatterbot_pairs() -> list[Conversation]:
    """Consecutive turns of every English chatterbot-corpus conversation as prompt/response pairs."""
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")  # located, not imported
    folder = Path(spec.submodule_search_locations[0]) / "data" / "english" if spec else None
    if folder is None or not folder.is_dir():
        raise ModuleNotFoundError(f"source='chatterbot' needs the chatterbot-corpus package:\n    {CHATTERBOT_PIP}")
    pairs = []
    for file in sorted(folder.glob("*.yml")):
        data = yaml.load(file.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        for conv in data.get("conversations") or []:
            turns = [str(t) for t in conv]  # some items are numbers
            pairs += [[{"role": "user", "content": a}, {"role": "assistant", "content": b}]
                      for a, b in zip(turns, turns[1:])]
    return pairs


def pydoc_text() -> list[str]:
    """The stdlib's pydoc topics (about 65k words of English prose), one document per topic, in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def read_text(path: str | Path) -> str:
    """A UTF-8 text file (a byte that is not UTF-8 raises ``ValueError`` naming ``path:line``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    return decode_utf8(path.read_bytes(), path)
