"""Speed and memory of lightning_lora against PEFT and against the physical floor (REFERENCE.md section 3).

Every variant is built in one process over the same frozen base weights (shared, not copied), warmed up, then timed
round by round, interleaved, so machine noise hits all variants alike. Ratios use the median step time.

    python benchmarks/bench.py            # default: hidden 1024, 2 layers, MLP 2752, vocab 8192, batch 4 x 128
    python benchmarks/bench.py --quick    # fewer rounds (about 3 minutes on 2 cores)
    python benchmarks/bench.py --tiny     # seconds: a tiny model, 1 round (used by tests/test_bench.py)

Floor: frozen base forward + loss + backward to the inputs (the embedding output requires grad, so backward runs
through every layer). Train steps: forward + loss + backward + AdamW step. Peak memory: the CPU allocator's own
alloc/free events (torch.profiler, profile_memory=True) summed in time order over one step, plus the bytes that are
resident before it (parameters, optimizer state), deduplicated by storage. Activation memory: bytes saved for
backward (torch.autograd.graph.saved_tensors_hooks), deduplicated by storage, parameters excluded.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # silence the profiler's start/stop lines

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_lora import DoRA, LoRA, VeRA, inject, merge, param_groups, set_adapter
from lightning_lora.io.files import write_json
from lightning_lora.quant.nf4 import NF4, quantize

SIZES = {
    "default": dict(hidden_size=1024, num_hidden_layers=2, intermediate_size=2752, vocab_size=8192, heads=16, batch=4, seq=128),
    "tiny": dict(hidden_size=64, num_hidden_layers=1, intermediate_size=96, vocab_size=128, heads=4, batch=2, seq=16),
}
KEYS = (
    "lora_vs_floor", "lora_vs_peft", "lora_dropout_act_mem_vs_peft", "dora_vs_floor", "dora_vs_peft", "dora_mem_vs_lora",
    "vera_vs_floor", "vera_vs_peft", "qlora_vs_lora", "nf4_bits_per_param", "loraplus_vs_lora",
    "unmerged_infer_vs_base", "merged_infer_vs_base", "swap_ms", "merge_vs_peft",
)  # fmt: skip
PEFT_KEYS = ("peft_lora_vs_floor", "peft_dora_vs_floor", "peft_vera_vs_floor", "peft_qlora_vs_lora", "peft_unmerged_infer_vs_base")
GOALS = {
    "lora_vs_floor": "<= 1.04", "lora_vs_peft": "<= 1.00", "lora_dropout_act_mem_vs_peft": "<= 0.80",
    "dora_vs_floor": "<= 1.20", "dora_mem_vs_lora": "<= 1.10", "vera_vs_floor": "<= 1.25", "qlora_vs_lora": "<= 1.06",
    "nf4_bits_per_param": "4.127", "loraplus_vs_lora": "1.00 +- 0.03", "unmerged_infer_vs_base": "<= 1.06",
    "merged_infer_vs_base": "<= 1.01", "dora_vs_peft": "< 1", "vera_vs_peft": "< 1", "merge_vs_peft": "< 1",
}  # fmt: skip
R, ALPHA, VERA_R, LR = 16, 32.0, 256, 1e-4
MEDIAN_PAIRS = {
    "lora_vs_floor": ("lora", "floor"), "lora_vs_peft": ("lora", "peft_lora"), "dora_vs_floor": ("dora", "floor"),
    "dora_vs_peft": ("dora", "peft_dora"), "vera_vs_floor": ("vera", "floor"), "vera_vs_peft": ("vera", "peft_vera"),
    "qlora_vs_lora": ("qlora", "lora"), "loraplus_vs_lora": ("loraplus", "lora"),
    "unmerged_infer_vs_base": ("infer_unmerged", "infer_base"), "merged_infer_vs_base": ("infer_merged", "infer_base"),
    "peft_lora_vs_floor": ("peft_lora", "floor"), "peft_dora_vs_floor": ("peft_dora", "floor"),
    "peft_vera_vs_floor": ("peft_vera", "floor"), "peft_unmerged_infer_vs_base": ("peft_infer_unmerged", "infer_base"),
}  # fmt: skip


def base_model(size: dict) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=size["hidden_size"], num_hidden_layers=size["num_hidden_layers"],
        intermediate_size=size["intermediate_size"], vocab_size=size["vocab_size"], num_attention_heads=size["heads"],
        num_key_value_heads=size["heads"], max_position_embeddings=max(256, size["seq"]),
    )  # fmt: skip
    model = LlamaForCausalLM(config).train()
    model.requires_grad_(False)
    return model


def share(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters are the same tensors (no extra weight memory)."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


def clone(model: nn.Module) -> nn.Module:
    """A full copy (for merge, which writes the weights in place)."""
    return copy.deepcopy(model)


def nf4_bits(model: nn.Module) -> float:
    """Stored bits per quantized weight: packed 4-bit data + 8-bit absmax + fp32 second-level absmax."""
    bits = numel = 0
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None:
            continue
        numel += module.in_features * module.out_features
        bits += module.weight.data.numel() * module.weight.data.element_size() * 8
        bits += state.absmax.numel() * state.absmax.element_size() * 8
        if state.nested:
            bits += state.state2.absmax.numel() * state.state2.absmax.element_size() * 8
    return bits / numel


def peft_model(model: nn.Module, kind: str, dropout: float = 0.0) -> nn.Module:
    import peft

    if kind == "vera":
        config = peft.VeraConfig(r=VERA_R, target_modules="all-linear", vera_dropout=dropout)
    else:
        config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=dropout,
                                 use_dora=kind == "dora")  # fmt: skip
    return peft.get_peft_model(model, config).train()


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_step(model: nn.Module, opt: torch.optim.Optimizer | None, ids: torch.Tensor) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)


def infer_step(model: nn.Module, ids: torch.Tensor) -> None:
    with torch.no_grad():
        model(input_ids=ids)


def make_variants(base: nn.Module, ids: torch.Tensor, with_peft: bool) -> tuple[dict[str, Callable], dict]:
    """name -> a zero-argument step; plus the models by name (for memory measurements)."""
    models, steps = {}, {}

    def train(name: str, model: nn.Module, groups=None) -> None:
        model.train()
        opt = None if name == "floor" else torch.optim.AdamW(groups or trainable(model), lr=LR)
        models[name] = (model, opt)
        steps[name] = lambda: train_step(model, opt, ids)

    floor = share(base)
    floor.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_())
    train("floor", floor)
    train("lora", inject(share(base), LoRA(r=R, alpha=ALPHA)))
    lp = inject(share(base), LoRA(r=R, alpha=ALPHA))
    train("loraplus", lp, param_groups(lp, lr=LR, lr_ratio=16))
    train("dora", inject(share(base), DoRA(r=R, alpha=ALPHA)))
    train("vera", inject(share(base), VeRA(r=VERA_R)))
    train("qlora", inject(quantize(share(base), NF4()), LoRA(r=R, alpha=ALPHA)))
    if with_peft:
        train("peft_lora", peft_model(share(base), "lora"))
        train("peft_dora", peft_model(share(base), "dora"))
        train("peft_vera", peft_model(share(base), "vera"))
        train("peft_qlora", peft_model(quantize(share(base), NF4()), "lora"))
    infer = {"infer_base": share(base), "infer_unmerged": _perturbed(inject(share(base), LoRA(r=R, alpha=ALPHA)))}
    infer["infer_merged"] = merge(_perturbed(inject(clone(base), LoRA(r=R, alpha=ALPHA))))
    if with_peft:
        infer["peft_infer_unmerged"] = _perturbed(peft_model(share(base), "lora"))
    for name, model in infer.items():
        model.eval()
        steps[name] = (lambda m: lambda: infer_step(m, ids))(model)
    return steps, models


def _perturbed(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in trainable(model):
            p.add_(torch.randn_like(p) * 0.01)
    return model


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def time_rounds(steps: dict[str, Callable], rounds: int, warmup: int, seed: int = 0) -> dict[str, dict[str, list]]:
    """Per variant, the wall-clock and the process CPU time of every timed step."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: {"wall": [], "cpu": []} for name in steps}
    order = list(steps)
    rng = random.Random(seed)
    for i in range(rounds):
        say(f"round {i + 1}/{rounds}")
        rng.shuffle(order)  # no variant always runs right after the same neighbour
        for name in order:
            wall, cpu = time.perf_counter(), time.process_time()
            steps[name]()
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
    return times


