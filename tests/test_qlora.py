"""QLoRA end to end on tiny Llamas: adapters over an NF4 base train (and only they change), DoRA/VeRA over NF4,
merged export against the high-precision base checked with PEFT as the oracle, adapter-only checkpoints, memory."""

import copy
import functools
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from tiny_models import perturb_adapters, tiny_llama
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from lightning_lora import DoRA, LoRA, VeRA, adapter_state_dict, inject, merge, save_adapter  # noqa: E402
from lightning_lora.train.memory import memory_report  # noqa: E402
from lightning_lora.quant.nf4 import NF4, original_weights, quantize, quantized_layer_names  # noqa: E402

IDS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))


def lm_loss(model, ids):
    logits = model(ids).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train(model, steps, lr=1e-2, ids=IDS):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = lm_loss(model, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, opt


def rel_rms(a, b):
    return float((a - b).norm() / b.norm())


def dequantized(layer):
    """The layer's NF4 weight, dequantized with bitsandbytes directly (out, in)."""
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def test_lora_over_nf4_trains_and_only_adapters_change():
    model = quantize(tiny_llama(), NF4()).train()
    inject(model, LoRA(r=4, alpha=8))
    before = {k: v.clone() for k, v in model.state_dict().items()}  # includes packed 4-bit data and absmax
    assert any(v.dtype == torch.uint8 for v in before.values())
    losses, _ = train(model, 15)
    assert losses[-1] < 0.9 * losses[0], losses
    trained = set(adapter_state_dict(model))
    after = model.state_dict()
    assert trained and before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]) == (k not in trained), f"{k}: only adapter tensors may change"


