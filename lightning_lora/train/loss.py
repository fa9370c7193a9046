"""Causal-LM loss on the labeled positions only, with the output head run in chunks.

A causal LM predicts token t+1 from position t. With labels y (-100 = ignored) and the last hidden states H (after the
final norm), Hugging Face's ``model(..., labels=y).loss`` is

    L = (1 / N) sum_{t : y_{t+1} != -100} -log softmax(W h_t)[y_{t+1}],    N = #{t : y_{t+1} != -100}

but it computes the logits W h_t (vocab wide) for *every* position and keeps them, their fp32 copy and their
log-softmax for backward. Only the labeled rows matter (about a quarter of the positions of a chat fine-tune, where
prompts are masked), so ``causal_lm_loss`` gathers those rows of H and runs head + cross-entropy over them in chunks
of ``chunk_size`` rows; at most one chunk of logits (chunk_size x vocab) is alive at any time. Logits are upcast to
fp32 per chunk and the sum over chunks is fp32, also when the model runs in bf16.

- A plain linear head (``nn.Linear``, or tied to the input embeddings) gets its gradients *inside* the forward, chunk
  by chunk (the way of Liger's fused linear cross-entropy, arXiv:2410.10989): with p = softmax(z), z = W h + b,

      dL/dz = p - onehot(y),    dL/dh = (p - onehot(y)) W,    dL/dW = sum_i (p_i - onehot(y_i)) h_i^T,

  so forward keeps dL/dh (rows x hidden) and backward only scales it: no logits are recomputed.
- Any other head (an adapted ``lm_head``) runs each chunk under non-reentrant ``torch.utils.checkpoint``: forward
  keeps only the chunk's loss, backward recomputes its logits (torchtune's ``CEWithChunkedOutputLoss``).

The model runs through its own ``forward`` (so FSDP2's hooks, attention masks, packed-sequence ``position_ids`` and
gradient checkpointing behave as usual) with its output head swapped, for the duration of the call, for a stand-in
that takes the last hidden states and returns the loss, applying the real head (``get_output_embeddings()``: a plain
or adapted ``lm_head``, or tied to the input embeddings) to the labeled rows only. That swap is made only after a
one-time probe per model (``head.py``) shows that the model calls its head once, on the hidden states the real
head gets, and returns the head's output untouched; models whose ``forward`` changes the logits after the head
(Gemma 2's soft-capping, Granite's ``logits_scaling``) fall back to Hugging Face's own loss, with one log line.

Example (an ``AdapterCallback`` user's ``training_step``)::

    from lightning_lora.train.loss import causal_lm_loss

    def training_step(self, batch, batch_idx):
        return causal_lm_loss(self.model, batch["input_ids"], batch["labels"],
                              attention_mask=batch.get("attention_mask"), position_ids=batch.get("position_ids"))
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_lora.train.attention import (
    find_segments,
    keeps_examples_apart,
    packed_attention_status,
    runs_packed_attention,
)
from lightning_lora.train.compiling import compiling
from lightning_lora.train.head import head_swap_verdict, head_swapped, rescales_logits
from lightning_lora.train.lean_swap import saving
from lightning_lora.train.probe import model_type

log = logging.getLogger(__name__)
IGNORE = -100
CHUNK_SIZE = 256  # 256 x vocab fp32 logits at a time: SmolLM2 QLoRA 4 x 512 peak RSS 3.95 -> 3.85 GiB vs 512


class _LossHead(nn.Module):
    """Stands in for the output head during the model's forward: gets the last hidden states, returns the loss.

    Running the real head inside the model's forward matters under FSDP2, whose root module holds the head: its
    parameters are gathered only inside the root's forward (and again in backward, from the output on).
    """

    def __init__(self, head: nn.Module, labels: Tensor, chunk_size: int):
        super().__init__()
        self.head, self.labels, self.chunk_size = head, labels, chunk_size
        self.count = 0  # labeled tokens of the last call

    def forward(self, hidden: Tensor) -> Tensor:
        """The summed loss (fp32) over the labeled rows; their number is left in ``self.count``."""
        if hidden.shape[:2] != self.labels.shape:
            raise ValueError(f"causal_lm_loss: labels {tuple(self.labels.shape)} do not match the hidden states "
                             f"{tuple(hidden.shape[:2])} (batch, seq).")
        rows, targets = labeled_rows(hidden, self.labels)
        self.count = targets.numel()
        if targets.numel() == 0:
            return hidden.sum().float() * 0.0
        if _plain_linear(self.head) and torch.is_grad_enabled():
            return _LinearCrossEntropy.apply(rows, self.head.weight, self.head.bias, targets, self.chunk_size)
        return chunked_cross_entropy(self.head, rows, targets, self.chunk_size)


def _plain_linear(head: nn.Module) -> bool:
    """A bare ``nn.Linear`` (no subclass, no hooks): its forward is exactly ``F.linear(h, weight, bias)``."""
    return (type(head) is nn.Linear and not head._forward_hooks and not head._forward_pre_hooks
            and not nn.modules.module._global_forward_hooks and not nn.modules.module._global_forward_pre_hooks)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i -log softmax(W h_i + b)[y_i], its gradients computed in forward chunk by chunk (module docstring)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk_size: int) -> Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            h, y = hidden[start : start + chunk_size], targets[start : start + chunk_size]
            # -log softmax(z)_y = log sum_j e^(z_j - m) - (z_y - m), m = max_j z_j: one chunk-sized tensor, one exp pass
            z = F.linear(h, weight, bias).float()
            z.sub_(z.amax(1, keepdim=True))
            picked = z.gather(1, y[:, None]).squeeze(1)
            sums = z.exp_().sum(1)
            total += (sums.log() - picked).sum()
            dz = z.div_(sums[:, None])  # softmax, in place of the logits
            dz[torch.arange(len(y), device=dz.device), y] -= 1.0
            if need_h:
                grad_h[start : start + chunk_size] = dz.to(weight.dtype) @ weight
            if need_w:
                grad_w += dz.t() @ h.float()
            if need_b:
                grad_b += dz.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = lambda g, dtype=None: None if g is None else (g * grad_out).to(dtype or g.dtype)  # noqa: E731
        return scale(grad_h), scale(grad_w, ctx.dtypes[0]), scale(grad_b, ctx.dtypes[1]), None, None


def _chunk_loss(head: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    """Summed cross-entropy of one chunk, in fp32."""
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_cross_entropy(head: nn.Module, hidden: Tensor, targets: Tensor, chunk_size: int = CHUNK_SIZE) -> Tensor:
    """sum_i -log softmax(head(hidden_i))[targets_i] over rows, ``chunk_size`` rows at a time (fp32 sum).

    Under autograd each chunk is checkpointed: its logits are recomputed in backward instead of being kept.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}.")
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, h, y, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, y)
    return total


