"""CPU threads under a busy neighbour: a QLoRA training step with OpenMP's defaults, with the commands' settings
(``commands/threads.py``), and with one thread, each alone and beside one busy process, interleaved.

    python benchmarks/threads.py [--steps 7] [--rounds 1]

Each setting runs in its own process (OpenMP reads its settings when torch loads). The model is SmolLM2-shaped
(hidden 576, MLP 1536, 9 heads, 3 KV heads) with 6 layers and a vocabulary of 8192, random weights, NF4 base, LoRA
r 8 on all linear layers, one row of 256 tokens with 76 labeled. Prints the median and the minimum step (the first
step left out) and the load average before each run: on a shared machine say how busy it was.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

SETTINGS = {"OpenMP defaults": {"LIGHTNING_LORA_THREADS": "keep"}, "commands' settings": {},
            "one thread": {"OMP_NUM_THREADS": "1"}}  # fmt: skip
STEP = r"""
import statistics, sys, time, torch
from lightning_lora.commands.threads import apply_for_commands, cpu_settings, usable_cores
from transformers import LlamaConfig, LlamaForCausalLM
import lightning_lora as ll
from lightning_lora.train.loss import causal_lm_loss
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=8192, hidden_size=576, intermediate_size=1536, num_hidden_layers=6,
                                     num_attention_heads=9, num_key_value_heads=3))
ll.prepare(model, ll.LoRA(r=8, target_modules="all-linear"), quantize=ll.NF4(skip_modules=["lm_head"]))
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
ids = torch.randint(0, 8192, (1, 256)); labels = ids.clone(); labels[:, :180] = -100
times = []
for _ in range(int(sys.argv[1])):
    t = time.perf_counter(); causal_lm_loss(model, ids, labels).backward(); opt.step(); opt.zero_grad()
    times.append(time.perf_counter() - t)
print(f"{statistics.median(times[1:]):.2f} {min(times[1:]):.2f} {torch.get_num_threads()}")
"""


def run(env_extra: dict, steps: int) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(env_extra)
    # apply the commands' settings as a command would, before torch loads
    code = "from lightning_lora.commands.threads import cpu_settings, usable_cores; import os; " \
           "os.environ.get('LIGHTNING_LORA_THREADS') == 'keep' or os.environ.update(cpu_settings(os.environ, " \
           "usable_cores()))\n" + STEP
    out = subprocess.run([sys.executable, "-c", code, str(steps)], env=env, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 else f"failed: {out.stderr[-300:]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    for _ in range(args.rounds):
        for busy in (False, True):
            neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
            time.sleep(0.5)
            try:
                for name, env in SETTINGS.items():
                    load = os.getloadavg()[0]
                    median, low, threads = run(env, args.steps).split()[:3]
                    print(f"{'busy neighbour' if busy else 'alone':>14} | {name:<18} | threads {threads} | "
                          f"median {median} s, min {low} s a step | load average before {load:.1f}", flush=True)
            finally:
                if neighbour is not None:
                    neighbour.kill()


if __name__ == "__main__":
    main()
