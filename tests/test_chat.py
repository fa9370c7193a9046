"""Chat templates of every family label exactly the assistant's tokens (``train/chat.py``).

Each ``tests/chat_templates/<family>.json`` holds a model's real chat template (its source named in the file), its
special tokens, and the expected text of two conversations written out by hand, with ``[[...]]`` around what the
loss must cover: the reply and its end-of-turn token, as the template writes them; never the header before the
reply, the newline after the end-of-turn token, or the next turn's markup. A family is one more file, no new code.
The tokenizer is the tests' offline byte-level BPE plus the family's special tokens.
"""

import json
import re
from datetime import datetime
from pathlib import Path

import pytest
from tiny_assets import make_tiny_tokenizer

from lightning_lora.train.chat import IGNORE, render, tokenize_conversations
from lightning_lora.train.data import InstructionDataModule

FIXTURES = sorted((Path(__file__).parent / "chat_templates").glob("*.json"))
TURNS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]
CONVERSATIONS = {"with_system": [{"role": "system", "content": "Be brief."}, *TURNS], "without_system": TURNS}


def family_tokenizer(fixture: dict):
    tok = make_tiny_tokenizer(chat_template=False)
    specials = {k: fixture[k] for k in ("bos_token", "eos_token") if fixture[k]}
    tok.add_special_tokens({**specials, "additional_special_tokens": fixture["special_tokens"]})
    tok.chat_template, tok.name_or_path = fixture["chat_template"], fixture["model"]
    return tok


def labeled_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    runs, previous = [], False
    for t, label in zip(ids, labels):
        if label != IGNORE:
            runs[-1:] = [runs[-1] + [t]] if previous else [*runs[-1:], [t]]
        previous = label != IGNORE
    return runs


def test_every_fixture_names_its_model_and_source():
    assert len(FIXTURES) >= 10
    for path in FIXTURES:
        fixture = json.loads(path.read_text())
        assert fixture["model"] and fixture["source"] and fixture["chat_template"], path.name


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_labels_are_the_assistant_tokens(path):
    fixture = json.loads(path.read_text())
    tok = family_tokenizer(fixture)
    for case, conv in CONVERSATIONS.items():
        expected = fixture["expected"][case]
        if isinstance(expected, dict):  # the template refuses or loses part of this conversation: a clear error
            with pytest.raises(ValueError, match=rf"^d\.jsonl:7: the chat template of {fixture['model']} .*"
                                                 + re.escape(expected["error"])):
                tokenize_conversations(tok, [conv], 4096, ["d.jsonl:7"])
            continue
        expected = expected.replace("{today}", datetime.now().strftime("%Y-%m-%d"))
        (example,) = tokenize_conversations(tok, [conv], 4096)
        ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
        assert tok.decode(ids, clean_up_tokenization_spaces=False) == expected.replace("[[", "").replace("]]", "")
        assert all(label in (IGNORE, t) for t, label in zip(ids, labels))
        got = [tok.decode(run, clean_up_tokenization_spaces=False) for run in labeled_runs(ids, labels)]
        assert got == re.findall(r"\[\[(.*?)\]\]", expected, re.S), case


def test_reply_text_the_template_reshapes():
    """Gemma trims the reply; Qwen3 splits off its reasoning: the span is what the model writes, as templated."""
    gemma = family_tokenizer(json.loads((FIXTURES[0].parent / "gemma3.json").read_text()))
    text, spans = render(gemma, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Hello.\n"}])
    assert [text[s:e] for s, e in spans] == ["Hello.<end_of_turn>"]
    qwen3 = family_tokenizer(json.loads((FIXTURES[0].parent / "qwen3.json").read_text()))
    reply = "<think>\nTwo and two.\n</think>\n\nFour."
    text, spans = render(qwen3, [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": reply}])
    assert [text[s:e] for s, e in spans] == ["<think>\nTwo and two.\n</think>\n\nFour.<|im_end|>"]


def test_template_errors_name_the_line_through_the_data_module(tmp_path):
    gemma2 = family_tokenizer(json.loads((FIXTURES[0].parent / "gemma2.json").read_text()))
    rows = [{"prompt": "Hi", "response": "Hello."},
            {"messages": [{"role": "system", "content": "Be brief."}, *TURNS]}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = InstructionDataModule(str(path), tokenizer=gemma2, val_fraction=0.0)
    with pytest.raises(ValueError, match=r"d\.jsonl:2: the chat template of google/gemma-2-2b-it refuses this "
                                         r"conversation: System role not supported"):
        dm.setup("fit")


def test_a_template_without_an_end_of_turn_token_is_warned_about(caplog):
    tok = make_tiny_tokenizer(chat_template=False)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
                        "{% if add_generation_prompt %}assistant: {% endif %}"
    tok.name_or_path = "plain-chat"
    with caplog.at_level("WARNING", logger="lightning_lora.train.chat"):
        text, spans = render(tok, TURNS[:2])
    assert [text[s:e] for s, e in spans] == ["Hello."]
    assert "plain-chat puts no end-of-turn token" in caplog.text
