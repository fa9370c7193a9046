"""MoE expert stacks as adapter targets (core/experts.py, core/experts_dispatch.py, methods/lora_experts.py,
quant/nf4_experts.py, io/peft_experts.py, estimate/moe.py) on tiny Mixtral, Qwen3-MoE and gpt-oss models.

Oracles: PEFT 0.21 (its ParamWrapper, running transformers' own grouped_mm experts on a model of its own config) both
ways; transformers' eager experts forward; per-expert formulas written here (W_e + s B_e A_e, PEFT's stacked layout);
bitsandbytes' own dequantization; autograd's saved tensors for the estimator.
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from tiny_models import perturb_adapters, saved_bytes
from transformers import AutoModelForCausalLM, GptOssConfig, MixtralConfig, Qwen3MoeConfig

import lightning_lora as ll
from lightning_lora.core import experts_dispatch
from lightning_lora.core.experts import ExpertLayer, expert_factors, expert_stacks
from lightning_lora.quant.nf4 import quantized_layer_names
from lightning_lora.quant.nf4_experts import NF4ExpertWeights

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)
CONFIGS = {
    "mixtral": lambda: MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": lambda: Qwen3MoeConfig(**TINY, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                        norm_topk_prob=True),
    "gpt_oss": lambda: GptOssConfig(**{**TINY, "intermediate_size": 64}, num_local_experts=4, num_experts_per_tok=2,
                                    sliding_window=8, attn_implementation="eager"),
}
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
TOL = 1e-5


def build(arch: str, seed: int = 0):
    """A fresh tiny model with a config of its own (a config shared by two models shares their experts' dispatch)."""
    torch.manual_seed(seed)
    kwargs = {"attn_implementation": "eager"} if arch == "gpt_oss" else {}
    return AutoModelForCausalLM.from_config(CONFIGS[arch](), **kwargs).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def adapted(arch: str, **lora):
    model = build(arch)
    ll.inject(model, ll.LoRA(**{"r": 2, "alpha": 4.0, **lora}))
    perturb_adapters(model, std=0.1)
    return model


@pytest.mark.parametrize("arch", CONFIGS)
@pytest.mark.parametrize("targets", [dict(), dict(target_modules=[], target_parameters=["experts.gate_up_proj"])],
                         ids=["all-linear", "one-stack"])
def test_peft_both_ways(arch, targets, tmp_path):
    """PEFT loads our folder and we load PEFT's, logits within 1e-5; PEFT's model runs transformers' own experts."""
    peft = pytest.importorskip("peft")
    ours = adapted(arch, **targets)
    ll.save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["target_parameters"] == (["experts.down_proj", "experts.gate_up_proj"] if not targets
                                           else ["experts.gate_up_proj"])
    theirs = peft.PeftModel.from_pretrained(build(arch), tmp_path / "ours").eval()
    assert theirs.base_model.model.config._experts_implementation != experts_dispatch.NAME
    torch.testing.assert_close(logits(theirs), logits(ours), atol=TOL, rtol=0)
    perturb_adapters(theirs, std=0.1, seed=5)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = ll.load_adapter(build(arch), tmp_path / "theirs")
    torch.testing.assert_close(logits(loaded), logits(theirs), atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_per_expert_updates_are_pefts(arch):
    """Our per-expert dW_e (layout of the stack: (E, out, in), or (E, in, out) transposed) is PEFT's
    ParamWrapper.get_delta_weight of the same tensors, and s B_e A_e from PEFT's layout written out here."""
    peft = pytest.importorskip("peft")
    ours = adapted(arch, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    theirs = peft.get_peft_model(build(arch), peft.LoraConfig(r=2, lora_alpha=4, target_modules=[],
                                                              target_parameters=["gate_up_proj", "down_proj"]))
    experts = ours.model.layers[0].mlp.experts
    wrappers = {"down_proj": theirs.base_model.model.model.layers[0].mlp.experts}
    wrappers["gate_up_proj"] = wrappers["down_proj"].base_layer  # PEFT nests the first stack inside the second
    for stack in ("gate_up_proj", "down_proj"):
        layer = getattr(experts, stack)
        branch = layer.adapters["default"]
        wrapper = wrappers[stack]
        assert wrapper.parameter_name == stack
        with torch.no_grad():
            wrapper.lora_A["default"].weight.copy_(branch.lora_A)
            wrapper.lora_B["default"].weight.copy_(branch.lora_B)
            E, r = layer.base_layer.num_experts, branch.r
            A = branch.lora_A.reshape(E, r, -1)  # expert-major rows
            B = torch.stack([branch.lora_B[:, [k * E + e for k in range(r)]] for e in range(E)])  # rank-major cols
            expected = branch.scale * B @ A
            expected = expected.transpose(1, 2) if layer.base_layer.transposed else expected
            torch.testing.assert_close(branch.delta_weight(layer.base_layer), expected)
            torch.testing.assert_close(wrapper.get_delta_weight("default"), expected)


def test_probe_selects_ours_only_when_it_matches_eager(caplog):
    """Every experts module runs ours (call count) and the logits equal eager's (and grouped_mm's) within 1e-5."""
    model = build("mixtral")
    eager, grouped = copy.deepcopy(model), logits(model)
    eager.config._experts_implementation_internal = "eager"
    experts_dispatch.use_experts_dispatch(model)
    assert experts_dispatch.runs_our_experts(model)
    experts_dispatch._calls = {}
    try:
        ours = logits(model)
        calls = experts_dispatch._calls
    finally:
        experts_dispatch._calls = None
    assert sorted(calls.values()) == [1, 1]
    assert torch.equal(ours, logits(eager))  # op for op the eager loop
    torch.testing.assert_close(ours, grouped, atol=TOL, rtol=0)


def test_probe_refuses_a_model_whose_experts_do_not_dispatch_or_differ():
    """A layer whose MoE block bypasses the dispatch, or a gate ours would apply differently: one line naming the
    model type; the model keeps its own experts."""
    model = build("qwen3_moe")
    experts = model.model.layers[1].mlp.experts
    experts.forward = type(experts).forward.__wrapped__.__get__(experts)  # its eager loop, called directly
    with pytest.raises(ValueError, match=r"MoE experts of qwen3_moe: .*1 of 2 experts modules never called it"):
        ll.inject(model, ll.LoRA(r=2))
    assert not experts_dispatch.runs_our_experts(model) and not ll.adapter_names(model)
    model = build("mixtral")  # Mixtral's eager loop gates inline; ours asks the module's _apply_gate
    model.model.layers[0].mlp.experts._apply_gate = lambda h: h[..., : h.shape[-1] // 2]
    with pytest.raises(ValueError, match=r"MoE experts of mixtral: .*outputs moved"):
        ll.quantize(model, ll.NF4())
    assert not any(isinstance(m, NF4ExpertWeights) for m in model.modules())


@pytest.mark.parametrize("arch", CONFIGS)
def test_nf4_stacks_dequantize_only_the_routed_experts(arch, monkeypatch):
    """Each expert is its own NF4 tensor; the forward equals the dense model holding the dequantized weights, and a
    one-token forward dequantizes only the k routed experts of each stack."""
    import bitsandbytes.functional as bnbf

    model, reference = build(arch), build(arch)
    ll.quantize(model, ll.NF4())
    stacks = {n: m for n, m in model.named_modules() if isinstance(m, NF4ExpertWeights)}
    assert set(stacks) == set(expert_stacks(reference))
    with torch.no_grad():
        for name, stack in stacks.items():
            owner, attr = expert_stacks(reference)[name]
            dense = getattr(owner, attr)
            assert len(stack.experts) == dense.shape[0]
            for e, p in enumerate(stack.experts):
                assert p.quant_state.shape == dense.shape[1:]  # expert e quantized on its own: its own blocks
                dense[e].copy_(bnbf.dequantize_4bit(p.data, p.quant_state))
        for name, m in model.named_modules():
            if hasattr(getattr(m, "weight", None), "quant_state") and not isinstance(m, NF4ExpertWeights):
                reference.get_submodule(name).weight.copy_(bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state))
    torch.testing.assert_close(logits(model), logits(reference), atol=TOL, rtol=0)
    seen = []
    expert = NF4ExpertWeights.expert
    monkeypatch.setattr(NF4ExpertWeights, "expert",
                        lambda self, e, dtype=None: seen.append(e) or expert(self, e, dtype))
    logits(model, IDS[:1, :1])
    assert len(seen) == len(stacks) * 2  # k = 2 experts per stack for the one token


def test_qlora_on_experts_keeps_no_dequantized_weight_for_backward():
    """Training memory holds 4-bit experts: no saved tensor has an expert matrix's shape; gradients reach every
    adapter."""
    model = build("mixtral")
    ll.prepare(model, ll.LoRA(r=2), quantize=ll.NF4())
    model.train()
    shapes = {m.shape[1:] for m in model.modules() if isinstance(m, NF4ExpertWeights)}
    assert shapes == {(256, 64), (64, 128)}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = set()

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved.add(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert saved and not shapes & saved
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if ".experts." in n and n.endswith("lora_B"))


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_merge_is_exact_dense_and_nf4_with_original_weights(arch):
    """Dense: merged logits equal the adapted ones. NF4: merged against the original weights, each stack is
    W_e + s B_e A_e exactly (never re-quantized), back as the experts module's own 3-D parameter."""
    model = adapted(arch)
    before = logits(model)
    ll.merge(model)
    torch.testing.assert_close(logits(model), before, atol=TOL, rtol=0)
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in build(arch).named_parameters()}
    original = build(arch)
    qlora = build(arch)
    ll.prepare(qlora, ll.LoRA(r=2, alpha=4.0), quantize=ll.NF4())
    perturb_adapters(qlora, std=0.1)
    layer = qlora.model.layers[1].mlp.experts.down_proj
    branch, transposed = layer.adapters["default"], layer.base_layer.transposed
    A, B = expert_factors(branch.lora_A.detach(), branch.lora_B.detach(), layer.base_layer.num_experts)
    update = branch.scale * B @ A
    expected = original.model.layers[1].mlp.experts.down_proj + (update.transpose(1, 2) if transposed else update)
    ll.merge(qlora, base_weights=ll.original_weights(original, quantized_layer_names(qlora)))
    merged = qlora.model.layers[1].mlp.experts.down_proj
    assert isinstance(merged, torch.nn.Parameter) and merged.dtype == torch.float32
    torch.testing.assert_close(merged, expected, atol=1e-6, rtol=0)


def test_remove_is_bit_exact():
    model = build("gpt_oss")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    ll.inject(model, ll.LoRA(r=2))
    perturb_adapters(model)
    ll.remove(model)
    assert list(model.state_dict()) == list(state)  # same keys in the same order (PEFT nests by it)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p is params[n] and p.requires_grad for n, p in model.named_parameters())


def test_swap_weights_combine_and_mixed_batches():
    """Two adapters on the experts: weighted activation is the sum of the updates; combine("cat") is that exactly and
    "svd" at full rank too; per_sample_adapters gives each row its own adapter's output."""
    model = build("qwen3_moe")
    spec = dict(r=2, alpha=4.0, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    ll.inject(model, ll.LoRA(**spec), "a")
    ll.inject(model, ll.LoRA(**spec), "b")
    perturb_adapters(model, std=0.1)
    outputs = {}
    for name in ("a", "b"):
        ll.set_adapter(model, name)
        outputs[name] = logits(model)
    ll.set_adapter(model, {"a": 0.7, "b": -0.3})
    weighted = logits(model)
    ll.combine(model, {"a": 0.7, "b": -0.3}, "cat")
    ll.combine(model, {"a": 0.7, "b": -0.3}, "svd", method="svd", rank=4)
    for name in ("cat", "svd"):
        ll.set_adapter(model, name)
        torch.testing.assert_close(logits(model), weighted, atol=TOL, rtol=0)
    assert model.model.layers[0].mlp.experts.down_proj.adapters["cat"].lora_A.shape == (4 * 4, 64)
    with ll.per_sample_adapters(model, ["a", "b"]):
        mixed = logits(model)
    torch.testing.assert_close(mixed[0], outputs["a"][0], atol=TOL, rtol=0)
    torch.testing.assert_close(mixed[1], outputs["b"][1], atol=TOL, rtol=0)


def test_all_linear_says_it_adapts_the_experts_and_dora_refuses_them(caplog):
    with caplog.at_level(logging.INFO, logger="lightning_lora"):
        ll.inject(build("mixtral"), ll.LoRA(r=2))
    assert "adapts the MoE experts too: 4 expert stacks (gate_up_proj, down_proj) of 4 experts each" in caplog.text
    model = build("mixtral")
    with caplog.at_level(logging.WARNING, logger="lightning_lora"):
        ll.inject(model, ll.DoRA(r=2))
    assert "leaves out the 4 expert stacks" in caplog.text and "plain LoRA only" in caplog.text
    assert not any(isinstance(m, ExpertLayer) for m in model.modules())
    with pytest.raises(ValueError, match="DoRA cannot adapt MoE expert stacks"):
        ll.inject(build("mixtral"), ll.DoRA(r=2, target_parameters=["experts.down_proj"]))
    with pytest.raises(ValueError, match="cannot start on the MoE expert stack"):
        ll.inject(build("mixtral"), ll.LoRA(r=2, init="pissa"))


@pytest.mark.parametrize("spec, message", [
    (dict(target_parameters=["experts.gate_proj"]), r"'experts.gate_proj' selects no parameter\. Expert stacks of "
                                                    r"MixtralForCausalLM: experts.down_proj, experts.gate_up_proj"),
    (dict(target_parameters=["mlp.gate.weight"]), r"selects 'model.layers.0.mlp.gate.weight', which is no MoE expert"),
    (dict(target_modules=["q_projj"], target_parameters=["experts.down_proj"]), r"'q_projj'.*match"),
])
def test_bad_targets_are_refused_with_the_model_unchanged(spec, message):
    model = build("mixtral")
    with pytest.raises(ValueError, match=message):
        ll.inject(model, ll.LoRA(r=2, **spec))
    assert not ll.adapter_names(model)
    with pytest.raises(ValueError, match="target_modules is empty"):
        ll.LoRA(target_modules=[])


def test_dropout_acts_per_expert_and_peft_files_say_zero(tmp_path, caplog):
    model = adapted("mixtral", dropout=0.5, target_modules=[], target_parameters=["experts.gate_up_proj"])
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(IDS).logits, model(IDS).logits)
    with caplog.at_level(logging.WARNING, logger="lightning_lora"):
        ll.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_dropout"] == 0.0
    assert "written as 0" in caplog.text


def test_yaml_selects_target_parameters():
    """A YAML adapter (jsonargparse, as LoRAModule's and AdapterCallback's ``adapter`` argument in the CLI) takes
    target_parameters; the config adapts exactly those stacks."""
    from jsonargparse import ArgumentParser, set_parsing_settings

    set_parsing_settings(subclasses_enabled=[ll.AdapterConfig])  # as train/module.py sets it up for the CLI
    parser = ArgumentParser()
    parser.add_argument("--adapter", type=ll.AdapterConfig)
    cfg = parser.parse_string("adapter:\n  class_path: lightning_lora.LoRA\n  init_args:\n    r: 4\n"
                              "    target_modules: []\n    target_parameters: [experts.down_proj]\n")
    adapter = parser.instantiate_classes(cfg).adapter
    assert adapter == ll.LoRA(r=4, target_modules=[], target_parameters=["experts.down_proj"])
    model = ll.inject(build("mixtral"), adapter)
    assert sorted(ll.core.verbs.layer_map(model, "default")) == [f"model.layers.{i}.mlp.experts.down_proj"
                                                                 for i in range(2)]


@pytest.mark.parametrize("preset, total, active", [("mixtral-8x7b", 46.7e9, 12.9e9), ("qwen3-30b-a3b", 30.5e9, 3.3e9)])
def test_estimate_counts_total_and_active_parameters(preset, total, active):
    """The published figures (to their rounding): Mixtral-8x7B 46.7B total, 12.9B active; Qwen3-30B-A3B 30.5B and
    3.3B."""
    from lightning_lora.estimate import estimate

    res = estimate(preset, "lora", 8, quantize="nf4")
    assert abs(res["base_params"] - total) < 0.05e9 and abs(res["active_params"] - active) < 0.06e9
    assert res["quantized_params"] > 0.97 * res["base_params"]  # every expert is NF4, not only the attention


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_estimate_matches_nf4_bytes_and_saved_activations(arch, tmp_path):
    """NF4 weights: the estimate equals what bitsandbytes stores for the quantized tiny MoE, byte for byte (every
    expert its own tensor). Activations (LoRA r8 on all-linear, experts included, fp32): within 10% of what autograd
    keeps; gpt-oss's eager attention scores (not modelled, as for any eager model) are taken out first."""
    from lightning_lora.estimate import estimate

    config = CONFIGS[arch]()
    config.save_pretrained(tmp_path)
    model = build(arch)
    ll.quantize(model, ll.NF4())
    stored = 0
    for p in model.parameters():
        stored += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            nested = state.state2
            stored += sum(t.numel() * t.element_size() for t in (state.absmax, state.code, nested.absmax, nested.code))
            stored += 4  # the nested offset (fp32)
    assert estimate(str(tmp_path), "lora", 8, quantize="nf4", dtype="fp32")["weights_bytes"] == stored
    model = build(arch)
    ll.inject(model, ll.LoRA(r=8))
    model.train()
    measured = sum(saved_bytes(model, lambda: model(input_ids=IDS, labels=IDS)).values())
    measured -= 4 * IDS.numel() * 128  # HF's saved fp32 log-softmax
    res = estimate(str(tmp_path), "lora", 8, batch_size=2, seq_len=9, dtype="fp32", loss_chunk_size=0)
    estimated = res["activation_bytes_no_checkpointing"] - 12 * IDS.numel() * 128
    if arch == "gpt_oss":  # eager attention's (heads x seq) fp32 scores and probabilities per token and layer
        measured -= 2 * 2 * 4 * config.num_attention_heads * 9 * IDS.numel()
    assert 0.9 * measured <= estimated <= 1.1 * measured


def test_memory_table_counts_every_nf4_expert():
    """The training memory table (train/memory.py) counts each expert's 4-bit tensors: E x (a x b) parameters per
    stack, at QLoRA's 4.127 bits per parameter (+ the last block of 256 rounded up) before the code tables."""
    from lightning_lora.train.memory import memory_report

    model = build("mixtral")
    linears = sum(m.weight.numel() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n != "lm_head")
    stacks = sum(getattr(m, s).numel() for m, s in expert_stacks(model).values())
    ll.quantize(model, ll.NF4())
    report = memory_report(model, log_table=False)["quantized base"]
    assert report["params"] == linears + stacks
    assert 4.127 <= float(report["source"].split()[0]) < 4.13


def test_lora_module_trains_nf4_experts_and_exports_the_exact_merge(tmp_path):
    """QLoRA through LoRAModule on a tiny Mixtral folder: the experts are NF4 stacks, their adapters train and are
    in the adapter-only checkpoint; the export merges into the high-precision base it reloads: W_e + s B_e A_e."""
    import functools

    from lightning.pytorch import Trainer, seed_everything
    from tiny_assets import make_tiny_model_dir
    from torch.utils.data import DataLoader

    from lightning_lora.io.export import export
    from lightning_lora.train.module import LoRAModule

    base = make_tiny_model_dir(tmp_path / "base", arch="mixtral", intermediate_size=128)
    ids = torch.randint(5, 300, (4, 12), generator=torch.Generator().manual_seed(0))
    data = DataLoader([{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}] * 2, batch_size=None)
    seed_everything(0)
    module = LoRAModule(str(base), adapter=ll.LoRA(r=4), quantize=ll.NF4(),
                        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))
    Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False).fit(module, data)
    layer = module.model.model.layers[1].mlp.experts.gate_up_proj
    assert isinstance(layer, ExpertLayer) and isinstance(layer.base_layer, NF4ExpertWeights)
    assert layer.adapters["default"].lora_B.abs().sum() > 0  # trained
    assert any(".experts.gate_up_proj.adapters.default." in k for k in module.state_dict())
    paths = export(module.model, tmp_path / "out", base_model=str(base))
    merged = AutoModelForCausalLM.from_pretrained(paths["merged"])
    branch = layer.adapters["default"]
    A, B = expert_factors(branch.lora_A.detach(), branch.lora_B.detach(), 4)
    original = AutoModelForCausalLM.from_pretrained(base).model.layers[1].mlp.experts.gate_up_proj
    torch.testing.assert_close(merged.model.layers[1].mlp.experts.gate_up_proj, original + branch.scale * B @ A,
                               atol=1e-6, rtol=0)
