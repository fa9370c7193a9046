"""The contract matrix: every registered method x every layer kind it supports, built from the registries.

Methods come from ``METHODS`` (each class's ``examples()`` configs, plus the outside methods ``examples/loha.py``
and the test-only ``tests/ia3_method.py``, which uses the hooks LoRA-like methods leave alone: a branch wrapping the
base call, merge writing the bias, options decided by the layer's name), kinds from ``KINDS`` (each kind's
``example()`` layer and input). For each pair: identity at init, only adapters train, merge == unmerged, remove is
bit-exact, save/load is exact, PEFT both ways wherever PEFT has the pair (``peft_supports``), with PEFT as the oracle;
``build`` gets the layer's name and ``to_peft`` the per-layer map; forward and backward under autocast; a
non-additive branch gives its own reason. A new method or kind is covered here with no new test code.
"""

import dataclasses
import sys
import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import perturb_adapters
from torch import nn

import lightning_lora as ll
from lightning_lora.core.kinds import KINDS
from lightning_lora.core.layer import METHODS, AdapterBranch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import fourierft  # noqa: E402, F401  (the second worked example: a dense additive update, names decide n)
import ia3_method  # noqa: E402, F401  (a test-only outside method using the wrap/bias/name hooks)
import loha  # noqa: E402, F401  (an outside method: registers itself)

from lightning_lora.core.layer import peft_config_of  # noqa: E402
from lightning_lora.core.verbs import layer_map, not_additive_reason  # noqa: E402


