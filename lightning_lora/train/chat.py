"""Conversations as token ids and labels: the loss covers exactly what the model generates, in any chat template.

``render`` gives a conversation's text and the character spans of its assistant turns. With a chat template, a
turn's span is found in three renderings:

1. the reply: the conversation is rendered again with that turn's content replaced by a sentinel (``SENTINEL``,
   private-use characters that no template adds or strips); where the two texts differ is the reply as the
   template writes it (after its ``trim``, its reasoning split, ...);
2. the start: if the conversation up to that turn, rendered with the generation prompt, is a prefix of the text,
   the span starts where that prompt ends: what a template writes between its prompt and the reply is generated
   by the model too (Mistral's space after ``[/INST]``, gpt-oss' ``<|channel|>final<|message|>``, Qwen3's
   ``<think></think>`` block); else it starts at the reply;
3. the end: over whitespace to the end of the first special token after the reply, the end-of-turn token the model
   must learn to emit (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``<|end|>``, ``</s>``, gpt-oss'
   ``<|return|>`` on the last turn), and no further: the newline after it, Phi-3.5's closing eos and the next turn's
   markup are never generated. A token that opens turns (it is in the generation prompt) is not an end; a
   template with no end-of-turn token gets a warning (the model would not learn to stop).

Rendering prefix by prefix alone breaks on templates that place the system prompt late (Mistral), end a
conversation with an extra eos (Phi-3.5) or render the last assistant turn differently (Qwen3, gpt-oss); this
needs only that a template renders the same conversation the same way twice. Templates that refuse a conversation
(Gemma has no system role) or drop a turn's text (Mistral Nemo keeps the system prompt only when the last turn is
the user's) give a one-line error naming the conversation (``file:line``) and the model.

Without a chat template the text is ``prompt\\nresponse<eos>\\n`` and the loss covers ``response<eos>``.
"""

from __future__ import annotations

import logging

import torch

from lightning_lora.train.conversations import Conversation

log = logging.getLogger(__name__)
IGNORE = -100
SENTINEL = "\ue000\ue001"
_warned: set[str] = set()


