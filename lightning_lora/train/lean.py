"""Lean saved activations: RMSNorm, SwiGLU and the rotary embedding as autograd functions that save their inputs
and recompute the cheap elementwise parts in backward (Liger-Kernel's approach, Hsu et al. 2024, arXiv:2410.10989).

Per token, a Llama decoder layer run by PyTorch's autograd keeps for backward (h hidden, m intermediate size):

    RMSNorm  y = w * x r,  r = 1 / sqrt(mean(x^2) + eps):   x and r (in bf16 also an fp32 copy of x)
    SwiGLU   p = silu(g) * u,  g = W_gate y, u = W_up y:    g, silu(g), u            (3 m values)
    RoPE     q' = q cos + rot(q) sin, rot(q) = [-q2, q1]:   cos and sin (shared by every layer)

and the layers that read these outputs keep them too: the adapters of q/k/v keep y, down_proj's keeps p. The
functions here keep only what their backward cannot cheaply rebuild:

    RMSNorm: x and r;  backward runs autograd's own ops (dr = sum(w dy x), d mean(x^2) = -r^3 dr / 2, ...).
    SwiGLU:  g and u;  du = dp silu(g), dg = silu'(g) (dp u), with silu(g) recomputed.
    RoPE:    cos and sin;  dq = dq' cos + rot^T(dq' sin), rot^T(z) = [z2, -z1].

Each runs the ops of the module it replaces in the same order: forward bitwise equal, backward equal to rounding.
Their outputs are also *recomputable*: inside ``saving_lean()`` (``causal_lm_loss`` enters it), a norm output or a
SwiGLU product that a later layer saves for backward is kept as its recipe (the function's own saved inputs) and
rebuilt, bitwise, when backward needs it. Per token and layer that drops y twice and p: with SwiGLU's own saving,
2 h + 2 m of the ~9 h + 4 m values a SmolLM2 layer keeps in fp32. No recipes under autocast. Under torch.compile
(``compiling.py``) the three run their plain forward ops, traced without a graph break, and inductor's partitioner
decides what to keep and recompute.

On CUDA with Liger-Kernel installed, its Triton kernels (the same saved tensors) run instead, without recipes.
Which modules of a model run these functions is decided by a probe (``lean_swap.py``).
"""

from __future__ import annotations

import contextlib
import importlib
import weakref
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

_RECIPES: dict[tuple, tuple] = {}  # identity of an output -> (weakref to it, rebuild, inputs, their versions)


def _identity(t: Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t._version)


def _versions(inputs: tuple) -> tuple:
    return tuple(i._version if isinstance(i, Tensor) else None for i in inputs)


def _register(out: Tensor, rebuild: Callable[..., Tensor], *inputs) -> Tensor:
    """Note that ``out`` is ``rebuild(*inputs)`` bitwise, so a later layer that saves it may keep the recipe."""
    if out.requires_grad and not torch.is_autocast_enabled(out.device.type) and not torch.compiler.is_compiling():
        key = _identity(out)
        _RECIPES[key] = (weakref.ref(out, lambda _, key=key: _RECIPES.pop(key, None)), _Recipe(rebuild, inputs))
    return out


class _Recipe:
    """A saved output kept as the function that rebuilds it and that function's inputs. Every layer that saved the
    output holds this one object, so backward rebuilds it once for all of them (q, k and v read one norm output)."""

    __slots__ = ("rebuild", "inputs", "versions", "built")

    def __init__(self, rebuild, inputs):
        self.rebuild, self.inputs, self.versions = rebuild, inputs, _versions(inputs)
        self.built: Tensor | None = None  # freed with this object, when the last layer that saved it has run backward

    def get(self) -> Tensor:
        if self.built is None:
            if _versions(self.inputs) != self.versions:
                raise RuntimeError("lean activations: an input of a recomputed activation was modified in place "
                                   "after the forward; call use_lean_activations(model, enabled=False) for this model.")
            with torch.no_grad():
                self.built = self.rebuild(*self.inputs)
        return self.built


