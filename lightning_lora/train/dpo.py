"""Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290) of an adapter, with a free reference.

For a prompt x with a chosen reply y_w and a rejected one y_l, DPO (section 4, eq. 7) minimises

    L = -log sigmoid( beta * [ (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) ] )

where log pi(y|x) is the sum of the policy's next-token log-probabilities over the reply's tokens and ref is the
frozen reference model. The implicit rewards are r = beta * (log pi - log ref) (section 5); we log their margin
r_w - r_l and the share of pairs with r_w > r_l (accuracy).

With an adapter the reference is free: it is the same model with the adapter off (``disable_adapters``, bit-exact),
run under ``torch.no_grad`` on the same batch before the policy pass. No second copy of the weights exists (the
memory table says so), and QLoRA works as is (the reference is the NF4 base). At init the adapter is the identity,
so pi = ref and L = ln 2 exactly.

Batches (``train/preference.py``) hold the B chosen sequences, then the B rejected ones (examples 0..2B-1), padded
or packed, with ``example_ids`` naming each position's example (-1: padding); labels mark the reply tokens. The
log-probabilities are summed per example by a stand-in output head (``train/loss.py``'s ``run_with_head``) that runs
the real head on the labeled rows only, in chunks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchmetrics.aggregation import MeanMetric

from lightning_lora.core.verbs import disable_adapters
from lightning_lora.train.head import rescales_logits
from lightning_lora.train.loss import CHUNK_SIZE, IGNORE, run_with_head
from lightning_lora.train.memory import memory_report
from lightning_lora.train.module import LoRAModule
from lightning_lora.train.step_loss import TokenWeightedLoss


def _row_logprobs(head: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    return -F.cross_entropy(head(hidden).float(), targets, reduction="none")


class _LogProbHead(nn.Module):
    """Stands in for the output head: per-example sums of log p(target) over the labeled rows."""

    def __init__(self, head: nn.Module, labels: Tensor, example_ids: Tensor, n_examples: int, chunk_size: int):
        super().__init__()
        self.head, self.labels, self.example_ids = head, labels, example_ids
        self.n_examples, self.chunk_size = n_examples, chunk_size

    def forward(self, hidden: Tensor) -> Tensor:
        targets = self.labels[:, 1:].reshape(-1)
        keep = targets != IGNORE
        rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]
        owner = self.example_ids[:, 1:].reshape(-1)[keep]  # the example each predicted token belongs to
        targets = targets[keep]
        parts = []
        for start in range(0, rows.shape[0], self.chunk_size):
            h, y = rows[start : start + self.chunk_size], targets[start : start + self.chunk_size]
            parts.append(checkpoint(_row_logprobs, self.head, h, y, use_reentrant=False) if torch.is_grad_enabled()
                         else _row_logprobs(self.head, h, y))  # fmt: skip
        logp = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
        return hidden.new_zeros(self.n_examples, dtype=torch.float32).index_add(0, owner, logp)


def sequence_logprobs(model: nn.Module, batch: dict, chunk_size: int = CHUNK_SIZE) -> Tensor:
    """(2B,) sums of log p(token | earlier tokens) over each example's labeled tokens (the reply)."""
    labels, owners = batch["labels"], batch["example_ids"]
    n = int(batch["num_pairs"]) * 2
    if rescales_logits(model):  # softcapped logits: the full head, as the model computes it
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                       position_ids=batch.get("position_ids"), use_cache=False).logits[:, :-1].float()
        targets = labels[:, 1:]
        keep = targets != IGNORE
        logp = logits.log_softmax(-1).gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)[keep]
        return logits.new_zeros(n).index_add(0, owners[:, 1:][keep], logp)
    return run_with_head(model, lambda head: _LogProbHead(head, labels, owners, n, chunk_size), batch["input_ids"],
                         batch.get("attention_mask"), batch.get("position_ids"))


def dpo_loss(policy: Tensor, reference: Tensor, beta: float) -> dict[str, Tensor]:
    """The DPO loss (module docstring) of ``policy`` and ``reference`` log-probabilities, each (2B,): B chosen, then
    B rejected. Returns ``loss`` (mean over pairs), and the detached ``margin`` (mean r_w - r_l) and ``accuracy``."""
    b = policy.shape[0] // 2
    rewards = beta * (policy - reference.detach())
    logits = rewards[:b] - rewards[b:]
    margin = logits.detach()
    return {"loss": -F.logsigmoid(logits).mean(), "margin": margin.mean(), "accuracy": (margin > 0).float().mean()}