@pytest.mark.parametrize("config", [DoRA(r=4, alpha=8), VeRA(r=8)], ids=["dora", "vera"])
def test_dora_and_vera_over_nf4_start_at_identity_and_stay_finite(config):
    model = quantize(tiny_llama(), NF4())
    with torch.no_grad():
        base = model(IDS).logits
    inject(model, config)
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, base, atol=1e-5)
    if isinstance(config, DoRA):  # m = ||W||_row of the dequantized NF4 weight (arXiv:2402.09353, eq. 5)
        layer = model.model.layers[0].self_attn.q_proj
        m = next(v for k, v in layer.adapters["default"].state_dict().items() if "magnitude" in k)
        assert torch.allclose(m, dequantized(layer.base_layer).norm(dim=1), rtol=1e-5)
    perturb_adapters(model, std=0.05)
    out = model(IDS).logits
    assert torch.isfinite(out).all() and not torch.allclose(out, base, atol=1e-3)
    lm_loss(model, IDS).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_merged_export_equals_high_precision_base_plus_adapter(tmp_path, caplog):
    """PEFT applies the saved adapter to the original high-precision base; our merge must give the same model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tiny_llama(seed=3).save_pretrained(tmp_path / "base")
    model = quantize(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), NF4()).train()
    inject(model, LoRA(r=4, alpha=8))
    train(model, 5)
    model.eval()
    save_adapter(model, tmp_path / "adapter")
    without_originals = copy.deepcopy(model)
    names = quantized_layer_names(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with originals there is nothing to warn about
        merge(model, base_weights=original_weights(tmp_path / "base", names))
    assert not any(type(m).__name__ == "Linear4bit" for m in model.modules())

    oracle = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    with torch.no_grad():
        want, got = oracle.eval()(IDS).logits, model(IDS).logits
    assert (got - want).abs().max() < 1e-5

    # merging into the dequantized NF4 weights instead warns with the estimated rounding error, and is visibly off
    originals = original_weights(tmp_path / "base", names)
    true = [rel_rms(dequantized(without_originals.get_submodule(n).base_layer), originals[n]) for n in names]
    with caplog.at_level("WARNING", logger="lightning_lora"):
        merge(without_originals)
    assert re.search(f"{len(names)} quantized layer.* estimated ([0-9.]+)% of the weights", caplog.text)
    stated = float(re.search(r"estimated ([0-9.]+)%", caplog.text).group(1)) / 100
    assert abs(stated - sum(true) / len(true)) < 0.1 * stated
    with torch.no_grad():
        assert (without_originals(IDS).logits - want).abs().max() > 100 * 1e-5


def test_adapter_state_dict_holds_no_4bit_tensors():
    model = inject(quantize(tiny_llama(), NF4()), LoRA(r=4))
    state = adapter_state_dict(model)
    assert state and all(v.dtype == torch.float32 and ".adapters.default.lora_" in k for k, v in state.items())
    assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_lora_module_checkpoint_excludes_the_quantized_base(tmp_path):
    pytest.importorskip("lightning_lora.train.module")
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint
    from tiny_assets import make_tiny_model_dir
    from torch.utils.data import DataLoader

    from lightning_lora.train.module import LoRAModule

    base = make_tiny_model_dir(tmp_path / "base")
    ids = torch.randint(5, 300, (4, 12), generator=torch.Generator().manual_seed(0))
    data = DataLoader([{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}] * 2, batch_size=None)
    seed_everything(0)
    module = LoRAModule(str(base), adapter=LoRA(r=4), quantize=NF4(),
                        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    Trainer(max_steps=2, callbacks=[ckpt], accelerator="cpu", logger=False, enable_progress_bar=False,
            enable_model_summary=False).fit(module, data)
    assert any(type(m).__name__ == "Linear4bit" for m in module.model.modules())
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all(".adapters." in k and v.dtype == torch.float32 for k, v in state.items())
    assert not any("absmax" in k or "quant" in k for k in state)


def test_memory_report_by_kind(caplog):
    model = tiny_llama()
    shapes = {n: m.weight.shape for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    total_params = sum(p.numel() for p in model.parameters())
    quantize(model, NF4())
    inject(model, LoRA(r=4))
    quantized = {n: s for n, s in shapes.items() if n in quantized_layer_names(model)}
    numel = sum(o * i for o, i in quantized.values())
    # per layer: 4-bit data, uint8 absmax per 64, fp32 absmax per 256 blocks, fp32 offset, code tables 16 + 256 fp32
    nf4_bytes = sum(o * i // 2 + o * i // 64 + 4 * -(-(o * i // 64) // 256) + 4 + 4 * (16 + 256) for o, i in quantized.values())
    lora = sum(4 * (o + i) for n, (o, i) in shapes.items() if n != "lm_head")  # r (in + out) per layer, all-linear

    with caplog.at_level("INFO"):
        report = memory_report(model)
    assert "memory by kind" in caplog.text and "quantized base" in caplog.text
    assert {k: report["quantized base"][k] for k in ("params", "bytes")} == {"params": numel, "bytes": nf4_bytes}
    assert report["adapters"] == {"params": lora, "bytes": 4 * lora}
    assert report["unquantized base"]["params"] >= total_params - numel  # + rotary buffers
    assert report["optimizer state"]["bytes"] == 2 * 4 * lora and "estimated" in report["optimizer state"]["source"]
    _, opt = train(model, 1)
    measured = memory_report(model, opt)["optimizer state"]
    assert measured["source"] == "measured" and measured["bytes"] == 2 * 4 * lora  # AdamW: exp_avg + exp_avg_sq


def test_bitsandbytes_optimizer_selected_in_yaml(tmp_path):
    """`optimizer: class_path: bitsandbytes.optim.AdamW8bit` builds that optimizer; one that fails here is refused."""
    from lightning_lora.commands.cli import make_cli
    from lightning_lora.train.memory import check_optimizer_supported

    config = tmp_path / "bnb.yaml"
    config.write_text("model:\n  base_model: x\n  optimizer:\n    class_path: bitsandbytes.optim.AdamW8bit\n"
                      "    init_args:\n      lr: 0.001\n")  # fmt: skip
    optimizer = make_cli(["--config", str(config)], run=False).model.optimizer
    check_optimizer_supported(optimizer, "cpu")
    built = optimizer([torch.nn.Parameter(torch.randn(8192))])
    assert type(built).__name__ == "AdamW8bit" and built.defaults["lr"] == 0.001
    config.write_text(config.read_text().replace("AdamW8bit", "AdEMAMix32bit"))
    with pytest.raises(ValueError, match="AdEMAMix32bit"):
        check_optimizer_supported(make_cli(["--config", str(config)], run=False).model.optimizer, "cpu")


def test_memory_table_leaves_out_empty_kinds():
    from lightning_lora.train.memory import format_report, memory_report

    text = format_report(memory_report(inject(tiny_llama(), LoRA(r=4)), log_table=False))
    assert "unquantized base" in text and "adapters" in text and "quantized base " not in text.replace("unquantized base", "")