def render(tokenizer, conv: Conversation, where: str = "a conversation",
           specials: tuple[list[str], set[str]] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text and the character spans of its assistant turns (the loss targets).

    ``where`` names the conversation in errors; ``specials`` is ``_special_tokens(tokenizer)``, computed once per
    tokenizer by ``tokenize_conversations``.
    """
    if not getattr(tokenizer, "chat_template", None):
        return _render_plain(tokenizer, conv)
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    text = _apply(tokenizer, conv, where, name)
    for m in conv:
        if m["role"] != "assistant" and m["content"].strip() and m["content"].strip() not in text:
            raise ValueError(f"{where}: the chat template of {name} leaves out this conversation's {m['role']} text "
                             f"({m['content'].strip()[:40]!r}); remove that turn or fold it into a user turn.")
    specials = specials or _special_tokens(tokenizer)
    return text, [_assistant_span(tokenizer, conv, i, text, where, name, specials)
                  for i, m in enumerate(conv) if m["role"] == "assistant"]


def _assistant_span(tokenizer, conv: Conversation, i: int, text: str, where: str, name: str,
                    specials: tuple[list[str], set[str]]) -> tuple[int, int]:
    """Characters of ``text`` the model generates for assistant turn ``i`` (see the module docstring)."""
    probe = _apply(tokenizer, [*conv[:i], {"role": "assistant", "content": SENTINEL}, *conv[i + 1:]], where, name)
    start = _common_prefix(text, probe)
    end = len(text) - _common_prefix(text[start:][::-1], probe[start:][::-1])
    if SENTINEL not in probe[start: len(probe) - (len(text) - end)]:
        raise ValueError(f"{where}: cannot locate assistant turn {i} in the text that the chat template of {name} "
                         "renders (the template changes more than that turn's content).")
    try:  # what the template writes between its generation prompt and the reply is generated too
        prompt = _apply(tokenizer, conv[:i], where, name, generation=True) if i else None
    except ValueError:
        prompt = None
    if prompt is not None and len(prompt) <= start and text.startswith(prompt):
        start = len(prompt)
    return start, _end_of_turn(text, end, specials, name)


def tokenize_conversations(tokenizer, convs: list[Conversation], max_length: int,
                           origins: list[str] | None = None) -> list[dict[str, torch.Tensor]]:
    """input_ids/labels per conversation; longer ones are truncated (counted and logged).

    A token is labeled when it overlaps an assistant span (so a token that merges the template's space with the
    reply's first word, as SentencePiece does after ``[/INST]``, is one the model must produce). ``origins`` name the
    conversations in errors (``file:line``).
    """
    if not convs:
        return []
    origins = origins or [f"conversation {i}" for i in range(len(convs))]
    specials = _special_tokens(tokenizer) if getattr(tokenizer, "chat_template", None) else None
    rendered = [render(tokenizer, c, w, specials) for c, w in zip(convs, origins)]
    enc = tokenizer([t for t, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    examples, truncated, dropped = [], 0, 0
    for (_, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
        labels = [t if any(a < e and max(b, a + 1) > s for s, e in spans) else IGNORE
                  for t, (a, b) in zip(ids, offsets)]
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(x == IGNORE for x in labels):
            dropped += 1  # nothing to learn from: the prompt fills max_length
            continue
        examples.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)})
    if truncated or dropped:
        log.warning(f"{truncated} of {len(convs)} examples were longer than max_length={max_length} and were "
                    f"truncated; {dropped} examples kept no response token and were dropped.")
    return examples


def _render_plain(tokenizer, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
    eos, bos = tokenizer.eos_token or "", tokenizer.bos_token or ""
    text, spans = (bos if bos != eos else ""), []
    for m in conv:
        if m["role"] == "assistant":
            spans.append((len(text), len(text) + len(m["content"]) + len(eos)))
            text += m["content"] + eos + "\n"
        else:
            text += m["content"] + "\n"
    return text, spans


def _apply(tokenizer, msgs: Conversation, where: str, name: str, generation: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation)
    except Exception as err:  # the template's raise_exception (TemplateError), or its own TypeError/KeyError
        raise ValueError(f"{where}: the chat template of {name} refuses this conversation: {err}") from None


def _special_tokens(tokenizer) -> tuple[list[str], set[str]]:
    """The tokenizer's special tokens, longest first, and those that open a turn (in the generation prompt)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials = {t.content for t in added.values() if getattr(t, "special", False)} | set(tokenizer.all_special_tokens)
    specials = sorted((s for s in specials if s and s.strip()), key=len, reverse=True)
    user = [{"role": "user", "content": SENTINEL}]
    try:
        with_prompt, without = (tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=g)
                                for g in (True, False))
    except Exception:  # noqa: BLE001 - a template that refuses this probe: no openers known
        return specials, set()
    opening = with_prompt[_common_prefix(with_prompt, without):]
    return specials, {s for s in specials if s in opening}


def _end_of_turn(text: str, end: int, specials: tuple[list[str], set[str]], name: str) -> int:
    """The end of the end-of-turn token after the content ending at ``end`` (only whitespace between)."""
    tokens, openers = specials
    j = end
    while j < len(text) and text[j].isspace():
        j += 1
    for tok in tokens:
        if text.startswith(tok, j):
            if tok not in openers:
                return j + len(tok)
            break
    if name not in _warned:
        _warned.add(name)
        log.warning(f"The chat template of {name} puts no end-of-turn token after the assistant's reply "
                    f"({text[end:end + 20]!r} follows it): the labels cover the reply only, and the model will not "
                    "learn where to stop.")
    return end


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of ``a`` and ``b`` (binary search over C-speed slice compares)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
