"""End to end: a QLoRA fine-tune of SmolLM2-135M-Instruct with lightning_lora against the standard recipe and the floor.

    python benchmarks/e2e.py                                          # every setting, its default variants, 2 rounds
    python benchmarks/e2e.py --settings dense --variants floor ours --repeats 3
    python benchmarks/e2e.py --settings quickstart --steps 12 --repeats 1                 # a smoke run

**The recipe** is written here as PEFT's QLoRA docs show it, not through our classes: transformers
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)`` loading,
``get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))``, and a plain PyTorch loop over
batches padded to the longest, minimising ``model(..., labels=...).loss`` with AdamW; labels on the reply and its
end-of-turn token, as ours (``recipe_tokenize``).
**Ours** is ``LoRAModule`` (NF4 base, LoRA r 8 on all linear layers, chunked labeled-only loss, lean activations,
fused AdamW) + ``InstructionDataModule(packing=True, share_prefix=True)`` + ``Trainer``, as ``configs/quickstart.yaml``
sets it up.
Variants of ours change one thing (``OURS``): ``ours+ckpt mlp`` / ``ours+ckpt layers`` (gradient checkpointing),
``ours-lean`` (``lean_activations=False``).
**The floor** (REFERENCE.md section 3) is the same NF4 model and the same packed batches as ours, every parameter
frozen, no adapter: forward + our loss + backward to the inputs, in a plain loop (no optimizer, no Trainer).

All see the same examples in the same order, ``batch_size`` examples per optimizer step (the recipe tokenizes with
its own code; the parent checks that both tokenizations are identical). Settings: ``quickstart`` (chatterbot pairs,
batch 4, max_length 64), ``long`` (batch 4, max_length 512, responses made of pydoc topics of varied length: the
recipe pads ~30%) and ``dense`` (batch 4, max_length 512, every example longer than that and cut: full rows, no
padding). Each run is its own process (1 torch thread); a round runs every variant once, the order reversed every
other round. Recorded per run: process CPU time per example over the steps after the first (data loading and
framework overhead included), the peak RSS during training (``VmHWM`` reset at the first step, with what was
resident then), the mean training loss over the last 10 steps (the step's token-weighted mean), and the load average.
Ratios are of the fastest run of each variant (of medians in ``*_median``). Writes ``benchmarks/e2e_results.json``.
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
SETTINGS = {"quickstart": dict(batch_size=4, max_length=64), "long": dict(batch_size=4, max_length=512),
            "dense": dict(batch_size=4, max_length=512)}
LR, R, ALPHA = 1e-3, 8, 16
# Ours with other LoRAModule arguments (and switches outside it), each a variant of its own.
OURS = {"ours": {}, "ours+ckpt mlp": dict(gradient_checkpointing="mlp"),
        "ours+ckpt layers": dict(gradient_checkpointing=True), "ours-lean": dict(lean_activations=False)}
VARIANTS = ["recipe", "floor", *OURS]
DEFAULT_VARIANTS = {"quickstart": ["recipe", "floor", "ours"], "long": ["recipe", "ours", "ours+ckpt mlp"],
                    "dense": ["recipe", "floor", "ours"]}


# ------------------------------------------------------------------------------------------------------ the data
def conversations(setting: str, n: int) -> list[dict]:
    """``n`` prompt/response pairs in a fixed order."""
    if setting == "quickstart":
        from lightning_lora.train.data import chatterbot_pairs

        pairs = chatterbot_pairs()
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0)).tolist()
        rows = ({"prompt": pairs[i][0]["content"], "response": pairs[i][1]["content"]} for i in order)
        return [r for r in rows if r["prompt"].strip() and r["response"].strip()][:n]  # both sides dropped otherwise
    from pydoc_data.topics import topics

    if setting == "dense":  # examples longer than max_length (cut at 512 tokens): full rows, no padding
        keys, out = sorted(k for k in topics if len(topics[k]) > 4000), []
        for i in range(n):  # a long topic read from a shifting offset, wrapping around
            key = keys[(7 * i) % len(keys)]
            text, offset = topics[key], (i // len(keys)) * 997 % len(topics[key])
            out.append({"prompt": f"Explain the Python topic '{key}'.",
                        "response": (text[offset:] + "\n\n" + text[:offset]).strip()})
        return out
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
    """The recipe's own tokenization: chat template, labels on the reply and its end-of-turn token (prompt and what
    the template adds after the end-of-turn masked, as TRL's ``assistant_only_loss``), truncated, label-less rows
    dropped."""
    out = []
    for row in rows:
        user = [{"role": "user", "content": row["prompt"]}]
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": row["response"]}], tokenize=False)
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_length]
        reply = ids[n_prompt:]
        if tokenizer.eos_token_id in reply:  # the end-of-turn token ends the labels ("\n" after it is the template's)
            reply = reply[: reply.index(tokenizer.eos_token_id) + 1]
        labels = [-100] * min(n_prompt, len(ids)) + reply + [-100] * (len(ids) - n_prompt - len(reply))
        if any(t != -100 for t in labels):
            out.append({"input_ids": ids, "labels": labels})
    return out


# ---------------------------------------------------------------------------------------------------- the workers
def _status(key: str) -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return None


def _reset_peak_rss() -> int | None:
    """Resets VmHWM (Linux); returns the resident bytes at that moment."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status("VmRSS")


