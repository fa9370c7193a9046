"""The bitsandbytes 4-bit linear as a layer kind (``core/kinds.py``): shape, dequantized dense weight, merge into a
plain ``nn.Linear`` (never re-quantized), and the rounding-error estimate and warning for merges made without the
original weights. ``quant/nf4.py`` registers it. bitsandbytes is imported only where a 4-bit weight is read.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lightning_lora.core.kinds import LayerKind, write_bias_in_place

log = logging.getLogger(__name__)


def nf4_rounding_error(layer: nn.Module) -> float:
    """Estimated relative RMS error ||W - W_q|| / ||W_q|| of an NF4 layer whose original W is gone.

    Re-quantizing W_q measures nothing (its values already sit on the NF4 grid). Instead, each weight's 4-bit code
    says which interval its original value fell into (between the midpoints to the neighbouring levels, times the
    block's absmax); taking the original as uniform over that interval, the expected squared error of a weight on
    level v with interval [lo, hi] is ((hi - v)^3 - (lo - v)^3) / (3 (hi - lo)), times the block's absmax squared;
    one weight per block (the absmax itself) is exact. On Gaussian and uniform weights this estimate is within a few
    percent of the true error (test_quantize.py).
    """
    w = _dequantized(layer).detach().float().reshape(-1)
    return float(rounding_error_sq(w, layer.weight.quant_state.blocksize).sqrt() / w.norm().clamp_min(1e-30))


def rounding_error_sq(w: Tensor, bs: int) -> Tensor:
    """The estimated squared error ||W - W_q||^2 of NF4 weights ``w`` (dequantized, flat) in blocks of ``bs``
    (``nf4_rounding_error``)."""
    import bitsandbytes.functional as bnbf

    pad = (-w.numel()) % bs
    blocks = torch.nn.functional.pad(w, (0, pad)).reshape(-1, bs)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    levels = bnbf.get_4bit_type("nf4", device="cpu").float().sort().values
    mids = (levels[1:] + levels[:-1]) / 2
    lo_edge = torch.cat([levels[:1], mids])  # the interval of each level, in units of absmax
    hi_edge = torch.cat([mids, levels[-1:]])
    normed = torch.where(absmax > 0, blocks / absmax.clamp_min(1e-30), torch.zeros_like(blocks))
    idx = torch.bucketize(normed.contiguous(), mids)  # values sit on the grid: nearest level = bucket
    v, lo, hi = levels[idx], lo_edge[idx], hi_edge[idx]
    width = (hi - lo).clamp_min(1e-12)
    mse = ((hi - v) ** 3 - (lo - v) ** 3) / (3 * width) * absmax**2
    mse.scatter_(1, blocks.abs().argmax(1, keepdim=True), 0.0)  # one weight per block (its absmax) is exact
    return mse.sum()


def warn_merge_without_originals(errors: Mapping[str, tuple[float, float]]) -> None:
    """One warning for a merge into dequantized NF4 weights; ``errors[layer] = (rounding error, update RMS)`` as
    relative RMS of the weight (``nf4_rounding_error``) and the adapter update's RMS over the weight's RMS."""
    if not errors:
        return
    worst = max(errors, key=lambda n: errors[n][0] / max(errors[n][1], 1e-30))
    mean = sum(e for e, _ in errors.values()) / len(errors)
    err, upd = errors[worst]
    log.warning(
        f"merge: {len(errors)} quantized layer(s) had no high-precision weight, so the adapters were merged into the "
        f"dequantized NF4 weights, which keep their rounding error: estimated {100 * mean:.1f}% of the weights' RMS "
        f"on average (from the 4-bit codes, see nf4_rounding_error); worst relative to the adapter update: {worst!r}, "
        f"rounding {100 * err:.1f}% vs update {100 * upd:.2f}% of the weight ({err / max(upd, 1e-30):.1f}x). "
        "Pass base_weights=original_weights(<model folder>, quantized_layer_names(model)) to merge exactly."
    )


def _is_4bit(layer: nn.Module) -> bool:
    """A bitsandbytes 4-bit layer: its weight is a ``Params4bit`` (checked by name: importing bitsandbytes is slow)."""
    weight = getattr(layer, "weight", None)
    return isinstance(layer, nn.Linear) and (
        getattr(weight, "quant_state", None) is not None or type(weight).__name__ == "Params4bit"
    )


def _dequantized(layer: nn.Module) -> Tensor:
    import bitsandbytes.functional as bnbf

    weight = layer.weight
    return bnbf.dequantize_4bit(weight.data, weight.quant_state).reshape(layer.out_features, layer.in_features)


def _plain_linear(layer: nn.Module, new_weight: Tensor, dtype: torch.dtype | None = None) -> nn.Module:
    """A plain ``nn.Linear`` holding the merged weight: re-quantizing would destroy most of a small update
    (REFERENCE section 5), in ``dtype`` (default: the new weight's)."""
    dtype = dtype or new_weight.dtype
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = nn.Parameter(new_weight.detach().to(dtype), requires_grad=False)
    if layer.bias is not None:
        linear.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
    return linear


NF4_LINEAR = LayerKind(
    name="nf4_linear",
    matches=_is_4bit,
    in_out=lambda m: (m.in_features, m.out_features),
    dense_weight=_dequantized,
    write_back=_plain_linear,
    write_bias=write_bias_in_place,  # into the plain nn.Linear that write_back returns
    pair_shapes=lambda m, r: ((r, m.in_features), (m.out_features, r)),
    apply_pair=lambda x, A, B, layer, p: nn.functional.linear(nn.functional.linear(nn.functional.dropout(x, p), A), B),
    linear=True,
    quantized=True,
    rounding_error=nf4_rounding_error,
    warn_rounding=warn_merge_without_originals,
)  # fmt: skip
