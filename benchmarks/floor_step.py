"""One process, ours against the floor step for step: where the time of a dense QLoRA step goes.

    python benchmarks/floor_step.py                  # 4 alternating rounds, CPU time per step and the ratio
    python benchmarks/floor_step.py --profile        # then one profiled step each: top ops, GEMM time by shape
    python benchmarks/floor_step.py --setting quickstart   # the 4 x 64 chat batches instead of 4 x 512 dense

**Ours** is ``LoRAModule``'s model (NF4 SmolLM2-135M-Instruct, LoRA r 8 on all linear layers, lean activations) with
its labeled-only loss and AdamW, in a plain loop (no Trainer). **The floor** is ``benchmarks/e2e.py``'s: the same NF4
model with every parameter frozen and no adapter, forward + the same loss + backward to the inputs. Both run the
same two packed batches (``e2e.py``'s ``dense`` setting, 4 x 512; ``--setting quickstart``: 4 x 64), 1 thread, in alternating order, so the ratio
is measured side by side; e2e.py's ratio adds the Trainer and separate processes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402  (the settings, data and floor of the end-to-end benchmark)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--setting", default="dense", choices=list(e2e.SETTINGS), help="e2e.py's batches (default dense)")
    p.add_argument("--profile", action="store_true", help="one profiled step each: aten::mm time by input shape")
    args = p.parse_args(argv)
    from lightning_lora import NF4, LoRA
    from lightning_lora.io.models import load_causal_lm
    from lightning_lora.quant.nf4 import quantize
    from lightning_lora.train.attention import use_packed_attention
    from lightning_lora.train.loss import causal_lm_loss
    from lightning_lora.train.module import LoRAModule

    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = LoRAModule(e2e.MODEL, adapter=LoRA(r=e2e.R, alpha=e2e.ALPHA, target_modules="all-linear"),
                        quantize=NF4(blocksize=64, double_quant=True))
    module.configure_model()
    ours = module.model.train()
    floor, tokenizer = load_causal_lm(e2e.MODEL)
    quantize(floor, NF4(blocksize=64, double_quant=True))
    use_packed_attention(floor)
    floor.requires_grad_(False).train()
    floor.get_input_embeddings().register_forward_hook(lambda mod, args, out: out.requires_grad_())
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / f"{args.setting}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in e2e.conversations(args.setting, 8)))
        dm = e2e._our_batches(data, args.setting, tokenizer)
        dm.setup("fit")
        batches = [b for _, b in zip(range(2), dm.train_dataloader())]
    optimizer = torch.optim.AdamW([q for q in ours.parameters() if q.requires_grad], lr=e2e.LR)

    def step(name: str, batch: dict) -> None:
        model = ours if name == "ours" else floor
        loss = causal_lm_loss(model, batch["input_ids"], batch["labels"], attention_mask=batch.get("attention_mask"),
                              position_ids=batch.get("position_ids"))
        loss.backward()
        if name == "ours":
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for name in ("ours", "floor"):  # warm-up
        step(name, batches[0])
    times: dict[str, list[float]] = {"ours": [], "floor": []}
    for i in range(args.rounds):
        for name in ("ours", "floor") if i % 2 == 0 else ("floor", "ours"):
            start = time.process_time()
            step(name, batches[i % 2])
            times[name].append(time.process_time() - start)
    res = {"cpu_s_per_step": times, "ours_vs_floor": min(times["ours"]) / min(times["floor"]),
           "ours_vs_floor_median": statistics.median(times["ours"]) / statistics.median(times["floor"])}
    print(f"CPU s per step: ours {times['ours']}, floor {times['floor']}; ours / floor {res['ours_vs_floor']:.3f} "
          f"(fastest), {res['ours_vs_floor_median']:.3f} (medians)")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name in ("ours", "floor"):
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                step(name, batches[0])
            events = prof.key_averages(group_by_input_shape=True)
            mm = sorted((e for e in events if e.key in ("aten::mm", "aten::addmm_")),
                        key=lambda e: -e.self_cpu_time_total)
            total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6
            print(f"== {name}: {total:.2f} s CPU in the profiled step; the ops with the most own time:")
            for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]:
                print(f"  {e.key[:40]:40s} {e.self_cpu_time_total / 1e6:7.3f} s {e.count:5d} calls")
            print("  GEMMs by shape:")
            for e in mm:
                print(f"  {e.key:13s} {e.self_cpu_time_total / 1e6:7.3f} s {e.count:5d} calls  {e.input_shapes}")
    return res


if __name__ == "__main__":
    main()
