"""Regional torch.compile (train/compiling.py) and packed attention as one operator (train/packed_op.py).

Graph breaks are checked per decoder layer with ``fullgraph=True`` (dynamo's "eager" backend: tracing only), the
numbers with "aot_eager" (AOTAutograd's joint graph and partitioner, without inductor's C++ build, which
benchmarks/compile.py measures).
"""

from __future__ import annotations

import copy
import logging
import sys

import pytest
import torch
from tiny_assets import make_tiny_model_dir
from tiny_models import perturb_adapters, tiny_llama
from torch._dynamo.utils import counters

import lightning_lora as ll
from lightning_lora.train.attention import attend_segments, find_segments, use_packed_attention
from lightning_lora.train.checkpointing import enable_checkpointing
from lightning_lora.train.compiling import check_compile, compile_layers, compiling
from lightning_lora.train.distributed import decoder_layers
from lightning_lora.train.lean_swap import use_lean_activations
from lightning_lora.train.loss import causal_lm_loss
from lightning_lora.train.packed_op import packed_sdpa


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama"))


def trained_model(adapter=None, nf4: bool = False, checkpointing: bool | str = False) -> torch.nn.Module:
    """A tiny Llama as LoRAModule prepares it: (NF4,) adapter, packed attention, checkpointing, lean activations."""
    model = tiny_llama()
    if nf4:
        ll.quantize(model, ll.NF4())
    ll.inject(model, adapter or ll.LoRA(r=4))
    perturb_adapters(model)
    assert use_packed_attention(model)
    enable_checkpointing(model, checkpointing)
    assert use_lean_activations(model)
    return model.train()


def packed(lengths: list[int], rows: int = 2) -> torch.Tensor:
    """(rows, sum(lengths)) position ids of rows packed with examples of ``lengths`` (rolled per row)."""
    out = []
    for r in range(rows):
        order = lengths[r % len(lengths):] + lengths[: r % len(lengths)]
        out.append(torch.cat([torch.arange(n) for n in order]))
    return torch.stack(out)


ADAPTERS = {
    "lora-layer-checkpointing": dict(adapter=ll.LoRA(r=4), checkpointing=True),
    "dora": dict(adapter=ll.DoRA(r=4)),
    "vera": dict(adapter=ll.VeRA(r=4)),
    "dora-nf4-mlp-checkpointing": dict(adapter=ll.DoRA(r=4), nf4=True, checkpointing="mlp"),
}


def run_layer(layer, hidden, cos_sin, position_ids):
    out = layer(hidden, position_embeddings=cos_sin, attention_mask=None, position_ids=position_ids,
                packed_segments=find_segments(position_ids))
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("kind", ADAPTERS)
def test_a_decoder_layer_compiles_as_one_graph_with_the_same_gradients(kind, request):
    """fullgraph=True raises at the first graph break: adapters, NF4, packed attention with a shared prefix, layer
    or MLP checkpointing, lean functions, saved tensors offloaded (save_on_cpu's hooks). Run by AOTAutograd (the
    joint graph, partitioned), output equals the eager layer's within 1e-5, gradients within 1e-6 of their
    largest entry."""
    model = trained_model(**ADAPTERS[kind])
    layer = decoder_layers(model)[0]
    if ADAPTERS[kind].get("checkpointing") is True and "_kernel_funcs" in vars(layer.self_attn):
        # transformers >= 5.25 with the `kernels` package (its dependency) wraps the attention's forward with
        # kernels' use_kernelized_func, which sets a ContextVar inside it: under whole-layer checkpointing dynamo
        # refuses that side effect (gb0067). Upstream, not ours; strict, so a fixed release shows up here.
        request.applymarker(pytest.mark.xfail(raises=torch._dynamo.exc.Unsupported, strict=True,
                                              reason="kernels' attention wrapper under layer checkpointing"))
    position_ids = torch.tensor([[0, 1, 2, 3, 2, 3, 4, 0, 1], [0, 1, 2, 0, 1, 2, 3, 4, 5]])  # a shared prefix in row 0
    hidden = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    cos_sin = model.model.rotary_emb(hidden, position_ids)
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    params = [hidden, *(p for p in layer.parameters() if p.requires_grad)]
    weight = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(1))
    with torch.autograd.graph.save_on_cpu(pin_memory=False):
        out = run_layer(torch.compile(layer, backend=recording, fullgraph=True), hidden, cos_sin, position_ids)
        grads = torch.autograd.grad((out * weight).sum(), params)
    assert counters["graph_break"] == {} and len(graphs) == 1
    ops = [node.target for gm in graphs[0].modules() if isinstance(gm, torch.fx.GraphModule)  # checkpoints' too
           for node in gm.graph.nodes if node.op == "call_function"]
    assert ops.count(torch.ops.lightning_lora.packed_sdpa.default) == 1  # the segments' loop is one operator
    expected = run_layer(layer, hidden, cos_sin, position_ids)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for got, ref in zip(grads, torch.autograd.grad((expected * weight).sum(), params), strict=True):
        # gradients reach ~70 here: fp32 sums of such terms in another order differ by ~1e-7 of that scale
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


