"""Sibling LoRA layers that read the same input tensor share one A GEMM (forward and backward).

q, k and v read the same hidden states, as do gate and up. Their LoRA down-projections are then one GEMM

    h_cat = x [A_q; A_k; A_v]^T,   h_q, h_k, h_v = split(h_cat)   (r_q, r_k, r_v columns)

and each layer adds ``s_i * h_i B_i^T`` to its own output. Backward does one grad_x GEMM ``[g_q, g_k, g_v] [A_q; A_k;
A_v]`` and one grad_A GEMM for the group, instead of one of each per layer plus the adds autograd needs to sum the
per-layer input gradients. It is the same sum in another order: exact up to float rounding.

Discovery, at run time: every eligible LoRA call (a linear kind, no dropout in effect, a non-inference input) is noted
in a per-thread slot keyed by a weak reference to the input tensor, its version counter, the grad mode and the
adapter dtype/device (as VeRA's shared projection). The branches that read the same input form the observed group.
A group is used from the forward after the backward that follows its observation: changes to the table are staged
and committed by an autograd callback at the end of a backward pass, so an activation-checkpointing recompute always
takes the same path as the forward it replays. A member that does not come (disabled, another input) gets ``None``
as its A gradient, as in the unfused path; a member whose A changed since the group GEMM computes on its own.
Dropout (each layer draws its own mask, as PEFT does) and per-sample adapters (each layer gets its own rows) never
fuse.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import Tensor, nn

# Off by default: the fused sum is the unfused one in another order, so it rounds differently (~1e-6 in fp32), and a
# group is used only from the step after the first backward; a run resumed from a checkpoint therefore takes the
# unfused path at a step where the uninterrupted run took the fused one, and the two stop being bit-identical
# (tests/test_distributed.py's resume tests). No speed-up was measurable on this project's CPU machine either
# (BENCHMARKS.md). ``siblings.ENABLED = True`` turns it on.
ENABLED = False
_GROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # leader branch -> tuple of weakrefs to members
_STAGED: dict[int, tuple] = {}  # id(leader) -> (weakref to leader, tuple of weakrefs to members)


class _Slot(threading.local):
    x_ref = None  # weakref to the input of the current slot
    key: tuple | None = None
    seen: list | None = None  # branches that read this input, in order
    parts: dict | None = None  # id(branch) -> (h part, A, A._version) precomputed by the leader
    hook_wanted = False


_SLOT = _Slot()


def _commit() -> None:
    for leader_ref, members in list(_STAGED.values()):
        leader = leader_ref()
        if leader is not None:
            if len(members) > 1:
                _GROUPS[leader] = members
            else:
                _GROUPS.pop(leader, None)
    _STAGED.clear()


def _queue_commit(*_):
    torch.autograd.Variable._execution_engine.queue_callback(_commit)


def _close_slot() -> None:
    """Stage what the closing slot observed, unless it agrees with (or is a truncation of) the committed group."""
    seen = _SLOT.seen
    if not seen:
        return
    leader = seen[0]
    committed = tuple(r() for r in _GROUPS.get(leader, ()))
    observed = tuple(seen)
    if observed != committed and not (len(observed) < len(committed) and committed[: len(observed)] == observed):
        if len(observed) > 1 or committed:
            _STAGED[id(leader)] = (weakref.ref(leader), tuple(weakref.ref(b) for b in observed))
            _SLOT.hook_wanted = True  # a checkpoint recompute may stop early: truncations are never staged


class _GroupDown(torch.autograd.Function):
    """(h_1, ..., h_n) = split(x [A_1; ...; A_n]^T); backward: one grad_x GEMM, one grad_A GEMM."""

    @staticmethod
    def forward(ctx, x: Tensor, *As: Tensor):
        ctx.set_materialize_grads(False)
        A_cat = torch.cat(As) if len(As) > 1 else As[0]
        h = torch.mm(x.reshape(-1, x.shape[-1]).to(A_cat.dtype), A_cat.t())
        ctx.ranks = [A.shape[0] for A in As]
        ctx.save_for_backward(x, *As)
        return tuple(h.split(ctx.ranks, dim=1))

    @staticmethod
    def backward(ctx, *grads):
        x, *As = ctx.saved_tensors
        present = [g is not None for g in grads]
        if not any(present):
            return (None,) * (1 + len(As))
        g_cat = torch.cat(
            [g if g is not None else x.new_zeros(x.numel() // x.shape[-1], r, dtype=As[0].dtype)
             for g, r in zip(grads, ctx.ranks)], dim=1,
        )  # fmt: skip
        grad_x, grad_As = None, [None] * len(As)
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g_cat, torch.cat(As) if len(As) > 1 else As[0]).view(x.shape).to(x.dtype)
        if any(ctx.needs_input_grad[1:]):
            x2 = x.reshape(-1, x.shape[-1]).to(As[0].dtype)
            grad_A = torch.mm(g_cat.t(), x2).split(ctx.ranks)
            grad_As = [ga if (ok and need) else None for ga, ok, need in zip(grad_A, present, ctx.needs_input_grad[1:])]
        return (grad_x, *grad_As)


def add_up(base_out: Tensor, h: Tensor, B: Tensor, scale: float, inplace: bool) -> Tensor:
    """``base_out + scale * h B^T`` for h (N, r), base_out (..., out): one ``addmm``, into ``base_out`` itself when
    ``inplace`` (the caller then marks it dirty)."""
    if inplace:
        base_out.view(-1, base_out.shape[-1]).addmm_(h, B.t(), alpha=scale)
        return base_out
    return torch.addmm(base_out.reshape(-1, base_out.shape[-1]), h, B.t(), alpha=scale).view(base_out.shape)


class _LoRAUp(torch.autograd.Function):
    """out = base_out + s * h B^T for a precomputed h (N, r); in place into base_out when ``inplace``."""

    @staticmethod
    def forward(ctx, h: Tensor, base_out: Tensor, B: Tensor, scale: float, inplace: bool) -> Tensor:
        out = add_up(base_out, h, B, scale, inplace)
        if inplace:
            ctx.mark_dirty(base_out)
        ctx.scale = scale
        ctx.save_for_backward(h, B)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        h, B = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        need_h, need_base, need_B = ctx.needs_input_grad[:3]
        grad_h = torch.mm(g, B).mul_(ctx.scale) if need_h else None
        grad_B = torch.mm(g.t(), h).mul_(ctx.scale) if need_B else None
        return grad_h, (grad_out if need_base else None), grad_B, None, None


def _eligible(branch: nn.Module, x: Tensor, dtype: torch.dtype) -> bool:
    A = branch.lora_A
    return (
        branch.fused and not (branch.training and branch.p > 0.0)
        and A.dtype == dtype and A.device == x.device and A.ndim == 2 and A.shape[1] == x.shape[-1]
    )  # fmt: skip


def shared_down(branch: nn.Module, x: Tensor) -> Tensor | None:
    """h = A x for ``branch`` from its sibling group's one GEMM, or None: then the caller runs its own path.

    Every call also notes ``branch`` as a reader of ``x`` (see the module docstring).
    """
    if not ENABLED or x.is_inference() or not x.is_floating_point():
        return None
    A = branch.lora_A
    key = (x._version, A.dtype, x.device, torch.is_grad_enabled(), torch.is_inference_mode_enabled())
    slot = _SLOT
    same = slot.x_ref is not None and slot.x_ref() is x and slot.key == key
    if same and not any(b is branch for b in slot.seen):  # a branch seen twice starts a new round (same x again)
        slot.seen.append(branch)
        part = slot.parts.pop(id(branch), None)
        if part is not None and part[1] is A and part[2] == A._version:
            return part[0]
        return None
    _close_slot()
    slot.x_ref, slot.key, slot.seen, slot.parts = weakref.ref(x), key, [branch], {}
    members = [r() for r in _GROUPS.get(branch, ())]
    members = [m for m in members if m is not None and (m is branch or _eligible(m, x, A.dtype))]
    if len(members) < 2 or members[0] is not branch:
        return None
    hs = _GroupDown.apply(x, *(m.lora_A for m in members))
    slot.parts = {id(m): (h, m.lora_A, m.lora_A._version) for m, h in zip(members[1:], hs[1:])}
    return hs[0]


def lora_up(h: Tensor, base_out: Tensor, B: Tensor, scale: float) -> Tensor:
    """``base_out + scale * h B^T`` in the adapter's dtype (cast back to ``base_out``'s), in place when it can be."""
    out_dtype = base_out.dtype
    if out_dtype != B.dtype:
        base_out = base_out.to(B.dtype)
    inplace = base_out.is_contiguous() and base_out._base is None
    out = _LoRAUp.apply(h, base_out, B, scale, inplace)
    if _SLOT.hook_wanted and out.grad_fn is not None:
        out.grad_fn.register_prehook(_queue_commit)
        _SLOT.hook_wanted = False
    return out if out.dtype == out_dtype else out.to(out_dtype)


def note_output(out: Tensor) -> Tensor:
    """Ask for a commit at the end of the backward through ``out`` when the table has staged changes."""
    if _SLOT.hook_wanted and out.grad_fn is not None:
        out.grad_fn.register_prehook(_queue_commit)
        _SLOT.hook_wanted = False
    return out
