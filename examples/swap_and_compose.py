"""Two adapters on one frozen SmolLM2, trained on two real data sets, then swapped and composed.

Adapter ``chat`` learns the chatterbot-corpus prompt/response pairs (loss on responses), adapter ``docs`` learns the
Python reference prose of the stdlib's ``pydoc_data.topics``. Each is trained with the other one loaded but inactive
(``set_adapter``: only the active one has ``requires_grad``). Then every variant is evaluated on both validation sets:

    base, chat, docs, 0.5 chat + 0.5 docs (runtime weights), the same combined into one LoRA by ``cat`` (exact) and by
    ``svd`` at the original rank (approximate, its relative error printed), and a mixed batch (``per_sample_adapters``).

Full run (about 10 minutes on 2 CPU cores)::

    python examples/swap_and_compose.py --steps 60 --out runs/swap_and_compose

Reduced run (what the test does, well under a minute once the model is cached)::

    python examples/swap_and_compose.py --steps 1 --max_length 64 --batch_size 2 --limit 12 --val_batches 1 --r 4
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

import lightning_lora as ll
from lightning_lora.train.data import InstructionDataModule, TextDataModule
from lightning_lora.io.models import load_causal_lm


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base_model", default="smollm2-135m-instruct", help="alias or Hugging Face folder")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per adapter")
    p.add_argument("--max_length", type=int, default=64, help="tokens per example / text block")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--limit", type=int, default=None, help="examples (chat) and blocks (docs) kept per data set")
    p.add_argument("--val_batches", type=int, default=8, help="validation batches per data set")
    p.add_argument("--r", type=int, default=8, help="LoRA rank of each adapter")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="save both adapters and the cat combination here (PEFT layout)")
    return p.parse_args(argv)


def val_loss(model: torch.nn.Module, batches: list[dict]) -> float:
    """Mean next-token loss over the label tokens of ``batches`` (token-weighted, as one big batch would be)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            count += n
    return total / max(count, 1)


def train(model: torch.nn.Module, name: str, loader, steps: int, lr: float) -> None:
    ll.set_adapter(model, name)
    params = [p for p in model.parameters() if p.requires_grad]  # only adapter `name`
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    start = time.perf_counter()
    for step, batch in zip(range(steps), itertools.cycle(loader)):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            print(f"  [{name}] step {step + 1}/{steps} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    model.eval()


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model, tokenizer = load_causal_lm(args.base_model)
    common = dict(tokenizer=tokenizer, batch_size=args.batch_size, limit=args.limit, seed=args.seed)
    data = {"chat": InstructionDataModule(max_length=args.max_length, **common),
            "docs": TextDataModule(block_size=args.max_length, **common)}  # fmt: skip
    for dm in data.values():
        dm.setup("fit")
    val = {k: list(itertools.islice(dm.val_dataloader(), args.val_batches)) for k, dm in data.items()}

    for name in data:  # both adapters on all linear layers; the first injected is active, the second inactive
        ll.inject(model, ll.LoRA(r=args.r, alpha=2 * args.r, target_modules="all-linear"), name)
    for name, dm in data.items():
        train(model, name, dm.train_dataloader(), args.steps, args.lr)

    half = {"chat": 0.5, "docs": 0.5}
    ll.combine(model, half, "cat", method="cat")
    svd_error = ll.combine(model, half, "svd", method="svd", rank=args.r)
    variants = {"base": None, "chat": "chat", "docs": "docs", "0.5 chat + 0.5 docs": half,
                "cat (rank %d)" % (2 * args.r): "cat", "svd (rank %d)" % args.r: "svd"}  # fmt: skip
    table: dict[str, dict[str, float]] = {}
    for label, adapters in variants.items():
        start = time.perf_counter()
        if adapters is None:
            with ll.disable_adapters(model):
                table[label] = {k: val_loss(model, b) for k, b in val.items()}
        else:
            ll.set_adapter(model, adapters)  # the swap: microseconds per layer, no base weight touched
            table[label] = {k: val_loss(model, b) for k, b in val.items()}
        table[label]["eval_s"] = time.perf_counter() - start

    # mixed batch: each validation row of both sets with the adapter trained for it, in one forward pass
    chat_batch, docs_batch = val["chat"][0], val["docs"][0]
    rows = [{k: v[i] for k, v in chat_batch.items()} for i in range(len(chat_batch["input_ids"]))]
    rows += [{k: v[i] for k, v in docs_batch.items()} for i in range(len(docs_batch["input_ids"]))]
    width = max(len(r["input_ids"]) for r in rows)
    pad = {"input_ids": tokenizer.pad_token_id or 0, "attention_mask": 0, "labels": -100}
    mixed = {k: torch.stack([torch.nn.functional.pad(r[k], (0, width - len(r[k])), value=pad[k]) for r in rows]) for k in pad}
    names = ["chat"] * len(chat_batch["input_ids"]) + ["docs"] * len(docs_batch["input_ids"])
    with ll.per_sample_adapters(model, names):
        mixed_loss = val_loss(model, [mixed])

    print(f"\nvalidation loss (lower is better); {args.steps} steps per adapter, r={args.r}")
    print(f"{'variant':<22}{'chat val':>10}{'docs val':>10}")
    for label, row in table.items():
        print(f"{label:<22}{row['chat']:>10.3f}{row['docs']:>10.3f}")
    print(f"svd combination: relative Frobenius error {svd_error:.3e} at rank {args.r} (of {2 * args.r})")
    print(f"mixed batch (chat rows -> chat, docs rows -> docs, one forward): loss {mixed_loss:.3f}")
    if args.out:
        ll.set_adapter(model, "chat")
        ll.save_adapters(model, args.out)
        print(f"adapters written to {args.out}/<name> (PEFT layout)")
    table["_meta"] = {"svd_error": svd_error, "mixed_loss": mixed_loss}
    return table


if __name__ == "__main__":
    main()
