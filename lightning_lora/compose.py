"""Composing adapters: fold a weighted set into one new LoRA, and run each sample of a batch with its own adapter.

Every additive branch here factors as a product: LoRA ``dW = s B A``, VeRA ``dW = (lambda_b * B_s)(lambda_d * A_s)``
(Hu et al. 2021, arXiv:2106.09685; Kopiczko et al. 2024, arXiv:2310.11454). A weighted sum of them is therefore

    sum_i w_i dW_i = [w_1 s_1 B_1, ..., w_n s_n B_n] [A_1; ...; A_n]  =  B_cat A_cat      (rank R = sum_i r_i)

``combine(..., method="cat")`` stores exactly that as a plain LoRA with ``alpha = R`` (so ``s = 1``): the weights and
each adapter's own scaling go into B, nothing is rescaled afterwards. That is also why rsLoRA inputs are handled
correctly (PEFT's ``add_weighted_adapter`` re-applies the new rank's rsLoRA scale and over-scales by sqrt(rank)).
VeRA adapters combine exactly too, whatever their seeds, because the result holds explicit A and B (it is a LoRA, not
a VeRA). ``method="svd"`` keeps the best rank-k approximation of ``B_cat A_cat`` per layer (Eckart-Young), computed
from the factors via two thin QRs and an SVD of the R x R core, never an SVD of the dense (out x in) matrix.

Only what a branch's own ``factors()`` returns is combined; a method whose update is no low-rank product raises
there with its own reason, which ``combine`` shows (DoRA: its magnitude rescales W + s B A row-wise, so no weighted
sum of DoRA adapters is a DoRA or a LoRA; PEFT's weighted combination is wrong for DoRA).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from lightning_lora.core.layer import AdapterBranch, AdapterLayer, build_branch
from lightning_lora.core.verbs import adapter_layers, adapter_names, attach, check_known, layers_set, refuse_trained
from lightning_lora.methods.lora import LoRA

log = logging.getLogger(__name__)


def factors(branch: AdapterBranch) -> tuple[Tensor, Tensor]:
    """2-D (B', A') with ``B' @ A' == dW`` in LoRA's parameter orientation ((out, fan_in); (dim, vocab) for an
    embedding): the branch's own ``factors()`` (the method contract).

    Raises:
        ValueError: ``{method} adapters cannot be combined: <the branch's own reason>``.
    """
    try:
        return branch.factors()
    except ValueError as err:
        raise ValueError(f"{branch.config.method} adapters cannot be combined: {err}") from None


def combine(
    model: nn.Module,
    weights: Mapping[str, float],
    name: str,
    method: str = "cat",
    rank: int | None = None,
) -> float | None:
    """Add a new LoRA adapter ``name`` equal to ``sum_a weights[a] * dW_a`` (see module docstring). It is added
    inactive; ``set_adapter(model, name)`` uses it and ``save_adapter`` writes it in PEFT's format.

    Args:
        weights: ``{adapter name: weight}``; weights may be negative (task arithmetic).
        method: ``"cat"`` (exact, rank = sum of the ranks) or ``"svd"`` (rank ``rank`` per layer, approximate).
        rank: only for ``"svd"``; default: the largest rank among the inputs.

    Returns:
        ``None`` for ``"cat"``; for ``"svd"`` the relative Frobenius error ``||dW - dW_k|| / ||dW||`` over all layers
        (also logged, with the worst layer's).

    Raises:
        ValueError: unknown or taken names, empty or non-finite weights, an input that does not factor (DoRA), a bad
            method or rank. The model
            is left unchanged.
    """
    weights = dict(weights)
    known = adapter_names(model)
    if not weights:
        raise ValueError("combine: give at least one adapter, e.g. {'a': 0.7, 'b': 0.3}.")
    check_known(model, list(weights), "combine", known)
    if name in known:
        raise ValueError(f"combine: an adapter named {name!r} already exists; choose another name or delete it first.")
    bad = {a: w for a, w in weights.items() if not math.isfinite(float(w))}
    if bad:
        raise ValueError(f"combine: weights must be finite numbers, got {bad}.")
    if method not in ("cat", "svd"):
        raise ValueError(f"combine: method must be 'cat' (exact) or 'svd' (truncated), got {method!r}.")
    refuse_trained(model, weights, "combine")

    layers = {t: layer for t, layer in adapter_layers(model).items() if any(a in layer.adapters for a in weights)}
    first = {a: next(layer.adapters[a] for layer in layers.values() if a in layer.adapters) for a in weights}
    ranks = {a: factors(branch)[1].shape[-2] for a, branch in first.items()}  # raises for DoRA
    total = sum(ranks.values())
    if method == "cat" and rank is not None and rank != total:
        raise ValueError(f"combine: 'cat' gives rank {total} (the sum of {ranks}); leave rank=None or use method='svd'.")
    if method == "svd":
        rank = max(ranks.values()) if rank is None else rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"combine: rank must be a positive integer, got {rank!r}.")

    new_rank = total if method == "cat" else rank
    config = LoRA(r=new_rank, alpha=float(new_rank), target_modules=sorted(layers))  # s = alpha / r = 1
    plan, err2, norm2, worst = [], 0.0, 0.0, (0.0, "")
    with torch.no_grad():
        for target, layer in layers.items():
            B, A = _concatenated(layer, weights, ranks)
            if method == "svd":
                B, A, lost2, kept2 = _truncate(B, A, rank)
                err2, norm2 = err2 + lost2, norm2 + lost2 + kept2
                worst = max(worst, (math.sqrt(lost2 / max(lost2 + kept2, 1e-300)), target))
            branch = build_branch(config, layer.base_layer, None, target)
            branch.load_factors(B, A)
            plan.append((target, branch))
    attach(model, plan, name)
    if method == "cat":
        return None
    error = math.sqrt(err2 / norm2) if norm2 > 0 else 0.0
    log.info("combine %s -> %r: svd rank %d, relative Frobenius error %.3e (worst layer %s: %.3e)",
             weights, name, rank, error, worst[1], worst[0])  # fmt: skip
    return error


def _concatenated(layer: AdapterLayer, weights: Mapping[str, float], ranks: Mapping[str, int]) -> tuple[Tensor, Tensor]:
    """B_cat, A_cat of one layer; an input adapter missing on this layer contributes zero blocks (exact). Batched
    factors (an MoE expert stack: (E, out, r), (E, r, in)) concatenate expert by expert."""
    lead, n_out, n_in = (), None, None
    parts = {}
    for a in weights:
        if a in layer.adapters:
            B, A = factors(layer.adapters[a])
            parts[a] = (B.float() * float(weights[a]), A.float())
            lead, n_out, n_in = B.shape[:-2], B.shape[-2], A.shape[-1]
    Bs, As = [], []
    device = _device(layer)
    for a, r in ranks.items():
        B, A = parts.get(a, (torch.zeros(*lead, n_out, r, device=device), torch.zeros(*lead, r, n_in, device=device)))
        Bs.append(B.to(device))
        As.append(A.to(device))
    return torch.cat(Bs, -1), torch.cat(As, -2)


def _device(layer: AdapterLayer) -> torch.device:
    return layer.base_layer.weight.device


def _truncate(B: Tensor, A: Tensor, k: int) -> tuple[Tensor, Tensor, float, float]:
    """Best rank-k factors of B A (Eckart-Young) via QR(B), QR(A^T) and an SVD of the small core; returns
    (B_k, A_k, squared Frobenius norm lost, kept). Singular values are split evenly: B_k = U sqrt(S), A_k = sqrt(S) V^T.
    Batched factors (an expert stack) are truncated expert by expert."""
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().transpose(-2, -1))
    U, S, Vh = torch.linalg.svd(Rb @ Ra.transpose(-2, -1))
    k_eff = min(k, S.shape[-1])
    root = S[..., :k_eff].sqrt()
    B_k = torch.zeros(*B.shape[:-1], k, dtype=torch.float64, device=B.device)
    A_k = torch.zeros(*A.shape[:-2], k, A.shape[-1], dtype=torch.float64, device=A.device)
    B_k[..., :k_eff] = (Qb @ U[..., :k_eff]) * root[..., None, :]
    A_k[..., :k_eff, :] = root[..., :, None] * (Vh[..., :k_eff, :] @ Qa.transpose(-2, -1))
    return B_k.float(), A_k.float(), float(S[..., k_eff:].pow(2).sum()), float(S[..., :k_eff].pow(2).sum())


@contextlib.contextmanager
def per_sample_adapters(model: nn.Module, names: list[str | None]) -> Iterator[nn.Module]:
    """Inside the block row i of every batch runs with adapter ``names[i]`` alone (weight 1; ``None``: the base).

    Inference only: the same outputs as running each sample alone with ``set_adapter(model, names[i])``, with one
    forward pass of the frozen base for the whole batch. The batch size must equal ``len(names)`` (else ValueError
    from the first adapted layer).

    Raises:
        RuntimeError: the model is in training mode (call ``model.eval()``).
        ValueError: an unknown adapter name.
    """
    if model.training:
        raise RuntimeError(
            "per_sample_adapters is for inference only; call model.eval() first (train one adapter at a time with "
            "set_adapter)."
        )
    names = list(names)
    check_known(model, names, "per_sample_adapters (None: the base)")
    refuse_trained(model, names, "per_sample_adapters")
    with layers_set(model, "sample_adapters", names):
        yield model
