"""End to end: a QLoRA fine-tune of SmolLM2-135M-Instruct with lightning_lora against the standard recipe.

    python benchmarks/e2e.py                                   # both settings, 2 alternating runs per variant
    python benchmarks/e2e.py --settings quickstart --steps 12 --repeats 1    # a smoke run

**The recipe** is written here as PEFT's QLoRA docs show it, not through our classes: transformers
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)`` loading,
``get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))``, and a plain PyTorch loop over
batches padded to the longest, minimising ``model(..., labels=...).loss`` with AdamW.
**Ours** is ``LoRAModule`` (NF4 base, LoRA r 8 on all linear layers, chunked labeled-only loss) +
``InstructionDataModule(packing=True, share_prefix=True)`` + ``Trainer``, as ``configs/quickstart.yaml`` sets it up;
in the settings named by ``--checkpointing`` (default: ``long``) ours also runs with
``LoRAModule(gradient_checkpointing="mlp")`` (``--checkpointing-mode layers``: whole layers), a third variant.

Both see the same examples in the same order, ``batch_size`` examples per optimizer step (the recipe tokenizes with
its own code; the parent checks that both tokenizations are identical). Settings: ``quickstart`` (chatterbot pairs,
batch 4, max_length 64) and ``long`` (batch 4, max_length 512, responses made of pydoc topics, mostly response
tokens). Each run is its own process (1 torch thread), variants alternating. Recorded per run: process CPU time per
example over the steps after the first (data loading and framework overhead included), the process's peak RSS
(loading included) and its peak RSS during training (``VmHWM`` reset at the first step), and the mean training loss
over the last 10 steps. Writes ``benchmarks/e2e_results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
SETTINGS = {"quickstart": dict(batch_size=4, max_length=64), "long": dict(batch_size=4, max_length=512)}
LR, R, ALPHA = 1e-3, 8, 16
CHECKPOINTING = {"ours+ckpt mlp": "mlp", "ours+ckpt layers": True}  # ours with LoRAModule(gradient_checkpointing=...)


# ------------------------------------------------------------------------------------------------------ the data
def conversations(setting: str, n: int) -> list[dict]:
    """``n`` prompt/response pairs in a fixed order."""
    if setting == "quickstart":
        from lightning_lora.train.data import chatterbot_pairs

        pairs = chatterbot_pairs()
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0)).tolist()
        return [{"prompt": pairs[i][0]["content"], "response": pairs[i][1]["content"]} for i in order[:n]]
    from pydoc_data.topics import topics

    out, keys = [], sorted(topics)
    for i in range(n):  # long responses of varied length: the first paragraphs of a topic, up to ~1,200-2,400 chars
        key = keys[(7 * i) % len(keys)]
        budget, text = 1200 + 150 * (i % 9), ""
        for para in topics[key].split("\n\n"):
            if text and len(text) + len(para) > budget:
                break
            text += para.strip() + "\n\n"
        out.append({"prompt": f"Explain the Python topic '{key}'.", "response": text.strip()})
    return out


def recipe_tokenize(tokenizer, rows: list[dict], max_length: int) -> list[dict]:
    """The recipe's own tokenization: chat template, prompt tokens masked, truncated, label-less rows dropped."""
    out = []
    for row in rows:
        user = [{"role": "user", "content": row["prompt"]}]
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": row["response"]}], tokenize=False)
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_length]
        labels = [-100] * min(n_prompt, len(ids)) + ids[n_prompt:]
        if any(t != -100 for t in labels):
            out.append({"input_ids": ids, "labels": labels})
    return out


