"""Where NF4 hurts SmolLM2-135M-Instruct, and how much of it LoftQ's rank-r start can undo.

    python benchmarks/loftq_error.py       # ~10 min on 2 CPU cores; prints the figures BENCHMARKS.md quotes

LoftQ with one iteration (arXiv:2310.08659, Algorithm 1, T = 1) starts from dequant(Q) + L_r with Q = NF4(W) and L_r
the best rank-r approximation of the rounding error E = W - dequant(Q) (exact SVD). This script simulates it with
dense fp32 weights (dequant(Q) + L_r written into each linear layer; it gives the same validation perplexity as the
bitsandbytes layers, 56.79 and 53.88) and reports:

1. per layer kind, the relative error ||E|| / ||W|| and the share of ||E||^2 that L_r holds for r = 8, 32, 128;
2. the quickstart's validation perplexity (12 batches, response tokens) for fp32, NF4 and LoftQ at r = 8, 32, 128,
   and the share of the log-perplexity gap closed, (log ppl(NF4) - log ppl(LoftQ)) / (log ppl(NF4) - log ppl(fp32));
3. NF4 (or LoftQ r 8) on one layer kind, or on 5 consecutive blocks, the rest fp32: where the damage is;
4. the same three models on 96 validation examples with every token of the chat template scored, split into the
   system prompt SmolLM2's template adds, the user turn (with the template's tags) and the response.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from lightning_lora.io.models import load_causal_lm
from lightning_lora.train.data import InstructionDataModule, collate
from lightning_lora.train.loss import causal_lm_loss

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANKS = (8, 32, 128)


def nf4_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """dequant(NF4(weight)), the quickstart's settings (block 64, double quantization)."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight.contiguous(), blocksize=64, compress_statistics=True, quant_type="nf4")
    return bnbf.dequantize_4bit(packed, state).reshape(weight.shape)


def closed(fp32: float, nf4: float, run: float) -> str:
    return f"{100 * (math.log(nf4) - math.log(run)) / (math.log(nf4) - math.log(fp32)):.1f}%"


def main() -> None:
    torch.set_num_threads(1)  # shared 2-core machine
    model, _ = load_causal_lm("smollm2-135m-instruct")
    data = InstructionDataModule(tokenizer="smollm2-135m-instruct", max_length=64, packing=True, batch_size=4, seed=0)
    data.setup()
    batches = [b for _, b in zip(range(12), data.val_dataloader())]  # the quickstart's limit_val_batches
    layers = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    W = {n: m.weight.detach().clone() for n, m in layers.items()}
    Q, fits, rows = {}, {}, {k: [] for k in KINDS}
    start = time.perf_counter()
    for n, w in W.items():
        Q[n] = nf4_roundtrip(w)
        U, S, Vh = torch.linalg.svd(w - Q[n], full_matrices=False)
        fits[n] = (U[:, : max(RANKS)] * S[: max(RANKS)], Vh[: max(RANKS)])
        energy = S.square()
        rows[n.rsplit(".", 1)[1]].append([float((w - Q[n]).norm() / w.norm())] +
                                          [float(energy[:r].sum() / energy.sum()) for r in RANKS])
    print(f"NF4 round trips and SVDs of {len(W)} layers: {time.perf_counter() - start:.0f} s")
    print("| layer kind | norm(W - Q) / norm(W) | " + " | ".join(f"share of norm(W - Q)^2 at r {r}" for r in RANKS) + " |")
    for kind, values in rows.items():
        means = [sum(v[i] for v in values) / len(values) for i in range(1 + len(RANKS))]
        print(f"| {kind} | {means[0]:.3f} | " + " | ".join(f"{m:.1%}" for m in means[1:]) + " |")

    def use(pick) -> None:  # pick(name) -> "fp32" | "nf4" | rank r (LoftQ's start at rank r)
        for n, m in layers.items():
            how = pick(n)
            if how == "fp32":
                m.weight.data.copy_(W[n])
            else:
                US, Vh = fits[n]
                m.weight.data.copy_(Q[n] if how == "nf4" else Q[n] + US[:, :how] @ Vh[:how])

    @torch.no_grad()
    def val_ppl(pick) -> float:
        use(pick)
        total = count = 0
        for b in batches:
            loss = causal_lm_loss(model, b["input_ids"], b["labels"], attention_mask=b.get("attention_mask"),
                                  position_ids=b.get("position_ids"))
            tokens = int((b["labels"][:, 1:] != -100).sum())
            total, count = total + float(loss) * tokens, count + tokens
        return math.exp(total / count)

    fp32, nf4 = val_ppl(lambda n: "fp32"), val_ppl(lambda n: "nf4")
    print(f"\nquickstart validation ppl (response tokens): fp32 {fp32:.2f}, NF4 {nf4:.2f}")
    for r in RANKS:
        ppl = val_ppl(lambda n, r=r: r)
        print(f"LoftQ (1 iteration) r {r}: {ppl:.2f}, gap closed {closed(fp32, nf4, ppl)}")
    print("\n| NF4 on | ppl, NF4 there | ppl, LoftQ r 8 there |\n|---|---|---|")
    groups = {k: (lambda n, k=k: n.endswith(k)) for k in KINDS}
    groups |= {f"blocks {i}-{i + 4}": (lambda n, i=i: int(n.split(".")[2]) in range(i, i + 5)) for i in range(0, 30, 5)}
    for name, inside in groups.items():
        only_nf4 = val_ppl(lambda n: "nf4" if inside(n) else "fp32")
        only_loftq = val_ppl(lambda n: 8 if inside(n) else "fp32")
        print(f"| {name} | {only_nf4:.2f} | {only_loftq:.2f} |")

    # every token of the chat template, by part: system prompt (up to the 2nd <|im_start|>), user turn, response
    examples, bos = data.val_set[:96], data.tokenizer.convert_tokens_to_ids("<|im_start|>")
    sums = {}
    for how in ("fp32", "nf4", 8):
        use(lambda n: how)
        for i in range(0, len(examples), 8):
            batch = collate(examples[i : i + 8], pad_id=0)
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            nll = F.cross_entropy(logits.transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
            labels, mask = batch["labels"][:, 1:], batch["attention_mask"][:, 1:]
            user_from = (batch["input_ids"] == bos).long().cumsum(1)[:, 1:] >= 2  # from the user turn's tag on
            parts = {"system prompt": ~user_from, "user turn": user_from & (labels == -100), "response": labels != -100}
            for part, where in parts.items():
                where = where & (mask == 1)
                t, c = sums.get((how, part), (0.0, 0))
                sums[(how, part)] = (t + float(nll[where].sum()), c + int(where.sum()))
    print("\n96 validation examples, every token scored (chat template):")
    print("| tokens | count | fp32 ppl | NF4 ppl | LoftQ r 8 ppl | gap closed |\n|---|---|---|---|---|---|")
    for part in ("system prompt", "user turn", "response", "all"):
        keys = ("system prompt", "user turn", "response") if part == "all" else (part,)
        ppl = {how: math.exp(sum(sums[(how, k)][0] for k in keys) / sum(sums[(how, k)][1] for k in keys))
               for how in ("fp32", "nf4", 8)}
        count = sum(sums[("fp32", k)][1] for k in keys)
        print(f"| {part} | {count} | {ppl['fp32']:.2f} | {ppl['nf4']:.2f} | {ppl[8]:.2f} | "
              f"{closed(ppl['fp32'], ppl['nf4'], ppl[8])} |")


if __name__ == "__main__":
    main()
