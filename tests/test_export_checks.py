"""Nothing non-finite leaves the process (io/finite.py), and the messages of a failed export or load are one line
naming the file or key: NaN adapters, finite-but-huge adapters whose logits are NaN, NaN folders given to
load_adapter and generate, pickled checkpoints, broken PEFT configs, the renamed export_gguf key, the export command's
output."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from tiny_assets import make_tiny_model_dir
from tiny_models import perturb_adapters, tiny_llama
from torch import nn

import lightning_lora as ll
from lightning_lora.commands.errors import one_line
from lightning_lora.commands.export import export_checkpoint
from lightning_lora.commands.export import main as export_main
from lightning_lora.core.verbs import adapter_layers, adapter_state_dict
from lightning_lora.io.checkpoint import write_facts
from lightning_lora.io.export import export, parse_exports
from lightning_lora.io.finite import probe
from lightning_lora.io.models import load_causal_lm


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("checks") / "llama")


def adapted(base, seed=0):
    model, tokenizer = load_causal_lm(str(base))
    ll.inject(model, ll.LoRA(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]))
    perturb_adapters(model, seed=seed)
    return model, tokenizer


def first_branch(model):
    target, layer = next(iter(adapter_layers(model).items()))
    return target, layer.adapters["default"]


# ------------------------------------------------------------------------------------------------ non-finite
def test_nan_adapter_is_refused_before_anything_is_written(base, tmp_path):
    """Before: the NaN adapter replaced the good one, then the merge refused "the model is unchanged"."""
    good, tokenizer = adapted(base)
    export(good, tmp_path / "exp", tokenizer=tokenizer)
    before = {p: p.read_bytes() for p in (tmp_path / "exp").rglob("*") if p.is_file()}
    bad, _ = adapted(base, seed=1)
    target, branch = first_branch(bad)
    with torch.no_grad():
        branch.lora_B[0, 0] = float("nan")
    for exports in (["peft", "merged"], ["gguf"], ["peft"]):
        with pytest.raises(ValueError, match=rf"'{target}.adapters.default.lora_B' holds 1 NaN/inf value"):
            export(bad, tmp_path / "exp", exports=exports, tokenizer=tokenizer)
    assert {p: p.read_bytes() for p in (tmp_path / "exp").rglob("*") if p.is_file()} == before
    with pytest.raises(ValueError, match="lora_B.weight' holds 1 NaN/inf"):
        ll.save_adapter(bad, tmp_path / "direct")  # the public verb refuses too
    assert not (tmp_path / "direct").exists()


def test_checkpoint_with_nan_is_refused_naming_the_checkpoint_key(base, tmp_path):
    model, _ = adapted(base)
    state = {"model." + k: v.clone() for k, v in adapter_state_dict(model).items()}
    key = next(k for k in state if k.endswith("lora_A"))
    state[key][1, 2] = float("inf")
    checkpoint = {"state_dict": state}
    write_facts(checkpoint, adapter=ll.LoRA(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]),
                adapter_name="default", base_model=str(base))  # fmt: skip
    torch.save(checkpoint, tmp_path / "nan.ckpt")
    with pytest.raises(ValueError, match=rf"nan.ckpt: tensor '{key.removeprefix('model.')}' holds 1 NaN/inf.*earlier"):
        export_checkpoint(tmp_path / "nan.ckpt", tmp_path / "exp")
    assert not (tmp_path / "exp").exists()


def test_finite_but_huge_adapter_with_nan_logits_is_refused_naming_the_layer(base, tmp_path):
    """The issue's lr 1e30 run: merged weights ~1e29 pass merge's finite check, but every logit is NaN."""
    model, tokenizer = adapted(base)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.adapters["default"].lora_A.fill_(1e14)
            layer.adapters["default"].lora_B.fill_(1e15)
    for exports in (["peft", "merged"], ["peft"]):  # the merged model, or the adapted one when nothing is merged
        with pytest.raises(ValueError, match=r"non-finite \(NaN/inf\) outputs on a probe batch: the first layer whose "
                                             r"output is non-finite is 'model\.layers\.0\.[\w.]+' \(largest weight "
                                             r"[\d.]+e\+\d+"):  # fmt: skip
            export(model, tmp_path / "exp", exports=exports, tokenizer=tokenizer)
    assert not (tmp_path / "exp").exists()
    merged = ll.merge(model)
    assert all(torch.isfinite(p).all() for p in merged.parameters())  # what merge alone lets through


def test_probe_names_the_first_module_with_a_non_finite_output():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
    x = torch.ones(1, 4)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.fill_(1.0)
    probe(model, x)  # finite: passes
    with torch.no_grad():
        model[2].weight.fill_(3e38)  # finite weights, 4 x 5 x 3e38 overflows
    with pytest.raises(ValueError, match=r"first layer whose output is non-finite is '2' \(largest weight 3e\+38"):
        probe(model, x, "the model")
    assert model.training  # its mode is restored


def test_load_adapter_and_generate_refuse_a_nan_folder_naming_the_key(base, tmp_path):
    """Before: the NaN folder loaded, and generate printed an empty reply with exit 0."""
    from lightning_lora.commands.generate import main as generate

    model, _ = adapted(base)
    folder = ll.save_adapter(model, tmp_path / "a")
    tensors = ll.io.files.load_tensors(folder / "adapter_model.safetensors")
    key = sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    fresh, _ = load_causal_lm(str(base))
    with pytest.raises(ValueError, match=rf"adapter_model.safetensors: tensor '{key}' holds 1 NaN/inf.*not loaded"):
        ll.load_adapter(fresh, folder)
    assert not adapter_layers(fresh)  # unchanged
    with pytest.raises(ValueError, match=rf"'{key}' holds 1 NaN/inf"):
        generate(["generate", "--adapter", str(folder), "--prompt", "hi", "--max_new_tokens", "2"])


# ---------------------------------------------------------------------------------------------- messages
class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_checkpoint_refusal_is_one_short_line_pinned_to_ckpt_path(tmp_path):
    """Before: 1,100 characters, pinned to data.init_args.source, repeating the advice to use weights_only=False."""
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "lightning_lora": _Payload()}, ckpt)
    with pytest.raises(ValueError, match=r"evil.ckpt holds pickled Python objects \(posix.system\)") as err:
        export_checkpoint(ckpt, tmp_path / "out", base_model="unused")
    assert "weights_only=False" not in str(err.value) and not (tmp_path / "out").exists()
    with pytest.raises(pickle.UnpicklingError) as torch_err:  # what Lightning's own loading raises on fit --ckpt_path
        torch.load(ckpt, weights_only=True)
    torch_err.value.lightning_lora_config = {"data.init_args.source": "chatterbot", "ckpt_path": str(ckpt)}
    line = one_line(torch_err.value)
    assert line.startswith(f"error: {ckpt} holds pickled Python objects (posix.system)") and "(ckpt_path)" in line
    assert len(line) < 400 and "weights_only=False" not in line and "\x1b" not in line and "source" not in line, line


@pytest.mark.parametrize("change, expected", [
    (lambda c: c.pop("r"), r"adapter_config.json: the key 'r' is missing"),
    (lambda c: c.update(lora_alpha="sixteen"), r"adapter_config.json: the value lora_alpha='sixteen' is not what LoRA"),
])  # fmt: skip
def test_broken_peft_config_names_the_file_and_key(base, tmp_path, change, expected):
    model, _ = adapted(base)
    folder = ll.save_adapter(model, tmp_path / "a")
    config = json.loads((folder / "adapter_config.json").read_text())
    change(config)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=expected):
        ll.load_adapter(tiny_llama(), folder)


def test_old_export_gguf_key_and_unknown_formats_are_named(monkeypatch, tmp_path):
    import sys
    from argparse import ArgumentError

    from lightning_lora.commands.cli import make_cli

    monkeypatch.setattr(sys, "argv", ["lightning_lora"])
    config = tmp_path / "old.yaml"
    config.write_text("model:\n  base_model: x\n  export_gguf: [adapter, q8_0]\n")
    with pytest.raises((ArgumentError, ValueError)) as err:
        make_cli(["--config", str(config)], run=False)
    line = one_line(err.value)
    assert "'export_gguf' was replaced by 'exports' (model.export_gguf): use exports: [peft, merged, gguf" in line, line
    assert parse_exports("peft, gguf-merged:q8_0,peft") == [("peft", None), ("gguf-merged", "q8_0")]
    assert parse_exports(["gguf-merged"]) == [("gguf-merged", "f16")]
    with pytest.raises(ValueError, match=r"unknown format 'q8_0' \('q8_0' is now 'gguf-merged:q8_0'\)"):
        parse_exports(["q8_0"])
    with pytest.raises(ValueError, match=r"'gguf:q8_0' has no option 'q8_0'; choose from gguf"):
        parse_exports(["gguf:q8_0"])


def test_export_command_prints_each_file_once_with_its_name(base, tmp_path, capsys):
    """Before: every line twice (a log and a print), one of them "gguf q8 0 written"."""
    model, _ = adapted(base)
    checkpoint = {"state_dict": {"model." + k: v for k, v in adapter_state_dict(model).items()}}
    write_facts(checkpoint, adapter=ll.LoRA(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]),
                adapter_name="default", base_model=str(base))  # fmt: skip
    torch.save(checkpoint, tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match="--format, --merged and --outtype were replaced by --exports"):
        export_main(["export", "--ckpt_path", str(tmp_path / "a.ckpt"), "--export_dir", "x", "--format", "gguf"])
    export_main(["export", "--ckpt_path", str(tmp_path / "a.ckpt"), "--export_dir", str(tmp_path / "exp"),
                 "--exports", "gguf", "gguf-merged:q8_0"])  # fmt: skip
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"lightning_lora: adapter GGUF (llama.cpp LoRA) written to {tmp_path}/exp/adapter.gguf",
                                f"lightning_lora: merged model GGUF (q8_0) written to {tmp_path}/exp/merged-q8_0.gguf"]
    assert "written" not in err  # the library's own lines are not repeated