# ---------------------------------------------------------------------------------------------------- the workers
def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
    except OSError:
        pass


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_recipe(data: Path, setting: str, steps: int) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from lightning_lora.io.models import resolve_model_path  # only to find the local model folder

    torch.manual_seed(0)
    folder = resolve_model_path(MODEL)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    spec = SETTINGS[setting]
    examples = recipe_tokenize(tokenizer, [json.loads(x) for x in data.read_text().splitlines()], spec["max_length"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    losses, start = [], None
    for step in range(steps):
        batch = examples[step * spec["batch_size"] : (step + 1) * spec["batch_size"]]
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.tensor([b["input_ids"] + [pad] * (width - len(b["input_ids"])) for b in batch])
        mask = torch.tensor([[1] * len(b["input_ids"]) + [0] * (width - len(b["input_ids"])) for b in batch])
        labels = torch.tensor([b["labels"] + [-100] * (width - len(b["labels"])) for b in batch])
        if step == 0:
            _reset_peak_rss()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == 0:
            start = time.process_time()
    return {"cpu_s": time.process_time() - start, "losses": losses}


def run_ours(data: Path, setting: str, steps: int, checkpointing: bool | str = False) -> dict:
    from lightning.pytorch import Callback, Trainer, seed_everything

    from lightning_lora import LoRA, NF4
    from lightning_lora.train.data import InstructionDataModule, read_jsonl, tokenize_conversations
    from lightning_lora.train.module import LoRAModule

    class InOrder(InstructionDataModule):
        """The file's examples in the file's order (the recipe's), packed; ``batch_size`` examples per step."""

        def setup(self, stage=None):
            super().setup(stage)
            self.train_set = tokenize_conversations(self.tokenizer, read_jsonl(self.path), self.max_length)

        def train_dataloader(self):
            return self._loader(self.train_set, shuffle=False)

    class Probe(Callback):
        def __init__(self):
            self.losses, self.start = [], None

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == 0:
                _reset_peak_rss()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))
            if batch_idx == 0:
                self.start = time.process_time()

    seed_everything(0, verbose=False)
    spec = SETTINGS[setting]
    module = LoRAModule(MODEL, adapter=LoRA(r=R, alpha=ALPHA, target_modules="all-linear"),
                        quantize=NF4(blocksize=64, double_quant=True),
                        optimizer=lambda params: torch.optim.AdamW(params, lr=LR),
                        gradient_checkpointing=checkpointing)
    dm = InOrder(path=str(data), val_fraction=0.0, packing=True, share_prefix=True, **spec)
    probe = Probe()
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0,
                      enable_checkpointing=False, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[probe])
    trainer.fit(module, dm)
    return {"cpu_s": time.process_time() - probe.start, "losses": probe.losses}


