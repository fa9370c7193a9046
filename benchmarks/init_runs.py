"""LoftQ and PiSSA starts against plain LoRA/QLoRA on the quickstart: validation perplexity before and after training,
and the init's seconds.

    python benchmarks/init_runs.py                 # the six runs, one subprocess each, then the table
    python benchmarks/init_runs.py --only loftq1   # one run (its JSON line is appended to the results)
    python benchmarks/init_runs.py --table         # print the table of what benchmarks/init_results.json holds
    python benchmarks/init_runs.py --only qpissa --before-only   # the start only: init + validation, no training

Every run is ``configs/quickstart.yaml`` (SmolLM2-135M-Instruct, LoRA r 8 alpha 16 on all linear layers, 40 steps of
4 x 64 tokens, lr 1e-3, seed 0, 12 validation batches) with only the base's quantization and the adapter's ``init``
changed, parsed by the same LightningCLI parser as ``python -m lightning_lora fit``. Export is off (not measured).
"init s" is the time ``prepare`` logs for the SVD start (``init: ... in X s``); the machine is shared (2 cores), so
treat seconds as rough.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "init_results.json"
NO_QUANT = ["--model.quantize", "null"]
RUNS = {
    "lora": ("LoRA (fp32 base)", NO_QUANT),
    "qlora": ("QLoRA, default start", []),
    "loftq1": ("QLoRA + LoftQ, 1 iteration", ["--model.adapter.init_args.init", "loftq"]),
    "loftq4": ("QLoRA + LoftQ, 4 iterations", ["--model.adapter.init_args.init", "loftq",
                                               "--model.adapter.init_args.loftq_iters", "4"]),
    "qpissa": ("QPiSSA (pissa_niter 4)", ["--model.adapter.init_args.init", "pissa",
                                          "--model.adapter.init_args.pissa_niter", "4"]),
    "pissa": ("PiSSA (fp32 base, pissa_niter 4)", [*NO_QUANT, "--model.adapter.init_args.init", "pissa",
                                                   "--model.adapter.init_args.pissa_niter", "4"]),
}


def run_one(key: str, before_only: bool = False) -> dict:
    import torch

    from lightning_lora.commands.cli import make_cli

    argv = ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--model.export_dir", "null",
            "--trainer.default_root_dir", f"{tempfile.gettempdir()}/init_runs/{key}", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", *RUNS[key][1]]  # fmt: skip
    seconds = []

    class InitTime(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found = re.search(r"^init: .* in ([0-9.]+) s", record.getMessage())
            if found:
                seconds.append(float(found.group(1)))

    for logger in ("lightning_lora", "lightning.pytorch.utilities.rank_zero"):  # ours, or Lightning's in older trees
        logging.getLogger(logger).addHandler(InitTime())
    cli = make_cli(argv, run=False)  # parses, seeds (seed_everything: 0) and builds model, data and trainer
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    start = time.perf_counter()
    model.configure_model()
    load_s = time.perf_counter() - start
    before = trainer.validate(model, datamodule=data, verbose=False)[0]["val_ppl"]
    fit_s = after = None
    if not before_only:
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
        fit_s = time.perf_counter() - start
        after = float(trainer.callback_metrics["val_ppl"])
    return {"run": key, "label": RUNS[key][0], "ppl_before": float(before), "ppl_after": after,
            "configure_model_s": load_s, "init_s": seconds[0] if seconds else 0.0, "fit_s": fit_s, "threads": torch.get_num_threads()}  # fmt: skip


def table(rows: list[dict]) -> str:
    by = {}
    for r in rows:  # a full run's row wins over a start-only one
        if r["run"] not in by or r.get("ppl_after") is not None:
            by[r["run"]] = r
    lines = ["| run | val ppl before | val ppl after | init s | log-ppl gap to fp32 closed at start |",
             "|---|---|---|---|---|"]
    fp, q = by.get("lora"), by.get("qlora")
    for key in RUNS:
        r = by.get(key)
        if r is None:
            continue
        extra = "" if key in ("lora", "qlora") else f"{r['init_s']:.0f}"
        closed = ""
        if fp and q and key not in ("lora", "qlora"):
            gap = math.log(q["ppl_before"]) - math.log(fp["ppl_before"])
            closed = f"{100 * (math.log(q['ppl_before']) - math.log(r['ppl_before'])) / gap:.0f}%"
        after = "not run" if r.get("ppl_after") is None else f"{r['ppl_after']:.2f}"
        lines.append(f"| {r['label']} | {r['ppl_before']:.2f} | {after} | {extra} | {closed} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(RUNS))
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--before-only", action="store_true", help="with --only: init and validate, no training")
    args = parser.parse_args()
    if args.only:
        row = run_one(args.only, args.before_only)
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row))
        return
    if not args.table:
        RESULTS.write_text("")
        for key in RUNS:
            subprocess.run([sys.executable, __file__, "--only", key], check=True, cwd=ROOT)
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    print(table(rows))


if __name__ == "__main__":
    main()