def _storages(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}


def activation_bytes(model: nn.Module, ids: torch.Tensor) -> int:
    """Bytes saved for backward in one forward, deduplicated by storage, parameters excluded."""
    params = set(_storages(model.parameters()))
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    del loss
    return sum(saved.values())


def peak_bytes(model: nn.Module, opt, step: Callable, times: dict | None = None) -> int:
    """Resident bytes before the step (params, optimizer state) + the allocator's peak of net allocations during it."""
    from torch.profiler import ProfilerActivity, profile

    resident = [*model.parameters(), *model.buffers()]
    if opt is not None:
        resident += [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    if times is not None:  # CPU time by op (profiled step): where the time goes
        for e in prof.key_averages():
            times[e.key] = e.cpu_time_total / 1e6
        times["self_total"] = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return sum(_storages(resident).values()) + peak


def swap_and_merge(base: nn.Module, ids: torch.Tensor, with_peft: bool, reps: int, clock=time.process_time) -> dict:
    """Adapter swap time (set_adapter between two adapters) and merge time against PEFT's merge_and_unload."""
    model = inject(share(base), LoRA(r=R, alpha=ALPHA), "a")
    inject(model, LoRA(r=R, alpha=ALPHA), "b")
    swaps = []
    for i in range(max(reps, 5)):
        start = clock()
        set_adapter(model, "b" if i % 2 == 0 else "a")
        swaps.append(clock() - start)
    out = {"swap_ms": 1e3 * statistics.median(swaps)}
    ours, theirs = [], []
    for _ in range(reps):
        m = _perturbed(inject(clone(base), LoRA(r=R, alpha=ALPHA)))
        start = clock()
        merge(m)
        ours.append(clock() - start)
        del m
        if with_peft:
            m = _perturbed(peft_model(clone(base), "lora"))
            start = clock()
            m.merge_and_unload()
            theirs.append(clock() - start)
            del m
    out["merge_s"] = min(ours)
    if theirs:
        out["peft_merge_s"] = min(theirs)
    return out


def run(size_name: str, rounds: int, warmup: int, with_peft: bool = True, clock: str = "cpu", threads: int = 1) -> dict:
    size = SIZES[size_name]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base = base_model(size)
    ids = torch.randint(0, size["vocab_size"], (size["batch"], size["seq"]))
    say("building variants")
    steps, models = make_variants(base, ids, with_peft)
    say(f"warm-up ({warmup} step(s) each of {len(steps)} variants)")
    times = time_rounds(steps, rounds, warmup)
    mins = {n: min(t[clock]) for n, t in times.items()}
    meds = {n: statistics.median(t[clock]) for n, t in times.items()}
    say("peak memory (profiler), activations, swap and merge")
    ops = {"floor": {}, "lora": {}}
    peaks = {n: peak_bytes(m, opt, steps[n], ops.get(n)) for n, (m, opt) in models.items()}
    adapter_s = sum(ops["lora"].get(k, 0.0) for k in ("_LoRALinear", "_LoRALinearBackward", "Optimizer.step#AdamW.step"))
    profile = {"floor_step_s": ops["floor"]["self_total"], "lora_step_s": ops["lora"]["self_total"],
               "lora_adapter_fwd_bwd_opt_s": adapter_s, "adapter_work_vs_floor": adapter_s / ops["floor"]["self_total"],
               "floor_mm_s": ops["floor"].get("aten::mm", 0.0), "lora_mm_s": ops["lora"].get("aten::mm", 0.0)}  # fmt: skip

    lora_model = models["lora"][0]
    act = {}
    for p in (0.0, 0.05):
        for module in lora_model.modules():
            if hasattr(module, "lora_A") and hasattr(module, "p"):
                module.p = p
        act[f"lora_p{p}"] = activation_bytes(lora_model, ids)
        if with_peft:
            act[f"peft_lora_p{p}"] = activation_bytes(peft_model(share(base), "lora", dropout=p), ids)
    for module in lora_model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "p"):
            module.p = 0.0
    extra = swap_and_merge(base, ids, with_peft, max(1, min(rounds, 5)), time.process_time if clock == "cpu" else time.perf_counter)

    ratio = lambda a, b: mins[a] / mins[b]  # noqa: E731  (contention only ever adds time: min is the robust estimate)
    by_median = {k: meds[a] / meds[b] for k, (a, b) in MEDIAN_PAIRS.items() if a in meds and b in meds}
    result = {
        "lora_vs_floor": ratio("lora", "floor"),
        "dora_vs_floor": ratio("dora", "floor"),
        "dora_mem_vs_lora": peaks["dora"] / peaks["lora"],
        "vera_vs_floor": ratio("vera", "floor"),
        "qlora_vs_lora": ratio("qlora", "lora"),
        "nf4_bits_per_param": nf4_bits(models["qlora"][0]),
        "loraplus_vs_lora": ratio("loraplus", "lora"),
        "unmerged_infer_vs_base": ratio("infer_unmerged", "infer_base"),
        "merged_infer_vs_base": ratio("infer_merged", "infer_base"),
        "swap_ms": extra["swap_ms"],
    }
    if with_peft:
        result.update(
            lora_vs_peft=ratio("lora", "peft_lora"),
            lora_dropout_act_mem_vs_peft=act["lora_p0.05"] / act["peft_lora_p0.05"],
            dora_vs_peft=ratio("dora", "peft_dora"),
            vera_vs_peft=ratio("vera", "peft_vera"),
            merge_vs_peft=extra["merge_s"] / extra["peft_merge_s"],
            peft_lora_vs_floor=ratio("peft_lora", "floor"),
            peft_dora_vs_floor=ratio("peft_dora", "floor"),
            peft_vera_vs_floor=ratio("peft_vera", "floor"),
            peft_qlora_vs_lora=ratio("peft_qlora", "peft_lora"),
            peft_unmerged_infer_vs_base=ratio("peft_infer_unmerged", "infer_base"),
            peft_dora_mem_vs_lora=peaks["peft_dora"] / peaks["peft_lora"],
        )
    return {
        "ratios": {k: result.get(k) for k in (*KEYS, *PEFT_KEYS, "peft_dora_mem_vs_lora")},
        "ratios_of_medians": by_median,
        "profile_one_step": profile,
        "step_s": {n: {"min": mins[n], "median": meds[n], "n": rounds, "clock": clock,
                       "wall_min": min(t["wall"]), "wall_median": statistics.median(t["wall"])} for n, t in times.items()},
        "peak_mb": {n: v / 2**20 for n, v in peaks.items()},
        "activation_mb": {n: v / 2**20 for n, v in act.items()},
        "merge_s": {k: v for k, v in extra.items() if k != "swap_ms"},
        "setup": {"size": size_name, **size, "r": R, "alpha": ALPHA, "vera_r": VERA_R, "dtype": "float32",
                  "targets": "all-linear (lm_head excluded, as PEFT)", "rounds": rounds, "warmup": warmup,
                  "clock": clock, "threads": threads},
        "machine": machine(),
    }  # fmt: skip