def worker(variant: str, data: Path, setting: str, steps: int, out: Path) -> None:
    torch.set_num_threads(1)
    if variant == "recipe":
        res = run_recipe(data, setting, steps)
    else:
        res = run_ours(data, setting, steps, checkpointing=CHECKPOINTING.get(variant, False))
    res.update(train_peak_rss=_peak_rss(), peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    out.write_text(json.dumps(res))


# ---------------------------------------------------------------------------------------------------- the parent
def check_same_examples(data: Path, setting: str) -> dict:
    """Our tokenization of the file equals the recipe's; returns the share of labeled and padded positions."""
    from lightning_lora.io.models import load_tokenizer
    from lightning_lora.train.data import read_jsonl, tokenize_conversations

    tok, spec = load_tokenizer(MODEL), SETTINGS[setting]
    ours = tokenize_conversations(tok, read_jsonl(data), spec["max_length"])
    theirs = recipe_tokenize(tok, [json.loads(x) for x in data.read_text().splitlines()], spec["max_length"])
    assert [(o["input_ids"].tolist(), o["labels"].tolist()) for o in ours] == \
        [(t["input_ids"], t["labels"]) for t in theirs], "the two tokenizations differ"
    lengths = [len(t["input_ids"]) for t in theirs]
    b = spec["batch_size"]
    padded = sum(b * max(lengths[i : i + b]) for i in range(0, len(lengths) - b + 1, b))
    labeled = sum(sum(x != -100 for x in t["labels"][1:]) for t in theirs)
    return {"examples": len(theirs), "labeled_share": labeled / sum(lengths),
            "padding_share_recipe": 1 - sum(lengths[: len(lengths) // b * b]) / padded}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 20 quickstart, 12 long)")
    p.add_argument("--repeats", type=int, default=2, help="runs per variant, alternating")
    p.add_argument("--checkpointing", nargs="*", default=["long"], choices=list(SETTINGS),
                   help="settings in which ours also runs with gradient checkpointing (the recipe never does)")
    p.add_argument("--checkpointing-mode", default="mlp", choices=["mlp", "layers"],
                   help="LoRAModule(gradient_checkpointing=...): 'mlp' (each layer's MLP) or 'layers' (True)")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("e2e_results.json"))
    p.add_argument("--worker", nargs=4, metavar=("VARIANT", "DATA", "SETTING", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        variant, data, setting, out = args.worker
        worker(variant, Path(data), setting, args.steps, Path(out))
        return {}
    from lightning_lora.io.files import write_json

    with tempfile.TemporaryDirectory() as folder:
        results = {setting: run_setting(setting, args, Path(folder)) for setting in args.settings}
    write_json(results, args.out)
    return results


def run_setting(setting: str, args, tmp: Path) -> dict:
    """Alternating runs of both variants on one setting; their summary and ratios."""
    steps = args.steps or {"quickstart": 20, "long": 12}[setting]
    data = tmp / f"{setting}.jsonl"
    rows = conversations(setting, steps * SETTINGS[setting]["batch_size"] * 2)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    facts = check_same_examples(data, setting)
    if facts["examples"] < steps * SETTINGS[setting]["batch_size"]:
        raise SystemExit(f"{setting}: only {facts['examples']} usable examples for {steps} steps")
    variants = ["recipe", "ours"] + ([f"ours+ckpt {args.checkpointing_mode}"] if setting in args.checkpointing else [])
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for rep in range(args.repeats):
        for variant in variants if rep % 2 == 0 else variants[::-1]:
            out = tmp / f"{setting}.{variant.replace(' ', '_')}.{rep}.json"
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
            cmd = [sys.executable, __file__, "--steps", str(steps), "--worker", variant, str(data), setting, str(out)]
            proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{variant} {setting} failed:\n{proc.stderr[-4000:]}")
            res = json.loads(out.read_text())
            runs[variant].append(res)
            print(f"{setting} {variant} run {rep}: {res['cpu_s'] / ((steps - 1) * SETTINGS[setting]['batch_size']):.3f} s/example, peak RSS "
                  f"{res['peak_rss'] / 2**30:.2f} GiB (training {res['train_peak_rss'] / 2**30:.2f}), "
                  f"loss(last 10) {statistics.mean(res['losses'][-10:]):.4f}", flush=True)
    summary = {}
    for variant, rs in runs.items():
        per_example = [r["cpu_s"] / ((steps - 1) * SETTINGS[setting]["batch_size"]) for r in rs]
        summary[variant] = {
            "cpu_s_per_example": min(per_example), "cpu_s_per_example_runs": per_example,
            "peak_rss_gib": max(r["peak_rss"] for r in rs) / 2**30,
            "train_peak_rss_gib": max(r["train_peak_rss"] for r in rs) / 2**30,
            "loss_last10": statistics.mean(statistics.mean(r["losses"][-10:]) for r in rs),
            "losses": rs[0]["losses"],
        }
    r = summary["recipe"]
    summary["ratios"] = {}
    for variant in variants[1:]:
        o = summary[variant]
        summary["ratios"][variant] = {"time_per_example": o["cpu_s_per_example"] / r["cpu_s_per_example"],
                                      "peak_rss": o["peak_rss_gib"] / r["peak_rss_gib"],
                                      "train_peak_rss": o["train_peak_rss_gib"] / r["train_peak_rss_gib"],
                                      "loss_last10": o["loss_last10"] / r["loss_last10"]}
    summary["setup"] = {"steps": steps, "repeats": args.repeats, "threads": 1, **SETTINGS[setting], **facts}
    for variant, ratios in summary["ratios"].items():
        print(f"{setting}: {variant}/recipe " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()), flush=True)
    return summary


if __name__ == "__main__":
    main()
