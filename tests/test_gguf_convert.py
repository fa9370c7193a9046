"""Our GGUF files against llama.cpp's own converters, for every family of ``GGUF_ARCHITECTURES``.

One tiny Hugging Face folder per family (``tiny_assets.FAMILIES``, norms and biases perturbed so that offsets and
biases show), plus variants (``VARIANTS``, merged model only): RoPE kinds that add metadata or tensors,
SentencePiece tokenizers (llama.cpp's ``llama`` vocabulary, converted by llama.cpp unpatched), added tokens, and the
q8_0 and bf16 file types. From each folder we write the merged-model GGUF (f16 unless the variant says) and the
adapter GGUF of a perturbed LoRA on all linear layers; llama.cpp's ``convert_hf_to_gguf.py`` converts the same folder
and ``convert_lora_to_gguf.py`` our PEFT folder (all conversions in one subprocess, ``llamacpp_scripts.py``). The
files must hold the same tensors (names, types, shapes, bytes) and the same metadata. Then transformers' GGUF reader
loads our merged file and must give the logits of the model with f16-rounded weights and the same tokens, for the
families that reader supports.
"""

import copy
import os

import numpy as np
import pytest
import torch
from llamacpp_scripts import Unavailable, convert, scripts_dir
from tiny_assets import FAMILIES, make_tiny_model_dir
from tiny_models import perturb_adapters, rounded_copy

import lightning_lora as ll
from lightning_lora.io.gguf import GGUF_ARCHITECTURES, write_adapter_gguf
from lightning_lora.io.gguf_model import write_model_gguf
from lightning_lora.io.models import load_causal_lm

gguf = pytest.importorskip("gguf")
TYPES = sorted(GGUF_ARCHITECTURES)
VARIANTS = {  # name -> (family, make_tiny_model_dir arguments): RoPE kinds and SentencePiece tokenizers
    "llama-rope-llama3": ("llama", dict(rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                                                             low_freq_factor=1.0, high_freq_factor=4.0,
                                                             original_max_position_embeddings=128))),
    "qwen3-rope-yarn": ("qwen3", dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                           original_max_position_embeddings=128))),
    "phi3-rope-longrope": ("phi3", dict(original_max_position_embeddings=128,
                                        rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                                             long_factor=[1.0 + i / 8 for i in range(8)],
                                                             short_factor=[1.0 - i / 32 for i in range(8)]))),
    "llama-sentencepiece": ("llama", dict(tokenizer="sentencepiece")),
    "gemma2-sentencepiece": ("gemma2", dict(tokenizer="sentencepiece")),
    "phi3-sentencepiece": ("phi3", dict(tokenizer="sentencepiece")),
    # added tokens not marked special: one that llama.cpp deems a control token anyway, one user-defined with "▁"
    "qwen2-added-tokens": ("qwen2", dict(added_tokens=["<|tool|>", "\u2581x<think>"])),
    # file types beyond f16: q8_0 blocks (3-D experts, the router kept f32) and bf16
    "qwen3_moe-q8_0": ("qwen3_moe", dict(outtype="q8_0")),
    "mixtral-bf16": ("mixtral", dict(outtype="bf16")),
}  # fmt: skip
# Descriptive metadata llama.cpp derives from folder names and model cards; not part of what a file computes.
DESCRIPTIVE = ("general.name", "general.size_label", "general.basename", "general.finetune", "general.tags",
               "general.base_model.", "general.license", "general.languages")  # fmt: skip
# The tiny BPE's pre-tokenizer is unknown to llama.cpp's hash table (llamacpp_scripts.py reports it as "gpt-2"); our
# detection is checked against llama.cpp's regexes below. Ours also states add_bos/add_eos (exactly what the
# Hugging Face tokenizer does) and the unknown token of the tokenizer object as loaded.
NOT_COMPARED = ("tokenizer.ggml.pre",)
OURS_ONLY = ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.ggml.unknown_token_id")
# The families transformers' GGUF reader reads back whole. Not: Mixtral ("llama" with experts, unread), Mistral
# (named "mistral", it asks gguf for an architecture of that name), Qwen2-MoE (shared-expert sizes unread), and the
# families it lacks (smollm3, granite, olmo2).
TRANSFORMERS_READS = {"llama", "qwen2", "qwen3", "qwen3_moe", "gemma2", "gemma3_text", "phi3"}


def test_every_family_has_a_tiny_model():
    assert set(GGUF_ARCHITECTURES) <= set(FAMILIES)


@pytest.fixture(scope="module")
def root():
    try:
        return scripts_dir()
    except Unavailable as err:
        if os.environ.get("CI"):
            pytest.fail(f"CI must compare against llama.cpp's converters: {err}")
        pytest.skip(f"llama.cpp's converters are not cached and cannot be fetched ({err}); run "
                    "`python tests/llamacpp_scripts.py fetch` once online, or set LLAMA_CPP_DIR.")  # fmt: skip


