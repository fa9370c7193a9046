"""QLoRA's frozen base: nn.Linear weights in 4-bit NormalFloat (NF4) with bitsandbytes.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314, section 3): each block of ``blocksize`` (64) weights is stored as 4-bit
indices into the 16 NF4 levels (quantiles of N(0, 1), scaled to [-1, 1]) plus one absmax constant,

    W ~ absmax_b * NF4[q],   q in {0..15}

and double quantization stores the absmax constants themselves in 8 bits (blocks of 256) with one fp32 constant each:
4 + 8/64 + 32/(64*256) = 4.127 bits per parameter (4.5 without it). Adapters go on top (``inject``) and train in
``compute_dtype``; the base is dequantized block-wise inside each forward.

Order: ``quantize`` first, ``inject`` after (quantizing an adapted model is refused: DoRA's magnitude and the merge
reference were taken from the unquantized weight).

bitsandbytes 0.50.2 on CPU, found by testing every shape (tests/test_quantize.py):
  * its AVX-512 dequantize kernel reads wrong absmax constants when ``in_features`` is a multiple of 16 but not of
    ``blocksize`` (blocks straddle rows; 2-3x the NF4 error). ``quantize`` keeps such layers unquantized, with a log line.
  * its fused eval-mode path (AVX-512 BF16 CPUs) repacks the weight in place at the first no-grad eval forward: it
    asserts on out widths not divisible by 32 and odd in widths, computes in bf16, and afterwards training forwards
    fail and ``dequantize_4bit`` reads a wrong layout. ``quantize`` turns that path off on every layer it makes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_lora.core.dtypes import dtype_name, parse_dtype
from lightning_lora.core.experts import expert_stacks
from lightning_lora.core.experts_dispatch import use_experts_dispatch
from lightning_lora.core.kinds import dense_weight, is_quantized, kind_of, register_kind
from lightning_lora.core.layer import AdapterLayer
from lightning_lora.quant.nf4_experts import plan_stacks, quantize_stacks
from lightning_lora.quant.nf4_layer import (  # noqa: F401
    NF4_LINEAR,
    nf4_rounding_error,
    warn_merge_without_originals,
)

log = logging.getLogger(__name__)

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes 0.50.2 accepts these for 4-bit (CPU and CUDA)
_STORAGE = {"uint8": torch.uint8}  # besides the float dtypes: bitsandbytes' default packed storage


@dataclasses.dataclass
class NF4:
    """How to quantize the frozen base (QLoRA, arXiv:2305.14314).

    Args:
        blocksize: weights per absmax constant; one of 32, 64, ..., 4096 (bitsandbytes' supported sizes).
        double_quant: store the absmax constants in 8 bits (blocks of 256): 4.127 instead of 4.5 bits per weight.
        compute_dtype: dtype of the dequantized weight in the matmul; ``None`` = the run's precision, decided at
            each forward: the autocast dtype under mixed precision (``bf16-mixed`` on a GPU: bf16), else the input's
            dtype (``32-true``: fp32, ``bf16-true``: bf16).
        skip_modules: names (or dotted name parts, e.g. ``"lm_head"``, ``"mlp"``) of linear layers kept unquantized.
        quant_storage: dtype the packed 4-bit data is stored in (default uint8; a float dtype lets FSDP shard it).

    Example::

        model = quantize(model, NF4())       # base to 4 bits
        inject(model, LoRA(r=16))            # adapters on top
    """

    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str | None = None
    skip_modules: tuple[str, ...] = ("lm_head",)
    quant_storage: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize not in BLOCKSIZES:
            raise ValueError(f"NF4: blocksize must be one of {BLOCKSIZES} (bitsandbytes' 4-bit block sizes), got {self.blocksize!r}.")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"NF4: double_quant must be True or False, got {self.double_quant!r}.")
        self.compute_dtype = dtype_name(self.compute_dtype, "NF4 compute_dtype")
        self.quant_storage = dtype_name(self.quant_storage, "NF4 quant_storage", _STORAGE)
        skip = (self.skip_modules,) if isinstance(self.skip_modules, str) else tuple(self.skip_modules or ())
        if not all(isinstance(s, str) and s for s in skip):
            raise ValueError(f"NF4: skip_modules must be layer names (strings), got {self.skip_modules!r}.")
        self.skip_modules = skip

    def dtype_for(self, device: torch.device | str) -> torch.dtype:
        """The compute dtype a layer starts with on ``device``: the configured one, else bf16 on CUDA and fp32
        elsewhere (with ``compute_dtype`` None each forward then follows the run's precision)."""
        if self.compute_dtype is not None:
            return parse_dtype(self.compute_dtype)
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32

    @property
    def storage_dtype(self) -> torch.dtype:
        return parse_dtype(self.quant_storage, extra=_STORAGE) if self.quant_storage else torch.uint8

    def skips(self, name: str) -> bool:
        """True if layer ``name`` is in ``skip_modules`` (whole name or a run of its dotted parts)."""
        return any(f".{s}." in f".{name}." for s in self.skip_modules)


def unsupported_shape(layer: nn.Linear, blocksize: int) -> str | None:
    """Why bitsandbytes cannot hold ``layer`` in NF4 correctly on every device, or None if it can."""
    if layer.in_features == 0 or layer.out_features == 0:
        return "it has no weights"
    if layer.in_features % blocksize:
        return (f"in_features {layer.in_features} is not a multiple of blocksize {blocksize} (bitsandbytes' CPU "
                "dequantize kernel misreads blocks that straddle rows)")
    return None


def quantize(model: nn.Module, nf4: NF4 | None = None, device: torch.device | str | None = None) -> nn.Module:
    """Replace every eligible ``nn.Linear`` of ``model`` by a bitsandbytes NF4 ``Linear4bit``, in place.

    MoE expert stacks are quantized too, each expert its own blocks (``nf4_experts.py``), once the probe of the
    experts' forward that runs them has passed (``core/experts_dispatch.py``). Skipped, with one log line: layers
    and stacks named in ``nf4.skip_modules``, GPT-2 ``Conv1D`` layers (not ``nn.Linear``), shapes bitsandbytes
    mishandles (``unsupported_shape``), experts that do not dispatch. Already-quantized layers are left as they are.

    Args:
        device: where the quantized layers live and quantization runs (default: each weight's current device).

    Raises:
        ValueError: the model already has adapters (quantize before ``inject``), weights are on the meta device, or
            the experts' forward fails its probe (the message names the model type). The model is then unchanged.
    """
    import bitsandbytes as bnb  # lazy: importing bitsandbytes takes seconds

    nf4 = nf4 or NF4()
    if not isinstance(nf4, NF4):
        raise TypeError(f"quantize: expected an NF4 config, got {type(nf4).__name__}.")
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ValueError("quantize: the model already has adapters; quantize the base first, then inject "
                         "(DoRA magnitudes and merges are taken from the weights at injection time).")
    plan, kept = [], {}
    already = sum(1 for m in model.modules() if is_quantized(m))  # e.g. quantized layer by layer by LoftQ's init
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or is_quantized(module):
            kind = kind_of(module)
            if kind is not None and kind.linear and not kind.quantized:
                kept[name] = f"{type(module).__name__} ({kind.name}) is not nn.Linear"
            continue
        why = "in skip_modules" if nf4.skips(name) else unsupported_shape(module, nf4.blocksize)
        if why is None and module.weight.is_meta:
            raise ValueError(f"quantize: {name!r} has its weights on the meta device; load the weights first.")
        if why:
            kept[name] = why
        else:
            plan.append((name, module))
    stacks, kept_stacks = plan_stacks(model, nf4)  # MoE expert stacks (nf4_experts.py)
    kept.update(kept_stacks)
    if stacks:
        use_experts_dispatch(model)  # the experts' forward that runs NF4 stacks, once proved; raises: model unchanged
    new = {name: _nf4_linear(bnb, module, nf4, device) for name, module in plan}
    for name, layer in new.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    quantize_stacks(stacks, nf4, device)
    how = f"(blocksize {nf4.blocksize}, double_quant={nf4.double_quant})"
    experts = f" and {len(stacks)} MoE expert stacks (each expert its own blocks)" if stacks else ""
    if already and not new and not stacks:
        done = f"the base is NF4: {already} linear layers {how}"
    else:
        done = f"{len(new)} linear layers{experts} to NF4 {how}" + (f", {already} were NF4 already" if already else "")
    log.info(f"quantize: {done}" + "".join(f"\n  kept {n!r}: {why}" for n, why in kept.items()))
    return model


def _nf4_linear(bnb, linear: nn.Linear, nf4: NF4, device: torch.device | str | None) -> nn.Module:
    device = torch.device(device) if device is not None else linear.weight.device
    layer = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=nf4.dtype_for(device),
        compress_statistics=nf4.double_quant, quant_type="nf4", quant_storage=nf4.storage_dtype, device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.detach().contiguous(), requires_grad=False, blocksize=nf4.blocksize,
        compress_statistics=nf4.double_quant, quant_type="nf4", quant_storage=nf4.storage_dtype, module=layer,
    ).to(device)  # Params4bit quantizes on its first move
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=linear.bias.requires_grad)
    layer.support_avx512bf16_for_cpu = False  # see module docstring: the fused CPU eval path breaks training
    if nf4.compute_dtype is None:  # follow the run's precision (autocast dtype, else the input's), wherever it runs
        layer.register_forward_pre_hook(_auto_compute_dtype)
    layer.train(linear.training)
    return layer


