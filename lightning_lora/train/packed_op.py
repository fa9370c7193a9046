"""Attention on each example of packed rows: the loop over segments, and the same as one opaque operator.

``attend_segments`` runs scaled-dot-product attention on each segment of each row (``attention.py`` says which
tokens a segment sees). It loops in Python, so a compiled graph traced through it would hold the example boundaries
of one batch as constants, and every other packing would trace again. Under ``torch.compile`` (``compiling.py``),
``packed_attention`` calls ``lightning_lora::packed_sdpa`` instead: the same loop as one custom operator that reads
the boundaries from a tensor (``PackedSegments.table``), so one graph serves every packing.

Its backward is a second operator that rebuilds each segment's attention probabilities from q and k (FlashAttention's
backward, Dao et al. 2022, arXiv:2205.14135, section 3.1; one attention forward more per layer), so the operator keeps
only q, k and v for backward (not the output, nor k and v repeated for grouped-query heads). Attention dropout is
refused there: the recomputation would draw another mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# A row's segments: (start, end, prefix_start, prefix_length) per example; prefix_length 0 means "restarts at 0".
Segment = tuple[int, int, int, int]


def _repeat_heads(x: Tensor, groups: int) -> Tensor:
    """(b, kv_heads, L, d) -> (b, kv_heads * groups, L, d): each key/value head serves ``groups`` query heads."""
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def attend_segments(query: Tensor, key: Tensor, value: Tensor, rows: list[list[Segment]], dropout: float = 0.0,
                    scaling: float | None = None) -> Tensor:
    """(b, heads, L, d) query, (b, kv_heads, L, d) key/value -> (b, L, heads, d): sdpa on each segment of each row."""
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_heads(key, groups), _repeat_heads(value, groups)
    out_rows = []
    for b, segments in enumerate(rows):
        q, k, v = query[b : b + 1], key[b : b + 1], value[b : b + 1]
        outs = []
        for start, end, pre_start, pre_len in segments:
            if pre_len == 0:
                outs.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end],
                                                           dropout_p=dropout, scale=scaling, is_causal=True))
                continue
            keys = torch.cat([k[:, :, pre_start : pre_start + pre_len], k[:, :, start:end]], dim=2)
            values = torch.cat([v[:, :, pre_start : pre_start + pre_len], v[:, :, start:end]], dim=2)
            n = end - start
            mask = torch.ones(n, pre_len + n, dtype=torch.bool, device=q.device).tril(pre_len)
            outs.append(F.scaled_dot_product_attention(q[:, :, start:end], keys, values, attn_mask=mask,
                                                       dropout_p=dropout, scale=scaling))
        out_rows.append(torch.cat(outs, dim=2))
    return torch.cat(out_rows, dim=0).transpose(1, 2).contiguous()



@torch.library.custom_op("lightning_lora::packed_sdpa", mutates_args=())
def packed_sdpa(query: Tensor, key: Tensor, value: Tensor, table: Tensor, dropout: float,
                scaling: float | None) -> Tensor:
    """``attend_segments`` with the segments as an (n, 5) tensor (row, start, end, prefix start, prefix
    length): (b, heads, L, d) query, (b, kv_heads, L, d) key/value -> (b, L, heads, d)."""
    if dropout:
        raise ValueError("packed attention under torch.compile recomputes attention in backward, which would draw "
                         "another dropout mask; set the model's attention_dropout to 0 or compile=False.")
    return attend_segments(query, key, value, _rows(table, query.shape[0]), 0.0, scaling)


def _rows(table: Tensor, batch: int) -> list[list[tuple[int, int, int, int]]]:
    rows: list[list[tuple[int, int, int, int]]] = [[] for _ in range(batch)]
    for r, start, end, pre_start, pre_len in table.tolist():
        rows[r].append((start, end, pre_start, pre_len))
    return rows


@packed_sdpa.register_fake
def _(query, key, value, table, dropout, scaling):
    b, heads, n, d = query.shape
    return query.new_empty(b, n, heads, d)


@torch.library.custom_op("lightning_lora::packed_sdpa_backward", mutates_args=())
def packed_sdpa_backward(grad: Tensor, query: Tensor, key: Tensor, value: Tensor, table: Tensor,
                         scaling: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``packed_sdpa`` for query, key and value. Per segment, with S = q k^T s (masked), P = softmax(S),
    O = P v and dO the output's gradient (FlashAttention's backward, Dao et al. 2022, arXiv:2205.14135, eq. in 3.1):

        dv = P^T dO,   dS = P * (dO v^T - rowsum(dO * O)),   dq = dS k s,   dk = dS^T q s

    k and v rows of a shared prefix collect the gradients of every segment that reads them; grouped-query heads are
    summed back to their key/value head."""
    groups = query.shape[1] // key.shape[1]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    k, v = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    do = grad.transpose(1, 2)  # (b, heads, L, d)
    dq, dk, dv = torch.zeros_like(query), torch.zeros_like(k), torch.zeros_like(v)
    for r, start, end, pre_start, pre_len in table.tolist():
        idx = torch.cat([torch.arange(pre_start, pre_start + pre_len), torch.arange(start, end)]).to(query.device)
        q_s, k_s, v_s, do_s = query[r, :, start:end], k[r][:, idx], v[r][:, idx], do[r, :, start:end]
        n = end - start
        mask = torch.ones(n, pre_len + n, dtype=torch.bool, device=query.device).tril(pre_len)
        p = torch.softmax((q_s @ k_s.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf")), dim=-1)
        o_s = p @ v_s
        ds = p * (do_s @ v_s.transpose(-1, -2) - (do_s * o_s).sum(-1, keepdim=True))
        dq[r, :, start:end] = ds @ k_s * scale
        dk[r].index_add_(1, idx, ds.transpose(-1, -2) @ q_s * scale)
        dv[r].index_add_(1, idx, p.transpose(-1, -2) @ do_s)
    b, kv, n, d = key.shape
    return dq.contiguous(), dk.view(b, kv, groups, n, d).sum(2), dv.view(b, kv, groups, n, d).sum(2)


@packed_sdpa_backward.register_fake
def _(grad, query, key, value, table, scaling):
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)  # contiguous


def _setup(ctx, inputs, output) -> None:
    query, key, value, table, _, scaling = inputs
    ctx.save_for_backward(query, key, value, table)
    ctx.scaling = scaling


def _backward(ctx, grad):
    query, key, value, table = ctx.saved_tensors
    return (*packed_sdpa_backward(grad.contiguous(), query, key, value, table, ctx.scaling), None, None, None)


packed_sdpa.register_autograd(_backward, setup_context=_setup)


__all__ = ["Segment", "attend_segments", "packed_sdpa", "packed_sdpa_backward"]
