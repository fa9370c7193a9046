"""evaluate: metrics against hand-computed values, loss against Hugging Face's, variants, reports, the command, and
lm-evaluation-harness through a stub (the real harness is not installed here)."""

import json
import math
import sys
import types
from collections import Counter

import pytest
import torch
from tiny_assets import make_tiny_model_dir
from tiny_models import perturb_adapters

import lightning_lora as ll
from lightning_lora.io.models import load_causal_lm
from lightning_lora.train.data import collate, tokenize_conversations
from lightning_lora.train.eval_report import report_markdown, write_report
from lightning_lora.train.evaluate import evaluate_model, greedy_replies, lm_eval_tasks, response_loss, split_example
from lightning_lora.train.text_metrics import chrf, exact_match, rouge_l

CONVS = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in [
    ("What is the capital of Norway?", "Oslo."), ("Name a colour.", "Blue is a colour."),
    ("Say hello.", "Hello there, friend."), ("Count to three.", "One, two, three.")]]


def _chrf_by_hand(hyps, refs, n_max=6, beta=2.0):
    """Popovic's chrF from its definition: corpus counts per order, F_beta per order, mean over orders."""
    f = []
    for n in range(1, n_max + 1):
        match = hyp_n = ref_n = 0
        for h, r in zip(hyps, refs):
            h, r = h.replace(" ", ""), r.replace(" ", "")
            hc = Counter(h[i : i + n] for i in range(len(h) - n + 1))
            rc = Counter(r[i : i + n] for i in range(len(r) - n + 1))
            match += sum((hc & rc).values())
            hyp_n, ref_n = hyp_n + sum(hc.values()), ref_n + sum(rc.values())
        p, r = (match / hyp_n if hyp_n else 0.0), (match / ref_n if ref_n else 0.0)
        f.append((1 + beta**2) * p * r / (beta**2 * p + r) if p + r else 0.0)
    return 100 * sum(f) / n_max


def test_metrics_equal_hand_computed_values():
    assert exact_match(["Oslo", " a  b "], ["Oslo ", "a c"]) == 0.5
    # LCS("the cat sat", "the cat sat on") = 3 words: P = 1, R = 3/4, F1 = 6/7
    assert rouge_l(["the cat sat"], ["the cat sat on"]) == pytest.approx(6 / 7, abs=1e-6)
    # LCS("a b c d", "a c d e") = 3: P = R = F1 = 3/4; mean with a disjoint pair (0)
    assert rouge_l(["a b c d", "x"], ["a c d e", "y"]) == pytest.approx(0.375, abs=1e-6)
    # "abc" vs "abd": 1-grams 2/3 and 2/3, 2-grams 1/2 and 1/2, no longer match: (2/3 + 1/2) / 6 = 7/36
    assert chrf(["abc"], ["abd"]) == pytest.approx(100 * 7 / 36, abs=1e-4)
    hyps, refs = ["Hello there friend", "Oslo is big"], ["Hello, my friend", "It is Oslo"]
    assert chrf(hyps, refs) == pytest.approx(_chrf_by_hand(hyps, refs), abs=1e-3)
    assert chrf(["same text"], ["same text"]) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="as many replies"):
        exact_match(["a"], [])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny_model_dir(tmp_path_factory.mktemp("evalmodel"))
    model, tok = load_causal_lm(str(folder))
    return folder, model, tok, tokenize_conversations(tok, CONVS, 64)


def test_split_example_and_response_loss_match_hugging_face(tiny):
    _, model, tok, examples = tiny
    prompt, reference = split_example(examples[0])
    assert tok.decode(reference, skip_special_tokens=True).strip() == "Oslo."
    assert tok.decode(prompt).endswith("<|assistant|>\n")
    loss, tokens = response_loss(model, examples, tok.pad_token_id, batch_size=3)
    total = count = 0.0
    for e in examples:  # oracle: Hugging Face's own loss, one example at a time, weighted by its predicted tokens
        n = int((e["labels"][1:] != -100).sum())
        with torch.no_grad():
            total += float(model(input_ids=e["input_ids"][None], labels=e["labels"][None]).loss) * n
        count += n
    assert tokens == count
    assert loss == pytest.approx(total / count, rel=1e-5)


