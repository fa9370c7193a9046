"""New tokens and whole-module copies trained by LoRAModule, AdapterCallback and YAML: the tokenizer gets the tokens,
the embeddings grow, only the new rows (and the copy) train; checkpoints hold them and resume exactly; the exports
carry them (PEFT, with PEFT as the oracle; the merged folder; the merged GGUF with the new vocabulary; the offline
export from a checkpoint)."""

from __future__ import annotations

import functools
import sys

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from tiny_assets import make_tiny_model_dir
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

import lightning_lora as ll
from lightning_lora.io.checkpoint import load_for_export
from lightning_lora.train.module import LoRAModule

peft = pytest.importorskip("peft")
QUIET = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
NEW = ["<tool>", "</tool>"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama"))


def batches(ids: list[int], n: int = 3) -> list[dict]:
    """``n`` batches of random tokens with the new tokens' ids in every row (so their rows get gradients)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        rows = torch.randint(5, 300, (2, 10), generator=g)
        rows[:, 2], rows[:, 6] = ids[0], ids[1]
        out.append({"input_ids": rows, "attention_mask": torch.ones_like(rows), "labels": rows.clone()})
    return out


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


def module(tiny_dir, **kwargs) -> LoRAModule:
    return LoRAModule(tiny_dir, adapter=ll.LoRA(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
                      new_tokens=NEW, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2), **kwargs)  # fmt: skip


def test_fit_trains_the_new_rows_and_the_head_and_exports_them(tiny_dir, tmp_path):
    seed_everything(0)
    trained = module(tiny_dir, export_dir=str(tmp_path / "out"), exports=["peft", "merged", "gguf-merged:f16"])
    ids = trained.tokenizer.convert_tokens_to_ids(NEW)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    old_rows = base.model.embed_tokens.weight.shape[0]
    assert ids == [old_rows, old_rows + 1] and trained.tokenizer.tokenize("a<tool>b")[1] == "<tool>"
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    Trainer(max_steps=3, callbacks=[ckpt], **QUIET).fit(trained, DataLoader(batches(ids), batch_size=None))
    model = trained.model
    embedding = model.model.embed_tokens
    assert embedding.base_layer.weight.shape[0] == len(trained.tokenizer) == old_rows + 2
    assert torch.equal(embedding.base_layer.weight[:old_rows], base.model.embed_tokens.weight)  # old rows frozen
    new_start = base.model.embed_tokens.weight.mean(0)
    assert not torch.allclose(embedding.trained["default"].rows[0], new_start)  # the new rows trained
    assert not torch.equal(model.lm_head.trained["default"].copy.weight[:old_rows], base.lm_head.weight)

    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    assert {"model.model.embed_tokens.trained.default.rows", "model.lm_head.trained.default.copy.weight"} <= set(state)

    probe = torch.tensor([[5, ids[0], 40, ids[1], 7]])
    expected = logits(model, probe)
    out = tmp_path / "out"
    # PEFT's way: the tokenizer from the adapter folder, the base resized to it, then the adapter
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    theirs = AutoModelForCausalLM.from_pretrained(tiny_dir)
    theirs.resize_token_embeddings(len(tokenizer))
    theirs = peft.PeftModel.from_pretrained(theirs, out / "adapter")
    torch.testing.assert_close(logits(theirs, probe), expected, rtol=1e-5, atol=1e-5)
    card = (out / "adapter" / "README.md").read_text()
    assert "| trained copies (modules_to_save) | lm_head |" in card and "| trained token rows | 2 of model.embed_tokens |" in card
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert merged.config.vocab_size == old_rows + 2 and len(AutoTokenizer.from_pretrained(out / "merged")) == old_rows + 2
    torch.testing.assert_close(logits(merged, probe), expected, rtol=1e-5, atol=1e-5)

    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(out / "merged-f16.gguf")
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode() for i in field.data]
    assert len(tokens) == old_rows + 2 and tokens[ids[0]] == "<tool>" and tokens[ids[1]] == "</tool>"
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    rows = torch.from_numpy(embd.data.astype("float32")).reshape(-1, 64)
    torch.testing.assert_close(rows[ids], merged.model.embed_tokens.weight[ids].detach().half().float())

    again, _, _ = load_for_export(tmp_path / "ckpt" / "last.ckpt")  # offline: rebuilt from the checkpoint's facts
    torch.testing.assert_close(logits(again, probe), expected, rtol=0, atol=0)


def _run(tiny_dir, root, max_steps, ckpt_path=None):
    seed_everything(0)
    trained = module(tiny_dir)
    ids = trained.tokenizer.convert_tokens_to_ids(NEW)
    ckpt = ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=2, save_top_k=-1)
    Trainer(max_steps=max_steps, callbacks=[ckpt], **QUIET).fit(trained, DataLoader(batches(ids, 2), batch_size=None),
                                                                 ckpt_path=ckpt_path)  # fmt: skip
    return {k: v for k, v in trained.model.state_dict().items() if ".trained." in k}


def test_resume_restores_the_rows_and_the_copy_exactly(tiny_dir, tmp_path):
    full = _run(tiny_dir, tmp_path / "full", 4)
    _run(tiny_dir, tmp_path / "part", 2)
    resumed = _run(tiny_dir, tmp_path / "resumed", 4, ckpt_path=tmp_path / "part" / "step=2.ckpt")
    assert full.keys() == resumed.keys() and len(full) == 2
    assert all(torch.equal(full[k], resumed[k]) for k in full)


class HFModule(LightningModule):
    """A user's own module: a Hugging Face model and its tokenizer."""

    def __init__(self, tiny_dir):
        super().__init__()
        self.model = AutoModelForCausalLM.from_pretrained(tiny_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(tiny_dir)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def test_adapter_callback_trains_them_too(tiny_dir, tmp_path):
    seed_everything(0)
    user = HFModule(tiny_dir)
    old_rows = len(user.tokenizer)
    callback = ll.AdapterCallback(ll.LoRA(r=4, target_modules=["q_proj"], bias="all"), target="model", new_tokens=NEW,
                                  export_dir=str(tmp_path / "out"), exports=["peft"])  # fmt: skip
    ids = list(range(old_rows, old_rows + 2))
    Trainer(max_steps=2, enable_checkpointing=False, callbacks=[callback], **QUIET).fit(
        user, DataLoader(batches(ids, 2), batch_size=None))
    assert user.tokenizer.convert_tokens_to_ids(NEW) == ids
    rows = ll.core.verbs.trained_map(user.model, "default")
    assert rows["model.embed_tokens"].indices.tolist() == ids and rows["lm_head"].indices.tolist() == ids  # untied
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out" / "adapter")
    theirs = AutoModelForCausalLM.from_pretrained(tiny_dir)
    theirs.resize_token_embeddings(len(tokenizer))
    theirs = peft.PeftModel.from_pretrained(theirs, tmp_path / "out" / "adapter")
    probe = torch.tensor([[5, ids[0], 40, ids[1], 7]])
    torch.testing.assert_close(logits(theirs, probe), logits(user.model, probe), rtol=1e-5, atol=1e-5)


def test_yaml_takes_them(monkeypatch, tmp_path):
    from lightning_lora.commands.cli import make_cli
    from test_cli import ROOT

    monkeypatch.setattr(sys, "argv", ["lightning_lora"])
    cli = make_cli(["fit", "--config", str(ROOT / "configs" / "lora.yaml"), "--model.new_tokens", "[<tool>, </tool>]",
                    "--model.adapter.init_args.modules_to_save", "[lm_head]", "--model.adapter.init_args.bias", "all",
                    "--trainer.default_root_dir", str(tmp_path)], run=False)  # fmt: skip
    assert cli.model.new_tokens == NEW
    assert cli.model.adapter.modules_to_save == ["lm_head"] and cli.model.adapter.bias == "all"


def test_a_tied_head_follows_the_new_rows(tmp_path):
    folder = make_tiny_model_dir(tmp_path / "tied", tie_word_embeddings=True)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    adapter = ll.io.tokens.add_new_tokens(model, tokenizer, ll.LoRA(r=4, target_modules=["q_proj"]), NEW)
    assert adapter.trainable_token_indices == tokenizer.convert_tokens_to_ids(NEW)  # a list: the head follows
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ll.inject(model, adapter)
    assert model.lm_head.trained["default"].rows is model.model.embed_tokens.trained["default"].rows
    with pytest.raises(ValueError, match="new_tokens must be a list of distinct"):
        LoRAModule(str(folder), new_tokens="<tool>")
    with pytest.raises(ValueError, match="leave the adapter's trainable_token_indices unset"):
        LoRAModule(str(folder), adapter=ll.LoRA(trainable_token_indices=[3]), new_tokens=NEW)


def test_a_llama_cpp_adapter_cannot_hold_them(tiny_dir, tmp_path):
    from lightning_lora.io.export import export

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    ll.inject(model, ll.LoRA(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match=r"exports 'gguf': adapter 'default' also trains a copy of 'lm_head'.*"
                                         "export 'gguf-merged' instead"):  # fmt: skip
        export(model, tmp_path / "out", exports=["peft", "gguf"])
    assert not (tmp_path / "out").exists()


def test_generate_and_evaluate_use_the_tokenizer_saved_with_the_adapter(tiny_dir, tmp_path):
    """Before: generate/evaluate loaded the base's tokenizer and embeddings, and the adapter's token rows past them
    were refused. Now they take the grown tokenizer from the adapter folder; the oracle is the merged export (its own
    folder, tokenizer and vocabulary)."""
    import json

    from lightning_lora.commands.generate import main as generate
    from lightning_lora.train.evaluate import evaluate_adapters

    seed_everything(0)
    trained = module(tiny_dir, export_dir=str(tmp_path / "out"), exports=["peft", "merged"])
    ids = trained.tokenizer.convert_tokens_to_ids(NEW)
    Trainer(max_steps=3, enable_checkpointing=False, **QUIET).fit(trained, DataLoader(batches(ids), batch_size=None))
    adapter, merged = tmp_path / "out" / "adapter", tmp_path / "out" / "merged"
    prompt = ["--prompt", "a <tool> b </tool>", "--max_new_tokens", "5", "--no_chat"]
    ours = generate(["generate", "--base_model", tiny_dir, "--adapter", str(adapter), *prompt])
    tokenizer, oracle = AutoTokenizer.from_pretrained(merged), AutoModelForCausalLM.from_pretrained(merged).eval()
    prompt_ids = tokenizer("a <tool> b </tool>", return_tensors="pt").input_ids
    assert prompt_ids.eq(ids[0]).any()  # the new token is one token, as in training
    reply = oracle.generate(prompt_ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert list(ours.values()) == [tokenizer.decode(reply[0, prompt_ids.shape[1]:], skip_special_tokens=True).strip()]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i} <tool>", "response": f"a <tool> {i} </tool>"}) + "\n"
                            for i in range(3)))
    with_adapter = evaluate_adapters(tiny_dir, {"tools": str(adapter)}, str(data), max_new_tokens=2)
    of_merged = evaluate_adapters(str(merged), {}, str(data), max_new_tokens=2)
    assert with_adapter["variants"]["tools"]["loss"] == pytest.approx(of_merged["variants"]["base"]["loss"], rel=1e-5)
