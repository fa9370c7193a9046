"""Data modules: response-only masking checked against an independent tokenization, splits, packing, errors."""

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from tiny_assets import make_tiny_model_dir
from transformers import AutoTokenizer

from lightning_lora.train.data import InstructionDataModule, TextDataModule, chatterbot_pairs

PAIRS = [("Hello there, how are you?", "Fine, thank you."), ("What is 2 + 2?", "It is 4."),
         ("Name a colour.", "Blue"), ("Say nothing", "...")]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama"))


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("plain") / "gpt2", arch="gpt2", chat_template=False))


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def examples(dm):
    return sorted((b["input_ids"].tolist(), b["labels"].tolist()) for b in dm.train_set + dm.val_set)


def test_masking_with_chat_template(tiny_dir, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "response": r} for p, r in PAIRS])
    dm = InstructionDataModule(path, tokenizer=tiny_dir, val_fraction=0.0)
    dm.setup("fit")
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    expected = []
    for p, r in PAIRS:  # the template written out by hand: "<|role|>\n" + content + "<|end|>\n"
        prompt, response = enc(tok, f"<|user|>\n{p}<|end|>\n<|assistant|>\n"), enc(tok, f"{r}<|end|>\n")
        expected.append((prompt + response, [-100] * len(prompt) + response))
    assert examples(dm) == sorted(expected)


def test_masking_multi_turn_messages(tiny_dir, tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."}]
    dm = InstructionDataModule(write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}]), tokenizer=tiny_dir,
                               val_fraction=0.0)
    dm.setup("fit")
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    parts = [("<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n", False), ("Hello.<|end|>\n", True),
             ("<|user|>\nBye<|end|>\n<|assistant|>\n", False), ("Goodbye.<|end|>\n", True)]
    ids = [enc(tok, t) for t, _ in parts]
    labels = [x if train else [-100] * len(x) for x, (_, train) in zip(ids, parts)]
    assert examples(dm) == [(sum(ids, []), sum(labels, []))]


def test_masking_plain_format_without_template(plain_dir, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "response": r} for p, r in PAIRS])
    dm = InstructionDataModule(path, tokenizer=plain_dir, val_fraction=0.0)
    dm.setup("fit")
    tok = AutoTokenizer.from_pretrained(plain_dir)
    assert not tok.chat_template
    expected = []
    for p, r in PAIRS:  # "prompt\n" + "response<eos>" + "\n", loss on "response<eos>"
        prompt, response, tail = enc(tok, p + "\n"), enc(tok, r) + [tok.eos_token_id], enc(tok, "\n")
        expected.append((prompt + response + tail, [-100] * len(prompt) + response + [-100] * len(tail)))
    assert examples(dm) == sorted(expected)


def test_batches_are_padded_dicts(tiny_dir, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "response": r} for p, r in PAIRS])
    dm = InstructionDataModule(path, tokenizer=tiny_dir, val_fraction=0.0, batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    lengths = sorted(len(ids) for ids, _ in examples(dm))
    assert sorted(batch["attention_mask"].sum(1).tolist()) == lengths
    assert batch["input_ids"].shape == (4, lengths[-1])
    pad = batch["attention_mask"] == 0
    assert pad.any()
    assert (batch["labels"][pad] == -100).all() and (batch["input_ids"][pad] == dm.tokenizer.pad_token_id).all()


def test_split_sizes_are_deterministic(tiny_dir, tmp_path):
    rows = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)

    def split(seed, **kw):
        dm = InstructionDataModule(path, tokenizer=tiny_dir, val_fraction=0.25, seed=seed, **kw)
        dm.setup("fit")
        return tuple({tuple(x["input_ids"].tolist()) for x in part} for part in (dm.train_set, dm.val_set))

    train, val = split(0)
    assert (len(train), len(val)) == (15, 5) and not train & val
    assert split(0) == (train, val)
    assert split(1)[1] != val and split(1)[0] | split(1)[1] == train | val
    assert [len(s) for s in split(0, limit=8)] == [6, 2]


def test_chatterbot_pairs():
    pairs = chatterbot_pairs()
    assert len(pairs) > 2000
    assert all(isinstance(m["content"], str) for conv in pairs for m in conv)
    assert [m["role"] for m in pairs[0]] == ["user", "assistant"]


