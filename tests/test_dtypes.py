"""One dtype parser: every dtype argument accepts the same names and refuses the same way."""

import pytest
import torch

from lightning_lora import NF4
from lightning_lora.core.dtypes import dtype_name, parse_dtype
from lightning_lora.train.module import LoRAModule


@pytest.mark.parametrize(
    "value, want",
    [("bf16", torch.bfloat16), ("BFloat16", torch.bfloat16), ("torch.float16", torch.float16), ("half", torch.float16),
     ("fp32", torch.float32), (torch.bfloat16, torch.bfloat16)],
)  # fmt: skip
def test_names_and_dtypes(value, want):
    assert parse_dtype(value) is want
    assert dtype_name(value) == str(want).removeprefix("torch.")


@pytest.mark.parametrize("value", ["float77", "int8", 3, torch.int64, None])
def test_refused_with_the_field_and_the_choices(value):
    with pytest.raises(ValueError, match=r"compute_dtype=.*bfloat16, float16, float32"):
        parse_dtype(value, "compute_dtype")


def test_every_dtype_argument_agrees():
    assert NF4(compute_dtype="bf16").compute_dtype == "bfloat16"
    assert LoRAModule("unused-folder", dtype="bf16").dtype_name == "bfloat16"
    assert LoRAModule("unused-folder", dtype="auto").dtype_name == "auto"
    for make in (lambda: NF4(compute_dtype="bf17"), lambda: LoRAModule("unused-folder", dtype="bf17")):
        with pytest.raises(ValueError, match="'bf17' is not a dtype"):
            make()
