"""LoRA(init=...): PiSSA, QPiSSA and LoftQ starts against formulas written here (float64 SVD, bitsandbytes' own NF4
functions), exports that compute the trained function (PEFT as the oracle for the adapter on the original base),
reproducible starts for resume and offline export, and bad input that leaves the model unchanged."""

from __future__ import annotations

import functools

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

import lightning_lora as ll
from lightning_lora.core.verbs import adapter_layers
from lightning_lora.commands.export import export_checkpoint
from lightning_lora.io.export import export
from lightning_lora.io.models import load_causal_lm
from lightning_lora.quant.nf4 import NF4
from lightning_lora.methods.lora_init import INIT_A, INIT_B
from lightning_lora.quant.prepare import prepare
from lightning_lora.train.callback import AdapterCallback
from lightning_lora.train.module import LoRAModule
from tiny_assets import make_tiny_model_dir
from tiny_models import perturb_adapters, tiny_llama

NF4_32 = NF4(blocksize=32)  # tiny Llama: in_features 64 and 96, both multiples of 32, so every linear layer is NF4
QUIET = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The float64 SVD oracles here are many small LAPACK calls: on 2 shared cores one thread is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama"))


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}


def top_r64(weight: torch.Tensor, r: int) -> torch.Tensor:
    """The best rank-r approximation of ``weight``, from a float64 SVD."""
    U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def nf4_roundtrip(weight: torch.Tensor, blocksize: int = 32) -> torch.Tensor:
    """dequant(NF4(weight)) with bitsandbytes' functions (double quantization, as NF4() does)."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight.float().contiguous(), blocksize=blocksize, compress_statistics=True,
                                       quant_type="nf4")  # fmt: skip
    return bnbf.dequantize_4bit(packed, state).reshape(weight.shape)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


# ------------------------------------------------------------------ the starts
@pytest.mark.parametrize("rslora", [False, True])
def test_pissa_start_is_the_top_r_part(rslora):
    model = tiny_llama()
    before, reference = linear_weights(model), logits(model)
    prepare(model, ll.LoRA(r=4, alpha=8, rslora=rslora, init="pissa"))
    s = 8 / (2 if rslora else 4)
    for name, layer in adapter_layers(model).items():
        branch = layer.adapters["default"]
        principal = top_r64(before[name], 4)
        A, B = branch.lora_A.double(), branch.lora_B.double()
        torch.testing.assert_close(s * B @ A, principal, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(layer.base_layer.weight.double(), before[name].double() - principal, atol=2e-5, rtol=1e-4)
        S = torch.linalg.svdvals(before[name].double())[:4]  # sqrt(S / s) on each side: A A^T = B^T B = diag(S) / s
        torch.testing.assert_close(A @ A.t(), torch.diag(S) / s, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(B.t() @ B, torch.diag(S) / s, atol=1e-4, rtol=1e-4)
        assert torch.equal(getattr(branch, INIT_A), branch.lora_A) and torch.equal(getattr(branch, INIT_B), branch.lora_B)
    torch.testing.assert_close(logits(model), reference, atol=1e-5, rtol=1e-5)  # unchanged at init


def test_pissa_randomized_svd_is_reproducible_and_close():
    runs = []
    for _ in range(2):
        model = tiny_llama()
        before = linear_weights(model)
        torch.manual_seed(123 + len(runs))  # the randomized SVD must not depend on the global RNG
        prepare(model, ll.LoRA(r=4, alpha=8, init="pissa", pissa_niter=4))
        runs.append({n: layer.adapters["default"].lora_B.detach().clone() for n, layer in adapter_layers(model).items()})
    for name, layer in adapter_layers(model).items():
        assert torch.equal(runs[0][name], runs[1][name])
        branch = layer.adapters["default"]
        captured = (2 * branch.lora_B.double() @ branch.lora_A.double()).norm() ** 2
        best = (torch.linalg.svdvals(before[name].double())[:4] ** 2).sum()
        assert captured > 0.97 * best  # near the optimal rank-4 energy


def test_gaussian_start():
    model = tiny_llama()
    prepare(model, ll.LoRA(r=4, init="gaussian"))
    branches = [layer.adapters["default"] for layer in adapter_layers(model).values()]
    values = torch.cat([b.lora_A.detach().flatten() for b in branches])
    assert all(torch.count_nonzero(b.lora_B) == 0 for b in branches)
    assert abs(values.std().item() - 1 / 4) < 0.02 and abs(values.mean().item()) < 0.02  # N(0, (1/r)^2)


@pytest.mark.parametrize("iters", [1, 3])
def test_loftq_follows_the_alternating_algorithm(iters):
    model = tiny_llama()
    before = linear_weights(model)
    prepare(model, ll.LoRA(r=4, alpha=8, init="loftq", loftq_iters=iters), quantize=NF4_32)
    s = 2.0
    for name, layer in adapter_layers(model).items():
        W = before[name]
        branch = layer.adapters["default"]
        fitted = s * branch.lora_B.double() @ branch.lora_A.double()
        dequant = ll.core.layer.dense_weight(layer.base_layer)
        assert ll.core.layer.is_quantized(layer.base_layer)
        # the last step of the paper's Algorithm 1, written out: Q = NF4(W - previous correction), then the best
        # rank-r fit of W - Q (float64 SVD); ours is an exact fp32 SVD, so the two agree to rounding
        if iters == 1:
            torch.testing.assert_close(dequant, nf4_roundtrip(W), atol=0, rtol=0)  # Q_1 = NF4(W), bit for bit
        error = (W - dequant).double()
        best = top_r64(error, 4)
        torch.testing.assert_close(fitted, best, atol=1e-5, rtol=1e-4)
        # and the start fits better than plain NF4: ||W - Q - s B A|| < ||W - NF4(W)||
        assert (error - fitted).norm() < (W - nf4_roundtrip(W)).double().norm()


def test_loftq_iterations_quantize_the_corrected_weight():
    """Q_t = NF4(W - s B_{t-1} A_{t-1}): with two iterations the base is NF4 of W minus the first step's fit."""
    one = tiny_llama()
    prepare(one, ll.LoRA(r=4, alpha=8, init="loftq", loftq_iters=1), quantize=NF4_32)
    two = tiny_llama()
    prepare(two, ll.LoRA(r=4, alpha=8, init="loftq", loftq_iters=2), quantize=NF4_32)
    original = linear_weights(tiny_llama())
    for name, layer in adapter_layers(one).items():
        branch = layer.adapters["default"]
        W = original[name]
        expected = nf4_roundtrip(W - 2.0 * branch.lora_B.detach() @ branch.lora_A.detach())
        got = ll.core.layer.dense_weight(adapter_layers(two)[name].base_layer)
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_loftq_starts_closer_to_the_original_than_qlora():
    reference = logits(tiny_llama())
    qlora = logits(ll.quantize(tiny_llama(), NF4_32))
    loftq = logits(prepare(tiny_llama(), ll.LoRA(r=8, init="loftq", loftq_iters=2), quantize=NF4_32))
    assert (loftq - reference).norm() < (qlora - reference).norm()


