"""An evaluation report (``train/evaluate.py``) as Markdown and JSON files, and the evaluation at the end of ``fit``.

``write_report(report, folder)`` writes ``evaluation.json`` (the report as is: every figure, the example replies)
and ``evaluation.md`` (the side-by-side table, then the example replies), each atomically. ``report_table`` is the
table alone; the model card of an export (``io/card.py``) includes it when ``fit`` evaluated (``evaluate: true``).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from lightning_lora.io.files import atomic_file, write_json
from lightning_lora.train.evaluate import BASE, evaluate_model

log = logging.getLogger(__name__)

COLUMNS = (("loss", "loss", ".4f"), ("ppl", "perplexity", ".3f"), ("exact_match", "exact match", ".3f"),
           ("rouge_l", "ROUGE-L F1", ".3f"), ("chrf", "chrF (0-100)", ".2f"))  # fmt: skip


def _cell(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def report_table(report: dict) -> str:
    """The variants side by side as a Markdown table, with a line saying what the figures were measured on."""
    rows = ["| variant | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
            "|---|" + "---:|" * len(COLUMNS)]  # fmt: skip
    for label, scores in report["variants"].items():
        rows.append(f"| {label} | " + " | ".join(_cell(scores.get(k), spec) for k, _, spec in COLUMNS) + " |")
    tokens = next(iter(report["variants"].values()), {}).get("tokens")
    where = f"`{report['data']}`" if report.get("data") else "the data"
    counted = f" ({tokens:,} response tokens for the loss)" if isinstance(tokens, int) else ""
    rows += ["", f"{report['examples']} examples of {where}{counted}; greedy replies of up to "
                 f"{report['max_new_tokens']} new tokens against the reference responses."]  # fmt: skip
    return "\n".join(rows)


def report_markdown(report: dict) -> str:
    """The whole report: title, the table, then each shown example with the reference and every reply."""
    lines = ["# Evaluation", ""]
    if report.get("base_model"):
        lines += [f"Base model `{report['base_model']}`"
                  + "".join(f"; `{n}` = `{p}`" for n, p in report.get("adapters", {}).items()) + ".", ""]
    lines += [report_table(report), ""]
    for label, tasks in (report.get("tasks") or {}).items():
        lines += [f"lm-evaluation-harness, {label}: " + "; ".join(
            f"{task} " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())) for task, metrics in tasks.items()), ""]
    lines += ["## Example replies", ""]
    for i, shown in enumerate(report.get("shown", []), 1):
        lines += [f"### {i}. {_one_line(shown['prompt'])}", "", f"- reference: {_one_line(shown['reference'])}"]
        lines += [f"- {label}: {_one_line(text)}" for label, text in shown["replies"].items()] + [""]
    return "\n".join(lines)


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return (text[:300] + " ...") if len(text) > 300 else (text or "(empty)")


def write_report(report: dict, folder: str | os.PathLike) -> dict[str, Path]:
    """Write ``evaluation.json`` and ``evaluation.md`` into ``folder``; return both paths."""
    folder = Path(folder)
    paths = {"json": folder / "evaluation.json", "markdown": folder / "evaluation.md"}
    write_json(report, paths["json"])
    with atomic_file(paths["markdown"]) as tmp:
        tmp.write_text(report_markdown(report) + "\n", encoding="utf-8")
    return paths




def evaluate_at_end(module, examples: bool | int, export_dir: str | None) -> str | None:
    """``LoRAModule(evaluate=...)`` at the end of fit: the base (adapter off) and the trained adapter on the first
    ``examples`` validation examples (True: 32); writes the report next to the export (else in the log folder) and
    returns its table for the model card. Skipped, with a warning, under several processes or without a
    validation split of tokenized examples."""
    trainer = module.trainer
    val = getattr(trainer.datamodule, "val_set", None) if trainer.datamodule is not None else None
    if trainer.world_size > 1 or not val or not isinstance(val[0], dict) or "labels" not in val[0]:
        why = "it runs in one process only" if trainer.world_size > 1 else "the data module has no validation examples"
        log.warning(f"evaluate: skipped ({why}); run python -m lightning_lora evaluate on the exported adapter.")
        return None
    n = 32 if examples is True else int(examples)
    report = evaluate_model(module.model, module.tokenizer, val[:n], {BASE: None, module.adapter_name: module.adapter_name},
                            source="validation split")  # fmt: skip
    folder = export_dir or trainer.log_dir or trainer.default_root_dir
    if trainer.is_global_zero:
        paths = write_report(report, folder)
        log.info(f"evaluation written to {paths['markdown']}\n{report_table(report)}")
    return report_table(report)


__all__ = ["evaluate_at_end", "report_markdown", "report_table", "write_report"]
