"""LoRA on a CNN's Conv2d and Linear layers with one callback: ``python examples/vision_conv.py``.

``DigitsCNN`` is an ordinary LightningModule (two 3x3 convolutions, two linear layers). It is first trained fully on
scikit-learn's bundled 8x8 digits 0-4 (offline, no download), classes 0..4. Then ``AdapterCallback`` adds LoRA to
its Conv2d layers (PEFT's conv layout: A is a 3x3 conv to r channels, B a 1x1 conv back) and its Linear layers and
adapts it to digits 5-9 (class = digit - 5): only the adapter trains. Prints the accuracy on held-out 5-9 digits
before and after, and the share of parameters trained. Needs ``pip install scikit-learn`` (the ``examples`` extra).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lora import LoRA, disable_adapters
from lightning_lora.train.callback import AdapterCallback

TARGETS = ["conv1", "conv2", "fc1", "fc2"]  # convs are chosen by name: "all-linear" means linear layers only


class DigitsCNN(LightningModule):
    """Your own module: nothing adapter-specific in it."""

    def __init__(self, lr: float = 3e-3):
        super().__init__()
        self.lr = lr
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)  # (N, 32, 4, 4)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def digits(low: int, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Digits low..low+4 as (N, 1, 8, 8) images in [0, 1] and classes 0..4, split 70/30 into train and test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    keep = (data.target >= low) & (data.target < low + 5)
    x = torch.tensor(data.images[keep], dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target[keep] - low, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.7 * len(y))
    return TensorDataset(x[order[:cut]], y[order[:cut]]), TensorDataset(x[order[cut:]], y[order[cut:]])


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    model.eval()
    x, y = data.tensors
    return float((model(x).argmax(1) == y).float().mean())


def fit(model: LightningModule, data: TensorDataset, epochs: int, callbacks=()) -> None:
    trainer = Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))  # fmt: skip
    model.train()  # accuracy() left it in eval mode; Lightning keeps submodule modes
    trainer.fit(model, DataLoader(data, batch_size=64, shuffle=True))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-epochs", type=int, default=15)
    p.add_argument("--adapt-epochs", type=int, default=15)
    p.add_argument("--r", type=int, default=4)
    args = p.parse_args(argv)
    seed_everything(0, verbose=False)

    model = DigitsCNN()
    train_a, test_a = digits(0)
    fit(model, train_a, args.base_epochs)
    train_b, test_b = digits(5)
    before = accuracy(model, test_b)

    adapter = LoRA(r=args.r, alpha=2.0 * args.r, target_modules=TARGETS)
    model.lr = 1e-2
    fit(model, train_b, args.adapt_epochs, [AdapterCallback(adapter)])
    after = accuracy(model, test_b)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    with disable_adapters(model):  # the frozen base is untouched: switch the adapter off for the old task
        base_task = accuracy(model, test_a)
    print(f"digits 0-4 accuracy with the adapter off: {base_task:.3f}")
    print(f"digits 5-9 accuracy: before {before:.3f}, after LoRA {after:.3f}")
    print(f"parameters trained: {trained:,} of {total:,} ({100 * trained / total:.1f}%)")
    return dict(before=before, after=after, base_task=base_task, trained=trained, total=total, model=model)


if __name__ == "__main__":
    main()
