"""One process, ours against the floor and the recipe step for step: ratios that this host's noise cannot move.

    python benchmarks/side_by_side.py                        # 4 rounds at 4 x 512 dense: CPU time per step, ratios
    python benchmarks/side_by_side.py --setting quickstart   # the 4 x 64 chat batches
    python benchmarks/side_by_side.py --profile              # then one profiled step each: top ops, GEMMs by shape

Between processes the same variant moves 15-26% from run to run on this shared host (BENCHMARKS.md), more than the
gaps the goals are about. Here the three run in turns in one process, so each round's ratios compare steps taken
seconds apart; the median of the rounds' ratios is what to read. ``benchmarks/e2e.py`` stays the measurement of peak
RSS (each variant in a process of its own).

**Ours** is the whole fine-tune as ``configs/quickstart.yaml`` runs it: ``LoRAModule`` (NF4 SmolLM2-135M-Instruct,
LoRA r 8 on all linear layers, lean activations, labeled-only loss, fused AdamW) fed by ``InstructionDataModule``
(packed, shared prefix) through Lightning's ``Trainer``. Its step is counted from one batch's start to the next's,
less the time the floor and the recipe took in between: the data loader, the Trainer's hooks and the optimizer are
in it. **The floor** is ``e2e.py``'s: the same NF4 model, every parameter frozen, no adapter, forward + the same
loss + backward to the inputs, on ours' packed batch. **The recipe** is ``e2e.py``'s, as PEFT's QLoRA docs write it:
transformers' 4-bit loading, ``get_peft_model``, ``model(**batch).loss`` on the same examples padded to the longest,
AdamW. After each of ours' steps the floor and the recipe take theirs, in alternating order. 1 thread; CPU time;
per-example time is a step's time over ``batch_size``, the same divisor for all three. The first round is a warm-up
(``--warmup``). ``--compile`` runs ours with ``LoRAModule(compile=True)`` (regional torch.compile, opt-in): its step
time after warm-up; take ``--warmup 3``, so the first steps, which trace the graphs, are not counted.
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
    p.add_argument("--rounds", type=int, default=4, help="measured rounds, after the warm-up rounds")
    p.add_argument("--setting", default="dense", choices=list(e2e.SETTINGS), help="e2e.py's batches (default dense)")
    p.add_argument("--profile", action="store_true", help="one profiled step each: top ops, aten::mm time by shape")
    p.add_argument("--warmup", type=int, default=1, help="rounds run first and not counted")
    p.add_argument("--compile", action="store_true", help="ours with LoRAModule(compile=True) (take --warmup 3)")
    args = p.parse_args(argv)
    from lightning.pytorch import Callback, Trainer, seed_everything

    from lightning_lora import NF4, LoRA
    from lightning_lora.train.module import LoRAModule

    torch.set_num_threads(1)
    steps = args.rounds + args.warmup
    floor, _ = e2e.floor_model()
    recipe, recipe_optimizer, recipe_tokenizer = e2e.recipe_model()
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}

    class Turns(Callback):
        """Times ours' steps and runs the floor's and the recipe's between them (``--warmup`` rounds first)."""

        def __init__(self, padded: list[dict]):
            self.padded, self.first = padded, None
            self.start, self.index, self.others = None, 0, 0.0

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self._close(time.process_time())
            self.start, self.index, self.others = time.process_time(), batch_idx, 0.0

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            turns = (("floor", lambda: floor_step(batch)),
                     ("recipe", lambda: e2e.recipe_step(recipe, recipe_optimizer, self.padded[batch_idx])))
            for name, run in turns if batch_idx % 2 == 0 else turns[::-1]:
                start = time.process_time()
                run()
                self.others += time.process_time() - start
                if batch_idx >= args.warmup:
                    times[name].append(time.process_time() - start)
            self.first = batch if self.first is None else self.first

        def on_train_end(self, trainer, module):
            self._close(time.process_time())

        def _close(self, now: float) -> None:
            """Ours' step: from its batch's start to now (the next batch's start), less the others' turns."""
            if self.start is not None and self.index >= args.warmup:
                times["ours"].append(now - self.start - self.others)

    def floor_step(batch: dict) -> None:
        e2e.packed_loss(floor, batch).backward()

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / f"{args.setting}.jsonl"
        rows = e2e.conversations(args.setting, e2e.SETTINGS[args.setting]["batch_size"] * (steps + 1))
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        e2e.check_same_examples(data, args.setting)  # both tokenizations give the same ids and labels
        turns = Turns(e2e.recipe_batches(recipe_tokenizer, data, args.setting, steps))
        seed_everything(0, verbose=False)
        module = LoRAModule(e2e.MODEL, adapter=LoRA(r=e2e.R, alpha=e2e.ALPHA, target_modules="all-linear"),
                            quantize=NF4(blocksize=64, double_quant=True),
                            optimizer=lambda params: torch.optim.AdamW(params, lr=e2e.LR, fused=True),
                            compile=args.compile)
        trainer = Trainer(accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0,
                          enable_checkpointing=False, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, callbacks=[turns])
        trainer.fit(module, e2e._our_batches(data, args.setting, None))
    res = summarize(times, args.setting, args.rounds)
    if args.profile:
        ours, optimizer = module.model.train(), trainer.optimizers[0]

        def ours_step() -> None:
            e2e.packed_loss(ours, turns.first).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        _profile({"ours": ours_step, "floor": lambda: floor_step(turns.first),
                  "recipe": lambda: e2e.recipe_step(recipe, recipe_optimizer, turns.padded[0])})
    return res


def summarize(times: dict[str, list[float]], setting: str, rounds: int) -> dict:
    """Per-example times and, for each pair, the median and quartiles of the rounds' ratios (slow drift cancels in
    a round), with the ratios of the fastest and of the median steps."""
    batch_size = e2e.SETTINGS[setting]["batch_size"]
    res = {"setting": setting, "rounds": rounds,
           "cpu_s_per_example": {k: [t / batch_size for t in v] for k, v in times.items()}}
    for name in VARIANTS:
        print(f"{name:6s} CPU s per example: " + " ".join(f"{t:.3f}" for t in res["cpu_s_per_example"][name]))
    for a, b in (("ours", "floor"), ("ours", "recipe"), ("floor", "recipe")):
        per_round = sorted(x / y for x, y in zip(times[a], times[b]))
        q1, q3 = statistics.quantiles(per_round, n=4)[::2] if len(per_round) > 1 else per_round * 2
        r = res[f"{a}_vs_{b}"] = {
            "per_round_median": statistics.median(per_round), "per_round_quartiles": [q1, q3],
            "fastest": min(times[a]) / min(times[b]), "medians": statistics.median(times[a]) / statistics.median(times[b])}
        print(f"{setting}: {a} / {b} {r['per_round_median']:.3f} (median of the rounds' ratios; quartiles "
              f"{q1:.3f}-{q3:.3f}), {r['fastest']:.3f} (fastest steps), {r['medians']:.3f} (median steps)")
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
