"""LoRA+ optimizer parameter groups (Hayou et al. 2024, arXiv:2402.12354, section 4).

LoRA+ trains B with a learning rate ``lr_ratio`` times A's (the paper shows lr_B / lr_A >> 1 is needed for efficient
feature learning at large width; PEFT's docs suggest 16, the authors' README 20). Where each tensor goes:

Each method says which role each of its tensors plays (``AdapterBranch.param_roles``, the method contract):

| role | tensors (built-in methods) | group | lr | weight decay |
|---|---|---|---|---|
| ``slow`` | LoRA/DoRA ``lora_A`` (linear, conv) | ``lora_A`` | lr | weight_decay |
| ``fast`` | LoRA/DoRA ``lora_B`` (linear, conv) | ``lora_B`` | lr * lr_ratio | weight_decay |
| ``embedding`` | ``lora_A``, ``lora_B`` on ``nn.Embedding`` | ``embedding`` | ``embedding_lr`` (default lr) | weight_decay |
| ``vector`` | DoRA magnitudes, VeRA lambda_d / lambda_b | ``vectors`` | lr | 0 |
| (none) | any other trainable parameter (a head the user unfroze; 1-D ones go to ``vectors``) | ``other`` | lr | weight_decay |

1-D vectors get A's rate, not B's: they are scales, not the "output side" of a low-rank product, and giving DoRA
magnitudes B's rate (as PEFT's helper does) makes them move ``lr_ratio`` times faster than the paper intends.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

from torch import nn

from lightning_lora.core.layer import AdapterBranch


def optimizer_class(optimizer: Any) -> tuple[Any, dict]:
    """The class behind an optimizer callable and the keywords bound to it: a class, a ``functools.partial`` of one,
    or LightningCLI's ``OptimizerCallable`` (a partial around jsonargparse's instantiator, the class among its args)."""
    target, keywords = optimizer, {}
    while isinstance(target, functools.partial):
        keywords = {**target.keywords, **keywords}
        classes = [a for a in (target.func, *target.args) if inspect.isclass(a)]
        target = classes[0] if classes else target.func
    return target, keywords


def param_groups(
    model: nn.Module,
    lr: float,
    lr_ratio: float = 16.0,
    weight_decay: float = 0.0,
    embedding_lr: float | None = None,
) -> list[dict]:
    """Named optimizer groups for LoRA+ (see the module docstring); empty groups are left out.

    Learning-rate schedulers scale each group from its own ``lr`` (they multiply every group's initial lr).

    Example (also the one line for an ``AdapterCallback`` user's own ``configure_optimizers``)::

        return torch.optim.AdamW(lightning_lora.param_groups(self, lr=2e-4, lr_ratio=16))

    Raises:
        ValueError: ``lr``, ``lr_ratio`` or ``embedding_lr`` is not a finite number > 0.
    """
    if not _positive(lr):
        raise ValueError(f"param_groups: lr must be a finite number > 0, got {lr!r}.")
    if not _positive(lr_ratio):
        raise ValueError(
            f"param_groups: lr_ratio must be a finite number > 0 (LoRA+ uses 16 to 20; 1 is plain LoRA), got {lr_ratio!r}."
        )
    if embedding_lr is not None and not _positive(embedding_lr):
        raise ValueError(f"param_groups: embedding_lr must be a finite number > 0 or None, got {embedding_lr!r}.")
    if not 0.0 <= weight_decay < math.inf:
        raise ValueError(f"param_groups: weight_decay must be a finite number >= 0, got {weight_decay!r}.")
    group_of_role = {"slow": "lora_A", "fast": "lora_B", "embedding": "embedding", "vector": "vectors"}
    role: dict[int, str] = {}
    for module in model.modules():
        if isinstance(module, AdapterBranch):  # each method names its tensors' roles (the method contract)
            for pname, r in module.param_roles().items():
                if r not in group_of_role:
                    raise ValueError(f"param_groups: {module.config.method} gives {pname!r} the unknown role {r!r}; "
                                     f"roles are {list(group_of_role)}.")
                role[id(getattr(module, pname))] = group_of_role[r]
    settings = {
        "lora_A": (lr, weight_decay),
        "lora_B": (lr * lr_ratio, weight_decay),
        "embedding": (embedding_lr or lr, weight_decay),
        "vectors": (lr, 0.0),
        "other": (lr, weight_decay),
    }
    grouped: dict[str, list] = {name: [] for name in settings}
    for param in model.parameters():
        if param.requires_grad:
            name = role.get(id(param)) or ("vectors" if param.ndim == 1 else "other")
            grouped[name].append(param)
    return [
        {"name": name, "params": params, "lr": settings[name][0], "weight_decay": settings[name][1]}
        for name, params in grouped.items()
        if params
    ]


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf
