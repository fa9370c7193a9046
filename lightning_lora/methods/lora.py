"""LoRA and rsLoRA.

LoRA (Hu et al. 2021, arXiv:2106.09685, section 4.1): the frozen weight W (out x in) gets a trained low-rank update

    y = W x + s * B A dropout(x),   A: (r, in), B: (out, r),   s = alpha / r

A starts Kaiming-uniform (a = sqrt(5)), B at zero, so the model is unchanged at init. rsLoRA (Kalajdzievski 2023,
arXiv:2312.03732) uses s = alpha / sqrt(r), which keeps the update's scale stable as r grows.
On an embedding the roles flip (as in PEFT): y = E[ids] + s * (A^T[ids]) B^T with A: (r, vocab) zeros, B: (dim, r) normal.

The linear branch is one autograd function that saves only what backward needs: the input x (the base layer saves
the same tensor, so it costs nothing), the r-wide activation h = A dropout(x), and, with dropout, the kept-mask packed
8 per byte instead of a dropped copy of x. It adds into the base output in place (one ``addmm_``, no (N, out)
temporaries); without autograd (eval, ``torch.no_grad``) it is two plain GEMMs. Layers that read the same input
tensor (q/k/v, gate/up) share one A GEMM forward and backward instead (``siblings.py``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_lora.core.kinds import LayerKind
from lightning_lora.core.layer import AdapterBranch, AdapterConfig, in_own_precision, own_precision
from lightning_lora.methods import siblings


@dataclasses.dataclass
class LoRA(AdapterConfig):
    """LoRA adapter config: rank ``r``, scaling ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).

    Example::

        inject(model, LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    """

    r: int = 8
    alpha: float = 16.0
    rslora: bool = False
    init: str = "default"  # "default" | "gaussian" | "pissa" | "loftq": see INITS and lightning_lora/quant/prepare.py
    pissa_niter: int | None = None  # PiSSA: None = exact SVD; k = randomized SVD with k subspace iterations
    loftq_iters: int = 1  # LoftQ: alternating steps Q = NF4(W - s B A), (B, A) = top-r SVD of W - Q

    method: ClassVar[str] = "LoRA"
    peft_type: ClassVar[str] = "LORA"
    peft_suffixes: ClassVar[tuple[str, ...]] = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_rank(self.r)
        if not self.alpha > 0:
            raise ValueError(f"{self.method}: alpha must be > 0, got {self.alpha}.")
        check_init(self)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    @classmethod
    def supports(cls, kind: LayerKind) -> bool:
        return True  # every kind in the table: linear, GPT-2 Conv1D, embedding, conv1d/2d/3d, NF4

    @classmethod
    def examples(cls) -> list[LoRA]:
        return [cls(r=4, alpha=8.0), cls(r=4, alpha=8.0, rslora=True)]

    def build(self, base_layer: nn.Module, shared: object = None, name: str = "") -> LoRABranch:
        return LoRABranch(self, base_layer)

    @classmethod
    def from_peft(cls, peft_config: dict) -> LoRA | None:
        if cls is not LoRA or peft_config.get("peft_type") != "LORA" or peft_config.get("use_dora"):
            return None
        return cls(**cls._peft_fields(peft_config))

    @staticmethod
    def _peft_fields(peft_config: dict) -> dict:
        return dict(
            r=int(peft_config["r"]),
            alpha=float(peft_config.get("lora_alpha", 8)),
            dropout=float(peft_config.get("lora_dropout", 0.0)),
            rslora=bool(peft_config.get("use_rslora", False)),
        )

    def activation_bytes(self, n_in: int, n_out: int, act_bytes: int, adapter_bytes: int) -> int:
        """h = A x (r wide); an adapter dtype other than the activations' adds the input cast to it."""
        return act_bytes * self.r + (adapter_bytes * n_in if adapter_bytes != act_bytes else 0)

    def to_peft(self, targets: list[str], layers: Mapping[str, AdapterBranch] | None = None) -> dict:
        return {
            "peft_type": "LORA",
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.rslora,
            "use_dora": False,
            "target_modules": targets,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
            "task_type": None,
        }


INITS = ("default", "gaussian", "pissa", "loftq")


def check_init(config: LoRA) -> None:
    """Validate ``init``, ``pissa_niter`` and ``loftq_iters`` (their meaning: ``lightning_lora/quant/prepare.py``)."""
    if config.init not in INITS:
        raise ValueError(f"{config.method}: init must be one of {INITS}, got {config.init!r}.")
    niter = config.pissa_niter
    if niter is not None and (isinstance(niter, bool) or not isinstance(niter, int) or niter < 0):
        raise ValueError(f"{config.method}: pissa_niter must be None (exact SVD) or an integer >= 0, got {niter!r}.")
    iters = config.loftq_iters
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"{config.method}: loftq_iters must be an integer >= 1, got {iters!r}.")


_BIT_SHIFTS: dict[torch.device, Tensor] = {}


def _shifts(device: torch.device) -> Tensor:
    if device not in _BIT_SHIFTS:
        _BIT_SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return _BIT_SHIFTS[device]


def _pack_bits(mask: Tensor) -> Tensor:
    """A bool tensor as uint8, 8 elements per byte (little-endian bit order), padded to a multiple of 8."""
    flat = mask.reshape(-1).to(torch.uint8)
    if flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(8 - flat.numel() % 8)])
    return (flat.view(-1, 8) << _shifts(mask.device)).sum(1, dtype=torch.uint8)  # distinct bits: sum == or


def _unpack_bits(bits: Tensor, shape: torch.Size) -> Tensor:
    flat = ((bits.unsqueeze(1) >> _shifts(bits.device)) & 1).view(-1)
    return flat[: shape.numel()].view(shape).bool()


class _LoRALinear(torch.autograd.Function):
    """out = base_out + s * (dropout(x) A^T) B^T for x (..., in), base_out (..., out).

    Saves x (the base layer saves the same tensor), h = A dropout(x) (N, r) and, with dropout, the kept-mask packed
    8 per byte (1/32 of x in fp32); 1/(1-p) is applied to r-wide tensors, so no dropped copy of x is ever kept.
    With ``inplace`` the sum is written into ``base_out`` (marked dirty), which saves an (N, out) allocation.
    """

    @staticmethod
    def forward(ctx, x: Tensor, base_out: Tensor, A: Tensor, B: Tensor, scale: float, p: float, inplace: bool) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(A.dtype)  # a temporary when x is bf16/fp16: x itself is what is saved
        bits = None
        if p > 0.0:
            mask = torch.empty(x2.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)
            h = torch.mm(x2 * mask, A.t()).mul_(1.0 / (1.0 - p))
            bits = _pack_bits(mask)
        else:
            h = torch.mm(x2, A.t())
        out = siblings.add_up(base_out, h, B, scale, inplace)
        if inplace:
            ctx.mark_dirty(base_out)
        ctx.scale, ctx.p = scale, p
        ctx.save_for_backward(x, bits, h, A, B)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        with own_precision(grad_out):  # backward called inside an autocast block: still the adapter's dtype
            return _LoRALinear._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: Tensor):
        x, bits, h, A, B = ctx.saved_tensors
        scale, p = ctx.scale, ctx.p
        need_x, need_base, need_A, need_B = ctx.needs_input_grad[:4]
        g = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1]).to(A.dtype)
        mask = None if bits is None else _unpack_bits(bits, x2.shape)
        grad_x = grad_A = grad_B = None
        if need_x or need_A:  # d out / d (A x_kept) = s * g B, times 1/(1-p) for the dropout rescale
            grad_h = torch.mm(g, B).mul_(scale if mask is None else scale / (1.0 - p))
            if need_A:
                grad_A = torch.mm(grad_h.t(), x2 if mask is None else x2 * mask)
            if need_x:
                grad_x = torch.mm(grad_h, A)
                if mask is not None:
                    grad_x.mul_(mask)
                grad_x = grad_x.view(x.shape).to(x.dtype)
        if need_B:
            grad_B = torch.mm(g.t(), h).mul_(scale)
        return grad_x, (grad_out if need_base else None), grad_A, grad_B, None, None, None


def lora_linear(
    x: Tensor, base_out: Tensor, A: Tensor, B: Tensor, scale: float, p: float, inplace: bool = False
) -> Tensor:
    """``base_out + scale * B A dropout_p(x)`` over any leading dims, in the adapter's dtype (cast back to
    ``base_out``'s). Without autograd (eval, ``torch.no_grad``) it is two plain GEMMs, the second accumulating into
    the output. ``inplace=True`` lets the sum overwrite ``base_out``: only for a caller that owns it and never reads
    it again (``LoRABranch``; DoRA reuses its base output, so it must not).
    """
    n_in = x.shape[-1]
    out_dtype = base_out.dtype
    if out_dtype != A.dtype:  # mixed precision: compute in the adapter's dtype on a fresh copy, cast back at the end
        base_out = base_out.to(A.dtype)
    inplace = inplace and base_out.is_contiguous()
    if p == 0.0 and not (
        torch.is_grad_enabled() and (x.requires_grad or base_out.requires_grad or A.requires_grad or B.requires_grad)
    ):
        out = siblings.add_up(base_out, torch.mm(x.reshape(-1, n_in).to(A.dtype), A.t()), B, scale, inplace)
    else:
        inplace = inplace and base_out._base is None  # autograd cannot rebase an in-place custom op on a view (GPT-2)
        out = _LoRALinear.apply(x, base_out, A, B, scale, p, inplace)  # casts x inside: the saved x is the layer's
    return out if out.dtype == out_dtype else out.to(out_dtype)


class LoRABranch(AdapterBranch):
    """LoRA on one layer: parameters ``lora_A`` and ``lora_B`` shaped by the layer kind (``kinds.py``): (r, in) and
    (out, r) on linear kinds, (r, in, *k) and (out, r, 1, ...) on convs (PEFT's layout)."""

    def __init__(self, config: LoRA, base_layer: nn.Module):
        super().__init__(config, base_layer)
        kind = self.kind
        shape_A, shape_B = kind.pair_shapes(base_layer, config.r)
        self.fused = kind.linear  # (..., in) -> (..., out): the fused GEMM path
        self.scale = config.scaling
        self.p = config.dropout
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(shape_A, device=device))
        self.lora_B = nn.Parameter(torch.empty(shape_B, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.kind.reversed_init:  # embeddings, as PEFT: A zeros, B normal
                nn.init.zeros_(self.lora_A)
                nn.init.normal_(self.lora_B)
            elif getattr(self.config, "init", "default") == "gaussian":  # as PEFT's init_lora_weights="gaussian"
                nn.init.normal_(self.lora_A, std=1.0 / self.config.r)
                nn.init.zeros_(self.lora_B)
            else:  # "default"; "pissa" and "loftq" overwrite A and B after injection (quant/prepare.py)
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B)

    @in_own_precision  # the adapter's own dtype under mixed precision (the base runs autocast)
    def forward(self, x: Tensor, base_out: Tensor, base_layer: nn.Module, weight: float = 1.0) -> Tensor:
        p = self.p if self.training else 0.0
        if self.fused:
            h = siblings.shared_down(self, x) if p == 0.0 else None  # q/k/v, gate/up: one A GEMM (siblings.py)
            if h is not None:
                return siblings.lora_up(h, base_out, self.lora_B, self.scale * weight)
            out = lora_linear(x, base_out, self.lora_A, self.lora_B, self.scale * weight, p, inplace=True)
            return siblings.note_output(out)
        x = x.to(self.lora_A.dtype) if x.is_floating_point() else x
        delta = self.kind.apply_pair(x, self.lora_A, self.lora_B, base_layer, p)
        return base_out + delta.mul_(self.scale * weight).to(base_out.dtype)

    def pair(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """(B, A) as 2-D matrices (out, r), (r, fan_in), optionally cast."""
        B, A = self.lora_B.reshape(self.lora_B.shape[0], -1), self.lora_A.reshape(self.lora_A.shape[0], -1)
        return (B, A) if dtype is None else (B.to(dtype), A.to(dtype))

    def merged_weight(self, weight: Tensor, base_layer: nn.Module, scale: float = 1.0) -> Tensor:
        """W + scale * s * B A in one fused GEMM (no dense delta temporary)."""
        B, A = self.pair(weight.dtype)
        if self.kind.transposed:
            return torch.addmm(weight, A.t(), B.t(), alpha=scale * self.scale)
        return torch.addmm(weight, B, A, alpha=scale * self.scale)

    def delta_weight(self, base_layer: nn.Module) -> Tensor:
        B, A = self.pair()
        delta = (B @ A) * self.scale  # (out, fan_in) or (dim, vocab)
        return delta.t() if self.kind.transposed else delta

    def peft_tensors(self) -> dict[str, Tensor]:
        name_A, name_B = self.kind.peft_pair
        return {name_A: self.lora_A, name_B: self.lora_B}

    def factors(self) -> tuple[Tensor, Tensor]:
        B, A = self.pair()
        return B * self.scale, A

    @torch.no_grad()
    def load_factors(self, B: Tensor, A: Tensor) -> None:
        """Set B (out, r) and A (r, fan_in) as 2-D matrices (conv kinds: reshaped to (out, r, 1, ...), (r, in, *k))."""
        self.lora_B.copy_(B.reshape(self.lora_B.shape))
        self.lora_A.copy_(A.reshape(self.lora_A.shape))

    def param_roles(self) -> dict[str, str]:
        if self.kind.reversed_init:  # embedding adapters: their own learning rate
            return {"lora_A": "embedding", "lora_B": "embedding"}
        return {"lora_A": "slow", "lora_B": "fast"}
