"""The architecture matrix: every property below over every line of ``tests/architectures.py`` (a tiny random model
per family, built from transformers' own config class). Each property has an independent reference: Hugging Face's
own loss and forward, PEFT 0.21 as the oracle of the adapter format, the model's own logits before any swap, the
built model's parameter count. A new architecture is one line in the registry and no new test code.

One adapted model per architecture (LoRA r 4 on all-linear, visible adapters, packed attention selected as
LoRAModule does) is shared by the properties through a module-scoped fixture; tests that change a model copy it.
"""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path

import pytest
import torch
from architectures import ARCHS, BY_NAME, TINY, expert_tensors, experts_adapted, gguf_files, nf4_report
from tiny_models import perturb_adapters, unpacked_loss

import lightning_lora as ll
from lightning_lora.core.experts_dispatch import runs_our_experts
from lightning_lora.core.kinds import kind_of
from lightning_lora.core.layer import AdapterBranch
from lightning_lora.core.verbs import adapter_layers
from lightning_lora.io.export import export
from lightning_lora.io.peft_experts import peft_paths
from lightning_lora.train.attention import runs_packed_attention, use_packed_attention
from lightning_lora.train.head import head_swap_verdict
from lightning_lora.train.loss import causal_lm_loss
from lightning_lora.train.packing import collate_packed

REQUIRED = {"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gemma2", "gemma3_text", "phi3", "olmo2",
            "granite", "gpt2", "gpt_neox", "falcon", "smollm3"}
VOCAB, TOL = 128, 1e-5


@pytest.fixture(scope="module", params=ARCHS, ids=[a.name for a in ARCHS])
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def adapted(arch):
    """The arch's tiny model with visible LoRA adapters on all-linear, dropout off, packed attention if proven."""
    model = arch.build()
    ll.inject(model, ll.LoRA(r=4, alpha=8))
    perturb_adapters(model, std=0.1)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    use_packed_attention(model)
    return model


def grads(model, loss) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def assert_close_grads(model, ours, ref):
    assert abs(ours.item() - ref.item()) < TOL, (ours.item(), ref.item())
    g_ours, g_ref = grads(model, ours), grads(model, ref)
    for name in g_ref:
        torch.testing.assert_close(g_ours[name], g_ref[name], atol=TOL, rtol=1e-4, msg=name)


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


IDS = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def test_registry_covers_the_families():
    names = [a.name for a in ARCHS]
    assert len(names) == len(set(names)) and REQUIRED <= set(names)
    for a in ARCHS:
        assert a.make_config().model_type == a.name
        assert a.packing == "packed attention" and a.loss_head or a.why, f"{a.name}: say why it differs"


def test_identity_at_init_and_only_adapters_train(arch):
    base, model = arch.build(), arch.build()
    ll.inject(model, ll.LoRA(r=4, alpha=8))
    if runs_our_experts(model):  # MoE: ours is the family's eager loop (the probe proved it), not the default kernel
        base.set_experts_implementation("eager")
    assert torch.equal(logits_of(model, IDS), logits_of(base, IDS))  # bit-exact: B = 0
    perturb_adapters(model)
    causal_lm_loss(model, IDS, IDS).backward()
    adapter = {id(p) for m in model.modules() if isinstance(m, AdapterBranch) for p in m.parameters()}
    assert adapter
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) in adapter), name
        assert (p.grad is not None) == (id(p) in adapter), name