def test_batched_greedy_replies_equal_one_by_one_generation(tiny):
    _, model, tok, examples = tiny
    prompts = [split_example(e)[0] for e in examples]
    batched = greedy_replies(model, tok, prompts, max_new_tokens=6, batch_size=4)
    alone = []
    for p in prompts:  # oracle: transformers' generate on the unpadded prompt
        out = model.generate(p[None], attention_mask=torch.ones_like(p[None]), max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        alone.append(tok.decode(out[0, len(p):], skip_special_tokens=True).strip())
    assert batched == alone


def test_variants_side_by_side_and_report_files(tiny, tmp_path):
    folder, _, tok, examples = tiny
    model, _ = load_causal_lm(str(folder))
    ll.inject(model, ll.LoRA(r=4), "moved")
    perturb_adapters(model, std=0.3)
    ll.inject(model, ll.LoRA(r=4), "zero")  # identity at init: must score exactly as the base
    ll.set_adapter(model, "moved")
    model.train()
    report = evaluate_model(model, tok, examples, {"base": None, "zero": "zero", "moved": "moved"}, max_new_tokens=5,
                            n_shown=2, source="tiny")
    v = report["variants"]
    assert v["zero"]["loss"] == v["base"]["loss"] and v["zero"]["chrf"] == v["base"]["chrf"]
    assert v["moved"]["loss"] != v["base"]["loss"]
    assert v["base"]["ppl"] == pytest.approx(math.exp(v["base"]["loss"]))
    assert model.training and ll.active_adapters(model) == {"moved": 1.0}  # mode and adapters restored
    assert [s["reference"] for s in report["shown"]] == ["Oslo.", "Blue is a colour."]
    paths = write_report(report, tmp_path)
    assert json.loads(paths["json"].read_text())["variants"]["moved"]["tokens"] == v["moved"]["tokens"]
    text = paths["markdown"].read_text()
    assert "| variant | loss | perplexity | exact match | ROUGE-L F1 | chrF (0-100) |" in text
    assert f"| moved | {v['moved']['loss']:.4f} |" in text and "- reference: Oslo." in text


def test_evaluate_command_writes_both_reports(tiny, tmp_path, capsys):
    from lightning_lora.commands.evaluate import main

    folder, _, _, _ = tiny
    model, _ = load_causal_lm(str(folder))
    ll.inject(model, ll.LoRA(r=4))
    perturb_adapters(model)
    ll.save_adapter(model, tmp_path / "chat" / "adapter")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": c[0]["content"], "response": c[1]["content"]}) + "\n" for c in CONVS))
    report = main(["evaluate", "--base_model", str(folder), "--adapter", str(tmp_path / "chat" / "adapter"),
                   "--data", str(data), "--max_new_tokens", "4", "--out", str(tmp_path / "out")])
    assert list(report["variants"]) == ["base", "chat"] and report["examples"] == 4
    out = capsys.readouterr().out
    assert "| chat |" in out and "report written to" in out
    assert (tmp_path / "out" / "evaluation.md").is_file() and (tmp_path / "out" / "evaluation.json").is_file()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["evaluate", "--base_model", str(folder), "--adapter", str(tmp_path / "nope"), "--data", str(data)])


def test_lm_eval_tasks_run_through_our_model_per_variant(tiny, monkeypatch):
    """A stub of lm-evaluation-harness: HFLM wraps the model object, simple_evaluate reads its logits."""
    folder, _, tok, _ = tiny
    model, _ = load_causal_lm(str(folder))
    ll.inject(model, ll.LoRA(r=4))
    perturb_adapters(model)
    ids = torch.arange(5)[None]
    calls = []

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            assert pretrained is model and tokenizer is tok
            self.model = pretrained

    def simple_evaluate(model, tasks, limit):
        calls.append((tasks, limit))
        with torch.no_grad():
            return {"results": {t: {"logit_sum": float(model.model(ids).logits.sum()), "alias": t} for t in tasks}}

    lm_eval = types.ModuleType("lm_eval")
    lm_eval.simple_evaluate = simple_evaluate
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = HFLM
    monkeypatch.setitem(sys.modules, "lm_eval", lm_eval)
    monkeypatch.setitem(sys.modules, "lm_eval.models", types.ModuleType("lm_eval.models"))
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", hf)
    out = lm_eval_tasks(model, tok, {"base": None, "adapter": "default"}, ["hellaswag"], limit=3)
    with torch.no_grad(), ll.disable_adapters(model):
        base = float(model(ids).logits.sum())
    with torch.no_grad():
        adapted = float(model(ids).logits.sum())
    assert out == {"base": {"hellaswag": {"logit_sum": base}}, "adapter": {"hellaswag": {"logit_sum": adapted}}}
    assert calls == [(["hellaswag"], 3)] * 2 and base != adapted
    text = report_markdown({"variants": {}, "examples": 1, "max_new_tokens": 1, "tasks": out, "data": None})
    assert "lm-evaluation-harness, adapter: hellaswag logit_sum" in text


def test_tasks_without_lm_eval_say_how_to_install(monkeypatch, tiny):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails
    _, model, tok, _ = tiny
    with pytest.raises(ImportError, match="pip install lm-eval"):
        lm_eval_tasks(model, tok, {"base": None}, ["hellaswag"])


def test_fit_evaluates_at_the_end_and_the_card_shows_the_table(tiny, tmp_path):
    from lightning.pytorch import Trainer, seed_everything

    from lightning_lora.train.data import InstructionDataModule
    from lightning_lora.train.module import LoRAModule

    folder = tiny[0]
    data = tmp_path / "d.jsonl"
    rows = [{"prompt": f"{c[0]['content']} ({i})", "response": c[1]["content"]} for i in range(5) for c in CONVS]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seed_everything(0)
    module = LoRAModule(str(folder), adapter=ll.LoRA(r=4), export_dir=str(tmp_path / "export"), evaluate=True,
                        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    dm = InstructionDataModule(path=str(data), batch_size=4, max_length=48, packing=True, val_fraction=0.2)
    trainer = Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, val_check_interval=3)
    trainer.fit(module, dm)
    report = json.loads((tmp_path / "export" / "evaluation.json").read_text())
    assert set(report["variants"]) == {"base", "default"} and report["examples"] == len(dm.val_set) == 4
    # the same examples, scored by the validation loop (packed batches) and by evaluate (padded batches)
    assert report["variants"]["default"]["loss"] == pytest.approx(float(trainer.callback_metrics["val_loss"]), rel=1e-4)
    card = (tmp_path / "export" / "adapter" / "README.md").read_text()
    assert "## Evaluation" in card and "| default |" in card and "| base |" in card
