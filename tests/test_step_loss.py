"""train/step_loss.py: the loss of an optimizer step split into micro-batches of unequal label counts has the gradient
of the one big batch (Hugging Face's ``model(**big_batch).loss`` is the oracle); the logged train_loss is its mean.
DDP and FSDP2 (2 ranks x 2 micro-batches): tests/test_distributed.py."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_lora import LoRA
from lightning_lora.train.callback import AdapterCallback
from lightning_lora.train.loss import causal_lm_loss
from lightning_lora.train.module import LoRAModule
from lightning_lora.train.step_loss import TokenWeightedLoss
from lightning_lora.train.summary import RunSummary
from tiny_assets import make_tiny_model_dir
from tiny_models import perturb_adapters

QUIET = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
             enable_checkpointing=False, num_sanity_val_steps=0)
MASKED = [(2, 9), (10, 11), (0, 4)]  # masked label prefix per row, per micro-batch: 13, 3 and 19 labeled tokens
LR = 1.0  # SGD, no momentum: the update is -LR * gradient


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama"))


def micro_batches() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for prefixes in MASKED:
        ids = torch.randint(5, 300, (len(prefixes), 12), generator=g)
        labels = ids.clone()
        for row, m in enumerate(prefixes):
            labels[row, :m] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def adapter_params(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def reference(model, batches: list[dict], mean_of_means: bool = False) -> tuple[float, dict]:
    """Hugging Face's loss of the one big batch (or the mean of the micro-batches' means) and its gradient."""
    model = copy.deepcopy(model)
    if mean_of_means:
        loss = sum(model(**b).loss for b in batches) / len(batches)
    else:
        loss = model(**{k: torch.cat([b[k] for b in batches]) for k in batches[0]}).loss
    params = adapter_params(model)
    return loss.item(), dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


class Plain(pl.LightningModule):
    """A user's own module (AdapterCallback injects): ``causal_lm_loss(..., step=...)`` in its training_step."""

    def __init__(self, folder: str, step: TokenWeightedLoss):
        super().__init__()
        self.folder, self.step = folder, step

    def configure_model(self):
        if getattr(self, "model", None) is None:
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(self.folder).train()

    def training_step(self, batch, batch_idx):
        return causal_lm_loss(self.model, batch["input_ids"], batch["labels"], batch["attention_mask"], step=self.step)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=LR)


class Snapshot(pl.Callback):
    """Makes B non-zero (so A gets a gradient too) and keeps a copy of the model as it is before the first step."""

    def on_fit_start(self, trainer, pl_module):
        perturb_adapters(pl_module.model, seed=1)
        self.before = copy.deepcopy(pl_module.model)


@pytest.mark.parametrize("user", ["LoRAModule", "AdapterCallback"])
def test_accumulated_unequal_micro_batches_step_like_the_one_big_batch(tiny_dir, user):
    pl.seed_everything(0, verbose=False)
    snapshot, summary, callbacks = Snapshot(), RunSummary(), []
    if user == "LoRAModule":
        module = LoRAModule(tiny_dir, adapter=LoRA(r=4), optimizer=lambda params: torch.optim.SGD(params, lr=LR))
    else:
        step = TokenWeightedLoss()
        module, callbacks = Plain(tiny_dir, step), [AdapterCallback(LoRA(r=4), target="model"), step]
    data = micro_batches()
    trainer = pl.Trainer(max_steps=1, accumulate_grad_batches=len(data), callbacks=[snapshot, summary, *callbacks],
                         **QUIET)  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=None, shuffle=False))

    loss, grads = reference(snapshot.before, data)
    before, after = adapter_params(snapshot.before), adapter_params(module.model)
    assert sorted(grads) == sorted(after) and len(after) == 28
    update = {n: (before[n] - after[n]).detach() / LR for n in after}
    assert max((update[n] - grads[n]).abs().max().item() for n in grads) < 1e-5
    assert abs(trainer.callback_metrics["train_loss"].item() - loss) < 1e-5  # the logged loss is the step's mean
    assert abs(summary.first_loss - loss) < 1e-5 and summary.last_loss == summary.first_loss  # so is the summary's
    assert f"train loss {loss:.4f} (first step)" in "\n".join(summary.summary_lines(trainer))
    # The test can fail: a mean of the micro-batches' means moves the adapter differently.
    _, naive = reference(snapshot.before, data, mean_of_means=True)
    assert max((update[n] - naive[n]).abs().max().item() for n in grads) > 1e-3


def test_sum_of_a_rescaling_model_is_hugging_face_mean_times_count():
    """Models whose logits are rescaled (Gemma-2's soft-capping) take Hugging Face's loss: its mean x labeled count."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, final_logit_softcapping=30.0,
                          attn_implementation="eager")
    model = Gemma2ForCausalLM(config)
    b = micro_batches()[0]
    b = {k: v % 128 if k == "input_ids" else v.where(v < 0, v % 128) for k, v in b.items()}
    step = TokenWeightedLoss()
    total = causal_lm_loss(model, b["input_ids"], b["labels"], step=step)
    assert step._tokens == 13 and step._calls == 1
    assert abs(total.item() - 13 * model(input_ids=b["input_ids"], labels=b["labels"]).loss.item()) < 1e-4


def test_refuses_a_step_without_noted_micro_batches_and_manual_optimization(tiny_dir):
    class Manual(Plain):
        def __init__(self, *args):
            super().__init__(*args)
            self.automatic_optimization = False

    step = TokenWeightedLoss()
    with pytest.raises(RuntimeError, match="manual optimization"):
        pl.Trainer(max_steps=1, callbacks=[step], **QUIET).fit(Manual(tiny_dir, step), DataLoader(micro_batches(), batch_size=None))

    class Forgets(Plain):  # returns the mean without telling the callback
        def training_step(self, batch, batch_idx):
            return causal_lm_loss(self.model, batch["input_ids"], batch["labels"])

    step = TokenWeightedLoss()
    trainer = pl.Trainer(max_steps=1, callbacks=[AdapterCallback(LoRA(r=4), target="model"), step], **QUIET)
    with pytest.raises(RuntimeError, match="step="):
        trainer.fit(Forgets(tiny_dir, step), DataLoader(micro_batches(), batch_size=None))
