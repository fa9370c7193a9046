"""train/attention.py: packed rows attended per example, and examples that share their prompt prefix, give every
example its unpacked loss, logits and gradients (Hugging Face's unpacked forward is the oracle); without packed
segments the attention is transformers' sdpa, bit for bit."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from tiny_assets import make_tiny_model_dir
from tiny_models import LLAMA, adapted_for_training, unpacked_loss
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_lora import LoRA
from lightning_lora.train.attention import find_segments, runs_packed_attention, use_packed_attention
from lightning_lora.train.data import InstructionDataModule
from lightning_lora.train.loss import causal_lm_loss
from lightning_lora.train.packing import collate_packed, shared_prefix_length

VOCAB = 128


def model_for(kind: str, packed: bool = True):
    model = adapted_for_training(kind)
    if packed:
        assert use_packed_attention(model)
    return model


def chats(prefix: int = 6, lengths=(9, 14, 11, 7), seed: int = 0) -> list[dict]:
    """Examples that start with the same ``prefix`` tokens (a system prompt), then a masked prompt and a response."""
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(0, VOCAB, (prefix,), generator=g)
    out = []
    for n in lengths:
        ids = torch.cat([system, torch.randint(0, VOCAB, (n,), generator=g)])
        labels = ids.clone()
        labels[: prefix + n // 3] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def grads(model, loss) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def assert_same(model, ours, ref):
    assert abs(ours.item() - ref.item()) < 1e-5
    g_ours, g_ref = grads(model, ours), grads(model, ref)
    for name in g_ref:
        assert torch.allclose(g_ours[name], g_ref[name], atol=1e-5, rtol=1e-4), name


def test_shared_prefix_length_is_the_common_unlabeled_start():
    batch = chats(prefix=6)
    brute = 0  # the largest p with equal starts, labels[1..p] unlabeled, a token left after the prefix
    for p in range(min(len(b["input_ids"]) for b in batch)):
        if all(torch.equal(b["input_ids"][:p], batch[0]["input_ids"][:p]) and (b["labels"][1 : p + 1] == -100).all()
               for b in batch):
            brute = p
    assert shared_prefix_length(batch) == brute >= 6
    batch[2]["labels"][4] = 7  # a labeled token inside the prefix cuts it before that token's predictor
    assert shared_prefix_length(batch) == 3
    assert shared_prefix_length(batch[:1]) == 0


def test_segments_found_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 3, 2, 3, 4, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2, 3, 0, 0, 0, 0]])
    seg = find_segments(pos)
    assert seg.rows[0] == [(0, 4, 0, 0), (4, 7, 0, 2), (7, 9, 0, 2), (9, 11, 9, 0)]
    assert seg.rows[1][:2] == [(0, 3, 0, 0), (3, 7, 3, 0)] and seg.shares_prefix
    assert find_segments(torch.arange(5)[None].repeat(2, 1)) is None
    with pytest.raises(ValueError, match="jump to 5"):
        find_segments(torch.tensor([[0, 1, 2, 5, 6]]))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("share", [False, True], ids=["restart", "shared_prefix"])
def test_packed_rows_give_unpacked_loss_and_gradients(kind, share):
    model, batch = model_for(kind), chats()
    packed = collate_packed(batch, pad_id=0, capacity=80, share_prefix=share)
    assert packed["input_ids"].shape[0] == 1
    if share:  # the prefix is held once: the row is shorter by (examples - 1) x prefix
        p = shared_prefix_length(batch)
        assert packed["input_ids"].shape[1] == sum(len(b["input_ids"]) for b in batch) - (len(batch) - 1) * p
    ours = causal_lm_loss(model, packed["input_ids"], packed["labels"], position_ids=packed["position_ids"])
    assert_same(model, ours, unpacked_loss(model, batch))


def test_shared_prefix_under_gradient_checkpointing_and_several_rows():
    model, batch = model_for("llama"), chats(lengths=(9, 14, 11, 7, 12))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    packed = collate_packed(batch, pad_id=0, capacity=36, share_prefix=True)
    assert packed["input_ids"].shape[0] > 1  # several rows, each with its own copy of the prefix, padded
    ours = causal_lm_loss(model, packed["input_ids"], packed["labels"], position_ids=packed["position_ids"])
    assert_same(model, ours, unpacked_loss(model, batch))


def test_grouped_query_attention():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**LLAMA, "num_attention_heads": 8, "num_key_value_heads": 2})).train()
    assert use_packed_attention(model)
    batch = chats()
    packed = collate_packed(batch, pad_id=0, capacity=80, share_prefix=True)
    ours = causal_lm_loss(model, packed["input_ids"], packed["labels"], position_ids=packed["position_ids"])
    assert_same(model, ours, unpacked_loss(model, batch))


def test_no_example_sees_another_only_the_prefix():
    model, batch = model_for("llama").eval(), chats()
    packed = collate_packed(batch, pad_id=0, capacity=80, share_prefix=True)
    seg = find_segments(packed["position_ids"])
    (_, _, _, _), (s1, e1, _, _), (s2, e2, _, _) = seg.rows[0][:3]

    def logits(ids):
        with torch.no_grad():
            return model(input_ids=ids, position_ids=packed["position_ids"], packed_segments=seg).logits

    base = logits(packed["input_ids"])
    changed = packed["input_ids"].clone()
    changed[0, s2:e2] = (changed[0, s2:e2] + 1) % VOCAB  # a later example's own tokens
    assert torch.equal(logits(changed)[0, :e1], base[0, :e1])
    changed = packed["input_ids"].clone()
    changed[0, 0] = (changed[0, 0] + 1) % VOCAB  # the shared prefix reaches every example
    assert not torch.allclose(logits(changed)[0, s1:e1], base[0, s1:e1])
    assert not torch.allclose(logits(changed)[0, s2:e2], base[0, s2:e2])


def test_without_segments_it_is_sdpa_bit_for_bit():
    ref = model_for("llama", packed=False).eval()
    model = copy.deepcopy(ref)
    assert use_packed_attention(model) and runs_packed_attention(model)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref(input_ids=ids, attention_mask=mask).logits)
        kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids, attention_mask=mask, **kw), ref.generate(ids, attention_mask=mask, **kw))


def test_shared_prefix_refused_without_packed_attention():
    model, batch = model_for("llama", packed=False), chats()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    packed = collate_packed(batch, pad_id=0, capacity=80, share_prefix=True)
    with pytest.raises(ValueError, match="use_packed_attention"):
        causal_lm_loss(model, packed["input_ids"], packed["labels"], position_ids=packed["position_ids"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    plain = collate_packed(batch, pad_id=0, capacity=80)  # restarting rows still train through transformers' mask
    ours = causal_lm_loss(model, plain["input_ids"], plain["labels"], position_ids=plain["position_ids"])
    assert_same(model, ours, unpacked_loss(model, batch))


def test_other_backends_are_left_alone():
    torch.manual_seed(0)
    eager = LlamaForCausalLM(LlamaConfig(**LLAMA, attn_implementation="eager"))
    sliding = LlamaForCausalLM(LlamaConfig(**LLAMA))
    sliding.config.sliding_window = 8
    assert not use_packed_attention(eager) and eager.config._attn_implementation == "eager"
    assert not use_packed_attention(sliding) and sliding.config._attn_implementation == "sdpa"


def test_datamodule_shares_prefixes_and_logs_the_saving(tmp_path, caplog):
    folder = make_tiny_model_dir(tmp_path / "model")
    rows = [{"prompt": f"question number {i}", "response": "an answer " * (1 + i % 4)} for i in range(24)]
    path = tmp_path / "data.jsonl"
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="share_prefix needs packing"):
        InstructionDataModule(path=str(path), tokenizer=str(folder), share_prefix=True)
    dm = InstructionDataModule(path=str(path), tokenizer=str(folder), batch_size=4, max_length=32, packing=True,
                               share_prefix=True, val_fraction=0.0)
    dm.setup()
    with caplog.at_level(logging.INFO, logger="lightning_lora"):
        batch = next(iter(dm.train_dataloader()))
    assert "shared prefix:" in caplog.text
    assert int(batch["num_tokens"]) > batch["input_ids"].numel() or find_segments(batch["position_ids"]) is not None


def test_lora_module_selects_packed_attention(tmp_path):
    from lightning_lora.train.module import LoRAModule

    module = LoRAModule(str(make_tiny_model_dir(tmp_path / "model")), adapter=LoRA(r=2))
    module.configure_model()
    assert runs_packed_attention(module.model)


def test_lora_module_refuses_a_shared_prefix_before_the_first_step(tmp_path):
    """Mistral's sliding-window attention keeps its own mask (packed examples stay apart) but cannot share a prefix:
    the fit stops at its start, naming the model type, before validation or any step has run."""
    import json

    from lightning.pytorch import Trainer

    from lightning_lora.train.module import LoRAModule

    folder = make_tiny_model_dir(tmp_path / "model", arch="mistral")
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": "q", "response": f"answer {i}"}) + "\n" for i in range(8)))
    dm = InstructionDataModule(path=str(path), tokenizer=str(folder), batch_size=4, max_length=32, packing=True,
                               share_prefix=True, val_fraction=0.0)
    module = LoRAModule(str(folder), adapter=LoRA(r=2))
    steps = []
    module.on_train_batch_start = lambda *args: steps.append(args)
    trainer = Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"^share_prefix: mistral does not run lightning_lora's packed attention"):
        trainer.fit(module, datamodule=dm)
    assert not steps
    assert runs_packed_attention(module.model) is False and module.model.config._attn_implementation == "sdpa"