def test_packed_sdpa_backward_equals_autograd_of_the_segment_loop():
    """The hand-written backward (FlashAttention's) against autograd through attend_segments, float64, grouped-query
    heads (4 query heads on 2 key/value heads), a shared prefix read by two segments, a segment of one token."""
    rows = [[(0, 3, 0, 0), (3, 5, 0, 2), (5, 7, 0, 1), (7, 8, 7, 0)], [(0, 5, 0, 0), (5, 8, 5, 0)]]
    segments = find_segments(torch.tensor([[0, 1, 2, 2, 3, 1, 2, 0], [0, 1, 2, 3, 4, 0, 1, 2]]))
    assert segments.rows == rows
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 8, 6, dtype=torch.float64, generator=gen, requires_grad=True) for h in (4, 2, 2))
    out = packed_sdpa(q, k, v, segments.table, 0.0, 0.3)
    ref = attend_segments(q, k, v, rows, 0.0, 0.3)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    weight = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    got = torch.autograd.grad((out * weight).sum(), [q, k, v])
    expected = torch.autograd.grad((ref * weight).sum(), [q, k, v])
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda q, k, v: packed_sdpa(q, k, v, segments.table, 0.0, None),
                                    [t.detach()[:, :, :8, :2].clone().requires_grad_() for t in (q, k, v)])
    torch.library.opcheck(packed_sdpa, (q.detach(), k.detach(), v.detach(), segments.table, 0.0, 0.3),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_dropout_is_refused_by_the_operator():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="attention_dropout to 0 or compile=False"):
        packed_sdpa(q, q, q, find_segments(torch.tensor([[0, 1, 0, 1]])).table, 0.1, None)


def _shifting(gm, example_inputs):
    def run(*args):
        out = gm(*args)
        return [o + 1e-3 if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in out]
    return run


def _failing(gm, example_inputs):
    raise RuntimeError("no compiler here")


@pytest.mark.parametrize("backend, reason", [(_shifting, "a training step changed: logits: outputs moved by"),
                                             (_failing, "the compiled step failed (BackendCompilerFailed")])
def test_a_compiled_step_that_differs_or_fails_is_refused_and_undone(backend, reason, caplog):
    model = tiny_llama()
    ll.inject(model, ll.LoRA(r=4))
    ids = torch.tensor([[1, 2, 3]])
    before = model(input_ids=ids).logits
    with caplog.at_level(logging.INFO, logger="lightning_lora"):
        found = compile_layers(model, backend=backend, dynamic=False)
    assert not found and reason in found.reason and not compiling(model)
    assert f"torch.compile not used for llama: {reason}" in caplog.text
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)


def step(model, ids, position_ids):
    loss = causal_lm_loss(model, ids, ids.clone(), position_ids=position_ids)
    return loss.detach(), torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


def test_module_compiles_its_layers_the_same_steps_and_another_packing_does_not_recompile(tiny_dir, caplog):
    """LoRAModule(compile=...) after its other swaps (lean activations, packed attention), one log
    line; dynamic shapes, dynamo's graphs run by autograd (fast to build; AOTAutograd is checked per layer above and
    by the probe at every use). Loss and every adapter gradient within 1e-5 of the same model run eagerly, over two
    packings (another number of examples per row); the second packing runs the first one's graphs."""
    with pytest.raises(ValueError, match="compile must be true, false or a dict"):
        ll.LoRAModule(tiny_dir, compile="yes")
    assert check_compile(False) is None and check_compile(True) == {}
    module = ll.LoRAModule(tiny_dir, adapter=ll.LoRA(r=4), compile={"backend": "eager"})
    with caplog.at_level(logging.INFO, logger="lightning_lora"):
        module.configure_model()
    assert "torch.compile: 2 decoder layers of llama compiled one by one (dynamic=True, backend=eager)" in caplog.text
    model = module.model
    assert compiling(model) and all(layer._compiled_call_impl for layer in decoder_layers(model))
    perturb_adapters(model)
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    graphs = []
    for position_ids in (packed([8, 10, 6]), packed([5, 4, 7, 8])):
        loss, grads = step(model, ids, position_ids)
        graphs.append(counters["stats"]["unique_graphs"])
        with torch.compiler.set_stance("force_eager"):
            ref_loss, ref_grads = step(model, ids, position_ids)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        for got, ref in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert graphs[1] == graphs[0], "a second packing of the same shape compiled again"
    assert counters["graph_break"] == {}


def test_compile_in_yaml(monkeypatch, capsys):
    from lightning_lora.commands.cli import make_cli

    monkeypatch.setattr(sys, "argv", ["lightning_lora"])
    with pytest.raises(SystemExit):
        make_cli(["fit", "--config", "configs/lora.yaml", "--model.compile", "true", "--print_config"])
    assert "compile: true" in capsys.readouterr().out
