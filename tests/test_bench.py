"""benchmarks/bench.py runs end to end in its tiny mode and writes every ratio; its two memory meters are right on
cases whose answer is known. No timing asserts."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

BENCH = Path(__file__).parent.parent / "benchmarks" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_every_key(bench, tmp_path):
    out = tmp_path / "results.json"
    res = bench.main(["--tiny", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["ratios"] == pytest.approx(res["ratios"])
    for key in bench.KEYS:
        value = written["ratios"][key]
        assert value is not None and math.isfinite(value) and value > 0, key
    assert 4.0 < written["ratios"]["nf4_bits_per_param"] < 4.2
    assert {"floor", "lora", "peft_lora", "infer_base", "infer_merged"} <= set(written["step_s"])
    assert written["machine"]["torch"] == torch.__version__


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 16)

    def forward(self, input_ids=None, labels=None):
        x = torch.ones(input_ids.shape[0], 8, requires_grad=True)
        y = torch.relu(self.lin(x))  # saves x (F.linear) and y (relu's output)

        class Out:
            loss = y.sum()

        return Out()


def test_activation_bytes_counts_saved_tensors_once_and_skips_parameters(bench):
    model = _Mlp()
    got = bench.activation_bytes(model, torch.zeros(3, 1, dtype=torch.long))
    assert got == (3 * 8 + 3 * 16) * 4  # x and relu's output, in fp32; the weight is a parameter and not counted


def test_peak_bytes_sees_a_temporary(bench):
    param = nn.Parameter(torch.zeros(1000))
    model = nn.Module()
    model.p = param

    def step():
        tmp = torch.empty(250_000)  # 1 MB, freed at once
        del tmp

    assert bench.peak_bytes(model, None, step) >= 4000 + 1_000_000


def test_side_by_side_pairs_each_round_with_its_own_steps():
    """benchmarks/side_by_side.py: a ratio is the median over rounds of that round's pair (slow drift cancels), here
    on times whose ratios are known: ours is 2x the floor in every round though all three slow down 4x."""
    spec = importlib.util.spec_from_file_location("side_by_side", BENCH.with_name("side_by_side.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    times = {"ours": [2.0, 4.0, 6.0, 8.0], "floor": [1.0, 2.0, 3.0, 4.0], "recipe": [4.0, 4.0, 4.0, 4.0]}
    res = module.summarize(times, "quickstart", 4)
    assert res["ours_vs_floor"]["per_round_median"] == pytest.approx(2.0)
    assert res["ours_vs_floor"]["per_round_quartiles"] == pytest.approx([2.0, 2.0])
    assert res["ours_vs_recipe"]["per_round_median"] == pytest.approx((1.0 + 1.5) / 2)
    assert res["ours_vs_recipe"]["fastest"] == pytest.approx(2.0 / 4.0)
    assert res["floor_vs_recipe"]["medians"] == pytest.approx(2.5 / 4.0)
    assert res["cpu_s_per_example"]["ours"] == pytest.approx([0.5, 1.0, 1.5, 2.0])  # batch_size 4