def test_dora_pissa_is_identity_at_init_and_keeps_the_principal_part():
    model = tiny_llama()
    reference = logits(model)
    prepare(model, ll.DoRA(r=4, alpha=8, init="pissa"))
    torch.testing.assert_close(logits(model), reference, atol=1e-5, rtol=1e-5)
    for layer in adapter_layers(model).values():
        branch = layer.adapters["default"]
        assert torch.count_nonzero(branch.lora_B) > 0
        torch.testing.assert_close(branch.magnitude, (layer.base_layer.weight + 2 * branch.lora_B @ branch.lora_A).norm(dim=1))


# ------------------------------------------------------------------ exports
def test_merge_of_an_svd_start_uses_the_trained_base():
    import warnings

    model = prepare(tiny_llama(), ll.LoRA(r=4, init="loftq"), quantize=NF4_32)
    perturb_adapters(model, std=0.05)
    trained = logits(model)
    with pytest.raises(ValueError, match=r"started from LoftQ \(1 iter.\), which rewrote its base"):  # counted twice
        ll.merge(model, base_weights=linear_weights(tiny_llama()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "merged into the dequantized NF4 weights" warning: that is the base here
        ll.merge(model)
    torch.testing.assert_close(logits(model), trained, atol=1e-5, rtol=0)


def test_inject_honours_the_start_or_points_to_prepare():
    """Every verb honours init: inject runs PiSSA exactly as prepare does; LoftQ (it needs a quantizer) is refused."""
    by_prepare = prepare(tiny_llama(), ll.LoRA(r=4, init="pissa", target_modules=["q_proj", "down_proj"]))
    by_inject = ll.inject(tiny_llama(), ll.LoRA(r=4, init="pissa", target_modules=["q_proj", "down_proj"]))
    mine, theirs = by_inject.state_dict(), by_prepare.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert any(k.endswith(INIT_A) for k in mine)
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"needs a quantized base: use prepare\(model, adapter, quantize=NF4\(\)\)"):
        ll.inject(model, ll.LoRA(r=4, init="loftq"))
    assert not any(isinstance(m, ll.AdapterLayer) for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("method", [ll.LoRA, ll.DoRA])
def test_save_adapter_of_a_pissa_start_is_for_the_original_base(method, tmp_path):
    """save_adapter / save_adapters write what export writes: PEFT on the original weights equals the trained model."""
    import json

    import peft

    model = ll.inject(tiny_llama(), method(r=4, alpha=8, init="pissa"))
    perturb_adapters(model, std=0.05)  # "training"
    ll.inject(model, ll.LoRA(r=2, target_modules=["v_proj"]), "other")  # a second adapter, saved in a subfolder
    trained = logits(model.eval())
    ll.save_adapter(model, tmp_path / "one")
    ll.save_adapters(model, tmp_path / "all")
    for folder in (tmp_path / "one", tmp_path / "all"):
        assert json.loads((folder / "adapter_config.json").read_text())["r"] == 8  # the rank-2r conversion
        assert "rank-8 LoRA" in (folder / "README.md").read_text()
        theirs = logits(peft.PeftModel.from_pretrained(tiny_llama(), folder).eval())  # the original base
        torch.testing.assert_close(theirs, trained, atol=1e-4, rtol=0)
    plain = ll.inject(tiny_llama(), ll.LoRA(r=4, alpha=8))  # a default start is written as it is
    ll.save_adapter(plain, tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["r"] == 4
    assert "Initialization" not in (tmp_path / "plain" / "README.md").read_text()


def test_save_adapter_of_a_loftq_start_says_which_base(tmp_path):
    model = prepare(tiny_llama(), ll.LoRA(r=4, init="loftq"), quantize=NF4_32)
    ll.save_adapter(model, tmp_path)
    assert "same NF4 quantization of the base it was trained on" in (tmp_path / "README.md").read_text()


def peft_logits(folder: str, adapter_dir) -> torch.Tensor:
    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder)
    return logits(peft.PeftModel.from_pretrained(base, adapter_dir).eval())


def merged_logits(folder) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return logits(AutoModelForCausalLM.from_pretrained(folder).eval())


@pytest.mark.parametrize("method", [ll.LoRA, ll.DoRA])
def test_pissa_exports_equal_the_trained_model(tiny_dir, tmp_path, method):
    model, _ = load_causal_lm(tiny_dir, dtype="float32")
    prepare(model, method(r=4, alpha=8, init="pissa"))
    perturb_adapters(model, std=0.05)  # "training"
    trained = logits(model.eval())
    export(model, tmp_path, base_model=tiny_dir)
    torch.testing.assert_close(peft_logits(tiny_dir, tmp_path / "adapter"), trained, atol=1e-4, rtol=0)  # original W
    torch.testing.assert_close(merged_logits(tmp_path / "merged"), trained, atol=1e-4, rtol=0)
    assert "rank-8 LoRA" in (tmp_path / "adapter" / "README.md").read_text()


@pytest.mark.parametrize("init", ["loftq", "pissa"])
def test_quantized_start_merged_export_is_exact(tiny_dir, tmp_path, init):
    model, _ = load_causal_lm(tiny_dir, dtype="float32")
    prepare(model, ll.LoRA(r=4, alpha=8, init=init, loftq_iters=2), quantize=NF4_32)
    perturb_adapters(model, std=0.05)
    trained = logits(model.eval())
    export(model, tmp_path, base_model=tiny_dir)
    torch.testing.assert_close(merged_logits(tmp_path / "merged"), trained, atol=1e-4, rtol=0)
    note = (tmp_path / "adapter" / "README.md").read_text()
    assert ("same NF4 quantization" if init == "loftq" else "QPiSSA") in note and "merged export" in note


def batches(n: int = 2, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        ids = torch.randint(5, 300, (2, 10), generator=g)
        data.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return DataLoader(data, batch_size=None)


@pytest.mark.parametrize("init", ["loftq", "pissa"])
def test_checkpoint_resume_and_offline_export_keep_the_start(tiny_dir, tmp_path, init):
    seed_everything(0)
    adapter = ll.LoRA(r=4, alpha=8, init=init, loftq_iters=2, pissa_niter=2)
    make = functools.partial(LoRAModule, tiny_dir, adapter=adapter, quantize=NF4_32 if init == "loftq" else None,
                             optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))  # fmt: skip
    module = make()
    Trainer(max_steps=2, callbacks=[ModelCheckpoint(dirpath=tmp_path, filename="last")], **QUIET).fit(module, batches())
    trained = logits(module.model.eval())
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert any(k.endswith(INIT_A) for k in state) == (init == "pissa")  # PiSSA's start travels in the checkpoint
    # resume: a new module rebuilds the same base, the checkpoint brings the trained factors back
    resumed = make()
    trainer = Trainer(max_steps=2, **QUIET)
    trainer.fit(resumed, batches(), ckpt_path=tmp_path / "last.ckpt")  # already at max_steps: restores, no step
    torch.testing.assert_close(logits(resumed.model.eval()), trained, atol=1e-5, rtol=0)
    export_checkpoint(tmp_path / "last.ckpt", tmp_path / "offline")  # rebuilds the start from the checkpoint's facts
    torch.testing.assert_close(merged_logits(tmp_path / "offline" / "merged"), trained, atol=1e-4, rtol=0)


class TinyModule(LightningModule):
    def __init__(self):
        super().__init__()
        self.model = tiny_llama()

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def test_adapter_callback_takes_the_init(tmp_path):
    module = TinyModule()
    reference = logits(tiny_llama())
    callback = AdapterCallback(ll.LoRA(r=4, init="loftq"), quantize=NF4_32, target="model", export_dir=str(tmp_path))
    Trainer(max_steps=1, enable_checkpointing=False, **QUIET, callbacks=[callback]).fit(
        module, DataLoader([{"input_ids": IDS, "labels": IDS}], batch_size=None))
    assert all(ll.core.layer.is_quantized(layer.base_layer) for layer in adapter_layers(module.model).values())
    trained = logits(module.model.eval())
    assert (trained - reference).abs().max() < 1.0
    torch.testing.assert_close(merged_from_safetensors(tmp_path / "merged"), trained, atol=1e-4, rtol=0)


def merged_from_safetensors(folder) -> torch.Tensor:
    from safetensors.torch import load_file

    model = tiny_llama()
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return logits(model.eval())


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "adapter, quantize, message",
    [
        (ll.LoRA(r=4, init="loftq"), None, "needs a quantized base"),
        (ll.LoRA(r=65, init="pissa"), None, "larger than min"),
        (ll.LoRA(r=65, init="loftq"), NF4_32, "larger than min"),
        (ll.DoRA(r=4, init="loftq"), NF4_32, "DoRA(init='loftq') is not supported"),
        (ll.LoRA(r=4, init="pissa", target_modules=["embed_tokens"]), None, "Embedding"),
    ],
)
def test_bad_input_is_refused_and_leaves_the_model_unchanged(adapter, quantize, message):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prepare(model, adapter, quantize=quantize)
    assert [type(m) for m in model.modules()] == modules
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_lightning_entry_points_refuse_loftq_without_nf4_before_loading(tiny_dir):
    with pytest.raises(ValueError, match="needs a quantized base"):
        LoRAModule(tiny_dir, adapter=ll.LoRA(init="loftq"))
    with pytest.raises(ValueError, match="not supported"):
        AdapterCallback(ll.DoRA(init="loftq"), quantize=NF4_32)


def test_already_quantized_or_adapted_models_are_refused():
    quantized = ll.quantize(tiny_llama(), NF4_32)
    with pytest.raises(ValueError, match="already quantized"):
        prepare(quantized, ll.LoRA(r=4, init="loftq"), quantize=NF4_32)
    adapted = ll.inject(tiny_llama(), ll.LoRA(r=4))
    with pytest.raises(ValueError, match="without adapters"):
        prepare(adapted, ll.LoRA(r=4, init="pissa"), name="other")


@pytest.mark.parametrize("fields, message", [
    (dict(init="svd"), "init must be one of"),
    (dict(init="pissa", pissa_niter=-1), "pissa_niter"),
    (dict(init="loftq", loftq_iters=0), "loftq_iters"),
])
def test_bad_init_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        ll.LoRA(r=4, **fields)