def _hooks(outer: tuple | None) -> tuple[Callable, Callable]:
    """Pack/unpack hooks that keep recipes and hand every other tensor to the ``outer`` hooks (offloading)."""
    outer_pack, outer_unpack = outer or (None, None)

    def pack(t):
        entry = _RECIPES.get(_identity(t)) if isinstance(t, Tensor) else None
        if entry is not None and entry[0]() is not None:
            return entry[1]
        return outer_pack(t) if outer_pack else t

    def unpack(packed):
        if not isinstance(packed, _Recipe):
            return outer_unpack(packed) if outer_unpack else packed
        return packed.get()

    return pack, unpack


@contextlib.contextmanager
def saving_lean() -> Iterator[None]:
    """Inside, saved tensors that are outputs of this module's functions are kept as their recipes; other saved
    tensors go to the saved-tensor hooks active outside (if any: activation offloading) as before."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:  # cannot see the outer hooks: keep everything as it is
        yield
        return
    with torch.autograd.graph.saved_tensors_hooks(*_hooks(top(False))):
        yield


def _liger(name: str):
    """Liger-Kernel's ``liger_kernel.ops.<name>`` module, or None when it is not installed."""
    try:
        return importlib.import_module(f"liger_kernel.ops.{name}")
    except ImportError:
        return None


# ------------------------------------------------------------------------------------------------------ RMSNorm
def _norm_out(xf: Tensor, r: Tensor, weight: Tensor, offset: float, cast_last: bool, dtype: torch.dtype) -> Tensor:
    """Llama: w * (x r).to(dtype); ``cast_last``: (w * x r).to(dtype) (OLMo-2, gpt-oss; Gemma: (x r (1 + w)))."""
    if offset:
        return ((xf * r) * (offset + weight.float())).to(dtype)
    if cast_last:
        return (weight * (xf * r)).to(dtype)
    return weight * (xf * r).to(dtype)


def _rebuild_norm(x: Tensor, r: Tensor, weight: Tensor, offset: float, cast_last: bool) -> Tensor:
    return _norm_out(x.to(torch.float32), r, weight, offset, cast_last, x.dtype)


class _RMSNorm(torch.autograd.Function):
    """(y, r): y = w * x r, r = rsqrt(mean(x^2) + eps) (module docstring); saves x, r and w.

    x comes twice: in fp32 autograd adds x's gradient through x r and through mean(x^2) to the residual stream's
    one by one, in that order; two inputs keep that order, so the sum rounds exactly as the module's does.
    """

    @staticmethod
    def forward(ctx, x: Tensor, x_again: Tensor, weight: Tensor, eps: float, offset: float, cast_last: bool):
        xf = x.to(torch.float32)
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, r, weight)
        ctx.offset, ctx.cast_last = offset, cast_last
        ctx.mark_non_differentiable(r)
        return _norm_out(xf, r, weight, offset, cast_last, x.dtype), r

    @staticmethod
    def backward(ctx, dy: Tensor, _dr):
        x, r, weight = ctx.saved_tensors
        offset, cast_last = ctx.offset, ctx.cast_last
        xf = x.to(torch.float32)
        late = bool(offset or cast_last)  # the cast to x's dtype comes after the product with w
        w = offset + weight.float() if offset else weight
        dh = dy.to(torch.float32) * w if late else (dy * w).to(torch.float32)  # d(x r), as autograd orders it
        dx = dh * r
        dr = (dh * xf).sum(-1, keepdim=True)
        dvar = -0.5 * dr * r.pow(3)  # rsqrt's derivative, then mean's and pow's
        dx_var = dvar.expand_as(xf) / xf.shape[-1] * (2 * xf)
        if x.dtype == torch.float32:  # x is x r's own input: two gradients, added by autograd (class docstring)
            dx, dx_again = dx, dx_var
        else:  # an fp32 copy of x was: its gradient is the sum, cast back
            dx, dx_again = (dx + dx_var).to(x.dtype), None
        dw = None
        if ctx.needs_input_grad[2]:
            h = xf * r if late else (xf * r).to(x.dtype)
            dw = ((dy.to(torch.float32) if late else dy) * h).reshape(-1, h.shape[-1]).sum(0).to(weight.dtype)
        return dx, dx_again, dw, None, None, None


