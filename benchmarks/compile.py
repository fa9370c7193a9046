"""Regional torch.compile on CPU: compile time, and step time after warm-up, compiled vs eager, in one process.

    flock /tmp/bench.lock python benchmarks/compile.py                    # inductor, SmolLM2, 2 x 256, 1 thread
    flock /tmp/bench.lock python benchmarks/compile.py --backend aot_eager --steps 3

Two copies of the same model, prepared as ``LoRAModule`` does (SmolLM2-135M-Instruct, LoRA r 8 on all linear
layers, packed attention, lean activations; ``--nf4`` for an NF4 base): one eager, one with its decoder layers
compiled by ``compile_layers`` (``train/compiling.py``). Batches are packed rows of random tokens (3 to 5 examples per
row, a different packing each step). A step is forward + chunked labeled-only loss + backward (no optimizer: the same
for both). **Compile time** is ``compile_layers`` (its probe step included) plus the first two compiled steps (the
packed graph is traced at the first, and the second, another packing, must not trace again), minus two eager steps.
**Step time** is the median over ``--steps`` steps after that, eager and compiled alternating, so the load of the
machine weighs on both alike. Times are process CPU time with 1 thread (as the other benchmarks: the machine is
shared), and the wall time of ``compile_layers`` besides (inductor's C++ compiler runs in child processes). Writes ``benchmarks/compile_results.json`` (with the load average before and after).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

import lightning_lora as ll
from lightning_lora.io.models import load_causal_lm
from lightning_lora.train.attention import use_packed_attention
from lightning_lora.train.compiling import compile_layers
from lightning_lora.train.lean_swap import use_lean_activations
from lightning_lora.train.loss import causal_lm_loss

HERE = Path(__file__).resolve().parent


def packed_batch(rows: int, length: int, seed: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, length) random token ids and position ids restarting at 0 for 3 to 5 examples per row."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, length), generator=gen)
    positions = []
    for _ in range(rows):
        n = int(torch.randint(3, 6, (1,), generator=gen))
        cuts = sorted(torch.randperm(length - 1, generator=gen)[: n - 1].add(1).tolist())
        bounds = [0, *cuts, length]
        positions.append(torch.cat([torch.arange(b - a) for a, b in zip(bounds[:-1], bounds[1:])]))
    return ids, torch.stack(positions)


def timed_step(model: torch.nn.Module, ids: torch.Tensor, position_ids: torch.Tensor) -> tuple[float, float]:
    """(process CPU seconds, loss) of one forward + loss + backward."""
    start = time.process_time()
    loss = causal_lm_loss(model, ids, ids.clone(), position_ids=position_ids)
    loss.backward()
    seconds = time.process_time() - start
    model.zero_grad(set_to_none=True)
    return seconds, loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--nf4", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    model, _ = load_causal_lm("smollm2-135m-instruct")
    if args.nf4:
        ll.quantize(model, ll.NF4())
    ll.inject(model, ll.LoRA(r=8, alpha=16, target_modules="all-linear"))
    assert use_packed_attention(model) and use_lean_activations(model)
    model.train()
    compiled = copy.deepcopy(model)
    vocab = model.config.vocab_size
    batches = [packed_batch(args.rows, args.length, seed, vocab) for seed in range(args.steps + 2)]

    eager_first = [timed_step(model, *batches[i])[0] for i in range(2)]
    start, wall = time.process_time(), time.perf_counter()
    verdict = compile_layers(compiled, backend=args.backend)
    probe_s, probe_wall = time.process_time() - start, time.perf_counter() - wall
    assert verdict, verdict.reason
    wall = time.perf_counter()
    first = [timed_step(compiled, *batches[0])[0]]
    graphs_after_first = counters["stats"]["unique_graphs"]
    first.append(timed_step(compiled, *batches[1])[0])
    first_wall = time.perf_counter() - wall
    eager, fast, diffs = [], [], []
    for ids, position_ids in batches[2:]:
        e, loss_e = timed_step(model, ids, position_ids)
        c, loss_c = timed_step(compiled, ids, position_ids)
        eager.append(e)
        fast.append(c)
        diffs.append(abs(loss_e - loss_c))
    result = {
        "model": "smollm2-135m-instruct" + (" NF4" if args.nf4 else ""), "adapter": "LoRA r8 all-linear",
        "batch": f"{args.rows} x {args.length} packed", "backend": args.backend, "threads": args.threads,
        "torch": torch.__version__, "compile_s": round(probe_s + sum(first) - sum(eager_first), 1),
        "compile_layers_s": round(probe_s, 1), "compile_layers_wall_s": round(probe_wall, 1),
        "first_compiled_steps_wall_s": round(first_wall, 1), "first_compiled_steps_s": [round(s, 2) for s in first],
        "graphs_compiled": counters["stats"]["unique_graphs"],
        "graphs_compiled_at_later_packings": counters["stats"]["unique_graphs"] - graphs_after_first,
        "graph_breaks": sum(counters["graph_break"].values()),
        "eager_step_s": round(statistics.median(eager), 3), "compiled_step_s": round(statistics.median(fast), 3),
        "ratio_compiled_over_eager": round(statistics.median(fast) / statistics.median(eager), 3),
        "eager_steps_s": [round(s, 3) for s in eager], "compiled_steps_s": [round(s, 3) for s in fast],
        "max_loss_difference": max(diffs), "load_average_before": load_before, "load_average_after": os.getloadavg(),
    }
    print(json.dumps(result, indent=1))
    out = HERE / f"compile_results{'_nf4' if args.nf4 else ''}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
