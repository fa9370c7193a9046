"""``python -m lightning_lora evaluate``: the base model and each adapter side by side on prompt/response examples.

    python -m lightning_lora evaluate --base_model smollm2-135m-instruct --adapter runs/quickstart/export/adapter \\
        --data my.jsonl [--adapter DIR2 ...] [--max_new_tokens 32] [--limit 64] [--out DIR] [--tasks hellaswag,...]

Prints, for the base and each adapter: loss and perplexity on the responses, exact match, ROUGE-L and chrF of greedy
replies against the reference responses, and a few example replies; writes ``evaluation.json`` and ``evaluation.md``
to ``--out`` (default: the first adapter's folder). ``--data`` is a JSONL file as ``fit`` reads it (``prompt`` /
``response``, or ``messages``), or ``chatterbot``. With ``--tasks`` (needs ``pip install lm-eval``), EleutherAI's
lm-evaluation-harness runs those tasks through the same model for every variant. The work is done by
``lightning_lora.train.evaluate``; this command parses and prints.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning_lora.commands import command_args
from lightning_lora.commands.generate import adapter_label


def adapter_labels(paths: list[str]) -> dict[str, str]:
    """``{label: folder}``, labels as ``generate`` shows adapters (``runs/chat/export/adapter`` -> ``chat``), made
    unique with ``_1``, ``_2``; never ``base``."""
    out: dict[str, str] = {}
    for path in paths:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"evaluate: adapter folder {path!r} does not exist. Pass a PEFT adapter folder "
                                    "(e.g. runs/quickstart/export/adapter).")  # fmt: skip
        stem = adapter_label(path)
        label, i = stem, 1
        while label in out or label == "base":
            label, i = f"{stem}_{i}", i + 1
        out[label] = path
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lightning_lora evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base_model", required=True, help="alias (smollm2-135m-instruct), HF folder or cached hub id")
    parser.add_argument("--adapter", action="append", default=[], metavar="DIR",
                        help="PEFT adapter folder; repeat for several (none: the base alone)")  # fmt: skip
    parser.add_argument("--data", required=True, help="JSONL of prompt/response (or messages) examples, or chatterbot")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="reply length (greedy), default 32")
    parser.add_argument("--limit", type=int, default=64, help="evaluate the first N examples (default 64; 0: all)")
    parser.add_argument("--max_length", type=int, default=256, help="examples longer than this are truncated")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--show", type=int, default=3, help="example replies to print (default 3)")
    parser.add_argument("--out", help="folder for evaluation.json and evaluation.md (default: the first adapter's)")
    parser.add_argument("--tasks", help="comma-separated lm-evaluation-harness tasks (needs: pip install lm-eval)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    from lightning_lora.train.eval_report import report_markdown, write_report
    from lightning_lora.train.evaluate import evaluate_adapters

    args = build_parser().parse_args(command_args(argv, "evaluate"))
    if args.max_new_tokens < 1 or args.limit < 0 or args.batch_size < 1:
        raise ValueError("evaluate: --max_new_tokens and --batch_size must be positive and --limit >= 0. "
                         "Pass e.g. --max_new_tokens 32 --limit 64")  # fmt: skip
    adapters = adapter_labels(args.adapter)
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    report = evaluate_adapters(args.base_model, adapters, args.data, max_new_tokens=args.max_new_tokens,
                               limit=args.limit or None, max_length=args.max_length, n_shown=args.show,
                               batch_size=args.batch_size, tasks=tasks)  # fmt: skip
    out = args.out or (next(iter(adapters.values())) if adapters else ".")
    paths = write_report(report, out)
    print(report_markdown(report))
    print(f"report written to {paths['markdown']} and {paths['json']}")
    return report


if __name__ == "__main__":
    main()