def nf4_layer(weight: Tensor, like: nn.Linear, nf4: NF4) -> nn.Module:
    """A bitsandbytes NF4 layer holding ``weight`` (out, in), with ``like``'s bias, device and train/eval mode (the
    quantizer ``prepare`` hands to a start that chooses the base, e.g. LoftQ's)."""
    import bitsandbytes as bnb  # lazy: importing bitsandbytes takes seconds

    linear = nn.Linear(like.in_features, like.out_features, bias=like.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().to(like.weight.dtype).contiguous(), requires_grad=False)
    if like.bias is not None:
        linear.bias = like.bias
    linear.train(like.training)
    return _nf4_linear(bnb, linear, nf4, like.weight.device)


def _auto_compute_dtype(layer: nn.Module, args: tuple) -> None:
    """``compute_dtype`` None follows the run's precision at every forward: the autocast dtype when autocast is on
    (Lightning's ``bf16-mixed``, ``16-mixed``), else the input's float dtype (``bf16-true``, ``32-true``)."""
    x = args[0]
    if torch.is_autocast_enabled(x.device.type):
        layer.compute_dtype = torch.get_autocast_dtype(x.device.type)
    else:
        layer.compute_dtype = x.dtype if x.is_floating_point() else torch.float32


def quantized_layer_names(model: nn.Module) -> list[str]:
    """Names of the NF4 layers of ``model``; an adapted one is named by its ``AdapterLayer`` (as ``merge`` expects)."""
    names = []
    for name, module in model.named_modules():
        base = module.base_layer if isinstance(module, AdapterLayer) else module
        if is_quantized(base) and not (is_quantized(module) and name.endswith(".base_layer")):
            names.append(name)
    return names


