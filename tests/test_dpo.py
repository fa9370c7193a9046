"""DPO (train/dpo.py, train/preference.py): the paper's loss by hand on a tiny model, ln 2 at init (also over NF4),
a reference pass that never touches the adapter's gradients, packed pairs, the built-in preference set, a short fit."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_assets import make_tiny_model_dir
from tiny_models import perturb_adapters

import lightning_lora as ll
from lightning_lora.io.models import load_causal_lm
from lightning_lora.train.dpo import DPOModule, dpo_loss, sequence_logprobs
from lightning_lora.train.preference import PreferenceDataModule, chatterbot_preferences, collate_pairs, read_pairs

ROWS = [{"prompt": "What is the capital of Norway?", "chosen": "Oslo.", "rejected": "Bakken, a small town."},
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "I do not know."},
        {"prompt": "Say hello.", "chosen": "Hello there!", "rejected": "No."}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("dpo") / "llama"))


def _pairs(tiny_dir, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    dm = PreferenceDataModule(path=str(path), tokenizer=tiny_dir, val_fraction=0.0, max_length=64)
    dm.setup()
    order = {e["chosen"]["input_ids"].shape[0]: e for e in dm.train_set}
    return [order[k] for k in sorted(order)], dm.tokenizer


def _module(tiny_dir, **kwargs):
    module = DPOModule(tiny_dir, beta=0.5, adapter=ll.LoRA(r=4), **kwargs)
    module.configure_model()
    for m in module.model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return module


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("quantize", [None, ll.NF4()], ids=["lora", "qlora"])
def test_loss_is_ln2_exactly_at_init(tiny_dir, tmp_path, packing, quantize):
    pairs, tok = _pairs(tiny_dir, tmp_path)
    module = _module(tiny_dir, quantize=quantize)
    out = module.dpo_step(collate_pairs(pairs, tok.pad_token_id, packing=packing))
    assert out["loss"].item() == torch.tensor(math.log(2.0)).item()  # the adapter is the identity: pi = ref
    assert out["margin"].item() == 0.0 and out["accuracy"].item() == 0.0


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_loss_equals_the_papers_formula_by_hand(tiny_dir, tmp_path, packing):
    pairs, tok = _pairs(tiny_dir, tmp_path)
    module = _module(tiny_dir)
    perturb_adapters(module.model, std=0.2)
    reference_model, _ = load_causal_lm(tiny_dir)  # an independent copy without any adapter

    def logp(model, seq):  # sum over the reply tokens of log softmax(logits_t)[token_{t+1}], one unpadded sequence
        ids, labels = seq["input_ids"][None], seq["labels"][None]
        logprobs = model(input_ids=ids).logits[:, :-1].float().log_softmax(-1)
        token = logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1)
        return token[labels[:, 1:] != -100].sum()

    beta = 0.5
    with torch.no_grad():
        terms = []
        for p in pairs:
            pw, pl = logp(module.model, p["chosen"]), logp(module.model, p["rejected"])
            rw, rl = logp(reference_model, p["chosen"]), logp(reference_model, p["rejected"])
            terms.append(-F.logsigmoid(beta * ((pw - rw) - (pl - rl))))
        by_hand = torch.stack(terms).mean()
        out = module.dpo_step(collate_pairs(pairs, tok.pad_token_id, packing=packing))
    assert abs(by_hand.item() - math.log(2)) > 1e-3  # the adapter moved the policy
    assert out["loss"].item() == pytest.approx(by_hand.item(), abs=1e-5)


def test_reference_pass_never_changes_the_adapters_gradients(tiny_dir, tmp_path):
    pairs, tok = _pairs(tiny_dir, tmp_path)
    batch = collate_pairs(pairs, tok.pad_token_id)
    module = _module(tiny_dir)
    perturb_adapters(module.model, std=0.2)
    params = [p for p in module.model.parameters() if p.requires_grad]
    module.dpo_step(batch)["loss"].backward()
    through_module = [p.grad.clone() for p in params]
    # the reference pass alone: no graph, no gradient, adapters back on afterwards
    with torch.no_grad(), ll.disable_adapters(module.model):
        reference = sequence_logprobs(module.model, batch)
    assert not reference.requires_grad
    assert all(torch.equal(p.grad, g) for p, g in zip(params, through_module))
    # the same loss with the reference given as constants computed elsewhere: the same gradients
    for p in params:
        p.grad = None
    reference_model, _ = load_causal_lm(tiny_dir)
    with torch.no_grad():
        constants = sequence_logprobs(reference_model, batch)
    torch.testing.assert_close(constants, reference, rtol=0, atol=1e-5)
    dpo_loss(sequence_logprobs(module.model, batch), constants, 0.5)["loss"].backward()
    for p, g in zip(params, through_module):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_pairs_read_collate_and_pack(tiny_dir, tmp_path):
    pairs, tok = _pairs(tiny_dir, tmp_path)
    padded, packed = collate_pairs(pairs, tok.pad_token_id), collate_pairs(pairs, tok.pad_token_id, packing=True)
    assert padded["input_ids"].shape[0] == 6 and packed["input_ids"].shape[0] == 1 and int(packed["num_pairs"]) == 3
    seqs = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    for i, s in enumerate(seqs):  # each sequence found whole where example_ids says, in both layouts
        assert torch.equal(padded["input_ids"][padded["example_ids"] == i], s["input_ids"])
        assert torch.equal(packed["input_ids"][packed["example_ids"] == i], s["input_ids"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected string keys 'prompt', 'chosen' and 'rejected'"):
        read_pairs(bad)


def test_builtin_preferences_pair_each_prompt_with_another_response():
    pytest.importorskip("chatterbot_corpus")
    from lightning_lora.train.data import chatterbot_pairs

    own = {c[0]["content"]: set() for c in chatterbot_pairs()}
    for c in chatterbot_pairs():
        own[c[0]["content"]].add(c[1]["content"])
    prefs = chatterbot_preferences(seed=0)
    assert len(prefs) > 2300
    assert all(ch[1]["content"] in own[ch[0]["content"]] and ch[1]["content"] != rj[1]["content"] for ch, rj in prefs)


def test_short_fit_logs_rewards_and_trains_only_the_adapter(tiny_dir, tmp_path):
    from lightning.pytorch import Trainer, seed_everything

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 4))
    seed_everything(0)
    module = DPOModule(tiny_dir, beta=0.1, adapter=ll.LoRA(r=4), optimizer=lambda p: torch.optim.AdamW(p, lr=5e-3),
                       export_dir=str(tmp_path / "export"))
    dm = PreferenceDataModule(path=str(path), batch_size=2, packing=True, val_fraction=0.25, max_length=64)
    trainer = Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, val_check_interval=4)
    trainer.validate(module, dm, verbose=False)
    assert float(trainer.callback_metrics["val_loss"]) == pytest.approx(math.log(2), abs=1e-6)
    trainer.fit(module, dm)
    metrics = trainer.callback_metrics
    assert {"train_loss", "reward_margin", "reward_accuracy", "val_reward_margin", "val_reward_accuracy"} <= set(metrics)
    assert float(metrics["val_loss"]) < math.log(2)  # the chosen replies gained against the rejected ones
    card = (tmp_path / "export" / "adapter" / "README.md").read_text()
    assert "DPO (beta 0.1), final validation: val_loss" in card and "| final validation perplexity | n/a |" in card