@pytest.fixture(scope="module")
def built(root, tmp_path_factory):
    """Per family: our two files, llama.cpp's two, and the base model and tokenizer; llama.cpp runs once for all."""
    out = tmp_path_factory.mktemp("gguf_families")
    jobs, bases = [], {}
    for name, (kind, overrides) in [(kind, (kind, {})) for kind in TYPES] + copy.deepcopy(list(VARIANTS.items())):
        added = overrides.pop("added_tokens", [])
        outtype = overrides.pop("outtype", "f16")
        folder = make_tiny_model_dir(out / name, arch=kind, **overrides)
        if added:
            from transformers import AddedToken, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
            tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
            tokenizer.save_pretrained(folder)
        model, tokenizer = load_causal_lm(str(folder))
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:  # norms start at 1 (Gemma: 0), biases at 0: make offsets and biases visible
                    p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        model.save_pretrained(folder)
        write_model_gguf(model, tokenizer, out / f"{name}-ours-model.gguf", outtype)
        jobs.append(dict(script="convert_hf_to_gguf.py", out=f"{name}-model.gguf",
                         args=[str(folder), "--outtype", outtype, "--outfile", f"{name}-model.gguf"]))  # fmt: skip
        bases[name] = (copy.deepcopy(model), tokenizer)
        if name in VARIANTS:
            continue
        # linear layers only: llama.cpp's convert_lora_to_gguf.py cannot read PEFT's target_parameters (MoE experts)
        ll.inject(model, ll.LoRA(r=4, alpha=8, target_modules="all-linear", exclude_modules=["experts"]))
        perturb_adapters(model)
        ll.save_adapter(model, out / f"{kind}-peft")
        write_adapter_gguf(model, out / f"{kind}-ours-lora.gguf")
        jobs.append(dict(script="convert_lora_to_gguf.py", out=f"{kind}-lora.gguf",
                         args=["--base", str(folder), "--outtype", "f32", "--outfile", f"{kind}-lora.gguf",
                               str(out / f"{kind}-peft")]))  # fmt: skip
    return out, convert(root, jobs, out), bases


def _read(path):
    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items()
            if not k.startswith(("GGUF.", *DESCRIPTIVE)) and k not in NOT_COMPARED}  # fmt: skip
    return meta, {t.name: (t.tensor_type.name, np.array(t.data)) for t in reader.tensors}


@pytest.mark.parametrize("kind,what", [(k, w) for k in TYPES for w in ("model", "lora")]
                         + [(v, "model") for v in VARIANTS])  # fmt: skip
def test_gguf_equals_llamacpp_conversion(built, kind, what):
    out, failed, _ = built
    assert f"{kind}-{what}.gguf" not in failed, failed.get(f"{kind}-{what}.gguf")
    meta_ours, ours = _read(out / f"{kind}-ours-{what}.gguf")
    meta_theirs, theirs = _read(out / f"{kind}-{what}.gguf")
    family = VARIANTS[kind][0] if kind in VARIANTS else kind
    assert meta_ours["general.architecture"] == GGUF_ARCHITECTURES[family].arch
    extra = {k for k in meta_ours if k not in meta_theirs}
    assert extra <= set(OURS_ONLY), extra
    assert {k: meta_ours.get(k) for k in meta_theirs} == meta_theirs
    assert sorted(ours) == sorted(theirs)
    for name, (qtype, data) in theirs.items():
        assert ours[name][0] == qtype, name
        assert ours[name][1].shape == data.shape, name
        np.testing.assert_array_equal(ours[name][1], data, err_msg=name)  # the same bytes


@pytest.mark.parametrize("kind", sorted(TRANSFORMERS_READS & set(TYPES)) + ["gemma2-sentencepiece"])
def test_transformers_reads_merged_gguf(built, kind):
    """Same logits as the model with f16-rounded weights, and the same tokens. (transformers' reader of a Llama
    SentencePiece vocabulary omits llama.cpp's default space prefix, so that variant is not read here.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _, bases = built
    model, tokenizer = bases[kind]
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=f"{kind}-ours-model.gguf", dtype=torch.float32)
    text = "The quick brown fox jumps over 12 lazy dogs.\nÜnïcödé ✓"
    ids = torch.tensor([tokenizer(text).input_ids])
    assert AutoTokenizer.from_pretrained(out, gguf_file=f"{kind}-ours-model.gguf")(text).input_ids == ids[0].tolist()
    with torch.no_grad():
        got, ref = loaded.eval()(ids).logits, rounded_copy(model, torch.float16)(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_pre_tokenizer_regexes_are_llamacpps(root):
    """Each regex we map to a llama.cpp pre-tokenizer type is the one llama.cpp's source quotes for that type."""
    from lightning_lora.io.gguf_vocab import PRE_TOKENIZER_REGEXES

    source = (root / "src" / "llama-vocab.cpp").read_text()
    for regex, name in PRE_TOKENIZER_REGEXES.items():
        after = source[source.index(f'tokenizer_pre == "{name}"') :]
        pre_type = after[after.index("pre_type = ") + len("pre_type = ") :].split(";")[0].strip()
        case = source[source.index(f"case {pre_type}:") :]
        assert regex.replace("\\", "\\\\") in case[: case.index("break;")], name  # as a C string literal


def test_fetch_is_quiet_and_never_breaks_setup(tmp_path):
    """``python tests/llamacpp_scripts.py fetch`` (scripts/setup.sh): nothing printed when the converters are there;
    when they cannot be had (here: the cache path is a file), one line on stderr and status 1, no traceback."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("llamacpp_scripts.py")
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "convert_lora_to_gguf.py").touch()
    (tmp_path / "file").touch()
    env = {k: v for k, v in os.environ.items() if k not in ("LLAMA_CPP_DIR", "LIGHTNING_LORA_CACHE")}
    ok = subprocess.run([sys.executable, str(script), "fetch"], capture_output=True, text=True,
                        env={**env, "LLAMA_CPP_DIR": str(tmp_path / "tree")})  # fmt: skip
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "", "")
    bad = subprocess.run([sys.executable, str(script), "fetch"], capture_output=True, text=True,
                         env={**env, "LIGHTNING_LORA_CACHE": str(tmp_path / "file")})  # fmt: skip
    assert bad.returncode == 1 and bad.stdout == "" and len(bad.stderr.strip().splitlines()) == 1
    assert bad.stderr.startswith("llama.cpp's converters not fetched (") and "will skip" in bad.stderr
