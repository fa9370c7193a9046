"""Several adapters on one frozen base: swapping, disabling, training one of them, and PEFT's multi-adapter layout."""

import pytest
import torch
from tiny_models import perturb_adapters, tiny_llama
from peft import PeftModel

import lightning_lora as ll
from lightning_lora.io.peft import load_adapters, save_adapters


def two_adapters(targets_b=("q_proj", "v_proj", "down_proj")):
    """Tiny Llama with LoRA "a" (all linear, r 4) and rsLoRA "b" (some layers, r 6), both with random values."""
    model = tiny_llama()
    ll.inject(model, ll.LoRA(r=4, alpha=8), "a")
    perturb_adapters(model, seed=1)
    ll.inject(model, ll.LoRA(r=6, alpha=3, rslora=True, target_modules=list(targets_b)), "b")
    ll.set_adapter(model, "b")
    perturb_adapters(model, seed=2)
    return model


def base_tensors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".adapters." not in n}


def only(model, name):
    """A fresh model holding a copy of adapter ``name`` alone (same tensors)."""
    single = tiny_llama()
    cfg = next(m.adapters[name].config for m in model.modules() if isinstance(m, ll.AdapterLayer) and name in m.adapters)
    targets = [t for t, m in model.named_modules() if isinstance(m, ll.AdapterLayer) and name in m.adapters]
    ll.inject(single, type(cfg)(**{**cfg.__dict__, "target_modules": targets}), name)
    source = ll.adapter_state_dict(model, name)
    single.load_state_dict(source, strict=False)
    assert ll.adapter_state_dict(single, name).keys() == source.keys()
    return single


def test_swap_gives_exactly_the_chosen_adapter(ids):
    model = two_adapters()
    base = base_tensors(model)
    for name in ["a", "b", "a", "b"]:
        ll.set_adapter(model, name)
        assert torch.equal(model(ids).logits, only(model, name)(ids).logits), name
    assert ll.active_adapters(model) == {"b": 1.0}
    after = base_tensors(model)
    assert after.keys() == base.keys() and all(torch.equal(after[k], v) for k, v in base.items())


def test_disable_adapters_gives_base_bit_exactly(ids):
    model = two_adapters()
    ll.set_adapter(model, {"a": 0.5, "b": 2.0})
    adapted = model(ids).logits
    with ll.disable_adapters(model):
        assert torch.equal(model(ids).logits, tiny_llama()(ids).logits)
    assert torch.equal(model(ids).logits, adapted)


def test_swap_sees_layers_added_after_a_previous_swap(ids):
    """set_adapter caches the adapted layers: adding an adapter on new layers must not leave it stale."""
    model = tiny_llama()
    ll.inject(model, ll.LoRA(r=2, target_modules=["q_proj"]), "a")
    ll.set_adapter(model, "a")
    ll.inject(model, ll.LoRA(r=2, target_modules=["up_proj"]), "b")
    ll.set_adapter(model, "b")
    perturb_adapters(model)
    layers = [m for m in model.modules() if isinstance(m, ll.AdapterLayer)]
    assert {tuple(m.active) for m in layers} == {("b",)}
    assert not torch.equal(model(ids).logits, tiny_llama()(ids).logits)
    ll.delete_adapter(model, "b")
    ll.set_adapter(model, "a")
    assert all(m.active == {"a": 1.0} for m in model.modules() if isinstance(m, ll.AdapterLayer))


def test_only_the_active_adapter_trains(ids):
    model = two_adapters().train()
    ll.set_adapter(model, "a")
    frozen = {k: v.clone() for k, v in ll.adapter_state_dict(model, "b").items()}
    start = {k: v.clone() for k, v in ll.adapter_state_dict(model, "a").items()}
    base = base_tensors(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # all params, as a careless user would
    for _ in range(3):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    assert all(torch.equal(ll.adapter_state_dict(model, "b")[k], v) for k, v in frozen.items())
    assert all(not torch.equal(ll.adapter_state_dict(model, "a")[k], v) for k, v in start.items())
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)


def test_several_adapters_on_disk_in_peft_layout(tmp_path, ids):
    model = tiny_llama()
    ll.inject(model, ll.LoRA(r=4, alpha=8), "default")
    perturb_adapters(model, seed=1)
    ll.inject(model, ll.LoRA(r=6, alpha=3, rslora=True, target_modules=["q_proj", "v_proj"]), "b")
    ll.set_adapter(model, "b")
    perturb_adapters(model, seed=2)
    save_adapters(model, tmp_path / "run")
    assert (tmp_path / "run/adapter_config.json").exists() and (tmp_path / "run/b/adapter_model.safetensors").exists()
    assert not (tmp_path / "run/default").exists()

    peft = PeftModel.from_pretrained(tiny_llama(), tmp_path / "run")
    peft.load_adapter(tmp_path / "run/b", adapter_name="b")
    for name in ["default", "b"]:
        peft.set_adapter(name)
        ll.set_adapter(model, name)
        torch.testing.assert_close(model(ids).logits, peft(ids).logits, atol=1e-5, rtol=0)

    again = tiny_llama()
    assert load_adapters(again, tmp_path / "run") == ["default", "b"]
    for name in ["default", "b"]:
        ll.set_adapter(again, name)
        ll.set_adapter(model, name)
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_load_adapters_leaves_model_unchanged_on_error(tmp_path):
    model = two_adapters()
    save_adapters(model, tmp_path / "run")
    (tmp_path / "run/b/adapter_model.safetensors").write_bytes(b"truncated")
    fresh = tiny_llama()
    with pytest.raises(ValueError, match="safetensors"):
        load_adapters(fresh, tmp_path / "run")
    assert ll.adapter_names(fresh) == [] and not any(isinstance(m, ll.AdapterLayer) for m in fresh.modules())
    assert all(p.requires_grad for p in fresh.parameters())


def test_export_carries_every_adapter_by_name(tmp_path, ids):
    """With two adapters on the model the export holds both (PEFT layout) and the merge uses the trained one."""
    from lightning_lora.io.export import export

    model = tiny_llama()
    ll.inject(model, ll.LoRA(r=4, target_modules=["q_proj"]), "default")
    ll.inject(model, ll.LoRA(r=2, target_modules=["v_proj"]), "task")
    ll.set_adapter(model, "task")
    perturb_adapters(model)
    expected = model(ids).logits
    paths = export(model, tmp_path, name="task")
    assert (paths["peft"] / "adapter_config.json").exists() and (paths["peft"] / "task" / "adapter_config.json").exists()
    fresh = tiny_llama()
    assert ll.load_adapters(fresh, paths["peft"]) == ["default", "task"]
    merged = type(fresh).from_pretrained(paths["merged"]).eval()
    assert (merged(ids).logits - expected).abs().max() < 1e-5
