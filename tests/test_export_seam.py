"""The export seam (io/export.py): one writer per format in one table; each format alone writes exactly its own path,
and what it writes loads back to the trained model; io/ knows nothing of Lightning."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tiny_assets import make_tiny_model_dir
from tiny_models import perturb_adapters

import lightning_lora as ll
from lightning_lora.io.export import FORMATS, export, relative_path
from lightning_lora.io.models import load_causal_lm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = make_tiny_model_dir(tmp_path_factory.mktemp("seam") / "llama")
    model, tokenizer = load_causal_lm(str(base))
    ll.inject(model, ll.LoRA(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    perturb_adapters(model, std=0.2)
    ids = torch.randint(0, 300, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(ids).logits
    return base, model, tokenizer, ids, logits


@pytest.mark.parametrize("key", sorted(FORMATS))
def test_each_format_alone_writes_its_path_and_it_loads_back(trained, tmp_path, key):
    base, model, tokenizer, ids, logits = trained
    option = FORMATS[key].options[0] if FORMATS[key].options else None
    paths = export(model, tmp_path / "exp", exports=[key], tokenizer=tokenizer, base_model=str(base))
    rel = relative_path(key, option)
    assert list(paths.values()) == [tmp_path / "exp" / rel]
    assert [p.name for p in (tmp_path / "exp").iterdir()] == [rel]  # nothing else, no leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
    path = tmp_path / "exp" / rel
    if key == "peft":
        fresh, _ = load_causal_lm(str(base))
        ll.load_adapter(fresh, path)
        with torch.no_grad():
            torch.testing.assert_close(fresh(ids).logits, logits, rtol=0, atol=1e-5)
    elif key == "merged":
        from transformers import AutoModelForCausalLM

        with torch.no_grad():
            merged = AutoModelForCausalLM.from_pretrained(path).eval()(ids).logits
        torch.testing.assert_close(merged, logits, rtol=0, atol=1e-5)
    else:
        from gguf import GGUFReader

        names = [t.name for t in GGUFReader(str(path)).tensors]
        assert any(".lora_a" in n for n in names) if key == "gguf" else "token_embd.weight" in names


def test_io_knows_nothing_of_lightning():
    """Before: io/export.py reached into a LightningModule's ``_trainer`` to copy it."""
    for path in sorted((ROOT / "lightning_lora" / "io").glob("*.py")):
        text = path.read_text()
        assert not re.search(r"_trainer|\bTrainer\b|LightningModule|(import|from) lightning(\.pytorch|\.fabric|\s)", text), path.name


def test_adapter_callback_writes_what_it_is_asked_and_probes_with_the_example_input(tmp_path):
    """A plain LightningModule (no Hugging Face model): the merged copy is made without the Trainer it points to, and
    the probe batch is the module's ``example_input_array``; finite weights whose output overflows are refused."""
    from lightning.pytorch import Callback, Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lightning_lora.core.verbs import adapter_layers

    class Net(BoringModel):
        def __init__(self):
            super().__init__()
            self.example_input_array = torch.ones(1, 32)

    class BlowUp(Callback):  # finite adapter, W' x overflows: 32 x (2 x 1e18 x 1e19)
        def on_train_end(self, trainer, pl_module):
            with torch.no_grad():
                for layer in adapter_layers(pl_module).values():
                    layer.adapters["default"].lora_A.fill_(1e18)
                    layer.adapters["default"].lora_B.fill_(1e19)

    def fit(out, *extra):
        callback = ll.AdapterCallback(ll.LoRA(r=2, alpha=2, target_modules=["layer"]), export_dir=str(out),
                                      exports=["merged"])  # fmt: skip
        Trainer(max_steps=2, callbacks=[*extra, callback], logger=False, enable_progress_bar=False,
                enable_checkpointing=False, enable_model_summary=False).fit(Net())  # fmt: skip
        return callback

    callback = fit(tmp_path / "ok")
    assert [p.name for p in (tmp_path / "ok").iterdir()] == ["merged"] and list(callback.exported) == ["merged"]
    assert (tmp_path / "ok" / "merged" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match=r"first layer whose output is non-finite is 'layer'"):
        fit(tmp_path / "blown", BlowUp())
    assert not (tmp_path / "blown").exists()