def original_weights(source: str | os.PathLike | Mapping[str, Tensor] | nn.Module, names: Iterable[str]) -> dict[str, Tensor]:
    """The high-precision (out, in) weights of the linear layers ``names``, for ``merge(model, base_weights=...)``;
    an MoE expert stack's (``<experts module>.<stack>``) is its 3-D parameter, stored under its own name.

    ``source`` is a model folder (``*.safetensors``, sharded or not, read tensor by tensor), a state dict, or the
    unquantized model. A name may carry a wrapper prefix (``model.``): the longest suffix found in ``source`` is used.

    Raises:
        ValueError: a layer's weight is not in ``source``, or ``source`` holds it quantized.
    """
    names = list(names)
    if isinstance(source, nn.Module):
        table = {f"{n}.weight": dense_weight(m) for n, m in source.named_modules()
                 if kind_of(m) is not None and not is_quantized(m)}
        table.update({n: getattr(m, s) for n, (m, s) in expert_stacks(source).items()
                      if isinstance(getattr(m, s), nn.Parameter)})
        return {n: table[_find_key(n, table, "the given model")].detach() for n in names}
    if isinstance(source, Mapping):
        return {n: source[_find_key(n, source, "the given state dict")] for n in names}
    from safetensors import safe_open

    folder = Path(source)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else [folder]
    if not files or not all(f.is_file() for f in files):
        raise ValueError(f"original_weights: no *.safetensors in {str(folder)!r}; give the original model folder.")
    where = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), f))
    out = {}
    for n in names:
        key = _find_key(n, where, str(folder))
        with safe_open(str(where[key]), framework="pt") as handle:
            out[n] = handle.get_tensor(key)
    return out


def _find_key(name: str, table: Mapping[str, object], what: str) -> str:
    parts = f"{name}.weight".split(".")
    keys = [".".join(parts[i:]) for i in range(len(parts) - 1)]
    keys += [".".join(parts[i:-1]) for i in range(len(parts) - 2)]  # an expert stack: the parameter's own name
    for key in keys:
        if key in table:
            if str(getattr(table[key], "dtype", "")) in ("torch.uint8", "torch.int8") or f"{key}.absmax" in table:
                raise ValueError(f"original_weights: {key!r} in {what} is quantized; give the high-precision source.")
            return key
    raise ValueError(f"original_weights: no weight for layer {name!r} in {what} (looked for {name}.weight and its "
                     f"suffixes; e.g. {list(table)[:3]}).")


def _example() -> tuple[nn.Module, Tensor]:
    """A tiny NF4 linear (in 64 = one block per row) and an input, for the contract tests."""
    torch.manual_seed(0)
    holder = quantize(nn.Sequential(nn.Linear(64, 32)))
    return holder[0], torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(1))


NF4_KIND = register_kind(dataclasses.replace(NF4_LINEAR, example=_example))
