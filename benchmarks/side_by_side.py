"""One process, ours against the floor and the recipe step for step: ratios that this host's noise cannot move.

    python benchmarks/side_by_side.py                        # 4 rounds at 4 x 512 dense: CPU time per step, ratios
    python benchmarks/side_by_side.py --setting quickstart   # the 4 x 64 chat batches
    python benchmarks/side_by_side.py --profile              # then one profiled step each: top ops, GEMMs by shape

Between processes the same variant moves 15-26% from run to run on this shared host (BENCHMARKS.md), more than the
gaps the goals are about; side by side in one process, alternating, the ratios hold within a few percent.
``benchmarks/e2e.py`` stays the whole-run measurement (Trainer, data loading, peak RSS in processes of their own).

**Ours** is ``LoRAModule``'s model (NF4 SmolLM2-135M-Instruct, LoRA r 8 on all linear layers, lean activations) with
its labeled-only loss and fused AdamW (as ``configs/*.yaml``), in a plain loop (the Trainer's own work is 2-3% of a
4 x 64 step and <0.3% of a dense one). **The floor** is ``e2e.py``'s: the same NF4 model, every parameter frozen, no
adapter, forward + the same loss + backward to the inputs. **The recipe** is ``e2e.py``'s, as PEFT's QLoRA docs
write it: transformers' 4-bit loading, ``get_peft_model``, ``model(**batch).loss`` on batches padded to the longest,
AdamW. All three run the same examples (``batch_size`` of them per step: ours and the floor packed, the recipe
padded), 1 thread, in an order that rotates every round. Per-example time is the step's CPU time over
``batch_size``, the same divisor for all three.
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
import e2e  # noqa: E402  (the settings, data, floor and recipe of the end-to-end benchmark)

VARIANTS = ("ours", "floor", "recipe")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--setting", default="dense", choices=list(e2e.SETTINGS), help="e2e.py's batches (default dense)")
    p.add_argument("--profile", action="store_true", help="one profiled step each: top ops, aten::mm time by shape")
    args = p.parse_args(argv)
    from lightning_lora import NF4, LoRA
    from lightning_lora.train.module import LoRAModule

    torch.set_num_threads(1)
    module = LoRAModule(e2e.MODEL, adapter=LoRA(r=e2e.R, alpha=e2e.ALPHA, target_modules="all-linear"),
                        quantize=NF4(blocksize=64, double_quant=True))
    module.configure_model()
    ours = module.model.train()
    ours_optimizer = torch.optim.AdamW([q for q in ours.parameters() if q.requires_grad], lr=e2e.LR, fused=True)
    floor, tokenizer = e2e.floor_model()
    recipe, recipe_optimizer, recipe_tokenizer = e2e.recipe_model()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / f"{args.setting}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in e2e.conversations(args.setting, 8)))
        e2e.check_same_examples(data, args.setting)  # both tokenizations give the same ids and labels
        dm = e2e._our_batches(data, args.setting, tokenizer)
        dm.setup("fit")
        packed = [b for _, b in zip(range(2), dm.train_dataloader())]
        padded = e2e.recipe_batches(recipe_tokenizer, data, args.setting, 2)

    def step(name: str, i: int) -> None:
        if name == "recipe":
            e2e.recipe_step(recipe, recipe_optimizer, padded[i])
            return
        loss = e2e.packed_loss(ours if name == "ours" else floor, packed[i])
        loss.backward()
        if name == "ours":
            ours_optimizer.step()
            ours_optimizer.zero_grad(set_to_none=True)

    for name in VARIANTS:  # warm-up
        step(name, 0)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for i in range(args.rounds):
        for name in VARIANTS[i % 3:] + VARIANTS[:i % 3]:
            start = time.process_time()
            step(name, i % 2)
            times[name].append(time.process_time() - start)
    batch_size = e2e.SETTINGS[args.setting]["batch_size"]
    res = {"setting": args.setting, "rounds": args.rounds,
           "cpu_s_per_example": {k: [t / batch_size for t in v] for k, v in times.items()}}
    for base in ("floor", "recipe"):
        res[f"ours_vs_{base}"] = min(times["ours"]) / min(times[base])
        res[f"ours_vs_{base}_median"] = statistics.median(times["ours"]) / statistics.median(times[base])
    res["floor_vs_recipe"] = min(times["floor"]) / min(times["recipe"])
    res["floor_vs_recipe_median"] = statistics.median(times["floor"]) / statistics.median(times["recipe"])
    for name in VARIANTS:
        print(f"{name:6s} CPU s per example: " + " ".join(f"{t:.3f}" for t in res["cpu_s_per_example"][name]))
    print(f"{args.setting}: ours / floor {res['ours_vs_floor']:.3f} (fastest), {res['ours_vs_floor_median']:.3f} "
          f"(medians); ours / recipe {res['ours_vs_recipe']:.3f}, {res['ours_vs_recipe_median']:.3f}; floor / recipe "
          f"{res['floor_vs_recipe']:.3f}, {res['floor_vs_recipe_median']:.3f}")
    if args.profile:
        _profile({name: (lambda name=name: step(name, 0)) for name in VARIANTS})
    return res


def _profile(steps: dict) -> None:
    from torch.profiler import ProfilerActivity, profile

    for name, run in steps.items():
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            run()
        events = prof.key_averages(group_by_input_shape=True)
        mm = sorted((e for e in events if e.key in ("aten::mm", "aten::addmm_", "aten::addmm")),
                    key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6
        print(f"== {name}: {total:.2f} s CPU in the profiled step; the ops with the most own time:")
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]:
            print(f"  {e.key[:40]:40s} {e.self_cpu_time_total / 1e6:7.3f} s {e.count:5d} calls")
        print("  GEMMs by shape:")
        for e in mm[:16]:
            print(f"  {e.key:13s} {e.self_cpu_time_total / 1e6:7.3f} s {e.count:5d} calls  {e.input_shapes}")


if __name__ == "__main__":
    main()
