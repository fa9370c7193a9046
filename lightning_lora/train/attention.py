"""Attention for packed rows at each example's own cost, with an optional shared prompt prefix.

A packed row holds several examples end to end, their position ids restarting at 0 (``packing.py``). transformers
keeps attention inside each example with one block-diagonal (L x L) mask over the whole row (sdpa, eager): the kernel
still computes all L^2 scores and, with a mask on CPU, keeps them for backward, where the examples need only
sum_i L_i^2. ``packed_attention`` runs scaled-dot-product attention on each example's segment of the row instead
(causal, so torch's flash kernel where it has one), as FlashAttention-2's variable-length kernels (``cu_seqlens``) do
on GPUs; its cost and memory no longer grow with the row.

**Shared prefix** (``InstructionDataModule(share_prefix=True)``): the examples of a batch usually start with the same
tokens (the chat template's system prompt, often the same question). A row can then hold that prefix once, followed by
each example's remaining tokens, whose position ids continue at the prefix length p instead of restarting at 0. Such
a segment attends to the prefix, then causally to itself:

    O_i = softmax(Q_i [K_pre; K_i]^T / sqrt(d) + M) [V_pre; V_i],    M_{t,j} = -inf where j > p + t

(the causal mask aligned to the bottom right). The prefix's keys and values are those each example computes for its
own copy (same tokens, same positions), so logits, loss and gradients equal the unpacked ones; the prefix's gradient
is the sum of its copies'. A prefix-sharing row means nothing to transformers' own attention (it would cut each
example off its prefix), so ``causal_lm_loss`` refuses such rows unless the model runs ``packed_attention``.

How it plugs in: ``use_packed_attention(model)`` registers ``packed_attention`` with transformers'
``AttentionInterface`` under ``NAME`` (with sdpa's mask function) and selects it, but only after a one-time probe
shows that every attention layer of the model calls it and the logits do not move (``probe.py``); a model whose
attention does not dispatch that way (Falcon) is left as it was. ``causal_lm_loss`` finds the
segments of packed rows and passes them down the model's forward as the ``packed_segments`` keyword, which
transformers forwards to every attention call (also when gradient checkpointing recomputes a layer). Without that
keyword the function *is* sdpa: generation, padded batches and everything else run exactly as before. The loop over
segments lives in ``packed_op.py``; under ``torch.compile`` it runs as one custom operator there, so the compiled
graph does not depend on where a row's examples start. A model
left on its own attention trains packed rows only if that attention keeps the examples apart (probed by
``keeps_examples_apart``; gpt-oss's does not), and never with a shared prefix: ``causal_lm_loss`` refuses both by
model type.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_lora.train.packed_op import Segment, attend_segments, packed_sdpa
from lightning_lora.train.probe import Verdict, cached, differs, frozen_modes, logits, num_layers, probe_ids, verdict

NAME = "lightning_lora_packed"
KEY = "packed attention"  # the probe's verdict, cached per model (probe.py)


class PackedSegments:
    """The segments of each row of a packed batch (``segments``), and whether an attention call used them."""

    def __init__(self, rows: list[list[Segment]]):
        self.rows, self.used = rows, False
        # the same as one (n, 5) tensor (row, *segment): what a compiled layer reads (packed_op.py); its length is
        # dynamic, so that another number of examples does not recompile
        self.table = torch.tensor([(r, *seg) for r, row in enumerate(rows) for seg in row], dtype=torch.long)
        torch._dynamo.maybe_mark_dynamic(self.table, 0)

    @property
    def shares_prefix(self) -> bool:
        return any(seg[3] for row in self.rows for seg in row)


def find_segments(position_ids: Tensor) -> PackedSegments | None:
    """The examples of each row from its position ids: a new segment starts where a position is not the previous
    one + 1. A segment starting at p > 0 continues the first p tokens of the row's latest segment that started at 0
    (its shared prefix). None when every row holds a single example (nothing packed)."""
    pos = position_ids.detach().to("cpu", torch.long)
    if pos.ndim != 2:
        raise ValueError(f"position_ids must be (batch, seq), got shape {tuple(pos.shape)}.")
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if pos.shape[1] == 0 or not starts[:, 1:].any():
        return None
    rows = []
    for r in range(pos.shape[0]):
        begin = starts[r].nonzero().flatten().tolist() + [pos.shape[1]]
        segments, base = [], None  # base: (start, length) of the latest segment that starts at position 0
        for start, end in zip(begin[:-1], begin[1:]):
            first = int(pos[r, start])
            if first == 0:
                segments.append((start, end, start, 0))
                base = (start, end - start)
            elif base is not None and first <= base[1]:
                segments.append((start, end, base[0], first))
            else:
                raise ValueError(f"position_ids of row {r} jump to {first} at index {start} with no segment of at "
                                 f"least {first} tokens starting at 0 before it: a packed example must restart at 0 or "
                                 "continue a shared prefix (train/attention.py).")
        rows.append(segments)
    return PackedSegments(rows)


def packed_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     dropout: float = 0.0, scaling: float | None = None, packed_segments: PackedSegments | None = None,
                     **kwargs) -> tuple[Tensor, None]:
    """transformers' attention signature: (b, heads, L, d) query/key/value -> ((b, L, heads, d), None).

    With ``packed_segments`` each example's segment attends to itself (and its shared prefix) only, the row's mask
    unused; without, this is transformers' sdpa attention unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if torch.compiler.is_compiling():  # one opaque op, so the compiled graph does not depend on where examples start
        # (``used`` is not set here: a Python side effect inside a checkpointed layer breaks the graph; a compiled
        # layer always runs this, which ``causal_lm_loss`` knows from ``compiling(model)``)
        return packed_sdpa(query, key, value, packed_segments.table, dropout, scaling), None
    packed_segments.used = True
    return attend_segments(query, key, value, packed_segments.rows, dropout, scaling), None


