"""FourierFT, a method defined outside lightning_lora with a per-layer option decided by the layer's name: the second
worked example of docs/adding-a-method.md (docs/fourierft.md walks through it).

FourierFT (Gao et al. 2024, arXiv:2405.03003, section 3) learns n spectral coefficients c per layer, at n entries of
the (out, in) frequency grid chosen at random (the same entries for every layer of one shape and seed), and

    dW = s * Re(IDFT2(F)),   F[j_k, l_k] = c_k (k = 1 .. n), 0 elsewhere,   s = ``scaling``

so a layer trains n numbers whatever its size. ``n_frequency_pattern`` gives some layers another n, by name
(PEFT's rule for this method: a key matches a name that ends with ``"." + key``, the key a regex): ``build`` receives
each layer's name and decides its n there, and ``to_peft`` writes the pattern back from the per-layer map.

The update is additive (runtime weights and merge work) but it is a dense matrix, no low-rank product: ``factors()``
says so, and ``combine`` shows that sentence. Files are PEFT's ``FOURIERFT`` format (``fourierft_spectrum`` per
layer; the entries are redrawn from ``random_loc_seed``, as PEFT does). Deviation: PEFT starts c at random
(``init_weights=False``); here c starts at zero, so the model is unchanged at init (PEFT's ``init_weights=True``).
Use::

    import fourierft, lightning_lora as ll
    ll.inject(model, fourierft.FourierFT(n_frequency=1000, target_modules=["q_proj", "v_proj"],
                                         n_frequency_pattern={"v_proj": 2000}))
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_lora.core.kinds import LayerKind
from lightning_lora.core.layer import AdapterBranch, AdapterConfig


@dataclasses.dataclass
class FourierFT(AdapterConfig):
    """FourierFT: ``n_frequency`` coefficients per layer (``n_frequency_pattern``: per layer, by name), ``scaling``."""

    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int = 777
    n_frequency_pattern: dict[str, int] | None = None

    method: ClassVar[str] = "FourierFT"
    peft_type: ClassVar[str] = "FOURIERFT"
    peft_suffixes: ClassVar[tuple[str, ...]] = ("fourierft_spectrum",)

    def __post_init__(self) -> None:
        super().__post_init__()
        for key, n in {"n_frequency": self.n_frequency, **(self.n_frequency_pattern or {})}.items():
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise ValueError(f"FourierFT: the number of frequencies for {key!r} must be a positive integer, got {n!r}.")

    @classmethod
    def examples(cls) -> list[FourierFT]:
        return [cls(n_frequency=16, scaling=3.0, random_loc_seed=5)]

    @classmethod
    def supports(cls, kind: LayerKind) -> bool:
        return kind.linear  # nn.Linear, GPT-2 Conv1D, NF4: a dense (out, in) weight

    @classmethod
    def peft_supports(cls, kind: LayerKind) -> bool:
        return kind.name in ("linear", "hf_conv1d")

    def pattern_key(self, name: str) -> str | None:
        """The first ``n_frequency_pattern`` key selecting layer ``name`` (PEFT's FourierFT rule), or None."""
        return next((k for k in self.n_frequency_pattern or {} if re.match(rf".*\.{k}$", name)), None)

    def build(self, base_layer: nn.Module, shared: object, name: str) -> FourierFTBranch:
        key = self.pattern_key(name)
        return FourierFTBranch(self, base_layer, self.n_frequency if key is None else self.n_frequency_pattern[key])

    def to_peft(self, targets: list[str], layers: Mapping[str, AdapterBranch]) -> dict:
        used = {self.pattern_key(name) for name in layers} - {None}  # the pattern entries that decide a saved layer
        return {"peft_type": "FOURIERFT", "n_frequency": self.n_frequency, "scaling": self.scaling,
                "random_loc_seed": self.random_loc_seed, "target_modules": targets, "fan_in_fan_out": False,
                "n_frequency_pattern": {k: v for k, v in (self.n_frequency_pattern or {}).items() if k in used},
                "init_weights": True, "inference_mode": True, "bias": "none", "modules_to_save": None,
                "task_type": None}  # fmt: skip

    @classmethod
    def from_peft(cls, peft_config: dict) -> FourierFT | None:
        if cls is not FourierFT or peft_config.get("peft_type") != "FOURIERFT":
            return None
        return cls(n_frequency=int(peft_config.get("n_frequency", 1000)), scaling=float(peft_config.get("scaling", 150.0)),
                   random_loc_seed=int(peft_config.get("random_loc_seed", 777)),
                   n_frequency_pattern=dict(peft_config.get("n_frequency_pattern") or {}) or None)  # fmt: skip

    def card_facts(self, layers: Mapping[str, AdapterBranch]) -> dict[str, str]:
        counts = sorted({b.fourierft_spectrum.numel() for b in layers.values()})
        return {"frequencies per layer": " to ".join(map(str, counts[:: max(len(counts) - 1, 1)])),
                "scaling": f"{self.scaling:g}"}  # fmt: skip


class FourierFTBranch(AdapterBranch):
    """FourierFT on one layer: the trained coefficients ``fourierft_spectrum`` (n,) and their frozen entries."""

    def __init__(self, config: FourierFT, base_layer: nn.Module, n: int):
        super().__init__(config, base_layer)
        n_in, n_out = self.in_out
        if n > n_in * n_out:
            raise ValueError(f"FourierFT: {n} frequencies do not fit a {n_out} x {n_in} layer; lower n_frequency.")
        flat = torch.randperm(n_out * n_in, generator=torch.Generator().manual_seed(config.random_loc_seed))[:n]
        self.register_buffer("entries", torch.stack([flat // n_in, flat % n_in]).to(base_layer.weight.device),
                             persistent=False)  # fmt: skip
        self.fourierft_spectrum = nn.Parameter(torch.zeros(n, device=base_layer.weight.device))

    def delta_weight(self, base_layer: nn.Module | None = None) -> Tensor:
        """dW = s Re(IDFT2(F)), (out, in), computed in fp32 (the FFT has no half-precision path)."""
        n_in, n_out = self.in_out
        spectrum = self.fourierft_spectrum
        dense = torch.zeros(n_out, n_in, device=spectrum.device)
        dense[self.entries[0], self.entries[1]] = spectrum.float()
        return (torch.fft.ifft2(dense).real * self.config.scaling).to(spectrum.dtype)

    def forward(self, x: Tensor, base_out: Tensor, base_layer: nn.Module, weight: float = 1.0) -> Tensor:
        delta = F.linear(x.to(self.fourierft_spectrum.dtype), self.delta_weight() * weight)
        return base_out + delta.to(base_out.dtype)

    def peft_tensors(self) -> dict[str, Tensor]:
        return {"fourierft_spectrum": self.fourierft_spectrum}

    def factors(self) -> tuple[Tensor, Tensor]:
        raise ValueError("FourierFT's update is a dense spectral matrix (an inverse 2-D DFT), not a low-rank product "
                         "B A, so it cannot be folded into a LoRA; merge it, or weight it at run time.")

    def activation_bytes(self, act_bytes: int, adapter_bytes: int) -> int:
        """Only a cast of the input when the adapter's dtype differs: dW is built per layer, not per token."""
        return adapter_bytes * self.in_out[0] if adapter_bytes != act_bytes else 0

    def param_roles(self) -> dict[str, str]:
        return {"fourierft_spectrum": "vector"}
