"""The generate CLI and export_combination, against a reference built here from the adapter files' tensors."""

import pytest
import torch
from tiny_models import perturb_adapters
from safetensors.torch import load_file
from tiny_assets import make_tiny_model_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

import lightning_lora as ll
from lightning_lora.commands.generate import main, parse_adapter

PROMPT = "What is a list?"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny model folder and two LoRA adapter folders (r 4 all-linear; rsLoRA r 2 on q,v) with random values."""
    root = tmp_path_factory.mktemp("gen")
    base = make_tiny_model_dir(root / "base")
    for i, cfg in enumerate([ll.LoRA(r=4, alpha=8), ll.LoRA(r=2, alpha=4, rslora=True, target_modules=["q_proj", "v_proj"])]):
        model = AutoModelForCausalLM.from_pretrained(base)
        ll.inject(model, cfg)
        perturb_adapters(model, std=0.3, seed=i)
        ll.save_adapter(model, root / f"ad{i}")
    return base, root / "ad0", root / "ad1"


def reference_model(base, adapters):
    """Base weights + sum_i w_i * s_i * B_i A_i, read straight from adapter_model.safetensors and its config."""
    import json

    model = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        for path, w in adapters.items():
            cfg = json.loads((path / "adapter_config.json").read_text())
            s = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg["use_rslora"] else cfg["r"])
            tensors = load_file(path / "adapter_model.safetensors")
            for key, A in tensors.items():
                if key.endswith("lora_A.weight"):
                    B = tensors[key.replace("lora_A", "lora_B")]
                    layer = model.get_submodule(key.removeprefix("base_model.model.").removesuffix(".lora_A.weight"))
                    layer.weight += w * s * B @ A
    return model


def greedy(model, tokenizer, n=6):
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_parse_adapter():
    assert parse_adapter("runs/a:0.7") == ("runs/a", 0.7)
    assert parse_adapter("runs/a") == ("runs/a", 1.0)
    assert parse_adapter("C:/x/a") == ("C:/x/a", 1.0)
    assert parse_adapter("a:-1e-1") == ("a", -0.1)


def test_generate_combination_and_compare(assets, capsys):
    base, a0, a1 = assets
    tok = AutoTokenizer.from_pretrained(base)
    texts = main(["generate", "--base_model", str(base), "--adapter", f"{a0}:0.7", "--adapter", f"{a1}:0.3",
                  "--prompt", PROMPT, "--max_new_tokens", "6", "--compare"])  # fmt: skip
    assert list(texts) == ["base", "ad0", "ad1", "0.7*ad0 + 0.3*ad1"]
    assert texts["base"] == greedy(AutoModelForCausalLM.from_pretrained(base).eval(), tok)
    assert texts["ad0"] == greedy(reference_model(base, {a0: 1.0}), tok)
    assert texts["ad1"] == greedy(reference_model(base, {a1: 1.0}), tok)
    assert texts["0.7*ad0 + 0.3*ad1"] == greedy(reference_model(base, {a0: 0.7, a1: 0.3}), tok)
    assert len(set(texts.values())) > 1  # the adapters change the output
    printed = capsys.readouterr().out
    assert "variant" in printed and "ad1" in printed


def test_merge_to_writes_a_loadable_folder(assets, tmp_path, ids):
    base, a0, a1 = assets
    out = main(["generate", "--base_model", str(base), "--adapter", f"{a0}:0.7", "--adapter", f"{a1}:-0.5",
                "--merge_to", str(tmp_path / "merged")])  # fmt: skip
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ref = reference_model(base, {a0: 0.7, a1: -0.5})
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
    assert AutoTokenizer.from_pretrained(out).chat_template
    assert (out / "lightning_lora_merge.json").exists()


def test_generate_reads_the_base_the_adapters_record(assets, tmp_path):
    """Before: --base_model was required although every adapter folder records its base."""
    import json
    import shutil

    base, a0, a1 = assets
    for folder in (a0, a1):
        assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    given = main(["generate", "--base_model", str(base), "--adapter", str(a0), "--prompt", PROMPT, "--max_new_tokens", "4"])
    recorded = main(["generate", "--adapter", str(a0), "--prompt", PROMPT, "--max_new_tokens", "4"])
    assert recorded == given
    other = tmp_path / "other"
    shutil.copytree(a1, other)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/another-base"}))
    with pytest.raises(ValueError, match="record different base models.*pass --base_model"):
        main(["generate", "--adapter", str(a0), "--adapter", str(other), "--prompt", PROMPT])


def test_readme_generate_example_uses_folders_the_readme_configs_write():
    """Before: the README's literal `--adapter other:0.3` named a folder nothing writes."""
    import re
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    line = next(ln for ln in (root / "README.md").read_text().splitlines() if "lightning_lora generate" in ln)
    folders = [parse_adapter(spec)[0] for spec in re.findall(r"--adapter (\S+)", line)]
    written = {}
    for config in (root / "configs").glob("*.yaml"):
        model = yaml.safe_load(config.read_text())["model"]
        model = model.get("init_args", model)
        if model.get("export_dir") and "peft" in model.get("exports", ["peft"]):
            written[f"{model['export_dir']}/adapter"] = config.name
    assert len(folders) == 2 and all(f in written for f in folders), (folders, written)
    assert "--base_model" not in line  # the adapters record it


def test_generate_errors(assets, tmp_path):
    base, a0, _ = assets
    with pytest.raises(SystemExit, match="does not exist"):
        main(["generate", "--base_model", str(base), "--adapter", str(tmp_path / "nope:0.5"), "--prompt", "x"])
    with pytest.raises(SystemExit, match="--prompt"):
        main(["generate", "--base_model", str(base), "--adapter", str(a0)])
    assert not (tmp_path / "merged").exists()
