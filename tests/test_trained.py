"""Tensors an adapter trains besides its method's branches (``core/trained.py``): whole module copies, token rows,
biases, through every verb: inject (identity), training, set_adapter (per-adapter copies), disable_adapters and
remove (the original, bit for bit), merge (folded, saved and reloaded), delete_adapter, and the refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from peft_formats import TOKENS, llama, llama_tied
from tiny_models import perturb_adapters, tiny_gpt2
from transformers import AutoModelForCausalLM

import lightning_lora as ll
from lightning_lora.core.verbs import trained_map

IDS = torch.tensor([[1, *TOKENS, 9, 11, 4], [2, 9, *TOKENS, 8, 6]])
EVERYTHING = dict(modules_to_save=["lm_head"], trainable_token_indices=TOKENS, bias="all")


def logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


def adapted(make=llama, name="default", seed=0, model=None, **fields):
    model = make() if model is None else model
    ll.inject(model, ll.LoRA(r=4, target_modules=["q_proj", "v_proj"], **(fields or EVERYTHING)), name)
    ll.set_adapter(model, name)
    perturb_adapters(model, std=0.2, seed=seed)
    return model


def test_inject_is_the_identity_and_only_adapter_tensors_train():
    model, base = llama(), logits(llama())
    ll.inject(model, ll.LoRA(r=4, target_modules=["q_proj"], **EVERYTHING))
    assert torch.equal(logits(model), base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "lm_head.trained.default.copy.weight" in trainable and "model.embed_tokens.trained.default.rows" in trainable
    assert all("lora_" in n or ".trained.default." in n for n in trainable)
    biases = sum(n.endswith(".bias") for n, _ in llama().named_parameters())
    assert biases == 14 and sum(n.endswith("trained.default.bias") for n in trainable) == biases  # every one, once
    rows = model.model.embed_tokens.trained["default"].rows
    assert rows.shape == (len(TOKENS), 64) and torch.equal(rows, llama().model.embed_tokens.weight[TOKENS])


def test_a_training_step_changes_only_the_trained_rows():
    model = llama()
    ll.inject(model, ll.LoRA(r=4, target_modules=["q_proj"], trainable_token_indices=TOKENS))
    model.train()
    model(IDS, labels=IDS).loss.backward()
    rows = model.model.embed_tokens.trained["default"].rows
    assert rows.grad is not None and rows.grad.abs().sum() > 0
    assert model.model.embed_tokens.base_layer.weight.grad is None  # the embedding itself stays frozen


def test_disable_and_remove_give_the_original_bit_for_bit():
    original = llama()
    model = adapted()
    assert not torch.equal(logits(model), logits(original))
    with ll.disable_adapters(model):
        assert torch.equal(logits(model), logits(original))
    ll.remove(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]
    state, reference = model.state_dict(), original.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
    assert all(p.requires_grad for p in model.parameters())  # as before the first injection


@pytest.mark.parametrize("make", [llama, llama_tied, tiny_gpt2], ids=["llama", "llama_tied", "gpt2"])
def test_merge_folds_them_into_a_plain_model_that_saves_and_reloads(make, tmp_path):
    fields = (dict(modules_to_save=["ln_f"], trainable_token_indices=TOKENS, bias="all") if make is tiny_gpt2
              else dict(EVERYTHING, bias="all" if make is llama else "none"))  # fmt: skip
    if make is tiny_gpt2:
        model = tiny_gpt2()
        ll.inject(model, ll.LoRA(r=4, target_modules=["c_attn"], **fields))
        perturb_adapters(model, std=0.2)
    else:
        model = adapted(make, **fields)
    expected = logits(model)
    ll.merge(model)
    assert not any(isinstance(m, ll.AdapterLayer) for m in model.modules())
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(again), expected, rtol=1e-5, atol=1e-5)
    if make is llama_tied:  # the head was trained as a copy: the embeddings are no longer tied
        assert again.config.tie_word_embeddings is False
        assert again.lm_head.weight.data_ptr() != again.model.embed_tokens.weight.data_ptr()


def test_a_tied_head_shares_the_embeddings_rows_and_stays_tied_after_merge():
    model = llama_tied()
    ll.inject(model, ll.LoRA(r=4, target_modules=["q_proj"], trainable_token_indices=TOKENS))
    head, embedding = model.lm_head.trained["default"], model.model.embed_tokens.trained["default"]
    assert head.rows is embedding.rows and head.follows == "model.embed_tokens"
    perturb_adapters(model, std=0.2)
    expected = logits(model)
    ll.merge(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings
    torch.testing.assert_close(logits(model), expected, rtol=1e-6, atol=1e-6)


def test_each_adapter_has_its_own_copies_and_swaps():
    model = adapted(name="a", seed=1)
    alone = {"a": logits(model)}
    adapted(model=model, name="b", seed=2)
    alone["b"] = logits(model)
    assert not torch.allclose(alone["a"], alone["b"])
    for name in ("a", "b", "a"):
        ll.set_adapter(model, name)
        torch.testing.assert_close(logits(model), alone[name], rtol=0, atol=0)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert f"lm_head.trained.{name}.copy.weight" in trainable
        assert not any(f".trained.{other}." in n for n in trainable for other in "ab" if other != name)
    with pytest.raises(ValueError, match=r"both train 3 token rows of 'model.embed_tokens'.*one of them"):
        ll.set_adapter(model, ["a", "b"])
    with pytest.raises(ValueError, match="cannot be weighted"):
        ll.set_adapter(model, {"a": 0.5})
    ll.set_adapter(model, "b")
    ll.delete_adapter(model, "a")
    assert ll.adapter_names(model) == ["b"] and "a" not in model.lm_head.trained
    torch.testing.assert_close(logits(model), alone["b"], rtol=0, atol=0)


def test_combine_and_mixed_batches_refuse_them():
    model = adapted(name="a")
    ll.inject(model, ll.LoRA(r=4, target_modules=["q_proj"]), "plain")
    with pytest.raises(ValueError, match=r"combine: adapter 'a' trains 3 token rows of 'model.embed_tokens'"):
        ll.combine(model, {"a": 0.5, "plain": 0.5}, "mix")
    with pytest.raises(ValueError, match="per_sample_adapters: adapter 'a' trains"):
        with ll.per_sample_adapters(model.eval(), ["a", "plain"]):
            pass
    assert "mix" not in ll.adapter_names(model)


@pytest.mark.parametrize(("fields", "message"), [
    (dict(modules_to_save="lm_head"), "modules_to_save must be a list"),
    (dict(trainable_token_indices=[3, 3]), "list of distinct token ids"),
    (dict(trainable_token_indices={"embed_tokens": []}), "list of distinct token ids"),
    (dict(bias="some"), "bias must be 'none', 'all' or 'lora_only'"),
])  # fmt: skip
def test_bad_options_are_refused_by_the_config(fields, message):
    with pytest.raises(ValueError, match=message):
        ll.LoRA(**fields)


@pytest.mark.parametrize(("fields", "message"), [
    (dict(modules_to_save=["lm_haed"]), r"modules_to_save: \['lm_haed'\] match no module"),
    (dict(modules_to_save=["self_attn"]), r"'model.layers.0.self_attn' is also adapted \('model.layers.0.self_attn.q_proj'\)"),
    (dict(modules_to_save=["q_proj"]), "is also adapted"),
    (dict(trainable_token_indices=[3, 128]), "token id 128 is outside 'model.embed_tokens', which has 128 rows"),
    (dict(trainable_token_indices={"embed_tokenz": [3]}), "'embed_tokenz' matches no module"),
    (dict(trainable_token_indices={"q_proj": [3]}), "also adapted by the method"),
    (dict(trainable_token_indices={"norm": [3]}), "token rows are trained on an nn.Embedding"),
    (dict(modules_to_save=["embed_tokens"], trainable_token_indices=TOKENS), "copied by modules_to_save"),
])  # fmt: skip
def test_options_that_do_not_fit_the_model_leave_it_unchanged(fields, message):
    model, reference = llama(), llama()
    with pytest.raises(ValueError, match=message):
        ll.inject(model, ll.LoRA(r=4, target_modules=["q_proj"], **fields))
    assert not any(isinstance(m, ll.AdapterLayer) for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_merge_refuses_a_non_finite_trained_tensor():
    model = adapted()
    with torch.no_grad():
        model.lm_head.trained["default"].copy.weight[0, 0] = float("nan")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"merge refused: the trained weight of 'lm_head' holds non-finite"):
        ll.merge(model)
    assert isinstance(model.lm_head, ll.AdapterLayer)
    assert all(torch.equal(v, before[k]) or v.isnan().any() for k, v in model.state_dict().items())


def test_the_layers_and_what_they_train_are_listed():
    model = adapted()
    described = {t: s.describe() for t, s in trained_map(model, "default").items()}
    assert described["lm_head"] == "a copy" and described["model.embed_tokens"] == "3 token rows"
    assert described["model.layers.0.self_attn.q_proj"] == "the bias"


class ScaledEmbedding(torch.nn.Embedding):
    """Gemma's kind of embedding: its forward scales the rows (so rows cannot be patched after it)."""

    def forward(self, ids):
        return super().forward(ids) * 8.0