def _peak_rss() -> int:
    peak = _status("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def recipe_model():
    """The recipe's model and optimizer, as PEFT's QLoRA docs set them up (transformers loads the 4-bit base)."""
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
    return model, optimizer, tokenizer


def recipe_batches(tokenizer, data: Path, setting: str, steps: int) -> list[dict]:
    """The recipe's batches: ``batch_size`` examples of the file in order, padded to the longest."""
    spec = SETTINGS[setting]
    examples = recipe_tokenize(tokenizer, [json.loads(x) for x in data.read_text().splitlines()], spec["max_length"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = []
    for step in range(steps):
        batch = examples[step * spec["batch_size"] : (step + 1) * spec["batch_size"]]
        width = max(len(b["input_ids"]) for b in batch)
        batches.append({
            "input_ids": torch.tensor([b["input_ids"] + [pad] * (width - len(b["input_ids"])) for b in batch]),
            "attention_mask": torch.tensor([[1] * len(b["input_ids"]) + [0] * (width - len(b["input_ids"]))
                                            for b in batch]),
            "labels": torch.tensor([b["labels"] + [-100] * (width - len(b["labels"])) for b in batch])})
    return batches


def recipe_step(model, optimizer, batch: dict) -> float:
    """One step of the recipe's plain loop."""
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def run_recipe(data: Path, setting: str, steps: int) -> dict:
    model, optimizer, tokenizer = recipe_model()
    losses, start, rss_before = [], None, None
    for step, batch in enumerate(recipe_batches(tokenizer, data, setting, steps)):
        if step == 0:
            rss_before = _reset_peak_rss()
        losses.append(recipe_step(model, optimizer, batch))
        if step == 0:
            start = time.process_time()
    return {"cpu_s": time.process_time() - start, "losses": losses, "rss_before": rss_before}


def _our_batches(data: Path, setting: str, tokenizer):
    """The data module ours trains on: the file's examples in the file's order (the recipe's), packed with a shared
    prefix, ``batch_size`` examples per step."""
    from lightning_lora.train.data import InstructionDataModule, read_jsonl, tokenize_conversations

    class InOrder(InstructionDataModule):
        def setup(self, stage=None):
            super().setup(stage)
            self.train_set = tokenize_conversations(self.tokenizer, read_jsonl(self.path), self.max_length)

        def train_dataloader(self):
            return self._loader(self.train_set, shuffle=False)

    return InOrder(path=str(data), tokenizer=tokenizer, val_fraction=0.0, packing=True, share_prefix=True,
                   **SETTINGS[setting])


def _step_mean(loss_sum: float, batch: dict) -> float:
    from lightning_lora.train.loss import labeled_count

    return loss_sum / max(labeled_count(batch["labels"]), 1)


def run_ours(data: Path, setting: str, steps: int, **module_args) -> dict:
    from lightning.pytorch import Callback, Trainer, seed_everything

    from lightning_lora import LoRA, NF4
    from lightning_lora.train.module import LoRAModule

    class Probe(Callback):
        def __init__(self):
            self.losses, self.start, self.rss_before = [], None, None

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == 0:
                self.rss_before = _reset_peak_rss()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.losses.append(_step_mean(float(outputs["loss"]), batch))  # the step's summed loss (one micro-batch)
            if batch_idx == 0:
                self.start = time.process_time()

    seed_everything(0, verbose=False)
    module = LoRAModule(MODEL, adapter=LoRA(r=R, alpha=ALPHA, target_modules="all-linear"),
                        quantize=NF4(blocksize=64, double_quant=True),
                        optimizer=lambda params: torch.optim.AdamW(params, lr=LR, fused=True),  # as configs/*.yaml
                        **module_args)
    probe = Probe()
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0,
                      enable_checkpointing=False, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[probe])
    trainer.fit(module, _our_batches(data, setting, None))
    return {"cpu_s": time.process_time() - probe.start, "losses": probe.losses, "rss_before": probe.rss_before}


def floor_model():
    """The floor's model: the same NF4 model as ours with every parameter frozen and no adapter; the embedding output
    requires grad, so backward runs through every layer to the inputs."""
    from lightning_lora import NF4
    from lightning_lora.io.models import load_causal_lm
    from lightning_lora.quant.nf4 import quantize
    from lightning_lora.train.attention import use_packed_attention

    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(MODEL)
    quantize(model, NF4(blocksize=64, double_quant=True))
    use_packed_attention(model)
    model.requires_grad_(False).train()
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_())
    return model, tokenizer


def packed_loss(model, batch: dict):
    """Our labeled-only loss of a packed batch (the floor's step is this and its backward)."""
    from lightning_lora.train.loss import causal_lm_loss

    return causal_lm_loss(model, batch["input_ids"], batch["labels"], attention_mask=batch.get("attention_mask"),
                          position_ids=batch.get("position_ids"))


def run_floor(data: Path, setting: str, steps: int) -> dict:
    """The floor (``floor_model``) on ours' packed batches: forward + our loss + backward, no optimizer."""
    model, tokenizer = floor_model()
    dm = _our_batches(data, setting, tokenizer)
    dm.setup("fit")
    losses, start, rss_before = [], None, None
    for step, batch in enumerate(dm.train_dataloader()):
        if step == steps:
            break
        if step == 0:
            rss_before = _reset_peak_rss()
        loss = packed_loss(model, batch)
        loss.backward()
        losses.append(loss.item())
        if step == 0:
            start = time.process_time()
    return {"cpu_s": time.process_time() - start, "losses": losses, "rss_before": rss_before}


def worker(variant: str, data: Path, setting: str, steps: int, out: Path) -> None:
    torch.set_num_threads(1)
    if variant == "recipe":
        res = run_recipe(data, setting, steps)
    elif variant == "floor":
        res = run_floor(data, setting, steps)
    else:
        res = run_ours(data, setting, steps, **OURS[variant])
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
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                   help="variants to run in every setting (default: DEFAULT_VARIANTS per setting); 'recipe' is "
                        "always run, as the ratios' base")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 20 quickstart, 12 long)")
    p.add_argument("--repeats", type=int, default=2, help="runs per variant, alternating")
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


