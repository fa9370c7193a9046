"""Adapter GGUF of LoRA on MoE expert stacks (Mixtral, Qwen2-MoE, Qwen3-MoE), read back with gguf.GGUFReader.

llama.cpp applies an expert adapter inside its expert matmul (``build_lora_mm_id``: ``b_e (a_e x)``, scale alpha / r
with r = ``b->ne[0]``), so for expert e the update it adds to ``<ffn_*_exps>`` is (alpha / r) b[e] @ a[e] in numpy
order, with a (E, r, in) and b (E, out, r). The reference here is PEFT's ``target_parameters`` layout written out:
A (r E, in) holds expert e's rows at e r .. e r + r - 1, B (out, r E) its columns at e, e + E, ..., so
dW_e = s B[:, e::E] A[e r : (e + 1) r]; and the merged model's own stacks (W'_e - W_e). The binary check (llama.cpp's
perplexity with this adapter) is in ``test_llamacpp.py``.
"""

import copy

import numpy as np
import pytest
import torch
from tiny_assets import FAMILIES, SHAPE
from tiny_models import perturb_adapters

import lightning_lora as ll
from lightning_lora.core.verbs import adapter_layers
from lightning_lora.io.gguf import write_adapter_gguf

gguf = pytest.importorskip("gguf")
STACKS = ["experts.gate_up_proj", "experts.down_proj"]


def _moe(kind: str):
    from transformers import AutoModelForCausalLM

    cls, extra, _ = FAMILIES[kind]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cls(**(SHAPE | extra | {"vocab_size": 128}))).eval()


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_expert_adapter_tensors_are_each_experts_pair(tmp_path, kind):
    model = _moe(kind)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(tuple(STACKS))}
    # per-layer r and alpha too: llama.cpp has one alpha, so the ratio goes into B
    config = ll.LoRA(r=3, alpha=5, target_modules=["q_proj"], target_parameters=STACKS,
                     rank_pattern={"experts.down_proj": 2}, alpha_pattern={"layers.1.mlp.experts.gate_up_proj": 9})
    ll.inject(model, config)
    perturb_adapters(model)
    reader = gguf.GGUFReader(str(write_adapter_gguf(model, tmp_path / "a.gguf")))
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    merged = ll.merge(copy.deepcopy(model))
    E, H = model.config.num_local_experts if kind == "mixtral" else model.config.num_experts, SHAPE["hidden_size"]
    I = model.config.intermediate_size if kind == "mixtral" else model.config.moe_intermediate_size  # noqa: E741
    stacks = {t: layer for t, layer in adapter_layers(model).items() if ".experts." in t}
    assert len(stacks) == 2 * SHAPE["num_hidden_layers"]
    for target, layer in stacks.items():
        branch = layer.adapters["default"]
        A, B = branch.lora_A.detach(), branch.lora_B.detach()  # PEFT's (r E, in), (out, r E)
        r = A.shape[0] // E
        expected = torch.stack([branch.scale * B[:, e::E] @ A[e * r : (e + 1) * r] for e in range(E)])
        torch.testing.assert_close(merged.get_parameter(target) - before[target], expected, rtol=1e-5, atol=1e-6)
        block = target.split(".")[2]
        pieces = ({"ffn_gate_exps": expected[:, :I], "ffn_up_exps": expected[:, I:]} if target.endswith("gate_up_proj")
                  else {"ffn_down_exps": expected})  # fmt: skip
        for name, delta in pieces.items():
            a, b = tensors.pop(f"blk.{block}.{name}.weight.lora_a"), tensors.pop(f"blk.{block}.{name}.weight.lora_b")
            n_out, n_in = delta.shape[1:]
            assert a.shape == (E, r, n_in) and b.shape == (E, n_out, r)  # ggml ne: a [in, r, E], b [r, out, E]
            assert (n_out, n_in) == ((I, H) if name != "ffn_down_exps" else (H, I))
            ours = torch.from_numpy(alpha / b.shape[-1] * (b @ a))  # llama.cpp's scale: alpha / b->ne[0]
            torch.testing.assert_close(ours, delta, rtol=1e-5, atol=1e-6)
    assert sorted(tensors) == sorted(f"blk.{i}.attn_q.weight.lora_{x}" for i in range(2) for x in "ab")


def test_expert_adapter_of_qwen2_moe_shared_expert_and_its_gate(tmp_path):
    """Qwen2-MoE's shared expert is plain Linear layers beside the stacks; its 1-output gate is llama.cpp's
    ``ffn_gate_inp_shexp`` (a vector there, (1, H) here: a (r, H) and b (1, r) fit its shape check)."""
    model = _moe("qwen2_moe")
    ll.inject(model, ll.LoRA(r=2, target_modules=["shared_expert_gate", "shared_expert.up_proj"],
                             target_parameters=["experts.down_proj"]))  # fmt: skip
    perturb_adapters(model)
    reader = gguf.GGUFReader(str(write_adapter_gguf(model, tmp_path / "a.gguf")))
    shapes = {t.name: np.array(t.data).shape for t in reader.tensors if t.name.startswith("blk.0.")}
    assert shapes == {
        "blk.0.ffn_gate_inp_shexp.weight.lora_a": (2, 64), "blk.0.ffn_gate_inp_shexp.weight.lora_b": (1, 2),
        "blk.0.ffn_up_shexp.weight.lora_a": (2, 64), "blk.0.ffn_up_shexp.weight.lora_b": (48, 2),
        "blk.0.ffn_down_exps.weight.lora_a": (4, 2, 32), "blk.0.ffn_down_exps.weight.lora_b": (4, 64, 2),
    }  # fmt: skip
