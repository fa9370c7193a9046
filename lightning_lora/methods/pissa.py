"""SVD starts for LoRA factors: PiSSA's principal part of W, and the rank-2r form PEFT shares trained PiSSA adapters in.

PiSSA (Meng et al. 2024, arXiv:2404.02948, section 3): with W = U S V^T (out x in) and U_r, S_r, V_r its top-r
singular triplets, the adapter starts on the principal part and the frozen base keeps the rest,

    B0 = U_r sqrt(S_r) / sqrt(s),   A0 = sqrt(S_r) V_r^T / sqrt(s),   W_res = W - s B0 A0,

so s B0 A0 = U_r S_r V_r^T exactly (the LoRA scaling s = alpha / r, or alpha / sqrt(r) for rsLoRA, is divided out
here; the paper takes s = 1) and W_res + s B0 A0 = W: the model is unchanged at init. The fast variant (paper
section 4.5) replaces the SVD by a randomized one (Halko et al., ``torch.svd_lowrank``) with ``niter`` subspace
iterations; its random start is seeded, so the factors are reproducible (resuming and offline export rebuild them).

After training, W_res + s B A = W + s (B A - B0 A0): on the *original* W the trained adapter is the rank-2r LoRA

    B' = s [B, -B0],   A' = [A; A0],   scaling 1,

which is how PEFT converts PiSSA adapters for sharing (``convert_to_lora``), here with the scaling folded into B'.
"""

from __future__ import annotations

import torch
from torch import Tensor

_SEED = 0  # the randomized SVD's start: fixed, so the same W gives the same factors in every run


def top_r(matrix: Tensor, r: int, niter: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The top-``r`` singular triplets (U_r (out, r), S_r (r,), V_r (in, r)) of ``matrix``, in fp32.

    ``niter=None`` is the exact SVD; an integer uses ``torch.svd_lowrank`` with that many subspace iterations and
    2r probe vectors (capped at min(out, in)), from a fixed seed.
    """
    m = matrix.detach().float()
    if niter is None:
        U, S, Vh = torch.linalg.svd(m, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r].t()
    with torch.random.fork_rng(devices=[m.device] if m.device.type == "cuda" else []):
        torch.manual_seed(_SEED)
        U, S, V = torch.svd_lowrank(m, q=min(2 * r, *m.shape), niter=niter)
    return U[:, :r], S[:r], V[:, :r]


def split_factors(U: Tensor, S: Tensor, V: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(A, B) with s B A = U diag(S) V^T and sqrt(S) on each side: A = sqrt(S) V^T / sqrt(s), B = U sqrt(S) / sqrt(s)."""
    root = (S.clamp_min(0.0) / scale).sqrt()
    return root[:, None] * V.t(), U * root[None, :]


def pissa_factors(weight: Tensor, r: int, scale: float, niter: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(A0, B0, W_res) for the (out, in) ``weight``: PiSSA's start (module docstring), all fp32."""
    A, B = split_factors(*top_r(weight, r, niter), scale)
    residual = weight.detach().float() - scale * (B @ A)
    return A, B, residual


def shared_factors(A: Tensor, B: Tensor, A0: Tensor, B0: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(A', B') of the rank-2r LoRA with scaling 1 that applies the trained (A, B) to the original W (docstring)."""
    return torch.cat([A, A0], 0), torch.cat([B, -B0], 1) * scale