def rms_norm(x: Tensor, weight: Tensor, eps: float, offset: float = 0.0, cast_last: bool = False) -> Tensor:
    """RMSNorm keeping only x and 1/rms for backward; Liger's kernel on CUDA when installed. Under torch.compile
    the module's own ops (the compiler chooses what to keep)."""
    if torch.compiler.is_compiling():
        xf = x.to(torch.float32)
        return _norm_out(xf, torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps), weight, offset, cast_last, x.dtype)
    liger = _liger("rms_norm") if x.is_cuda else None
    if liger is not None:
        mode = "gemma" if offset or cast_last else "llama"
        return liger.LigerRMSNormFunction.apply(x, weight, eps, offset, mode, False)
    y, r = _RMSNorm.apply(x, x, weight, eps, offset, cast_last)
    return _register(y, _rebuild_norm, x, r, weight, offset, cast_last)


# ------------------------------------------------------------------------------------------------------- SwiGLU
def _silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate).mul_(up)


class _SwiGLU(torch.autograd.Function):
    """p = silu(g) * u; saves g and u."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return _silu_mul(gate, up)

    @staticmethod
    def backward(ctx, dp: Tensor):
        gate, up = ctx.saved_tensors
        d_gate = torch.ops.aten.silu_backward(dp * up, gate) if ctx.needs_input_grad[0] else None
        d_up = dp * F.silu(gate) if ctx.needs_input_grad[1] else None
        return d_gate, d_up


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up keeping only gate and up for backward; Liger's kernel on CUDA when installed. Under
    torch.compile the plain ops."""
    if torch.compiler.is_compiling():
        return F.silu(gate) * up
    liger = _liger("swiglu") if gate.is_cuda else None
    if liger is not None:
        return liger.LigerSiLUMulFunction.apply(gate, up)
    return _register(_SwiGLU.apply(gate, up), _silu_mul, gate, up)


# --------------------------------------------------------------------------------------------- rotary embedding
def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate_half_t(z: Tensor) -> Tensor:
    half = z.shape[-1] // 2
    return torch.cat((z[..., half:], -z[..., :half]), dim=-1)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x cos + rot(x) sin on the first cos.shape[-1] features of each head; the rest passes (partial rotary)."""
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return (x * cos) + (_rotate_half(x) * sin)
    return torch.cat([(x[..., :d] * cos) + (_rotate_half(x[..., :d]) * sin), x[..., d:]], dim=-1)


def _rope_t(g: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    d = cos.shape[-1]
    if d == g.shape[-1]:
        return (g * cos) + _rotate_half_t(g * sin)
    return torch.cat([(g[..., :d] * cos) + _rotate_half_t(g[..., :d] * sin), g[..., d:]], dim=-1)


class _Rotary(torch.autograd.Function):
    """(q', k') = (q cos + rot(q) sin, k cos + rot(k) sin); saves cos and sin."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor):
        ctx.save_for_backward(cos, sin)
        return _rope(q, cos, sin), _rope(k, cos, sin)

    @staticmethod
    def backward(ctx, dq: Tensor, dk: Tensor):
        cos, sin = ctx.saved_tensors
        dq = None if dq is None or not ctx.needs_input_grad[0] else _rope_t(dq, cos, sin)
        dk = None if dk is None or not ctx.needs_input_grad[1] else _rope_t(dk, cos, sin)
        return dq, dk, None, None


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    """Hugging Face's ``apply_rotary_pos_emb`` keeping only cos and sin for backward; Liger's kernel on CUDA when
    installed (full rotary only); under torch.compile the plain ops."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    if torch.compiler.is_compiling():  # the plain ops: the compiler chooses what to keep
        return _rope(q, cos, sin), _rope(k, cos, sin)
    liger = _liger("rope") if q.is_cuda and cos.shape[-1] == q.shape[-1] else None
    if liger is not None:
        return liger.LigerRopeFunction.apply(q, k, cos.squeeze(unsqueeze_dim), sin.squeeze(unsqueeze_dim), None,
                                             unsqueeze_dim)
    return _Rotary.apply(q, k, cos, sin)


__all__ = ["rms_norm", "rotary", "saving_lean", "swiglu"]
