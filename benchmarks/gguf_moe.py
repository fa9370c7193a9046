"""llama.cpp's perplexity of tiny trained MoE models with LoRA on their experts, against PyTorch's (BENCHMARKS.md).

For each family (Mixtral, Qwen2-MoE, Qwen3-MoE: ``tests/tiny_assets.FAMILIES``, hidden 64, 2 layers, 4 experts, top 2):
the base trains 150 full steps on pydoc text after the scored chunks; then, from that base, a LoRA r 8 on all linear
layers and the experts, and one on the experts alone, each train 60 steps on the scored chunks. Scored as
``tests/test_llamacpp.py`` scores (20 chunks of 128 tokens): our f16 base GGUF alone, with our adapter GGUF
(``--lora``), and our merged f16 GGUF, against PyTorch's fp32 model.

    LLAMA_CPP_BIN=<folder with llama-perplexity> PYTHONPATH=. python benchmarks/gguf_moe.py [qwen3_moe mixtral qwen2_moe]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from test_llamacpp import N_CHUNKS, N_CTX, _fit, _llamacpp_ppl, _text, llamacpp_style_ppl  # noqa: E402
from tiny_assets import make_tiny_model_dir  # noqa: E402

import lightning_lora as ll  # noqa: E402
from lightning_lora.io.gguf import write_adapter_gguf  # noqa: E402
from lightning_lora.io.gguf_model import write_model_gguf  # noqa: E402
from lightning_lora.io.models import load_causal_lm  # noqa: E402

ADAPTERS = {"all-linear + experts": dict(target_modules="all-linear"),
            "experts only": dict(target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"])}


def family(kind: str, work: Path, text: Path) -> list[tuple[str, float, float]]:
    """``[(row, llama.cpp ppl, PyTorch ppl)]`` for one family."""
    torch.manual_seed(0)
    folder = make_tiny_model_dir(work / kind, arch=kind)
    model, tokenizer = load_causal_lm(str(folder))
    ids = tokenizer(_text()).input_ids
    scored = N_CHUNKS * N_CTX
    _fit(model, ids[scored:], steps=150, lr=3e-3)
    model.save_pretrained(folder)
    base = write_model_gguf(model, tokenizer, work / f"{kind}-base.gguf", "f16")
    rows = [("base f16 GGUF", _llamacpp_ppl(base, text), llamacpp_style_ppl(model, ids, None))]
    for name, targets in ADAPTERS.items():
        model, tokenizer = load_causal_lm(str(folder))
        ll.inject(model, ll.LoRA(r=8, alpha=16, **targets))
        _fit(model, ids[:scored], steps=60, lr=1e-2)
        ours = llamacpp_style_ppl(model, ids, None)
        adapter = write_adapter_gguf(model, work / f"{kind}-{name[:3]}.gguf")
        rows.append((f"base + our adapter GGUF ({name})", _llamacpp_ppl(base, text, lora=adapter), ours))
        merged = write_model_gguf(ll.merge(model), tokenizer, work / f"{kind}-{name[:3]}-merged.gguf", "f16")
        rows.append((f"our merged f16 GGUF ({name})", _llamacpp_ppl(merged, text), llamacpp_style_ppl(model, ids, None)))
    return rows


def main(kinds: list[str]) -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "text.txt").write_text(_text())
        for kind in kinds:
            results[kind] = family(kind, work, work / "text.txt")
            for row, theirs, ours in results[kind]:
                print(f"| {kind} tiny, {row} | {theirs:.4f} | {ours:.4f} |", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:] or ["qwen3_moe", "mixtral", "qwen2_moe"])