def labeled_rows(hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Hidden states at positions t whose next label y_{t+1} is not -100, and those labels (both flattened)."""
    targets = labels[:, 1:].reshape(-1)
    keep = targets != IGNORE
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    return rows[keep], targets[keep]


def labeled_count(labels: Tensor) -> int:
    """How many positions carry a next-token label: #{t : y_{t+1} != -100} (the N of the mean)."""
    return int((labels[:, 1:] != IGNORE).sum())


def causal_lm_loss(model: nn.Module, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None,
                   position_ids: Tensor | None = None, chunk_size: int = CHUNK_SIZE, step=None) -> Tensor:
    """Next-token cross-entropy over the labeled positions: their mean (Hugging Face's ``model(..., labels=...).loss``),
    or, with ``step``, their sum, to be divided by the labeled tokens of the whole optimizer step.

    Args:
        model: a Hugging Face causal LM (``*ForCausalLM``), adapted or not, possibly FSDP2-sharded.
        input_ids, labels: (batch, seq); labels are *not* shifted (as for Hugging Face), -100 = ignored.
        attention_mask: (batch, seq) padding mask, or None. For packed rows pass None and ``position_ids`` that
            restart at 0 for each example: transformers then keeps attention inside each example.
        position_ids: (batch, seq) or None.
        chunk_size: labeled rows per head + cross-entropy chunk (memory: chunk_size x vocab fp32 logits).
        step: a ``TokenWeightedLoss`` callback of the Trainer (``train/step_loss.py``). The loss returned is then the
            *sum* over this micro-batch's labeled tokens, noted with their count in ``step``, which divides the
            gradients by the labeled tokens of the whole optimizer step (every accumulated micro-batch, every rank)
            before the optimizer steps, and logs that step's mean. Use it in ``training_step`` only.

    Returns:
        the fp32 scalar loss; 0 (still attached to the graph) when no position is labeled, where Hugging Face
        returns NaN.
    """
    kwargs = _packing_kwargs(model, input_ids, attention_mask, position_ids)
    if not head_swap_verdict(model):
        with saving(model):
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels,
                        use_cache=False, **kwargs)
        count = labeled_count(labels)
        total = out.loss.float() * count if count else out.loss.float().nan_to_num() * 0.0  # HF's mean -> the sum
    else:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}.")
        with head_swapped(model, lambda head: _LossHead(head, labels, chunk_size)) as loss_head, saving(model):
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False, **kwargs)
        total = out.logits  # what the model returns as its "logits" is the stand-in head's output: the summed loss
        count = loss_head.count
    segments = kwargs.get("packed_segments")
    if segments is not None and segments.shares_prefix and not segments.used and not compiling(model):
        raise ValueError(f"{type(model).__name__}'s attention layers never received the packed segments, so its "
                         "examples could not see their shared prefix; set share_prefix=False for this model.")
    if step is not None:
        return step.add(total, count)
    return total / count if count else total