@pytest.mark.parametrize("kind", ["embedding", "linear", "linear_bias", "scaled"])
def test_patched_rows_equal_the_swapped_weight_with_its_gradients(kind):
    """A plain embedding or head patches only the trained rows of its output; that is the layer with the rows
    written into its weight (the generic path, which any other layer takes), values and gradients."""
    from lightning_lora.core.trained import Trained

    torch.manual_seed(0)
    layer = {"embedding": lambda: torch.nn.Embedding(40, 8), "scaled": lambda: ScaledEmbedding(40, 8),
             "linear": lambda: torch.nn.Linear(8, 40, bias=False), "linear_bias": lambda: torch.nn.Linear(8, 40)}[kind]()
    layer.requires_grad_(False)
    state = Trained(layer, indices=[3, 17, 39], bias=kind == "linear_bias")
    with torch.no_grad():
        state.rows.normal_()
    x = torch.tensor([[3, 1, 17, 39, 3, 0]]) if "embedding" in kind or kind == "scaled" else torch.randn(2, 5, 8)
    results = []
    for fast in (True, False):
        state.zero_grad()
        if fast:
            out = state.call(layer, x)
        else:
            with state.in_place_of(layer) as swapped:
                out = swapped(x)
        out.pow(2).sum().backward()
        results.append((out.detach(), state.rows.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)
    assert results[0][1].abs().sum() > 0


def test_the_memory_table_counts_them_as_adapter_tensors():
    from lightning_lora.train.memory import memory_report

    model = adapted()
    report = memory_report(model, log_table=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report["adapters"]["params"] == trainable + len(TOKENS)  # and the rows' index buffer
    assert report["unquantized base"]["params"] == memory_report(llama(), log_table=False)["unquantized base"]["params"]