def test_loss_and_gradients_equal_hugging_face(arch, adapted):
    ids = torch.randint(3, VOCAB, (3, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, -6:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100  # a masked prompt
    assert bool(head_swap_verdict(adapted)) == arch.loss_head  # the probe decides whether the head is swapped
    ref = adapted(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
    ours = causal_lm_loss(adapted, ids, labels, attention_mask=mask, chunk_size=7)
    assert_close_grads(adapted, ours, ref)


def examples(prefix: int = 4, lengths=(7, 9, 6)) -> list[dict]:
    """Examples sharing an unlabeled prefix (a system prompt), then a masked prompt and a response."""
    g = torch.Generator().manual_seed(0)
    system = torch.randint(3, VOCAB, (prefix,), generator=g)
    out = []
    for n in lengths:
        ids = torch.cat([system, torch.randint(3, VOCAB, (n,), generator=g)])
        labels = ids.clone()
        labels[: prefix + 2] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


@pytest.mark.parametrize("share", [False, True], ids=["restart", "shared_prefix"])
def test_packed_rows_equal_unpacked_or_are_refused(arch, adapted, share):
    assert runs_packed_attention(adapted) == (arch.packing == "packed attention")
    batch = examples()
    packed = collate_packed(batch, pad_id=0, capacity=64, share_prefix=share)
    assert packed["input_ids"].shape[0] == 1
    run = lambda: causal_lm_loss(adapted, packed["input_ids"], packed["labels"], position_ids=packed["position_ids"])  # noqa: E731
    if arch.packing == "refused" or share and arch.packing == "own mask":
        with pytest.raises(ValueError, match=rf"^{'share_prefix' if share else 'packing'}: {arch.name}\b"):
            run()
        return
    assert_close_grads(adapted, run(), unpacked_loss(adapted, batch))


def test_causal_after_the_library_set_it_up(arch, adapted):
    """Changing token t changes no logit before t, in the model as LoRAModule runs it (packed attention if proven);
    Falcon lost its causal mask when packed attention was selected without the probe."""
    t = 6
    changed = IDS.clone()
    changed[:, t] = (changed[:, t] + 1) % VOCAB
    before, after = logits_of(adapted, IDS), logits_of(adapted, changed)
    torch.testing.assert_close(after[:, :t], before[:, :t], atol=TOL, rtol=0)
    assert (after[:, t] - before[:, t]).abs().max() > 1e-3  # the token itself does matter


def test_selection_never_moves_the_logits(arch, adapted):
    plain = arch.build()
    ll.inject(plain, ll.LoRA(r=4, alpha=8))
    perturb_adapters(plain, std=0.1)
    torch.testing.assert_close(logits_of(adapted, IDS), logits_of(plain.eval(), IDS), atol=TOL, rtol=0)


def peft_targets(peft_model) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def peft_dropped(arch, names) -> set[str]:
    """Those of ``names`` that PEFT 0.21 re-maps to expert parameters on this model type (``Arch.peft_drops``): layers,
    not the expert stacks themselves."""
    return {n for n in names if n.rpartition(".")[2] in arch.peft_drops and ".experts." not in n}


def test_peft_loads_ours(arch, adapted, tmp_path, caplog):
    """PEFT loads our folder with the same logits; where it re-maps some layer names on MoE model types
    (``peft_drops``), exactly those adapters are lost, which the registry states and save_adapter warns about."""
    peft = pytest.importorskip("peft")
    with caplog.at_level(logging.WARNING, logger="lightning_lora"):
        ll.save_adapter(adapted, tmp_path)
    assert ("PeftModel will drop" in caplog.text) == bool(arch.peft_drops)
    ours = set(adapter_layers(adapted))
    paths = peft_paths(adapted, ours)  # an expert stack sits under its experts module, nested (io/peft_experts.py)
    theirs = peft.PeftModel.from_pretrained(arch.build(), tmp_path).eval()
    experts = {e.rpartition(".")[0] for e in expert_tensors(arch.build())}
    assert {paths[n] for n in ours} - peft_targets(theirs) == {paths[n] for n in peft_dropped(arch, ours)}
    assert {n.removesuffix(".base_layer") for n in peft_targets(theirs) - set(paths.values())} <= experts
    if not arch.peft_drops:
        torch.testing.assert_close(logits_of(theirs, IDS), logits_of(adapted, IDS), atol=TOL, rtol=1e-4)


def test_we_load_pefts(arch, adapted, tmp_path):
    """On dense models PEFT's all-linear selects exactly our layers (on MoE model types PEFT also targets the expert
    and router parameters); a PEFT adapter on our layers loads into ours with PEFT's logits."""
    peft = pytest.importorskip("peft")
    ours = set(adapter_layers(adapted))
    if expert_tensors(arch.build()):  # our layers, the expert stacks named as PEFT's target_parameters
        targets = sorted(ours - peft_dropped(arch, ours))
        stacks = [t for t in targets if ".experts." in t]
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[t for t in targets if t not in stacks],
                                 target_parameters=stacks)
    else:
        targets, config = sorted(ours), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    theirs = peft.get_peft_model(arch.build(), config)
    assert peft_targets(theirs) == set(peft_paths(adapted, targets).values())
    perturb_adapters(theirs, std=0.1, seed=3)
    theirs.eval().save_pretrained(tmp_path)
    loaded = ll.load_adapter(arch.build(), tmp_path)
    torch.testing.assert_close(logits_of(loaded, IDS), logits_of(theirs, IDS), atol=TOL, rtol=1e-4)


def test_merge_is_exact(arch, adapted):
    model = copy.deepcopy(adapted)
    before = logits_of(model, IDS)
    ll.merge(model)
    assert not any(isinstance(m, ll.AdapterLayer) for m in model.modules())
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in arch.build().named_parameters()}
    torch.testing.assert_close(logits_of(model, IDS), before, atol=TOL, rtol=1e-4)


def test_each_export_format_works(arch, adapted, tmp_path):
    """PEFT folder + merged Hugging Face folder always (the merged one reloads with the adapted model's logits); the
    llama.cpp GGUF files io/gguf.py writes for the architecture (read back: one A and one B per adapted layer, two of
    each for a fused gate/up expert stack; the merged model with its tokenizer), else a refusal naming the model
    type, with nothing written."""
    import gguf
    from transformers import AutoModelForCausalLM

    files = gguf_files(adapted)
    if not files:
        with pytest.raises(ValueError, match=arch.name):
            export(adapted, tmp_path / "refused", exports=["peft", "merged", "gguf"])
        assert not (tmp_path / "refused").exists()
    paths = export(adapted, tmp_path / "out", exports=["peft", "merged", *(["gguf"] if "adapter" in files else [])])
    kwargs = {"attn_implementation": arch.attn} if arch.attn else {}
    merged = AutoModelForCausalLM.from_pretrained(paths["merged"], **kwargs).eval()
    torch.testing.assert_close(logits_of(merged, IDS), logits_of(adapted, IDS), atol=TOL, rtol=1e-4)
    if "adapter" in files:
        names = [t.name for t in gguf.GGUFReader(paths["gguf"]).tensors]
        pieces = [2 if t.endswith(".experts.gate_up_proj") else 1 for t in adapter_layers(adapted)]  # gate and up
        assert len(names) == 2 * sum(pieces) and all(n.endswith((".lora_a", ".lora_b")) for n in names)
    if "merged" in files:  # a byte-level BPE tokenizer needs >= 256 tokens: a model with the tokenizer's vocabulary
        from tiny_assets import VOCAB_SIZE, make_tiny_tokenizer

        model = ll.inject(arch.build(vocab_size=VOCAB_SIZE), ll.LoRA(r=4))
        path = export(model, tmp_path / "gguf", exports=["gguf-merged:f16"], tokenizer=make_tiny_tokenizer())["gguf-merged:f16"]
        stored = {t.name: int(t.n_elements) for t in gguf.GGUFReader(path).tensors}
        assert stored.get("token_embd.weight") == VOCAB_SIZE * TINY["hidden_size"] and len(stored) > 4


def test_nf4_quantizes_every_linear_or_says_why(arch):
    """Every linear layer and expert tensor is NF4 or named in quantize's log line with the reason."""
    report, model = nf4_report(arch.name), arch.build()
    linear = {n for n, m in model.named_modules() if (k := kind_of(m)) is not None and k.linear}
    assert set(report["quantized"]) | set(report["kept"]) == linear | set(expert_tensors(model))
    assert not set(report["quantized"]) & set(report["kept"]) and all(report["kept"].values())


def test_qlora_trains(arch):
    model = arch.build()
    ll.prepare(model, ll.LoRA(r=4, alpha=8), quantize=ll.NF4())
    loss = causal_lm_loss(model, IDS, IDS)
    loss.backward()
    assert torch.isfinite(loss)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)