class DPOModule(LoRAModule):
    """``LoRAModule`` trained with DPO on ``{prompt, chosen, rejected}`` pairs (``train/preference.py``'s
    ``PreferenceDataModule``); the reference is the model with the adapter off (module docstring).

    Args:
        beta: the strength of the KL constraint (the paper uses 0.1 to 0.5); smaller lets the policy move further
            from the reference.
        **kwargs: ``LoRAModule``'s arguments (base_model, adapter, quantize, optimizer, export_dir, ...).

    Logged: ``train_loss``, ``reward_margin``, ``reward_accuracy``; in validation ``val_loss``,
    ``val_reward_margin``, ``val_reward_accuracy``.
    """

    def __init__(self, base_model: str, beta: float = 0.1, **kwargs):
        if not (isinstance(beta, (int, float)) and beta > 0 and math.isfinite(beta)):
            raise ValueError(f"beta must be a positive number (DPO uses 0.1 to 0.5), got {beta!r}.")
        if kwargs.get("evaluate"):
            raise ValueError("evaluate: the end-of-fit evaluation reads prompt/response examples, not preference "
                             "pairs; set evaluate: false and run python -m lightning_lora evaluate afterwards.")
        super().__init__(base_model, **kwargs)
        self.beta = float(beta)
        self.val_margin, self.val_accuracy = MeanMetric(), MeanMetric()

    def on_fit_start(self) -> None:
        if self.trainer.is_global_zero:
            optimizer = self.trainer.optimizers[0] if self.trainer.optimizers else None
            memory_report(self.model, optimizer, reference="DPO: the same weights with the adapter off, no copy")

    def dpo_step(self, batch: dict) -> dict[str, Tensor]:
        """Reference pass (adapter off, no grad), then policy pass; the DPO loss and the reward figures."""
        with torch.no_grad(), disable_adapters(self.model):
            reference = sequence_logprobs(self.model, batch, self.loss_chunk_size)
        policy = sequence_logprobs(self.model, batch, self.loss_chunk_size)
        return dpo_loss(policy, reference, self.beta)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        out = self.dpo_step(batch)
        pairs = int(batch["num_pairs"])
        self.log("train_loss", out["loss"].detach(), prog_bar=True, batch_size=pairs)
        self.log("reward_margin", out["margin"], batch_size=pairs)
        self.log("reward_accuracy", out["accuracy"], batch_size=pairs)
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        out = self.dpo_step(batch)
        pairs = int(batch["num_pairs"])
        self.val_loss.update(out["loss"], weight=pairs)
        self.val_margin.update(out["margin"], weight=pairs)
        self.val_accuracy.update(out["accuracy"], weight=pairs)
        return out["loss"]

    test_step = validation_step

    def _reset_loss(self) -> None:
        with torch.inference_mode(False):
            for metric in (self.val_loss, self.val_margin, self.val_accuracy):
                metric.reset()

    def _figures(self, prefix: str) -> None:
        loss, margin, accuracy = self.val_loss.compute(), self.val_margin.compute(), self.val_accuracy.compute()
        self._reset_loss()
        self.log(f"{prefix}_loss", loss, prog_bar=True)
        self.log(f"{prefix}_reward_margin", margin)
        self.log(f"{prefix}_reward_accuracy", accuracy, prog_bar=prefix == "val")

    def on_validation_epoch_end(self) -> None:
        self._figures("val")

    def on_test_epoch_end(self) -> None:
        self._figures("test")

    def run_facts(self) -> dict:
        """The card's facts: the DPO figures in place of a validation loss (a perplexity of it would mean nothing)."""
        facts = super().run_facts()
        metrics = self.trainer.callback_metrics
        figures = ", ".join(f"{k} {float(metrics[k]):.4f}" for k in ("val_loss", "val_reward_accuracy",
                                                                     "val_reward_margin") if k in metrics)  # fmt: skip
        facts["data"] = f"{facts.get('data') or 'preference pairs'}; DPO (beta {self.beta:g})" + (
            f", final validation: {figures}" if figures else "")
        facts["val_loss"] = None
        return facts

    def configure_callbacks(self) -> list:
        """LoRAModule's guards, without the token-weighted causal-LM loss (DPO's loss is a mean over pairs)."""
        return [c for c in super().configure_callbacks() if not isinstance(c, TokenWeightedLoss)]


__all__ = ["DPOModule", "dpo_loss", "sequence_logprobs"]