def test_chatterbot_source_with_limit(tiny_dir):
    dm = InstructionDataModule(tokenizer=tiny_dir, limit=40, val_fraction=0.1, max_length=512)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (36, 4)
    assert all((x["labels"] != -100).any() for x in dm.train_set)


def test_tokenizer_comes_from_the_lightning_module(tiny_dir, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "response": r} for p, r in PAIRS])
    dm = InstructionDataModule(path)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        dm.setup("fit")
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=tok))
    dm.setup("fit")
    assert dm.tokenizer is tok and len(dm.train_set) + len(dm.val_set) == len(PAIRS)


@pytest.mark.parametrize(("rows", "match"), [
    (['{"prompt": "a", "response": "b"}', '{"prompt": "a", "response": "b"}', '{"prompt": "a", '], r"d\.jsonl:3: not"),
    ([{"prompt": "a", "response": "b"}, {"question": "a", "answer": "b"}], r"d\.jsonl:2: expected .*'question'"),
    ([{"messages": [{"role": "user", "content": "no reply"}]}], r"d\.jsonl:1: .*assistant"),
    ([], "empty"),
])
def test_bad_jsonl(tiny_dir, tmp_path, rows, match):
    dm = InstructionDataModule(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer=tiny_dir)
    with pytest.raises(ValueError, match=match):
        dm.setup("fit")


def test_unknown_source_and_bad_arguments():
    with pytest.raises(ValueError, match="Unknown source 'wiki'.*chatterbot"):
        InstructionDataModule(source="wiki")
    with pytest.raises(ValueError, match="Unknown source 'chatterbot'.*pydoc"):
        TextDataModule(source="chatterbot")
    with pytest.raises(ValueError, match="val_fraction"):
        InstructionDataModule(val_fraction=1.0)


def test_long_examples_are_truncated_and_counted(tiny_dir, tmp_path, caplog):
    rows = [{"prompt": "hi", "response": "word " * 200}, {"prompt": "hi", "response": "ok"},
            {"prompt": "long " * 200, "response": "lost"}]
    dm = InstructionDataModule(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer=tiny_dir, max_length=32,
                               val_fraction=0.0)
    with caplog.at_level(logging.WARNING, logger="lightning_lora.train.data"):
        dm.setup("fit")
    assert "2 of 3 examples were longer than max_length=32" in caplog.text and "1 examples kept no" in caplog.text
    assert sorted(len(x["input_ids"]) for x in dm.train_set)[-1] == 32 and len(dm.train_set) == 2


def test_text_blocks_from_pydoc(tiny_dir):
    from pydoc_data.topics import topics

    dm = TextDataModule(tokenizer=tiny_dir, block_size=64, val_fraction=0.1)
    dm.setup("fit")
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    stream = [t for k in sorted(topics) for t in enc(tok, topics[k]) + [tok.eos_token_id]]
    blocks = [tuple(stream[i:i + 64]) for i in range(0, len(stream) - 63, 64)]
    got = dm.train_set + dm.val_set
    assert sorted(tuple(b["input_ids"].tolist()) for b in got) == sorted(blocks)
    assert all(torch.equal(b["input_ids"], b["labels"]) for b in got)
    assert len(dm.val_set) == round(len(blocks) * 0.1)


def test_text_file_and_empty_text(tiny_dir, tmp_path):
    (tmp_path / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    dm = TextDataModule(str(tmp_path / "a.txt"), tokenizer=tiny_dir, block_size=16, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 16) and batch["attention_mask"].all()
    (tmp_path / "b.txt").write_text("too short")
    with pytest.raises(ValueError, match="empty"):
        TextDataModule(str(tmp_path / "b.txt"), tokenizer=tiny_dir, block_size=16).setup("fit")


def test_fit_step_with_a_module_that_has_a_tokenizer(tiny_dir, tmp_path):
    """The data module feeds a Hugging Face model in a real Trainer; the tokenizer is taken at setup."""
    import lightning.pytorch as pl
    from transformers import AutoModelForCausalLM

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = AutoModelForCausalLM.from_pretrained(tiny_dir).train()
            self.tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
            self.losses = []

        def training_step(self, batch, _):
            loss = self.model(**batch).loss
            self.losses.append(loss.item())
            return loss

        def validation_step(self, batch, _):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "response": r} for p, r in PAIRS * 3])
    trainer = pl.Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    module = Module()
    trainer.fit(module, InstructionDataModule(path, batch_size=2))
    assert len(module.losses) == 2 and all(torch.isfinite(torch.tensor(module.losses)))