def test_moe_experts_gap_is_stated(arch):
    """The registry's ``expert_gap`` tells the truth both ways: with it, the 3-D expert tensors exist, all-linear
    adapts none of them and NF4 leaves them in floating point (saying so in its log); without it, every expert tensor is adapted and
    quantized. When the "moe" stream closes the gap, this fails until the line's flag is flipped."""
    model = arch.build()
    experts = expert_tensors(model)
    if not experts:
        assert not arch.expert_gap, f"{arch.name} has no 3-D expert tensors: drop expert_gap"
        return
    ll.inject(model, ll.LoRA(r=4))
    report = nf4_report(arch.name)
    adapted_experts, left_in_fp = experts_adapted(model, experts), report["experts"]
    if arch.expert_gap:
        assert not adapted_experts and left_in_fp == sorted(experts), \
            f"{arch.name}: experts are now adapted/quantized; set expert_gap=False in tests/architectures.py"
        assert set(experts) <= set(report["kept"])  # quantize's log line names them, with the reason
    else:
        assert adapted_experts == list(experts) and not left_in_fp


def test_estimate_counts_the_built_model(arch, tmp_path):
    from lightning_lora.commands.estimate import estimate

    model = arch.build()
    model.config.save_pretrained(tmp_path)
    res = estimate(str(tmp_path / "config.json"), "lora", r=4, quantize="nf4")
    assert res["base_params"] == sum(p.numel() for p in model.parameters())
    ll.inject(model, ll.LoRA(r=4))
    assert res["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert res["adapted_layers"] == len(adapter_layers(model))
    report = nf4_report(arch.name)
    layers = [model.get_submodule(n) for n in report["quantized"]]  # adapted by all-linear, expert stacks too
    quantized = sum((m.base_layer if isinstance(m, ll.AdapterLayer) else m).weight.numel() for m in layers)
    assert res["quantized_params"] == quantized


def test_readme_table_is_current():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import arch_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert arch_table.block(readme) == arch_table.render(), "run python scripts/arch_table.py to refresh README.md"


def test_probes_run_once_and_log_the_refusal(caplog):
    """use_packed_attention on Falcon: the probe finds that its attention does not call ours, leaves the model as it
    was (same logits, still sdpa), logs why once, and is not repeated."""
    model = BY_NAME["falcon"].build()
    before = logits_of(model, IDS)
    forwards = []
    model.register_forward_pre_hook(lambda *a: forwards.append(1))
    with caplog.at_level(logging.INFO, logger="lightning_lora"):
        assert not use_packed_attention(model)
        n = len(forwards)
        assert not use_packed_attention(model) and len(forwards) == n > 0
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(logits_of(model, IDS), before)
    assert caplog.text.count("packed attention not used for falcon") == 1