class Net(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


CASES = [
    pytest.param(cfg, kind, id=f"{cls.method}{i}-{kind.name}")
    for cls in list(METHODS.values())
    for i, cfg in enumerate(cls.examples())
    for kind in list(KINDS)
    if kind.example is not None and cls.supports(kind)
]
PEFT_CASES = [c for c in CASES if type(c.values[0]).peft_supports(c.values[1])]


def fresh(kind):
    layer, x = kind.example()
    return Net(layer).eval(), x


def adapted(cfg, kind, perturb=True):
    net, x = fresh(kind)
    ll.inject(net, dataclasses.replace(cfg, target_modules=["layer"]))
    if perturb:
        perturb_adapters(net, std=0.1)
    return net, x


def test_matrix_covers_every_method_and_kind():
    assert {type(c.values[0]).method for c in CASES} >= {"LoRA", "DoRA", "VeRA", "LoHa", "IA3", "FourierFT"}
    assert {c.values[1].name for c in CASES} == {k.name for k in KINDS if k.example is not None}


@pytest.mark.parametrize("cfg, kind", CASES)
def test_identity_at_init(cfg, kind):
    base, x = fresh(kind)
    net, _ = adapted(cfg, kind, perturb=False)
    with torch.no_grad():
        assert torch.equal(net(x), base(x))  # bit-exact: each method starts at dW = 0 (DoRA: m / n = 1)


@pytest.mark.parametrize("cfg, kind", CASES)
def test_only_adapters_train(cfg, kind):
    net, x = adapted(cfg, kind)
    net.train()
    out = net(x)
    out.float().pow(2).mean().backward()
    adapter_params = {id(p) for m in net.modules() if isinstance(m, AdapterBranch) for p in m.parameters()}
    assert adapter_params
    for name, p in net.named_parameters():
        is_adapter = id(p) in adapter_params
        assert p.requires_grad == is_adapter, name
        assert (p.grad is not None) == is_adapter, name


@pytest.mark.parametrize("cfg, kind", CASES)
def test_merge_equals_unmerged(cfg, kind):
    net, x = adapted(cfg, kind)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NF4: merged into the dequantized weight (warned)
        before = net(x)
        ll.merge(net)
        after = net(x)
    assert not any(isinstance(m, ll.AdapterLayer) for m in net.modules())
    assert not torch.allclose(before, fresh(kind)[0](x), atol=1e-4)  # the adapter did change the output
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cfg, kind", CASES)
def test_remove_is_bit_exact(cfg, kind):
    net, x = fresh(kind)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    flags = {k: p.requires_grad for k, p in net.named_parameters()}
    with torch.no_grad():
        base_out = net(x)
    ll.inject(net, dataclasses.replace(cfg, target_modules=["layer"]))
    perturb_adapters(net)
    ll.remove(net)
    assert set(net.state_dict()) == set(state)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert {k: p.requires_grad for k, p in net.named_parameters()} == flags
    with torch.no_grad():
        assert torch.equal(net(x), base_out)


@pytest.mark.parametrize("cfg, kind", CASES)
def test_save_load_is_exact(cfg, kind, tmp_path):
    net, x = adapted(cfg, kind)
    ll.save_adapter(net, tmp_path)
    other, _ = fresh(kind)
    ll.load_adapter(other, tmp_path)
    mine, theirs = ll.adapter_state_dict(net), ll.adapter_state_dict(other)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with torch.no_grad():
        assert torch.equal(other(x), net(x))


@pytest.mark.parametrize("cfg, kind", PEFT_CASES)
def test_peft_loads_ours(cfg, kind, tmp_path):
    peft = pytest.importorskip("peft")
    net, x = adapted(cfg, kind)
    ll.save_adapter(net, tmp_path)
    theirs = peft.PeftModel.from_pretrained(fresh(kind)[0], tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), net(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cfg, kind", PEFT_CASES)
def test_we_load_pefts(cfg, kind, tmp_path):
    peft = pytest.importorskip("peft")
    config = dataclasses.replace(cfg, target_modules=["layer"]).to_peft(["layer"], {})
    if "fan_in_fan_out" in config:
        config["fan_in_fan_out"] = kind.fan_in_fan_out
    theirs = peft.get_peft_model(fresh(kind)[0], peft.get_peft_config(config))
    perturb_adapters(theirs, std=0.1, seed=3)
    theirs.eval().save_pretrained(tmp_path)
    net, x = fresh(kind)
    ll.load_adapter(net, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(net(x), theirs(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cfg, kind", CASES)
def test_build_gets_the_name_and_to_peft_the_per_layer_map(cfg, kind, monkeypatch):
    seen = {}
    cls = type(cfg)
    build, to_peft = cls.build, cls.to_peft
    monkeypatch.setattr(cls, "build", lambda self, base, shared, name: seen.setdefault("names", []).append(name)
                        or build(self, base, shared, name))
    net, x = adapted(cfg, kind)
    assert seen["names"] == ["layer"]
    if cls.peft_type is None:
        return
    monkeypatch.setattr(cls, "to_peft", lambda self, targets, layers: seen.setdefault("layers", layers)
                        and to_peft(self, targets, layers))
    written = peft_config_of(cfg, ["layer"], layer_map(net, "default"))
    assert seen["layers"] == {"layer": net.layer.adapters["default"]} and written["target_modules"] == ["layer"]


@pytest.mark.parametrize("cfg, kind", [c for c in CASES if c.values[1].name not in ("embedding", "nf4_linear")])
def test_forward_and_backward_under_autocast(cfg, kind):
    """Branches run under the base's autocast; backward called inside the autocast block gives the gradients it
    gives outside it (the fused autograd functions keep their own dtype in backward too)."""
    grads = []
    for backward_inside in (False, True):
        net, x = adapted(cfg, kind)
        net.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = net(x).float().pow(2).mean()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        grads.append({n: p.grad for n, p in net.named_parameters() if p.requires_grad})
    assert grads[0] and all(g is not None and torch.isfinite(g).all() for g in grads[0].values())
    for name, g in grads[0].items():
        assert grads[1][name].dtype == g.dtype, name
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cfg, kind", CASES)
def test_branches_that_do_not_factor_give_their_own_reason(cfg, kind):
    """factors() is the 2-D pair combine folds, or a ValueError in the method's own words, which combine shows (and
    set_adapter too, for a non-additive branch, which may be neither weighted nor shared)."""
    net, _ = adapted(cfg, kind)
    branch = net.layer.adapters["default"]
    try:
        B, A = branch.factors()
    except ValueError:
        reason = not_additive_reason(branch)
        assert reason and "additive = False" not in reason  # its own sentence, from its factors()
        with pytest.raises(ValueError, match="cannot be combined") as err:
            ll.combine(net, {"default": 1.0}, "sum")
        assert reason in str(err.value)
    else:
        assert branch.additive and B.dim() == A.dim() == 2
        return
    if not branch.additive:
        ll.inject(net, dataclasses.replace(cfg, target_modules=["layer"]), "other")
        with pytest.raises(ValueError, match="cannot be weighted") as err:
            ll.set_adapter(net, {"default": 0.5})
        assert reason in str(err.value)


@pytest.mark.parametrize("method", [ll.LoRA, ll.DoRA])
def test_dilated_strided_conv_merges_exactly(method):
    """A with the base's dilation too (PEFT's unmerged forward drops it): merged == unmerged; dW as the formula."""
    torch.manual_seed(0)
    net = Net(nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2))
    x = torch.randn(2, 3, 9, 9)
    ll.inject(net, method(r=2, alpha=4.0, target_modules=["layer"]))
    perturb_adapters(net)
    branch = net.layer.adapters["default"]
    with torch.no_grad():
        before = net(x)
        dW = (branch.lora_B.flatten(1) @ branch.lora_A.flatten(1)).view(4, 3, 3, 3) * 2.0  # s = alpha / r
        W = net.layer.base_layer.weight + dW
        if method is ll.DoRA:  # m * V / ||V|| per output channel, norm over (in, kh, kw)
            W = branch.magnitude.view(-1, 1, 1, 1) * W / W.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        expected = nn.functional.conv2d(x, W, net.layer.base_layer.bias, stride=2, padding=2, dilation=2)
        torch.testing.assert_close(before, expected, rtol=1e-4, atol=1e-5)
        ll.merge(net)
        torch.testing.assert_close(net(x), before, rtol=1e-4, atol=1e-5)


def test_grouped_conv_is_refused_and_nothing_changes():
    net = Net(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match=r"cannot adapt 'layer': a grouped convolution \(groups=2\)"):
        ll.inject(net, ll.LoRA(target_modules=["layer"]))
    assert isinstance(net.layer, nn.Conv2d)


def test_all_linear_leaves_convs_alone():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    ll.inject(net, ll.LoRA(r=2))
    assert isinstance(net[0], nn.Conv2d) and isinstance(net[2], ll.AdapterLayer)
