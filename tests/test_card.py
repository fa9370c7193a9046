"""Complete PEFT folders: task_type, base_model_name_or_path, compact target_modules, README.md card; PEFT as oracle."""

import json
import math

import pytest
import torch
from tiny_assets import make_tiny_model_dir
from tiny_models import perturb_adapters, tiny_llama

import lightning_lora as ll
from lightning_lora.core.targets import compact_targets
from lightning_lora.core.verbs import adapter_layers
from lightning_lora.io.card import base_source
from lightning_lora.io.models import load_causal_lm


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("card") / "llama")


def _adapted(base_dir, adapter):
    model, _ = load_causal_lm(str(base_dir))
    ll.inject(model, adapter)
    perturb_adapters(model)
    return model


@pytest.mark.parametrize("adapter", [ll.LoRA(r=4, alpha=8, target_modules="all-linear"),
                                     ll.LoRA(r=4, alpha=8, rslora=True, target_modules=["q_proj", "v_proj"])])
def test_auto_peft_loads_offline_with_same_logits(base_dir, tmp_path, monkeypatch, adapter):
    from peft import AutoPeftModelForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = _adapted(base_dir, adapter)
    folder = ll.save_adapter(model, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == str(base_dir.resolve())
    peft_model = AutoPeftModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_targets_compact_when_exact_else_full_names():
    model = tiny_llama()
    ll.inject(model, ll.LoRA(r=2, target_modules=["q_proj", "v_proj"]))
    targets = sorted(adapter_layers(model))
    assert len(targets) == 4
    assert compact_targets(model, targets) == ["q_proj", "v_proj"]
    only_first = [t for t in targets if ".layers.0." in t]  # suffixes would also select layer 1: keep full names
    assert compact_targets(model, only_first) == sorted(only_first)


def test_partial_targets_written_in_full_and_reload_into_peft(base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = _adapted(base_dir, ll.LoRA(r=2, target_modules=r"model\.layers\.0\.self_attn\.(q|k)_proj"))
    folder = ll.save_adapter(model, tmp_path / "a")
    targets = json.loads((folder / "adapter_config.json").read_text())["target_modules"]
    assert targets == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj"]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), folder).eval()
    adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(targets)  # PEFT adapts exactly those layers


def test_card_gives_the_facts(base_dir, tmp_path):
    model = _adapted(base_dir, ll.LoRA(r=4, alpha=8, target_modules="all-linear"))
    run = {"data": "chatterbot pairs", "steps": 17, "val_loss": 2.5}
    folder = ll.save_adapter(model, tmp_path / "a", run=run)
    card = (folder / "README.md").read_text()
    for fact in (str(base_dir.resolve()), "LoRA", "| rank r | 4 |", "scale 2.0000", "`q_proj`", "chatterbot pairs",
                 "| steps | 17 |", "2.5000", f"{math.exp(2.5):.3f}", "AutoPeftModelForCausalLM", "llama-cli"):
        assert fact in card, fact


def test_base_source_hub_snapshot_is_the_hub_id(tmp_path):
    snap = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    model = tiny_llama()
    model.name_or_path = str(snap)
    assert base_source(model) == "HuggingFaceTB/SmolLM2-135M"
    assert base_source(base_model="org/not-a-folder") == "org/not-a-folder"


def test_folder_written_by_peft_loads_into_ours(base_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                           task_type="CAUSAL_LM", init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "p")
    ours, _ = load_causal_lm(str(base_dir))
    ll.load_adapter(ours, tmp_path / "p")
    ids = torch.randint(0, ours.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, peft_model.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def test_alias_folder_card_says_weights_are_the_gguf_ones(base_dir, tmp_path, monkeypatch):
    """A built-in alias resolves to its converted cache folder; the card says its weights are the GGUF's."""
    import shutil

    from lightning_lora.io import card, models

    folder = tmp_path / "cache" / "smollm2-135m-instruct"
    shutil.copytree(base_dir, folder)
    (folder / models.MARKER).write_text(json.dumps({"file": "SmolLM2-135M-Instruct.Q4_1.gguf", "size": 1}))
    monkeypatch.setattr(card, "resolve_model_path", lambda name: folder)
    model = _adapted(folder, ll.LoRA(r=2))
    out = ll.save_adapter(model, tmp_path / "a", base_model_name_or_path=base_source(base_model="smollm2-135m-instruct"))
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(folder)
    text = (out / "README.md").read_text()
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in text and "not the hub repository's" in text
    # the card names the base portably (the alias's hub repository), never by a path into this machine's cache
    assert "\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n" in text and str(folder) not in text
    assert "| base model | `HuggingFaceTB/SmolLM2-135M-Instruct` (built-in alias `smollm2-135m-instruct`) |" in text


def test_card_of_a_quantized_base_says_qlora_and_a_local_base_is_no_hub_id(base_dir, tmp_path):
    from lightning_lora.io.export import export

    model, _ = load_causal_lm(str(base_dir))
    ll.quantize(model, ll.NF4(quant_storage="float32"))
    ll.inject(model, ll.LoRA(r=2, target_modules=["q_proj"]))
    export(model, tmp_path / "exp", exports=["peft"])
    text = (tmp_path / "exp" / "adapter" / "README.md").read_text()
    assert "| method | QLoRA (LoRA over an NF4 base) |" in text and "tags: [lightning_lora, qlora]" in text
    assert "base_model:" not in text.split("---")[1]  # a local folder is no hub id: the header leaves it out
    assert f"| base model | the local folder `{base_dir.resolve()}` |" in text


@pytest.mark.parametrize("source,header_base", [
    (None, None),  # unknown base: no base_model key (the title says how to give one)
    ("local", None),  # a folder on this machine is no hub id
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("org/name: v2 # [draft]", "org/name: v2 # [draft]"),  # not a folder here, so kept: YAML-special characters
])  # fmt: skip
def test_card_header_is_yaml_that_llamacpp_reads(base_dir, tmp_path, source, header_base):
    """The YAML header parses (PyYAML) to exactly the card's facts, and the ``gguf`` package's model-card reader (what
    llama.cpp's convert_lora_to_gguf.py runs on the PEFT folder) reads it."""
    import yaml

    gguf = pytest.importorskip("gguf")
    model = _adapted(base_dir, ll.LoRA(r=2, target_modules=["q_proj"]))
    model.name_or_path = ""  # the base's origin is only what save_adapter is given
    base = str(base_dir) if source == "local" else source
    out = ll.save_adapter(model, tmp_path / "a", base_model_name_or_path=base)
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("---\n")[1])
    assert header == {**({"base_model": header_base} if header_base else {}), "library_name": "peft",
                      "tags": ["lightning_lora", "lora"]}  # fmt: skip
    card = gguf.Metadata.load_model_card(out)
    assert card.get("base_model") == header_base and card["library_name"] == "peft"
    gguf.Metadata.load(None, out, None, 0)  # the converter's call: no crash on any base name
