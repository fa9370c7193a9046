"""``python -m lightning_lora estimate``: will a fine-tune fit? Parses the options and prints the table (or JSON);
the counts and the formulas are the library's (``lightning_lora/estimate/``)."""

from __future__ import annotations

import argparse
import json

import lightning_lora  # noqa: F401  (the built-in methods and the NF4 kind register on import)
from lightning_lora.commands import command_args
from lightning_lora.estimate.memory import GB, GIB, OPTIMIZERS, adapter_names, estimate
from lightning_lora.estimate.presets import ALIASES, PRESETS

DTYPES = "bf16, fp16, fp32 (or bfloat16, float16, float32, auto)"


def render(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    quant = "bf16/fp16/fp32" if not res["quantize"] else "NF4 + double quant" if res["double_quant"] else "NF4"
    console = Console(width=max(Console().width, 110))
    rank = "" if res["r"] is None else f" r={res['r']}"
    console.print(f"[bold]{res['model']}[/bold]: {res['base_params']:,} base parameters; {res['adapter']}{rank} "
                  f"on {res['adapted_layers']} layers: {res['trainable_params']:,} trainable "
                  f"({100 * res['trainable_params'] / res['base_params']:.3f}%)")
    if res.get("expert_params"):  # MoE: what a token uses
        console.print(f"MoE: {res['expert_params']:,} parameters in experts; {res['active_params']:,} active per token")
    table = Table(title=f"memory, batch {res['batch_size']} x {res['seq_len']} tokens")
    for col in ("kind", "bytes", "GB (1e9)", "GiB (2^30)", "note"):
        table.add_column(col, justify="left" if col in ("kind", "note") else "right")
    ckpt = res["gradient_checkpointing"]
    modes = {False: ("no checkpointing", "activation_bytes_no_checkpointing"),
             "mlp": ("MLP checkpointing", "activation_bytes_mlp_checkpointing"),
             True: ("layer checkpointing", "activation_bytes_checkpointing")}
    others = ", ".join(f"{name}: {res[key] / GB:.2f} GB" for mode, (name, key) in modes.items() if mode != ckpt)
    linear = f"linears{' and experts' if res.get('expert_params') else ''} {quant}, rest {res['dtype']}" \
        if res["quantize"] else res["dtype"]
    rows = [
        ("base weights", res["weights_bytes"], linear),
        ("adapters", res["adapter_bytes"], res["adapter_dtype"]),
        ("gradients", res["gradient_bytes"], f"adapters only, {res['adapter_dtype']}"),
        ("optimizer state", res["optimizer_bytes"], res["optimizer"]),
        ("activations", res["activation_bytes"],
         f"offloaded to host: {res['offloaded_bytes'] / GB:.2f} GB more there, one layer back at a time"
         if res["offload_activations"] else f"{modes[ckpt][0]} ({others})"),
        ("  of which loss/logits", res["logits_bytes"],
         f"{min(res['loss_chunk_size'], res['batch_size'] * res['seq_len'])} of {res['batch_size'] * res['seq_len']} "
         f"rows at a time (every row at once: {res['logits_bytes_unchunked'] / GB:.2f} GB)"
         if res["loss_chunk_size"] else "every position at once (Hugging Face's loss)"),
        ("CUDA/framework overhead", res["overhead_bytes"], "context, workspace, allocator slack"),
    ]
    for name, n, note in rows:
        table.add_row(name, f"{n:,}", f"{n / GB:.2f}", f"{n / GIB:.2f}", note)
    total = res["total_bytes"]  # "of which" rows are inside "activations", not added again
    table.add_row("total", f"{total:,}", f"{total / GB:.2f}", f"{total / GIB:.2f}", "", style="bold")
    console.print(table)
    if res["fits"] is not None:
        word = "[green]fits[/green]" if res["fits"] else "[red]does not fit[/red]"
        console.print(f"{word} in {res['gpu_memory_bytes'] / GB:g} GB ({res['gpu_memory_bytes'] / GIB:.2f} GiB): "
                      f"headroom {(res['gpu_memory_bytes'] - total) / GB:+.2f} GB")
    for note in res["notes"]:
        console.print(f"note: {note}")


def main(argv: list[str] | None = None) -> None:
    argv = command_args(argv, "estimate")
    p = argparse.ArgumentParser(prog="python -m lightning_lora estimate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help=f"preset ({', '.join([*PRESETS, *ALIASES])}), config.json or folder")
    p.add_argument("--adapter", default="lora",
                   help=f"{', '.join(adapter_names())}, a module.Class path, or a module defining a method")
    p.add_argument("--r", type=int, default=None, help="rank (> 0), for a method that has one; default: the method's")
    p.add_argument("--target-modules", nargs="+", default=["all-linear"], help='names, globs, regexes or "all-linear"')
    p.add_argument("--quantize", choices=["none", "nf4"], default="none")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--gradient-checkpointing", nargs="?", const="layers", default=None, choices=["layers", "mlp"],
                   help="recompute whole decoder layers (the flag alone) or each layer's MLP only (mlp) in backward")
    p.add_argument("--offload-activations", action="store_true",
                   help="saved activations in host memory (LoRAModule(offload_activations=True))")
    p.add_argument("--gpu-memory", type=float, default=None, help="GPU memory in GB (1e9 bytes)")
    p.add_argument("--dtype", default="bf16", help=f"base weights and activations: {DTYPES}")
    p.add_argument("--adapter-dtype", default=None, help="default: --dtype")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--overhead-gb", type=float, default=0.5)
    p.add_argument("--loss-chunk-size", type=int, default=256,
                   help="rows per chunk of the labeled-only loss (LoRAModule); 0: Hugging Face's loss over every position")
    p.add_argument("--packing", action="store_true", help="examples packed end to end (adds sdpa's block mask)")
    p.add_argument("--no-lean-activations", dest="lean_activations", action="store_false",
                   help="norm outputs and SwiGLU intermediates kept as autograd keeps them "
                        "(LoRAModule(lean_activations=False)); default: lean, as LoRAModule")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if args.r is not None and args.r <= 0:
        p.error(f"--r must be a positive integer (the rank), got {args.r}.")
    targets = args.target_modules[0] if args.target_modules == ["all-linear"] else args.target_modules
    try:
        res = estimate(args.model, args.adapter, args.r, targets, args.quantize, args.double_quant, args.batch_size,
                       args.seq_len, {None: False, "layers": True, "mlp": "mlp"}[args.gradient_checkpointing], args.gpu_memory, args.dtype, args.adapter_dtype,
                       args.optimizer, args.overhead_gb, args.loss_chunk_size, args.packing, args.offload_activations,
                       args.lean_activations)
    except ValueError as err:
        p.error(str(err))
    print(json.dumps(res)) if args.json else render(res)
