"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2024, arXiv:2310.11454, section 3).

One pair of frozen random matrices A (r, max_in) and B (max_out, r) is shared by every adapted layer; each layer
uses the top-left slices A_s (r, in), B_s (out, r) and trains only two vectors:

    y = W x + lambda_b * (B_s (lambda_d * (A_s dropout(x)))),   lambda_d (r,) = d_initial, lambda_b (out,) = 0

A and B are drawn exactly as PEFT draws them (Kaiming-uniform with gain sqrt(2), fan-in mode, from
``torch.Generator("cpu").manual_seed(seed)``, A first, fp32), so they can be regenerated from the seed instead of saved
and files interoperate with PEFT.

Cost: u = A_s dropout(x) is computed once per input tensor and shared by the layers that read it (q, k, v read the
same hidden states, as do gate and up, and A is shared), so its forward and backward GEMMs run once, not three times.
The rest is one autograd function that saves u (r wide) and z = B_s h (tokens, out), h = lambda_d * u, so that
lambda_b's gradient sum_tokens(g * z) is elementwise instead of a third r-wide GEMM per layer.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_lora.core.kinds import in_out_features
from lightning_lora.core.layer import AdapterBranch, AdapterConfig, in_own_precision, own_precision


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])  # fan_in = shape[1]
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class Projections:
    """The shared frozen A and B of one VeRA adapter: one copy per device/dtype, never a module buffer per layer."""

    def __init__(self, A: Tensor, B: Tensor):
        self.A, self.B = A, B
        self._copies: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._last: tuple | None = None  # (weakref to the input, key, u) of the last shared input projection

    @classmethod
    def generate(cls, seed: int, r: int, max_in: int, max_out: int) -> Projections:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        A = _kaiming_uniform((r, max_in), generator)
        B = _kaiming_uniform((max_out, r), generator)
        return cls(A, B)

    def on(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (device, dtype)
        if key not in self._copies:
            self._copies[key] = (self.A.to(device, dtype), self.B.to(device, dtype))
        return self._copies[key]

    def project(self, x: Tensor, n_in: int, dtype: torch.dtype, p: float) -> Tensor:
        """u = A[:, :n_in] dropout_p(x) as (tokens, r); without dropout, reused while the same input tensor comes in.

        The reuse is keyed on the input object itself (a weak reference), its version counter and the grad mode, so
        a changed or different tensor is always projected anew; autograd sums the layers' gradients into u.
        """
        A = self.on(x.device, dtype)[0][:, :n_in]
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        if p > 0.0:
            return nn.functional.dropout(x2, p) @ A.t()  # each layer draws its own mask, as PEFT does
        if torch.compiler.is_compiling() or x.is_inference():  # no version counter to key the reuse on (compiled:
            # the compiler sees the layers' shared A x in one graph anyway)
            return x2 @ A.t()
        key = (x._version, n_in, dtype, x.device, torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        last = self._last
        if last is not None and last[0]() is x and last[1] == key:
            return last[2]
        u = x2 @ A.t()
        self._last = (weakref.ref(x), key, u)
        return u


@dataclasses.dataclass
class VeRA(AdapterConfig):
    """VeRA adapter config. ``save_projection`` also writes A and B into adapter files (PEFT's default)."""

    r: int = 256
    d_initial: float = 0.1
    seed: int = 0
    save_projection: bool = False

    method: ClassVar[str] = "VeRA"
    peft_type: ClassVar[str] = "VERA"
    peft_suffixes: ClassVar[tuple[str, ...]] = ("vera_lambda_b", "vera_lambda_d")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_rank(self.r)

    @classmethod
    def examples(cls) -> list[VeRA]:
        return [cls(r=8, seed=3), cls(r=8, seed=3, save_projection=True)]

    def shared_state(self, layers: list[nn.Module]) -> Projections:
        dims = [in_out_features(layer) for layer in layers]
        return Projections.generate(self.seed, self.r, max(d[0] for d in dims), max(d[1] for d in dims))

    def build(self, base_layer: nn.Module, shared: Projections, name: str = "") -> VeRABranch:
        return VeRABranch(self, base_layer, shared)

    def to_peft(self, targets: list[str], layers: Mapping[str, AdapterBranch] | None = None) -> dict:
        return {
            "peft_type": "VERA",
            "r": self.r,
            "target_modules": targets,
            "projection_prng_key": self.seed,
            "save_projection": self.save_projection,
            "vera_dropout": self.dropout,
            "d_initial": self.d_initial,
            "fan_in_fan_out": False,
            "bias": "none",
            "init_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
            "task_type": None,
        }

    @classmethod
    def from_peft(cls, peft_config: dict) -> VeRA | None:
        if cls is not VeRA or peft_config.get("peft_type") != "VERA":
            return None
        return cls(
            r=int(peft_config["r"]),
            seed=int(peft_config.get("projection_prng_key", 0)),
            d_initial=float(peft_config.get("d_initial", 0.1)),
            dropout=float(peft_config.get("vera_dropout", 0.0)),
            save_projection=bool(peft_config.get("save_projection", True)),
        )

    def card_facts(self, layers: Mapping[str, AdapterBranch]) -> dict[str, str]:
        return {"rank r": str(self.r), "projections": f"seed {self.seed}" + (", saved" if self.save_projection else "")}

    def shared_tensors(self, shared: Projections) -> dict[str, Tensor]:
        return {"vera_A": shared.A, "vera_B": shared.B}

    def peft_shared_tensors(self, shared: Projections) -> dict[str, Tensor]:
        return self.shared_tensors(shared) if self.save_projection else {}  # else regenerated from the seed

    def load_shared_tensors(self, shared: Projections, tensors: dict[str, Tensor], source: str) -> None:
        unknown = sorted(set(tensors) - {"vera_A", "vera_B"})
        if unknown:
            raise ValueError(f"{source}: unexpected shared tensors {unknown} for a VeRA adapter.")
        for key, mine in (("vera_A", shared.A), ("vera_B", shared.B)):
            if key in tensors and tuple(tensors[key].shape) != tuple(mine.shape):
                raise ValueError(
                    f"{source}: base_model.{key} has shape {tuple(tensors[key].shape)}, expected {tuple(mine.shape)}."
                )
        shared.A = tensors.get("vera_A", shared.A).float()
        shared.B = tensors.get("vera_B", shared.B).float()
        shared._copies.clear()



class _VeRALinear(torch.autograd.Function):
    """out = base_out + w * lambda_b * z with z = (lambda_d * u) B^T, u = A dropout(x) (N, r), base_out (N, out).

    Saves u and, when lambda_b trains, z (N, out): lambda_b's gradient is then sum_tokens(g * z), an elementwise
    product instead of a third r-wide GEMM (r = 256 makes that GEMM a quarter of a base layer's work).
    """

    @staticmethod
    def forward(ctx, u, base_out, B, lambda_d, lambda_b, weight: float):
        z = torch.mm(u * lambda_d, B.t())
        out = torch.addcmul(base_out, z, lambda_b * weight)
        ctx.weight = weight
        ctx.save_for_backward(u, B, lambda_d, lambda_b, z if ctx.needs_input_grad[4] else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        with own_precision(grad_out):
            return _VeRALinear._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        u, B, lambda_d, lambda_b, z = ctx.saved_tensors
        weight = ctx.weight
        need_u, need_base, _, need_d, need_b = ctx.needs_input_grad[:5]
        grad_u = grad_d = grad_b = None
        if need_b:
            grad_b = torch.linalg.vecdot(grad_out, z, dim=0).mul_(weight)
        if need_u or need_d:
            grad_h = grad_out @ (B * (lambda_b * weight)[:, None])  # (N, r)
            if need_d:
                grad_d = (grad_h * u).sum(0)
            if need_u:
                grad_u = grad_h.mul_(lambda_d)
        return grad_u, (grad_out if need_base else None), None, grad_d, grad_b, None


class VeRABranch(AdapterBranch):
    """VeRA on one layer: trained ``lambda_d`` (r,) and ``lambda_b`` (out,), shared frozen projections."""

    def __init__(self, config: VeRA, base_layer: nn.Module, projections: Projections):
        super().__init__(config, base_layer, projections)
        self.n_in, self.n_out = in_out_features(base_layer)
        self.projections = projections
        device = base_layer.weight.device
        self.lambda_d = nn.Parameter(torch.full((config.r,), float(config.d_initial), device=device))
        self.lambda_b = nn.Parameter(torch.zeros(self.n_out, device=device))
        self.p = config.dropout

    def sliced(self) -> tuple[Tensor, Tensor]:
        A, B = self.projections.on(self.lambda_d.device, self.lambda_d.dtype)
        return A[:, : self.n_in], B[: self.n_out, :]

    @in_own_precision
    def forward(self, x: Tensor, base_out: Tensor, base_layer: nn.Module, weight: float = 1.0) -> Tensor:
        dtype, lead = self.lambda_d.dtype, base_out.shape[:-1]
        u = self.projections.project(x, self.n_in, dtype, self.p if self.training else 0.0)
        base2 = base_out.reshape(-1, base_out.shape[-1]).to(dtype)
        B = self.sliced()[1]
        out = _VeRALinear.apply(u, base2, B, self.lambda_d, self.lambda_b, float(weight))
        return out.reshape(*lead, out.shape[-1]).to(base_out.dtype)

    def delta_weight(self, base_layer: nn.Module) -> Tensor:
        A, B = self.sliced()
        return (self.lambda_b[:, None] * B) @ (self.lambda_d[:, None] * A)

    def peft_tensors(self) -> dict[str, Tensor]:
        return {"vera_lambda_b": self.lambda_b, "vera_lambda_d": self.lambda_d}

    def factors(self) -> tuple[Tensor, Tensor]:
        A, B = self.sliced()
        return self.lambda_b[:, None] * B, self.lambda_d[:, None] * A

    def activation_bytes(self, act_bytes: int, adapter_bytes: int) -> int:
        """u = A x and lambda_d * u (r wide each) and the output-wide lambda_b product."""
        return act_bytes * (2 * self.config.r + self.n_out)

    def param_roles(self) -> dict[str, str]:
        return {"lambda_d": "vector", "lambda_b": "vector"}