def machine() -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import peft

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "peft": peft.__version__,
            "python": platform.python_version()}  # fmt: skip


def table(res: dict) -> str:
    lines = ["Ratios of minimum step times (" + res["setup"]["clock"] + " clock); in brackets: of medians.", "",
             "| ratio | ours | PEFT | goal |", "|---|---|---|---|"]
    peft_of = {"lora_vs_floor": "peft_lora_vs_floor", "dora_vs_floor": "peft_dora_vs_floor",
               "vera_vs_floor": "peft_vera_vs_floor", "qlora_vs_lora": "peft_qlora_vs_lora",
               "unmerged_infer_vs_base": "peft_unmerged_infer_vs_base", "dora_mem_vs_lora": "peft_dora_mem_vs_lora"}  # fmt: skip
    med = res["ratios_of_medians"]

    def fmt(key: str) -> str:
        value = res["ratios"].get(key)
        if value is None:
            return "-"
        return f"{value:.3f}" + (f" ({med[key]:.3f})" if key in med else "")

    for key in KEYS:
        lines.append(f"| {key} | {fmt(key)} | {fmt(peft_of[key]) if key in peft_of else '-'} | {GOALS.get(key, '-')} |")
    prof = res["profile_one_step"]
    lines += ["", f"Profile of one step: LoRA's adapter work (fused forward + backward + AdamW) = "
              f"{prof['lora_adapter_fwd_bwd_opt_s']:.3f} s = {100 * prof['adapter_work_vs_floor']:.1f}% of the floor step "
              f"({prof['floor_step_s']:.3f} s); LoRA step {prof['lora_step_s']:.3f} s."]
    clock = res["setup"]["clock"]
    lines += ["", f"| variant | min s ({clock}) | median s ({clock}) | median s (wall) | peak MB |", "|---|---|---|---|---|"]
    for name, t in res["step_s"].items():
        peak = res["peak_mb"].get(name)
        lines.append(f"| {name} | {t['min']:.4f} | {t['median']:.4f} | {t['wall_median']:.4f} | "
                     f"{'-' if peak is None else f'{peak:.0f}'} |")
    lines += ["", "| activations saved for backward | MB |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in res["activation_mb"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds instead of 20")
    parser.add_argument("--tiny", action="store_true", help="tiny model, 1 round: checks the script, not the speed")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per variant (overrides the mode)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="time steps by process CPU time (default; robust on a shared machine) or wall clock")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: no spin-waits)")
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT variants (ratios vs PEFT become null)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.tiny else 5 if args.quick else 20)
    warmup = 1 if args.tiny else args.warmup
    res = run("tiny" if args.tiny else "default", rounds, warmup, not args.no_peft, args.clock, args.threads)
    res["command"] = " ".join(["python", "benchmarks/bench.py", *(argv if argv is not None else sys.argv[1:])])
    print(table(res))
    write_json(res, args.out)
    return res


if __name__ == "__main__":
    main()
