"""Layer kinds: everything the package knows about a kind of layer, as one entry in one table.

A ``LayerKind`` says how to read a layer's shape and dense weight, how to write a merged weight back, how an adapter's
low-rank pair (A, B) is laid out on it and applied to its input, and what PEFT's config says about it. Methods ask
the kind (``kind_of(layer)``) instead of testing layer types, so a new kind is one ``register_kind`` call:

| kind | matches | (in, out) | dense weight (2-D) | A, B of rank r |
|---|---|---|---|---|
| ``linear`` | ``nn.Linear`` | in/out_features | weight (out, in) | (r, in), (out, r) |
| ``hf_conv1d`` | transformers GPT-2 ``Conv1D`` | weight (in, out) | weight^T (out, in) | (r, in), (out, r); PEFT ``fan_in_fan_out`` |
| ``embedding`` | ``nn.Embedding`` | (vocab, dim) | weight (vocab, dim) = (in, out), "transposed" | (r, vocab), (dim, r) |
| ``conv1d/2d/3d`` | ``nn.Conv{1,2,3}d``, groups 1 | (in, out) channels | weight (out, in * prod(k)) | (r, in, *k), (out, r, 1, ...) |
| ``experts`` | an MoE expert stack (``core/experts.py``) | per expert | (E, out, in) as stored | (r E, in), (out, r E) |

Every kind but the embedding also has a bias that a merge may rewrite (``bias``/``write_bias``).

The bitsandbytes 4-bit linear is registered by ``lightning_lora.quant.nf4`` (core imports neither bitsandbytes nor
quant). Conv layers follow PEFT's layout: A is a conv with the base's kernel, stride, padding and dilation, B a 1x1
conv, so dW = B A reshaped to the base's (out, in, *k) and merging is exact. Deviation: PEFT 0.21's unmerged conv
forward drops the base's dilation (its merge keeps it), so on a dilated conv only the merged models agree with PEFT.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """One kind of layer an adapter can wrap (see the module docstring).

    Fields:
        name: short name, e.g. ``"linear"``; the contract matrix and error messages use it.
        matches: ``matches(module)`` is True for layers of this kind (checked in registration order, newest first).
        in_out: ``(in, out)`` of a layer: features, channels or (vocab, dim).
        dense_weight: the weight as a 2-D matrix: (out, fan_in), or (in, out) when ``transposed`` (embeddings).
        write_back: ``write_back(layer, new_weight, dtype)`` returns the layer holding ``new_weight`` (same
            orientation as ``dense_weight``): in place, or a new plain layer (a quantized base).
        bias: ``bias(layer)`` -> the layer's output bias (out,) or None (default: ``layer.bias`` if any).
        write_bias: ``write_bias(layer, new_bias)`` returns ``layer`` (the one ``write_back`` returned) with
            ``new_bias`` (out,) as its bias, adding one if it had none; None on kinds without a bias (embeddings):
            a merge that changes the bias is then refused.
        pair_shapes: ``pair_shapes(layer, r)`` -> shapes of A and B for a rank-r low-rank pair.
        apply_pair: ``apply_pair(x, A, B, layer, p)`` = B A dropout_p(x) laid out like the layer's output (unscaled).
        refuse: ``refuse(layer)`` -> None, or why this layer cannot be adapted (e.g. a grouped conv).
        linear: the input is (..., in) and the output (..., out), as a matrix product; ``"all-linear"`` selects it.
        transposed: ``dense_weight`` is (in, out) (an embedding's (vocab, dim)).
        channel_dim: the output dimension holding the ``out`` channels (-1 for linear kinds, 1 for convs).
        quantized: the stored weight is quantized (``dense_weight`` dequantizes; merge writes a plain layer).
        rounding_error: for quantized kinds, the estimated relative RMS rounding error of a layer's weight.
        warn_rounding: for quantized kinds, one warning for layers merged without their original weights.
        fan_in_fan_out: PEFT's config flag for this kind (GPT-2 ``Conv1D``).
        reversed_init: LoRA initializes A to zeros and B normal on this kind (PEFT's embedding init).
        peft_vector_shape: PEFT's shape for a per-output-channel vector (DoRA's magnitude): (out,), or
            (1, out, 1, ...) on convs.
        peft_layer: PEFT's layer family for this kind (``"linear"``, ``"embedding"``, ``"conv"``): PEFT names a
            method's tensors by it (e.g. LoRA's on embeddings), so methods key their PEFT names on it.
        example: a tiny seeded layer of this kind and an input for it; the contract tests (tests/test_contract.py)
            run every method that supports the kind on it, so a new kind is tested with no new test code.
        experts: a stack of E per-expert matrices of an MoE experts module (``core/experts.py``): ``"all-linear"``
            and ``target_parameters`` select it, the experts' forward calls it one expert at a time, and its
            ``dense_weight`` is (E, out, in).
        wrap: ``wrap(layer)`` -> the ``AdapterLayer`` that holds this kind's adapters (default: ``AdapterLayer``).
        restore: ``restore(layer)`` -> what its parent holds once no adapter wraps it (default: the layer itself; an
            expert stack gives back the parameter it holds).
    """

    name: str
    matches: Callable[[nn.Module], bool]
    in_out: Callable[[nn.Module], tuple[int, int]]
    dense_weight: Callable[[nn.Module], Tensor]
    write_back: Callable[[nn.Module, Tensor, torch.dtype | None], nn.Module]
    pair_shapes: Callable[[nn.Module, int], tuple[tuple[int, ...], tuple[int, ...]]]
    apply_pair: Callable[[Tensor, Tensor, Tensor, nn.Module, float], Tensor]
    refuse: Callable[[nn.Module], str | None] = lambda layer: None
    bias: Callable[[nn.Module], Tensor | None] = lambda layer: getattr(layer, "bias", None)
    write_bias: Callable[[nn.Module, Tensor], nn.Module] | None = None
    linear: bool = False
    transposed: bool = False
    channel_dim: int = -1
    quantized: bool = False
    rounding_error: Callable[[nn.Module], float] | None = None
    warn_rounding: Callable[[dict], None] | None = None
    fan_in_fan_out: bool = False
    reversed_init: bool = False
    peft_vector_shape: Callable[[int], tuple[int, ...]] = lambda n: (n,)
    peft_layer: str = "linear"
    example: Callable[[], tuple[nn.Module, Tensor]] | None = None
    experts: bool = False
    wrap: Callable[[nn.Module], nn.Module] | None = None
    restore: Callable[[nn.Module], object] | None = None


KINDS: list[LayerKind] = []  # registration order; kind_of checks the newest first (a 4-bit linear is an nn.Linear)


def register_kind(kind: LayerKind) -> LayerKind:
    """Add ``kind`` to the table (replacing one of the same name). Returns it."""
    KINDS[:] = [k for k in KINDS if k.name != kind.name]
    KINDS.append(kind)
    return kind


def kind_named(name: str) -> LayerKind:
    """The registered kind called ``name``."""
    for kind in KINDS:
        if kind.name == name:
            return kind
    raise KeyError(f"no layer kind named {name!r}; registered: {[k.name for k in KINDS]}.")


def kind_of(module: nn.Module) -> LayerKind | None:
    """The registered kind of ``module``, or None if no adapter can wrap it."""
    for kind in reversed(KINDS):
        if kind.matches(module):
            return kind
    return None


def is_quantized(layer: nn.Module) -> bool:
    """True for a layer of a quantized kind (the bitsandbytes 4-bit linear, once ``quant.nf4`` is imported)."""
    kind = kind_of(layer)
    return kind is not None and kind.quantized


def is_linear_like(module: nn.Module) -> bool:
    """True for the kinds ``"all-linear"`` selects (a matrix product over the last dim)."""
    kind = kind_of(module)
    return kind is not None and kind.linear


def in_out_features(layer: nn.Module) -> tuple[int, int]:
    """(in, out) of any registered kind ((num_embeddings, embedding_dim) of an embedding)."""
    return _kind(layer).in_out(layer)


def dense_weight(layer: nn.Module) -> Tensor:
    """The layer's weight as a dense 2-D matrix (see ``LayerKind.dense_weight``); quantized layers are dequantized.
    A layer of no registered kind (a norm) gives its ``weight`` as it is."""
    kind = kind_of(layer)
    return layer.weight if kind is None else kind.dense_weight(layer)


def merged_base_layer(
    layer: nn.Module, new_weight: Tensor, dtype: torch.dtype | None = None, new_bias: Tensor | None = None
) -> nn.Module:
    """The base layer with ``new_weight`` (same orientation as ``dense_weight``) written in (``LayerKind.write_back``),
    and ``new_bias`` (if given) as its bias (``LayerKind.write_bias`` of the layer written back)."""
    kind = _kind(layer)
    new = kind.write_back(layer, new_weight, dtype)
    if new_bias is None:
        return new
    if kind.write_bias is None:
        raise ValueError(f"a {kind.name} layer has no bias to merge an adapter's bias change into.")
    return kind.write_bias(new, new_bias)


def _kind(layer: nn.Module) -> LayerKind:
    kind = kind_of(layer)
    if kind is None:
        raise TypeError(f"{type(layer).__name__} is not a layer kind adapters can wrap; known: {[k.name for k in KINDS]}.")
    return kind


def write_in_place(layer: nn.Module, new_weight: Tensor, dtype: torch.dtype | None = None) -> nn.Module:
    """Write a (out, fan_in) or same-shape weight into ``layer.weight`` in place (adopting a fresh contiguous tensor)."""
    weight = layer.weight
    with torch.no_grad():
        if new_weight.shape == weight.shape and new_weight.is_contiguous() and new_weight.dtype == weight.dtype and (
            new_weight.device == weight.device
        ):
            weight.data = new_weight.detach()  # the merged tensor is new: adopt it instead of copying it over
        else:
            weight.copy_(new_weight.reshape(weight.shape))
    return layer


def write_bias_in_place(layer: nn.Module, new_bias: Tensor) -> nn.Module:
    """Write ``new_bias`` (out,) into ``layer.bias``, in place; a layer without a bias gets a frozen one."""
    with torch.no_grad():
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias.detach().to(layer.weight.dtype).clone(), requires_grad=False)
        else:
            layer.bias.copy_(new_bias)
    return layer


def _linear_pair(x: Tensor, A: Tensor, B: Tensor, layer: nn.Module, p: float) -> Tensor:
    return F.linear(F.linear(F.dropout(x, p) if p else x, A), B)


def _hf_conv1d_write(layer: nn.Module, new_weight: Tensor, dtype: torch.dtype | None = None) -> nn.Module:
    with torch.no_grad():
        layer.weight.t().copy_(new_weight)
    return layer


def _embedding_pair(x: Tensor, A: Tensor, B: Tensor, layer: nn.Module, p: float) -> Tensor:
    """(A^T[ids]) B^T: the input is ids, so no dropout (as PEFT)."""
    after_A = F.embedding(
        x, A.t(), layer.padding_idx, layer.max_norm, layer.norm_type, layer.scale_grad_by_freq, layer.sparse
    )
    return after_A @ B.t()


def _conv_pair(dims: int) -> Callable:
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]

    def apply(x: Tensor, A: Tensor, B: Tensor, layer: nn.Module, p: float) -> Tensor:
        h = conv(F.dropout(x, p) if p else x, A, None, layer.stride, layer.padding, layer.dilation)
        return conv(h, B)  # B is a 1x1 conv: (out, r, 1, ...)

    return apply


def _conv_refuse(layer: nn.Module) -> str | None:
    if layer.groups != 1:
        return (f"a grouped convolution (groups={layer.groups}) cannot take a LoRA/DoRA adapter here (PEFT's conv "
                "layout needs groups=1); exclude it with exclude_modules or target other layers")
    if layer.padding_mode != "zeros":
        return f"padding_mode={layer.padding_mode!r} is not supported (only 'zeros'); exclude this layer"
    return None


def _seeded(make: Callable[[], nn.Module], *input_shape: int, ids: int = 0) -> Callable[[], tuple[nn.Module, Tensor]]:
    def example() -> tuple[nn.Module, Tensor]:
        torch.manual_seed(0)
        layer = make()
        gen = torch.Generator().manual_seed(1)
        x = torch.randint(0, ids, input_shape, generator=gen) if ids else torch.randn(input_shape, generator=gen)
        return layer, x

    return example


def _gpt2_conv1d() -> nn.Module:
    layer = Conv1D(10, 12)  # nf = out, nx = in
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)
    return layer


_CONV_EXAMPLES = {
    1: _seeded(lambda: nn.Conv1d(3, 5, 3, padding=1), 2, 3, 9),
    2: _seeded(lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1), 2, 3, 7, 7),
    3: _seeded(lambda: nn.Conv3d(2, 4, (1, 3, 3), stride=(1, 2, 1), padding=(0, 1, 1)), 2, 2, 3, 6, 5),
}


def _conv_kind(cls: type, dims: int) -> LayerKind:
    return LayerKind(
        name=f"conv{dims}d",
        matches=lambda m: isinstance(m, cls),
        in_out=lambda m: (m.in_channels, m.out_channels),
        dense_weight=lambda m: m.weight.reshape(m.weight.shape[0], -1),
        write_back=write_in_place,
        pair_shapes=lambda m, r: ((r, m.in_channels, *m.kernel_size), (m.out_channels, r, *([1] * dims))),
        apply_pair=_conv_pair(dims),
        refuse=_conv_refuse,
        write_bias=write_bias_in_place,
        channel_dim=1,
        peft_vector_shape=lambda n: (1, n, *([1] * dims)),
        peft_layer="conv",
        example=_CONV_EXAMPLES[dims],
    )


register_kind(LayerKind(
    name="linear",
    matches=lambda m: isinstance(m, nn.Linear),
    in_out=lambda m: (m.in_features, m.out_features),
    dense_weight=lambda m: m.weight,
    write_back=write_in_place,
    pair_shapes=lambda m, r: ((r, m.in_features), (m.out_features, r)),
    apply_pair=_linear_pair,
    write_bias=write_bias_in_place,
    linear=True,
    example=_seeded(lambda: nn.Linear(12, 10), 2, 3, 12),
))  # fmt: skip
register_kind(LayerKind(
    name="hf_conv1d",
    matches=lambda m: isinstance(m, Conv1D),
    in_out=lambda m: (m.weight.shape[0], m.weight.shape[1]),
    dense_weight=lambda m: m.weight.t(),
    write_back=_hf_conv1d_write,
    pair_shapes=lambda m, r: ((r, m.weight.shape[0]), (m.weight.shape[1], r)),
    apply_pair=_linear_pair,
    write_bias=write_bias_in_place,
    linear=True,
    fan_in_fan_out=True,
    example=_seeded(_gpt2_conv1d, 2, 3, 12),
))  # fmt: skip
register_kind(LayerKind(
    name="embedding",
    matches=lambda m: isinstance(m, nn.Embedding),
    in_out=lambda m: (m.num_embeddings, m.embedding_dim),
    dense_weight=lambda m: m.weight,
    write_back=write_in_place,
    pair_shapes=lambda m, r: ((r, m.num_embeddings), (m.embedding_dim, r)),
    apply_pair=_embedding_pair,
    transposed=True,
    reversed_init=True,
    peft_layer="embedding",
    example=_seeded(lambda: nn.Embedding(20, 8), 2, 5, ids=20),
))  # fmt: skip
for _cls, _dims in ((nn.Conv1d, 1), (nn.Conv2d, 2), (nn.Conv3d, 3)):
    register_kind(_conv_kind(_cls, _dims))

