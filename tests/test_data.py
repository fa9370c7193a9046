"""Data modules: response-only masking checked against an independent tokenization, splits, packing, errors."""

import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_assets import make_tiny_model_dir
from transformers import AutoTokenizer

from lightning_lora.train.data import InstructionDataModule, TextDataModule, chatterbot_pairs

ROOT = Path(__file__).resolve().parents[1]
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
    for p, r in PAIRS:  # the template written out by hand: "<|role|>\n" + content + "<|end|>\n"; the loss covers
        # the reply and its end-of-turn token, not the newline after it (never generated: the model stops at <|end|>)
        prompt, response = enc(tok, f"<|user|>\n{p}<|end|>\n<|assistant|>\n"), enc(tok, f"{r}<|end|>")
        tail = enc(tok, "\n")
        expected.append((prompt + response + tail, [-100] * len(prompt) + response + [-100] * len(tail)))
    assert examples(dm) == sorted(expected)


def test_masking_multi_turn_messages(tiny_dir, tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."}]
    dm = InstructionDataModule(write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}]), tokenizer=tiny_dir,
                               val_fraction=0.0)
    dm.setup("fit")
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    parts = [("<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n", False), ("Hello.<|end|>", True),
             ("\n<|user|>\nBye<|end|>\n<|assistant|>\n", False), ("Goodbye.<|end|>", True), ("\n", False)]
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


# ------------------------------------------------------------------------------------- validation and test splits
def rows(n):
    return [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(n)]


def held_out(dm):
    return [{tuple(x["input_ids"].tolist()) for x in part} for part in (dm.train_set, dm.val_set, dm.test_set)]


def test_test_split_is_held_out_after_the_validation_split(tiny_dir, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows(40))
    plain = InstructionDataModule(path, tokenizer=tiny_dir, val_fraction=0.25)
    plain.setup("fit")
    dm = InstructionDataModule(path, tokenizer=tiny_dir, val_fraction=0.25, test_fraction=0.25)
    dm.setup("fit")
    train, val, test = held_out(dm)
    assert (len(train), len(val), len(test)) == (20, 10, 10) and not (train & val or train & test or val & test)
    assert val == held_out(plain)[1]  # adding a test split leaves the validation split as it was
    assert [len(b["input_ids"]) for b in dm.test_dataloader()] == [8, 2]
    with pytest.raises(ValueError, match=r"has no test split \(test_fraction 0\.0\)\. Set data test_fraction"):
        plain.test_dataloader()
    with pytest.raises(ValueError, match="leave examples to train on"):
        InstructionDataModule(path, val_fraction=0.5, test_fraction=0.5)


def test_a_small_validation_split_is_warned_about(tiny_dir, tmp_path, caplog):
    """A 12-line data set validates on 1 example: say so (before: nothing was said)."""
    with caplog.at_level(logging.WARNING, logger="lightning_lora.train.data"):
        InstructionDataModule(write_jsonl(tmp_path / "a.jsonl", rows(12)), tokenizer=tiny_dir).setup("fit")
    assert "The validation split holds only 1 of 12 examples (val_fraction 0.1): its loss and perplexity are noise" \
           in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lightning_lora.train.data"):
        InstructionDataModule(write_jsonl(tmp_path / "b.jsonl", rows(100)), tokenizer=tiny_dir).setup("fit")
    assert "split holds only" not in caplog.text


def test_a_checkpoint_is_not_scored_on_examples_it_trained_on(tiny_dir, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows(40))

    def split(**kw):
        dm = InstructionDataModule(path, tokenizer=tiny_dir, **{"val_fraction": 0.1, "test_fraction": 0.2, **kw})
        dm.setup("test")
        return dm

    saved = split().state_dict()
    for same_or_fewer in ({}, {"test_fraction": 0.0}, {"val_fraction": 0.2, "test_fraction": 0.1}):
        split(**same_or_fewer).load_state_dict(saved)
    for leaking in ({"test_fraction": 0.3}, {"seed": 1}, {"limit": 30}):
        with pytest.raises(ValueError, match=r"trained on this data with another split \(.* -> .*\), so these "
                                             r"validation or test examples include ones it trained on"):
            split(**leaking).load_state_dict(saved)
    other = InstructionDataModule(write_jsonl(tmp_path / "e.jsonl", rows(41)), tokenizer=tiny_dir, seed=1)
    other.setup("test")
    other.load_state_dict(saved)  # other data: its split owes nothing to the checkpoint's


def test_validate_and_test_a_run_with_its_config(tiny_dir, tmp_path, monkeypatch):
    """The README's commands: fit with a test split, then `validate` and `test` with the run's config.yaml."""
    from lightning_lora.commands.cli import make_cli

    monkeypatch.setattr("sys.argv", ["lightning_lora"])
    path = write_jsonl(tmp_path / "d.jsonl", rows(40))
    fit = make_cli(["fit", "--config", str(ROOT / "configs" / "own_data.yaml"), "--model.base_model", tiny_dir,
                    "--data.init_args.source", path, "--data.init_args.test_fraction", "0.25",
                    "--trainer.max_steps", "1", "--trainer.accelerator", "cpu", "--trainer.default_root_dir",
                    str(tmp_path / "run"), "--model.export_dir", "null", "--validate_before_fit", "false",
                    "--trainer.enable_progress_bar", "false"])  # fmt: skip
    run = tmp_path / "run" / "lightning_logs" / "version_0"
    again = ["--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]
    validate, test = make_cli(["validate", *again]), make_cli(["test", *again])
    metrics = [c.trainer.callback_metrics for c in (fit, validate, test)]
    assert float(metrics[1]["val_loss"]) == pytest.approx(float(metrics[0]["val_loss"]), abs=1e-5)  # same split
    assert len(test.datamodule.test_set) == 10 and torch.isfinite(metrics[2]["test_loss"])
    with pytest.raises(ValueError, match="include ones it trained on"):
        make_cli(["test", *again, "--data.init_args.test_fraction", "0.5"])