def use_packed_attention(model: nn.Module) -> bool:
    """Select ``packed_attention`` for ``model`` (a Hugging Face model running sdpa) if a probe proves it changes
    nothing; True when the model now runs it.

    The probe (once per model, ``probe.py``): on 2 tokens the logits with ``packed_attention`` equal the model's own
    within 1e-5 and every attention layer called it (one call per decoder layer); on a row of two packed 2-token
    examples, passing their segments, every layer used them and the logits equal those of each example run alone by
    the model's own attention. Otherwise the model is left as it was (False, the reason logged): e.g. Falcon, whose
    attention does not dispatch through ``AttentionInterface``. Models on another backend (eager, flash, flex) or
    with sliding-window layers are left as they are too. Their packed rows train through transformers' own
    block-diagonal mask where their attention keeps packed examples apart (``keeps_examples_apart``), without a
    shared prefix.
    """
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == NAME:
        return True
    reason = _not_applicable(config)
    if reason:
        return False
    return verdict(model, KEY, _probe_packed_attention).ok


def _not_applicable(config) -> str | None:
    """Why ``packed_attention`` is not even tried for a model with this config (None: try it)."""
    current = getattr(config, "_attn_implementation", None)
    if current != "sdpa":
        return f"it runs {current!r} attention, not sdpa"
    if getattr(config, "sliding_window", None) is not None or "sliding_attention" in (
            getattr(config, "layer_types", None) or ()):
        return "it has sliding-window layers, which packed attention does not implement"
    return None


@contextlib.contextmanager
def _counted() -> Iterator[list[bool]]:
    """``NAME`` registered as ``packed_attention`` that records each call (True when it got packed segments)."""
    from transformers import AttentionInterface

    calls: list[bool] = []

    def counting(*args, **kwargs):
        calls.append(kwargs.get("packed_segments") is not None)
        return packed_attention(*args, **kwargs)

    AttentionInterface.register(NAME, counting)
    try:
        yield calls
    finally:
        AttentionInterface.register(NAME, packed_attention)


def _probe_packed_attention(model: nn.Module) -> Verdict:
    """The one-time check of ``use_packed_attention`` (its docstring); selects the attention when it passes."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, packed_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    config, layers = model.config, num_layers(model)
    own = config._attn_implementation
    ids, four = probe_ids(model, 2), probe_ids(model, 4, seed=1)
    position_ids = torch.tensor([[0, 1, 0, 1]], device=four.device)
    with frozen_modes(model):
        reference = logits(model, ids)
        apart = torch.cat([logits(model, four[:, :2]), logits(model, four[:, 2:])], dim=1)
        config._attn_implementation = NAME
        why = None
        try:
            with _counted() as calls:
                plain = logits(model, ids)
            segments = PackedSegments([[(0, 2, 0, 0), (2, 4, 2, 0)]])
            with _counted() as packed_calls:
                packed = logits(model, four, position_ids=position_ids, packed_segments=segments)
        except Exception as err:  # noqa: BLE001 - any failure means "do not use it"; the reason is reported
            why = f"its forward failed with it ({type(err).__name__}: {err})"
        else:
            if len(calls) != layers or len(packed_calls) != layers or not all(packed_calls):
                why = (f"{len(calls)} of its {layers} attention layers called it ({sum(packed_calls)} with the "
                       "packed segments)")
            elif differs(reference, plain):
                why = f"the logits changed: {differs(reference, plain)}"
            elif differs(apart, packed):
                why = f"packed examples differ from the same examples run alone: {differs(apart, packed)}"
    if why:
        config._attn_implementation = own
        return Verdict(False, why)
    return Verdict(True)


def keeps_examples_apart(model: nn.Module) -> Verdict:
    """Whether the model's own attention keeps the examples of a packed row apart (``position_ids`` restarting at 0,
    no attention mask), as transformers' masks do for most families: a row of two 2-token examples gives the logits
    of each example run alone, within 1e-5. Probed once per model."""
    return verdict(model, "packing with its own attention", _probe_own_attention)


def _probe_own_attention(model: nn.Module) -> Verdict:
    four = probe_ids(model, 4, seed=1)
    position_ids = torch.tensor([[0, 1, 0, 1]], device=four.device)
    with frozen_modes(model):
        apart = torch.cat([logits(model, four[:, :2]), logits(model, four[:, 2:])], dim=1)
        try:
            packed = logits(model, four, position_ids=position_ids)
        except Exception as err:  # noqa: BLE001
            return Verdict(False, f"its forward failed on a packed row ({type(err).__name__}: {err})")
    why = differs(apart, packed)
    return Verdict(False, f"the second example of a packed row sees the first: {why}") if why else Verdict(True)


def packed_attention_status(model: nn.Module) -> Verdict:
    """Whether ``model`` runs ``packed_attention``, and if not, why (not tried, not applicable, or the probe's
    finding)."""
    if runs_packed_attention(model):
        return Verdict(True)
    found = cached(model, KEY)
    if found is not None:
        return found
    reason = _not_applicable(getattr(model, "config", None))
    return Verdict(False, reason or "lightning_lora.train.attention.use_packed_attention(model) was not called "
                   "after loading it (LoRAModule does)")


def runs_packed_attention(model: nn.Module) -> bool:
    """Whether the Hugging Face ``model`` has ``packed_attention`` selected."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == NAME


__all__ = ["NAME", "PackedSegments", "find_segments", "keeps_examples_apart", "packed_attention",
           "packed_attention_status", "runs_packed_attention", "use_packed_attention"]