def run_with_head(model: nn.Module, stand_in, input_ids: Tensor, attention_mask: Tensor | None = None,
                  position_ids: Tensor | None = None):  # fmt: skip
    """Run ``model`` with its output head replaced, for the call, by ``stand_in(head)`` (a module that takes the last
    hidden states), with packed rows handled as ``causal_lm_loss`` does; return what the stand-in returned. For
    other heads than the loss's, e.g. DPO's per-example log-probabilities (``train/dpo.py``).

    Raises:
        ValueError: the probe found that the model changes its logits after the head (``rescales_logits``).
    """
    if rescales_logits(model):
        raise ValueError(f"{type(model).__name__} rescales its logits after the head; a stand-in head would skip "
                         "that. Compute from model(...).logits instead.")
    kwargs = _packing_kwargs(model, input_ids, attention_mask, position_ids)
    with head_swapped(model, stand_in), saving(model):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                    **kwargs)
    return out.logits


def packing_refusal(model: nn.Module, share_prefix: bool = False) -> str | None:
    """Why ``model`` cannot train on packed rows (with a shared prompt prefix if ``share_prefix``), or None: it runs
    ``train/attention.py``'s packed attention, or (without a shared prefix) its own attention keeps packed examples
    apart, as a probe shows. LoRAModule asks before the first step, the loss at every packed batch."""
    if runs_packed_attention(model):
        return None
    if share_prefix:
        return (f"share_prefix: {model_type(model)} does not run lightning_lora's packed attention "
                f"({packed_attention_status(model).reason}), the only attention that lets packed examples "
                "share a prompt prefix; set share_prefix=False.")
    own = keeps_examples_apart(model)
    if not own:
        return (f"packing: {model_type(model)}'s own attention does not keep packed examples apart "
                f"({own.reason}) and lightning_lora's packed attention is not used for it "
                f"({packed_attention_status(model).reason}); set packing=False.")
    return None


def _packing_kwargs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
                    position_ids: Tensor | None) -> dict:
    """``{"packed_segments": ...}`` when the rows are packed and the model runs ``train/attention.py``'s attention;
    {} when they are not packed, or when the model's own attention keeps packed examples apart. Refuses the rest."""
    if position_ids is None or attention_mask is not None:
        return {}
    segments = find_segments(position_ids.expand(input_ids.shape))
    if segments is None:
        return {}
    if runs_packed_attention(model):
        return {"packed_segments": segments}
    why = packing_refusal(model, segments.shares_prefix)
    if why:
        raise ValueError(why)
    return {}  # transformers keeps attention inside each example with its own block-diagonal mask


__all__ = ["causal_lm_loss", "chunked_cross_entropy", "labeled_count", "labeled_rows", "packing_refusal",
           "run_with_head"]
