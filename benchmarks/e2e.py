"""End-to-end training throughput (tokens/s) of ``configs/quickstart.yaml``: lightning_lora's LoRA against PEFT's LoRA
on the same model (NF4-quantized when the config says ``quantize:``, as the QLoRA quickstart does), data, batches,
Trainer and optimizer.

    python benchmarks/e2e.py                       # 3 runs each, 8 steps per run, the first 2 of every run not timed
    python benchmarks/e2e.py --steps 4 --repeats 1 # a smoke run

Both variants are ``LoRAModule``; the PEFT one only replaces ``inject`` by ``peft.get_peft_model`` with the same rank,
alpha, dropout and targets. Runs alternate (ours, PEFT, ours, ...) so machine noise hits both alike. A step is timed
from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, optimizer step) in process CPU time
with one torch thread (robust on a shared machine); tokens are the batch's
non-padding tokens (attention mask). Writes ``benchmarks/e2e_results.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Callback, Trainer, seed_everything

from lightning_lora.train.data import InstructionDataModule
from lightning_lora.io.files import write_json
from lightning_lora.methods.lora import LoRA
from lightning_lora.train.module import LoRAModule
from lightning_lora.quant.nf4 import NF4, quantize

ROOT = Path(__file__).parent.parent


class PeftLoRAModule(LoRAModule):
    """``LoRAModule`` with PEFT's LoRA instead of ours (same base loading, loss, optimizer and logging)."""

    def configure_model(self) -> None:
        if self.model is not None:
            return
        import peft

        from lightning_lora.io.models import load_causal_lm

        model, tokenizer = load_causal_lm(self.base_model, dtype=self.dtype_name)
        self._tokenizer = self._tokenizer or tokenizer
        if self.quantize is not None:  # the same NF4 base as ours (QLoRA)
            model = quantize(model, self.quantize)
        a = self.adapter
        config = peft.LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, use_rslora=a.rslora,
                                 target_modules=a.target_modules)  # fmt: skip
        self.model = peft.get_peft_model(model, config).train()  # as ours: no module left in eval mode

    def on_fit_start(self) -> None:  # our memory report does not know PEFT's layers
        pass


class StepTimer(Callback):
    def __init__(self, skip: int):
        self.skip, self.steps, self._start = skip, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        seconds = time.process_time() - self._start
        if batch_idx >= self.skip:
            self.steps.append((int(batch["attention_mask"].sum()), seconds))


def run_once(cls: type, cfg: dict, steps: int, skip: int) -> list[tuple[int, float]]:
    seed_everything(cfg.get("seed_everything", 0), verbose=False)
    adapter = LoRA(**cfg["model"]["adapter"]["init_args"])
    nf4 = cfg["model"].get("quantize")
    module = cls(base_model=cfg["model"]["base_model"], adapter=adapter, export_dir=None,
                 quantize=None if nf4 is None else NF4(**nf4))  # fmt: skip
    data = InstructionDataModule(**cfg["data"]["init_args"])
    timer = StepTimer(skip)
    trainer = Trainer(
        accelerator="cpu", devices=1, precision=cfg["trainer"].get("precision", "32-true"), max_steps=steps,
        limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False, logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
    )  # fmt: skip
    trainer.fit(module, data)
    return timer.steps


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "quickstart.yaml")
    parser.add_argument("--steps", type=int, default=8, help="training steps per run")
    parser.add_argument("--skip", type=int, default=2, help="untimed warm-up steps at the start of every run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant, alternating")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("e2e_results.json"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time has no spin-waits)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = yaml.safe_load(args.config.read_text())
    if cfg["model"]["adapter"]["class_path"].rsplit(".", 1)[-1] != "LoRA":
        raise ValueError(f"{args.config}: e2e compares LoRA with PEFT's LoRA; the config's adapter is not LoRA.")
    samples: dict[str, list[tuple[int, float]]] = {"lightning_lora": [], "peft": []}
    for _ in range(args.repeats):
        samples["lightning_lora"] += run_once(LoRAModule, cfg, args.steps, args.skip)
        samples["peft"] += run_once(PeftLoRAModule, cfg, args.steps, args.skip)
    result = {
        name: {
            "tokens_per_s": sum(t for t, _ in s) / sum(sec for _, sec in s),
            "median_step_tokens_per_s": statistics.median(t / sec for t, sec in s),
            "steps_timed": len(s),
        }
        for name, s in samples.items()
    }
    result["ours_vs_peft_throughput"] = result["lightning_lora"]["tokens_per_s"] / result["peft"]["tokens_per_s"]
    result["setup"] = {"config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
                       "steps": args.steps, "skip": args.skip, "repeats": args.repeats, "threads": args.threads,
                       "clock": "process CPU time",
                       "batch_size": cfg["data"]["init_args"].get("batch_size"),
                       "max_length": cfg["data"]["init_args"].get("max_length")}  # fmt: skip
    print("| variant | tokens/s (total) | median step tokens/s | steps timed |\n|---|---|---|---|")
    for name in samples:
        r = result[name]
        print(f"| {name} | {r['tokens_per_s']:.1f} | {r['median_step_tokens_per_s']:.1f} | {r['steps_timed']} |")
    print(f"ours / PEFT throughput: {result['ours_vs_peft_throughput']:.3f}")
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
