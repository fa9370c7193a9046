"""Data is checked where it is read (``train/conversations.py``): ``file:line`` errors, or drops that are counted."""

import json
import logging

import pytest
from tiny_assets import make_tiny_tokenizer

from lightning_lora.train.conversations import jsonl_conversations, read_jsonl
from lightning_lora.train.data import InstructionDataModule, TextDataModule
from lightning_lora.train.preference import read_pairs

GOOD = {"prompt": "Hi", "response": "Hello."}


def write(tmp_path, rows, name="d.jsonl") -> str:
    path = tmp_path / name
    path.write_bytes(b"".join((r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode())
                              + b"\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(("row", "match"), [
    ({"prompt": "Hi", "response": True}, r"d\.jsonl:2: response must be text, got a JSON bool"),
    ({"prompt": ["Hi"], "response": "x"}, r"d\.jsonl:2: prompt must be text, got a JSON list"),
    ({"messages": [{"role": "user", "content": {"text": "Hi"}}, {"role": "assistant", "content": "x"}]},
     r"d\.jsonl:2: messages\[0\]\.content must be text, got a JSON dict"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "wizard", "content": "x"}]},
     r"d\.jsonl:2: messages\[1\] has role 'wizard'; roles must be 'system', 'user' or 'assistant'\.$"),
    ({"messages": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "x"}]},
     r"d\.jsonl:2: messages\[0\] has role 'human'.*did you mean 'user'\?"),
    ({"messages": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "Hello!"},
                   {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}]},
     r"d\.jsonl:2: the conversation starts with an 'assistant' turn"),
    ({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]},
     r"d\.jsonl:2: the conversation has no 'assistant' turn"),
    ({"messages": []}, r"d\.jsonl:2: the conversation has no 'assistant' turn"),
    ({"messages": "Hi"}, r"d\.jsonl:2: 'messages' must be a list"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
     r"d\.jsonl:2: messages\[0\] must be an object with 'role' and 'content', got \['role'\]"),
    (["Hi", "Hello."], r"d\.jsonl:2: expected keys 'prompt' and 'response'.*got a JSON list"),
    ({"prompt": "Hi"}, r"d\.jsonl:2: expected keys 'prompt' and 'response'.*got \['prompt'\]"),
])
def test_malformed_lines_are_errors_naming_file_and_line(tmp_path, row, match):
    with pytest.raises(ValueError, match=match):
        read_jsonl(write(tmp_path, [GOOD, row]))


def test_missing_values_are_dropped_and_counted(tmp_path, caplog):
    rows = [GOOD, {"prompt": "a", "response": None}, '{"prompt": "b", "response": NaN}',
            {"prompt": "c", "response": ""},
            {"prompt": None, "response": "d"}, {"prompt": "2+2?", "response": 4},
            {"messages": [{"role": "user", "content": "e"}, {"role": "assistant", "content": None}]}]
    with caplog.at_level(logging.WARNING, logger="lightning_lora.train.conversations"):
        got = jsonl_conversations(write(tmp_path, rows))
    assert [w.rsplit(":", 1)[1] for w, _ in got] == ["1", "6"]
    assert got[1][1] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert "dropped 5 of 7 lines with a missing value (line 2: response is null; line 3: response is nan; " \
           "line 4: response is empty; ...)" in caplog.text
    with pytest.raises(ValueError, match=r"d\.jsonl: all 2 lines have a missing value \(line 1: response is null"):
        read_jsonl(write(tmp_path, rows[1:3]))


def test_response_null_no_longer_trains_on_the_text_none(tmp_path):
    """Before: ``"response": null`` became the reply "None"; now the line is dropped and nothing says None."""
    tok = make_tiny_tokenizer()
    dm = InstructionDataModule(write(tmp_path, [GOOD, {"prompt": "a", "response": None}]), tokenizer=tok,
                               val_fraction=0.0)
    dm.setup("fit")
    assert len(dm.train_set) == 1 and "None" not in tok.decode(dm.train_set[0]["input_ids"])


def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path):
    path = write(tmp_path, [GOOD, GOOD, b'{"prompt": "caf\xe9", "response": "x"}'])
    with pytest.raises(ValueError, match=r"d\.jsonl:3: not UTF-8 \(byte 0xe9 at byte 16 of the line\)\. Save the "
                                         r"file as UTF-8"):
        read_jsonl(path)
    (tmp_path / "t.txt").write_bytes(b"plain text\nmore\nna\xefve\n")
    with pytest.raises(ValueError, match=r"t\.txt:3: not UTF-8 \(byte 0xef"):
        TextDataModule(str(tmp_path / "t.txt"), tokenizer=make_tiny_tokenizer(), block_size=4).setup("fit")
    pair = {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go."}
    with pytest.raises(ValueError, match=r"p\.jsonl:2: not UTF-8 \(byte 0xe9"):
        read_pairs(write(tmp_path, [pair, b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}'], "p.jsonl"))


def test_a_byte_order_mark_and_windows_line_ends_are_read(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n" + json.dumps(GOOD).encode() + b"\r\n")
    assert read_jsonl(path) == [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]] * 2
