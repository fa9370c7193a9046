"""train/packing.py: packed rows give every example exactly its unpacked loss and logits (Hugging Face's unpacked
forward is the oracle), no attention across examples, examples per batch kept; length grouping; the padding log."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from lightning_lora.train.data import InstructionDataModule
from lightning_lora.train.loss import causal_lm_loss
from lightning_lora.train.packing import collate_packed, first_fit, padding_share
from lightning_lora.train.sampler import EpochSampler
from tiny_assets import make_tiny_model_dir
from tiny_models import adapted_for_training

VOCAB = 128


def examples(seed: int = 0, lengths=(9, 5, 13, 7, 4)) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, VOCAB, (n,), generator=g)
        labels = ids.clone()
        labels[: n // 3] = -100  # a masked prompt
        out.append({"input_ids": ids, "labels": labels})
    return out


def model_for(kind: str):
    return adapted_for_training(kind)


def spans(batch: list[dict], packed: dict) -> list[tuple[int, int, int]]:
    """(row, start, length) of every example in the packed batch, found from the restarting position ids."""
    out = []
    for r, pos in enumerate(packed["position_ids"]):
        starts = [i for i in range(len(pos)) if pos[i] == 0] + [len(pos)]
        out += [(r, a, b - a) for a, b in zip(starts, starts[1:])]
    return out


def test_collate_keeps_every_example_once_restarts_positions_and_fits_rows():
    batch = examples()
    packed = collate_packed(batch, pad_id=0, capacity=16)
    found = []
    for r, a, n in spans(batch, packed):
        ids = packed["input_ids"][r, a : a + n]
        match = [i for i, b in enumerate(batch) if len(b["input_ids"]) == n and torch.equal(b["input_ids"], ids)]
        if match:
            found += match
            assert packed["labels"][r, a] == -100  # never predicts an example's first token from the previous one
            assert torch.equal(packed["labels"][r, a + 1 : a + n], batch[match[0]]["labels"][1:])
    assert sorted(found) == list(range(len(batch)))  # every example exactly once: the batch size is kept
    assert packed["input_ids"].shape[1] <= 16 and packed["input_ids"].shape[0] < len(batch)
    assert "attention_mask" not in packed and int(packed["num_tokens"]) == sum(len(b["input_ids"]) for b in batch)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_each_example_loss_and_logits_equal_unpacked(kind):
    model, batch = model_for(kind), examples()
    packed = collate_packed(batch, pad_id=0, capacity=20)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        for r, a, n in spans(batch, packed):
            ids = packed["input_ids"][r, a : a + n]
            i = next((i for i, b in enumerate(batch) if torch.equal(b["input_ids"], ids)), None)
            if i is None:
                continue  # the padding block
            alone = model(input_ids=ids[None], labels=batch[i]["labels"][None], use_cache=False)
            assert torch.allclose(logits[r, a : a + n], alone.logits[0], atol=1e-5)
            y = batch[i]["labels"][1:]
            mine = F.cross_entropy(logits[r, a : a + n - 1], y, ignore_index=-100)
            assert abs(mine.item() - alone.loss.item()) < 1e-5
    # the packed batch's loss is the token-weighted mean of the unpacked examples' losses
    ours = causal_lm_loss(model, packed["input_ids"], packed["labels"], position_ids=packed["position_ids"])
    total = sum(model(input_ids=b["input_ids"][None], labels=b["labels"][None]).loss.item() * int((b["labels"][1:] != -100).sum())
                for b in batch)
    count = sum(int((b["labels"][1:] != -100).sum()) for b in batch)
    assert abs(ours.item() - total / count) < 1e-5


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_no_example_attends_across_its_boundary(kind):
    model, batch = model_for(kind), examples()
    packed = collate_packed(batch, pad_id=0, capacity=40)  # everything in one row
    assert packed["input_ids"].shape[0] == 1
    r, a, n = spans(batch, packed)[0]
    changed = packed["input_ids"].clone()
    changed[r, a : a + n] = (changed[r, a : a + n] + 1) % VOCAB
    with torch.no_grad():
        before = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        after = model(input_ids=changed, position_ids=packed["position_ids"], use_cache=False).logits
    assert not torch.allclose(before[r, a : a + n], after[r, a : a + n])  # the perturbation is visible
    others = torch.ones(before.shape[1], dtype=torch.bool)
    others[a : a + n] = False
    assert torch.allclose(before[r, others], after[r, others], atol=1e-6)


def test_first_fit_respects_capacity_and_keeps_overlong_items_alone():
    lengths = [5, 9, 3, 20, 7, 1]
    rows = first_fit(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 or len(row) == 1 for row in rows)


def test_length_grouped_sampler_is_a_seeded_permutation_with_less_padding():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, 64, (400,), generator=g).tolist()
    sampler = EpochSampler(len(lengths), batch_size=4, seed=0, lengths=lengths)
    sampler.set_epoch(0)
    first = list(sampler)
    assert sorted(first) == list(range(400)) and first == list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    grouped = [first[i : i + 4] for i in range(0, 400, 4)]
    plain = [list(range(i, i + 4)) for i in range(0, 400, 4)]
    assert padding_share(lengths, grouped) < padding_share(lengths, plain) / 3


def test_datamodule_packs_logs_padding_and_keeps_batch_size(tmp_path, caplog):
    tiny = make_tiny_model_dir(tmp_path / "tiny")
    rows = [{"prompt": "word " * (i % 7 + 1), "response": "answer " * (i % 5 + 1)} for i in range(40)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = {}
    for packing, pack_length in ((False, None), (True, 48), (True, None)):
        dm = InstructionDataModule(str(path), tokenizer=str(tiny), max_length=48, batch_size=4, val_fraction=0.0,
                                   packing=packing, pack_length=pack_length)
        dm.setup("fit")
        with caplog.at_level(logging.INFO, logger="lightning_lora.train.packing"):
            caplog.clear()
            loader = dm.train_dataloader()
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("padding:")]
        assert len(lines) == 1 and ("packed" in lines[0]) == packing
        batches = list(loader)
        seen[(packing, pack_length)] = sorted(t for b in batches for t in b["labels"][b["labels"] != -100].tolist())
        if packing:
            assert all("position_ids" in b and b["input_ids"].shape[1] <= (pack_length or 4 * 48) for b in batches)
            assert sum(int(b["num_tokens"]) for b in batches) == sum(len(x["input_ids"]) for x in dm.train_set)
        if packing and pack_length is None:  # the default budget holds the whole batch: one row, no padding
            assert all(b["input_ids"].shape[0] == 1 and b["input_ids"].numel() == int(b["num_tokens"]) for b in batches)
    # all see the same response tokens, less the first label of an example (never a response token here)
    assert seen[(True, 48)] == seen[(True, None)] == seen[(False, None)]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_packed_rows_under_gradient_checkpointing_give_the_same_loss_and_gradients(kind):
    model, batch = model_for(kind), examples()
    packed = collate_packed(batch, pad_id=0, capacity=20)

    def loss_and_grads():
        loss = causal_lm_loss(model, packed["input_ids"], packed["labels"], position_ids=packed["position_ids"])
        params = [p for p in model.parameters() if p.requires_grad]
        return loss.item(), torch.autograd.grad(loss, params)

    ref_loss, ref = loss_and_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing
    loss, got = loss_and_grads()
    assert abs(loss - ref_loss) < 1e-6
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, ref))
