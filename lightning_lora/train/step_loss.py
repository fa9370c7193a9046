"""Token-weighted loss over a whole optimizer step: every accumulated micro-batch, every data-parallel rank.

Micro-batch j = 1..k on rank r = 1..N holds n_{r,j} labeled tokens with summed cross-entropy S_{r,j}. The loss of
the one big batch they make together is

    L = (1 / T) sum_{r,j} S_{r,j},    T = sum_{r,j} n_{r,j}.

A mean per micro-batch, then Lightning's 1/k (``accumulate_grad_batches``) and DDP's or FSDP's 1/N (they average
gradients over ranks), give instead (1 / kN) sum_{r,j} S_{r,j} / n_{r,j}: a mean of means, which weights a micro-batch
of 5 labeled tokens like one of 76 (the bug transformers fixed with ``num_items_in_batch``). T is known only once
every rank has read the step's last micro-batch, so, as torchtune does, each micro-batch backpropagates its sum
S_{r,j}, and before the optimizer step (before gradient clipping, in ``on_before_optimizer_step``) the gradients are
multiplied by kN / T, with T and sum S summed over the ranks in one all-reduce:

    g = (kN / T) * (1 / N) sum_r (1 / k) sum_j dS_{r,j}/dtheta = dL/dtheta.

The logged ``train_loss`` is that step's L. ``LoRAModule`` uses this callback; in your own module pass it to
``causal_lm_loss``.

Example::

    step = TokenWeightedLoss()
    trainer = Trainer(accumulate_grad_batches=4, callbacks=[AdapterCallback(LoRA(r=8), target="model"), step])

    def training_step(self, batch, batch_idx):  # in your LightningModule
        return causal_lm_loss(self.model, batch["input_ids"], batch["labels"], step=step)
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from typing_extensions import override


class TokenWeightedLoss(Callback):
    """Divides the gradients by the labeled tokens of the whole optimizer step and logs that step's mean loss.

    Args:
        log_name: the name the step's mean loss is logged under (None: not logged).
        prog_bar: show it in the progress bar.

    Raises:
        RuntimeError: (at fit start) the module uses manual optimization; (before a step) no micro-batch of the step
            went through ``causal_lm_loss(..., step=this)``.
    """

    def __init__(self, log_name: str | None = "train_loss", prog_bar: bool = True):
        self.log_name, self.prog_bar = log_name, prog_bar
        self._reset()

    def _reset(self) -> None:
        self._sum: Tensor | None = None
        self._tokens = 0
        self._calls = 0

    def add(self, loss_sum: Tensor, tokens: int) -> Tensor:
        """Note one micro-batch's summed loss and its labeled tokens; returns ``loss_sum`` (for ``training_step``)."""
        value = loss_sum.detach().float()
        self._sum = value if self._sum is None else self._sum + value
        self._tokens += int(tokens)
        self._calls += 1
        return loss_sum

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise RuntimeError("TokenWeightedLoss scales the gradients Lightning accumulates for its optimizer step; "
                               f"{type(pl_module).__name__} uses manual optimization: divide by the step's labeled "
                               "tokens yourself, or drop the callback.")
        self._reset()

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if not self._calls:
            raise RuntimeError("TokenWeightedLoss: no micro-batch of this optimizer step passed step= to "
                               "causal_lm_loss; return causal_lm_loss(..., step=<this callback>) from training_step.")
        totals = torch.stack([self._sum.double(), torch.tensor(float(self._tokens), dtype=torch.float64,
                                                              device=self._sum.device)])
        totals = trainer.strategy.reduce(totals, reduce_op="sum")  # one all-reduce: sum S and T over the ranks
        loss_sum, tokens = totals.tolist()
        self._reset()
        factor = trainer.accumulate_grad_batches * trainer.world_size / tokens if tokens else 0.0
        with torch.no_grad():
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if param.grad is not None:
                        param.grad.mul_(factor)
        if self.log_name is not None and tokens:
            pl_module.log(self.log_name, loss_sum / tokens, prog_bar=self.prog_bar, on_step=True, on_epoch=False,
                          batch_size=1)


__all__ = ["TokenWeightedLoss"]