def _per_example(res: dict, steps: int, setting: str) -> float:
    return res["cpu_s"] / ((steps - 1) * SETTINGS[setting]["batch_size"])


def run_setting(setting: str, args, tmp: Path) -> dict:
    """Runs of every variant on one setting, the order reversed every other round; their summary and ratios."""
    steps = args.steps or {"quickstart": 20, "long": 12, "dense": 12}[setting]
    data = tmp / f"{setting}.jsonl"
    rows = conversations(setting, steps * SETTINGS[setting]["batch_size"] * 2)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    facts = check_same_examples(data, setting)
    if facts["examples"] < steps * SETTINGS[setting]["batch_size"]:
        raise SystemExit(f"{setting}: only {facts['examples']} usable examples for {steps} steps")
    variants = ["recipe"] + [v for v in args.variants or DEFAULT_VARIANTS[setting] if v != "recipe"]
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
            res["load"] = os.getloadavg()[0]
            runs[variant].append(res)
            print(f"{setting} {variant} run {rep}: {_per_example(res, steps, setting):.3f} s/example, peak RSS "
                  f"{res['train_peak_rss'] / 2**30:.2f} GiB (resident before the first step "
                  f"{(res['rss_before'] or 0) / 2**30:.2f}), loss(last 10) {statistics.mean(res['losses'][-10:]):.4f}"
                  f", load {res['load']:.1f}", flush=True)
    summary = {}
    for variant, rs in runs.items():
        per_example = [_per_example(r, steps, setting) for r in rs]
        summary[variant] = {
            "cpu_s_per_example": min(per_example), "cpu_s_per_example_median": statistics.median(per_example),
            "cpu_s_per_example_runs": per_example,
            "train_peak_rss_gib": max(r["train_peak_rss"] for r in rs) / 2**30,
            "rss_before_gib": max(r["rss_before"] or 0 for r in rs) / 2**30,
            "loss_last10": statistics.mean(statistics.mean(r["losses"][-10:]) for r in rs),
            "losses": rs[0]["losses"], "load": [r["load"] for r in rs],
        }
    summary["ratios"] = {}
    for variant in variants[1:]:
        o = summary[variant]
        ratios = {}
        for base in ("recipe", "floor"):
            if base in summary and base != variant:
                b = summary[base]
                ratios[f"time_vs_{base}"] = o["cpu_s_per_example"] / b["cpu_s_per_example"]
                ratios[f"time_vs_{base}_median"] = o["cpu_s_per_example_median"] / b["cpu_s_per_example_median"]
        ratios["peak_rss_vs_recipe"] = o["train_peak_rss_gib"] / summary["recipe"]["train_peak_rss_gib"]
        if variant != "floor":
            ratios["loss_vs_recipe"] = o["loss_last10"] / summary["recipe"]["loss_last10"]
        summary["ratios"][variant] = ratios
    summary["setup"] = {"steps": steps, "repeats": args.repeats, "threads": 1, **SETTINGS[setting], **facts}
    for variant, ratios in summary["ratios"].items():
        print(f"{setting}: {variant} " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()), flush=True)
    return summary


if __name__ == "__main__":
    main()
