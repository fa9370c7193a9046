"""Add LoRA to an existing Lightning project with one callback: ``python examples/existing_project.py``.

``Classifier`` is an ordinary LightningModule (a small MLP of its own, no Hugging Face). We first train it fully on
task A, then adapt it to a related task B (the same points with the labels of a rotated rule) by adding
``AdapterCallback`` to the Trainer: the module's code does not change, only the adapter trains, checkpoints hold only
the adapter, and the adapter plus the merged weights are exported at the end. Runs in a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lora import LoRA
from lightning_lora.train.callback import AdapterCallback


class Classifier(LightningModule):
    """Your own module: nothing adapter-specific in it."""

    def __init__(self, n_in: int = 2, hidden: int = 64, n_classes: int = 4, lr: float = 1e-2):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, n_classes))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        # The usual line; with AdapterCallback only the adapter requires grad, so only it is optimized.
        # LoRA+ instead: torch.optim.AdamW(lightning_lora.param_groups(self, lr=self.lr, lr_ratio=16))
        return torch.optim.AdamW(filter(lambda p: p.requires_grad, self.parameters()), lr=self.lr)


def quadrant_data(angle: float, n: int = 2048, seed: int = 0) -> TensorDataset:
    """Points in the plane labelled by their quadrant after rotating the axes by ``angle``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    theta = torch.atan2(x[:, 1], x[:, 0]) - angle
    y = (torch.remainder(theta, 2 * math.pi) // (math.pi / 2)).long().clamp(max=3)
    return TensorDataset(x, y)


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def main(export_dir: str | None = "runs/existing_project/export", epochs: int = 4, root: str = "runs/existing_project"):
    seed_everything(0)
    task_a, task_b = quadrant_data(0.0), quadrant_data(math.pi / 5, seed=1)
    val_b = quadrant_data(math.pi / 5, n=1024, seed=2)
    loader = dict(batch_size=64, num_workers=0)
    quiet = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)

    model = Classifier()
    Trainer(max_epochs=epochs, default_root_dir=f"{root}/base", enable_checkpointing=False, **quiet).fit(
        model, DataLoader(task_a, shuffle=True, **loader)
    )
    before = accuracy(model, val_b)

    # The only change for LoRA: one callback on the Trainer.
    lora = AdapterCallback(LoRA(r=4, alpha=8), target="net", export_dir=export_dir)
    trainer = Trainer(max_epochs=epochs, default_root_dir=f"{root}/lora", callbacks=[lora], **quiet)
    trainer.fit(model, DataLoader(task_b, shuffle=True, **loader), DataLoader(val_b, **loader))
    after = accuracy(model, val_b)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"task B accuracy: {before:.3f} before LoRA, {after:.3f} after; trained {trainable} of {total} parameters")
    return {"before": before, "after": after, "trainable": trainable, "total": total, "trainer": trainer}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export_dir", default="runs/existing_project/export")
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    main(args.export_dir, args.epochs)
