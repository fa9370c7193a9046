"""What an adapter trains besides its method's branches: whole modules, some rows of a weight, biases.

Three options of every adapter config (``AdapterConfig``), with PEFT's names and meaning, none of them a method's:

| option | what trains | PEFT file keys (``base_model.model.<layer>.``) |
|---|---|---|
| ``modules_to_save: [lm_head]`` | a full copy of each module whose name ends with an entry (PEFT's rule) | ``weight``, ``bias``, ... (the module's own) |
| ``trainable_token_indices: [ids]`` | those rows of the input embedding (and of a head tied to it); ``{layer: ids}`` names the layers | ``token_adapter.trainable_tokens_delta`` (n, dim) |
| ``bias: all`` / ``lora_only`` | every bias of the model / the biases of the layers the adapter adapts | ``base_layer.bias`` (adapted layers), ``bias`` |

Each becomes one ``Trained`` per layer and adapter name, held by the layer's ``AdapterLayer`` next to the method's
branches (``layer.trained[name]``). While adapter ``name`` is active its tensors *replace* the layer's own for the
whole layer (the base call and the method's branches, so a DoRA branch sees the trained bias), as PEFT computes it:

    copy:  y = copy(x)                    rows:  W' = W with rows W'[i_k] = R_k       bias:  b' = trained b

They start equal to the layer's own tensors (the model is unchanged by ``inject``), are the adapter's own (a swap
changes them, ``remove`` and ``disable_adapters`` give the original layer bit for bit; PEFT trains biases in place
instead), may be active for one adapter at a time on a layer (weight 1), and ``merge`` writes them into the layer
(``fold``). A head whose weight *is* the embedding's (tied) shares the embedding's rows, as PEFT ties them.
Which layers they are on: ``core/trained_plan.py``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

ROWS_KEY = "token_adapter.trainable_tokens_delta"  # PEFT's key suffix of trained rows
FIELDS = ("modules_to_save", "trainable_token_indices", "bias")  # AdapterConfig fields, PEFT's config keys


def check_fields(config: object) -> None:
    """The checks of the three options that need no model (``AdapterConfig.__post_init__``).

    Raises:
        ValueError: naming the option, what it got and what it takes.
    """
    method = getattr(config, "method", "adapter")
    keep = config.modules_to_save
    if keep is not None and (isinstance(keep, str) or not all(isinstance(k, str) and k for k in keep)):
        raise ValueError(f"{method}: modules_to_save must be a list of module names (e.g. ['lm_head']), got {keep!r}.")
    tokens = config.trainable_token_indices
    if tokens is not None:
        lists = tokens.values() if isinstance(tokens, dict) else [tokens]
        if not isinstance(tokens, (list, tuple, dict)) or not lists or not all(_ids_ok(ids) for ids in lists):
            raise ValueError(f"{method}: trainable_token_indices must be a list of distinct token ids, or "
                             f"{{layer name: [ids]}}, got {tokens!r}.")  # fmt: skip
    bias = config.bias
    if not isinstance(bias, str) or not (bias in ("none", "all") or (bias.endswith("_only") and len(bias) > 5)):
        raise ValueError(f"{method}: bias must be 'none', 'all' or 'lora_only' (the biases of the adapted layers), "
                         f"got {bias!r}.")  # fmt: skip


def _ids_ok(ids: object) -> bool:
    return (isinstance(ids, (list, tuple)) and len(ids) > 0 and len(set(ids)) == len(ids)
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids))  # fmt: skip


def has_trained(config: object) -> bool:
    """True when ``config`` asks for any trained tensors besides its method's."""
    return bool(config.modules_to_save or config.trainable_token_indices or config.bias != "none")


class Trained(nn.Module):
    """Tensors one adapter trains in place of one layer's own (module docstring): a whole ``copy`` of the layer,
    or ``rows`` of its weight at ``indices`` and/or its ``bias``. ``follows`` names the layer whose rows these are
    (a head tied to the embedding): they are that layer's ``rows`` Parameter itself, saved once, under its name."""

    def __init__(self, layer: nn.Module, *, whole: bool = False, indices: list[int] | None = None,
                 bias: bool = False, rows: nn.Parameter | None = None, follows: str | None = None):  # fmt: skip
        super().__init__()
        self.register_module("copy", copy.deepcopy(layer).requires_grad_(True) if whole else None)
        self.register_parameter("rows", None)
        self.register_parameter("bias", None)
        self.follows = follows
        if indices is not None:
            self.register_buffer("indices", torch.tensor(indices, dtype=torch.long, device=layer.weight.device),
                                 persistent=False)  # fmt: skip
            self.rows = rows if rows is not None else nn.Parameter(layer.weight.detach()[self.indices].clone())
        if bias:
            self.bias = nn.Parameter(layer.bias.detach().clone())

    def describe(self) -> str:
        """What this trains, for messages: ``"a copy"``, ``"3 token rows"``, ``"the bias"``."""
        parts = ["a copy"] if self.copy is not None else []
        parts += [f"{len(self.indices)} token rows"] if self.rows is not None else []
        return " and ".join(parts + (["the bias"] if self.bias is not None else []))

    def tensors(self) -> dict[str, Tensor]:
        """The trained tensors by name (a tied follower's rows are its leader's: not listed)."""
        if self.copy is not None:
            return dict(self.copy.state_dict(keep_vars=True))
        out = {"rows": self.rows} if self.rows is not None and self.follows is None else {}
        return out | ({"bias": self.bias} if self.bias is not None else {})

    def peft_tensors(self, adapted: bool) -> dict[str, Tensor]:
        """The tensors under PEFT's key suffixes (after ``base_model.model.<layer>.``); ``adapted``: the adapter's
        method also adapts this layer, so PEFT holds its bias in the tuner layer's ``base_layer``."""
        if self.copy is not None:
            return {k: v for k, v in self.copy.state_dict().items()}
        out = {ROWS_KEY: self.rows} if self.rows is not None and self.follows is None else {}
        if self.bias is not None:
            out["base_layer.bias" if adapted else "bias"] = self.bias
        return out

    def call(self, base: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
        """The layer's output with these tensors and no branch on it. Rows of a plain ``nn.Embedding``/``nn.Linear``
        patch the frozen base's output (the same values as the swapped weight, with no gradient for the whole
        weight: on a 49k-token head that gradient is a second full matmul); anything else runs ``in_place_of``."""
        if self.rows is not None and self.copy is None and not args and not kwargs:
            rows = self.rows.to(base.weight.dtype)
            if type(base) is nn.Embedding and base.max_norm is None:
                hits = x.unsqueeze(-1) == self.indices
                found, which = hits.any(-1, keepdim=True), hits.int().argmax(-1)
                return torch.where(found, rows[which], base(x))
            if type(base) is nn.Linear:
                bias = base.bias if self.bias is None else self.bias
                out = F.linear(x, base.weight, bias)
                columns = F.linear(x, rows, None if bias is None else bias[self.indices])
                return out.index_copy(-1, self.indices, columns)
        with self.in_place_of(base) as replaced:
            return replaced(x, *args, **kwargs)

    @contextlib.contextmanager
    def in_place_of(self, base: nn.Module) -> Iterator[nn.Module]:
        """Inside the block ``base`` computes with these tensors (yielded: the module to call as the base)."""
        if self.copy is not None:
            yield self.copy
            return
        swaps = {}
        if self.rows is not None:
            weight = base.weight
            swaps["weight"] = weight.index_copy(0, self.indices, self.rows.to(weight.dtype))
        if self.bias is not None:
            swaps["bias"] = self.bias
        saved = {n: base._parameters[n] for n in swaps}
        base._parameters.update(swaps)  # the same swap as torch.func.functional_call, for the branches too
        try:
            yield base
        finally:
            base._parameters.update(saved)

    def fold(self, base: nn.Module, folded: dict) -> nn.Module:
        """``base`` with these tensors written in (for ``merge``): the copy itself, or ``base`` with a new weight
        and/or bias. ``folded`` maps (weight, rows) already folded to their new weight, so tied layers stay tied."""
        if self.copy is not None:
            return self.copy
        with torch.no_grad():
            if self.rows is not None:
                weight = base.weight
                key = (id(weight), id(self.rows))
                if key not in folded:
                    new = weight.index_copy(0, self.indices, self.rows.to(weight.dtype))
                    folded[key] = nn.Parameter(new, requires_grad=weight.requires_grad)
                base.weight = folded[key]
            if self.bias is not None:
                base.bias = nn.Parameter(self.bias.detach().to(base.bias.dtype), requires_grad=base.bias.requires_grad)
        return base


def active_trained(layer: nn.Module) -> Trained | None:
    """The ``Trained`` of ``layer``'s active adapter (at most one may have one, ``check_active``), or None."""
    trained = layer._modules["trained"]._modules
    return next((trained[n] for n in layer.active if n in trained), None) if trained else None


def check_active(layer: nn.Module, weights: Mapping[str, float], name_of: Callable[[], str]) -> None:
    """The rules of trained tensors on one layer, for ``set_adapter``: weight 1, one adapter with trained tensors
    active, and no other active adapter's branch beside a whole copy. ``name_of()`` gives the layer's name.

    Raises:
        ValueError: naming the adapters, the layer and what they train.
    """
    trained = layer._modules["trained"]._modules
    owners = [n for n in weights if n in trained]
    if not owners:
        return
    target = name_of()
    what = f"{trained[owners[0]].describe()} of {target!r}"
    if len(owners) > 1:
        raise ValueError(f"adapters {owners} both train {what} (modules_to_save, trainable_token_indices, bias): "
                         "only one of them can be active on it; activate them one at a time or merge one first.")
    if weights[owners[0]] != 1.0:
        raise ValueError(f"adapter {owners[0]!r} trains {what}, which replaces the layer's own tensors and cannot be "
                         "weighted; use weight 1.")
    others = [n for n in weights if n != owners[0] and n in layer.adapters]
    if trained[owners[0]].copy is not None and others:
        raise ValueError(f"adapter {owners[0]!r} trains a copy of {target!r} (modules_to_save), which adapter(s) "
                         f"{others} also adapt; activate them one at a time.")


def set_trainable(layer: nn.Module, weights: Mapping[str, float]) -> None:
    """Trained tensors of the active adapters train (``requires_grad``); the others do not."""
    for n, trained in layer._modules["trained"]._modules.items():
        for p in trained.parameters():
            p.requires_grad_(n in weights)


def check_finite(target: str, trained: Trained) -> None:
    """Raise ValueError (merge refused, model unchanged) when a trained tensor holds NaN/inf."""
    for key, value in trained.tensors().items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"merge refused: the trained {key} of {target!r} holds non-finite (NaN/inf) values; the "
                             "model is unchanged. Check the training run that produced them.")


def fold_all(model: nn.Module, layers: Mapping[str, nn.Module]) -> None:
    """Write the active trained tensors of ``layers`` (target -> ``AdapterLayer``) into their base layers, before
    the methods' branches are merged. When the input and output embeddings stop sharing their weight (a trained copy
    of one, different rows), the model's config says they are no longer tied."""
    folded: dict = {}
    for layer in layers.values():
        trained = active_trained(layer)
        if trained is not None:
            layer.base_layer = trained.fold(layer.base_layer, folded)
    _note_untied(model, layers)


def _note_untied(model: nn.Module, layers: Mapping[str, nn.Module]) -> None:
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "tie_word_embeddings", False):
        return
    try:
        pair = [model.get_input_embeddings(), model.get_output_embeddings()]
    except (AttributeError, NotImplementedError):
        return
    if any(m is None for m in pair):
        return
    weights = [getattr(m.base_layer if m in layers.values() else m, "weight", None) for m in pair]
    if weights[0] is not weights[1]:
        config.tie_word_embeddings = False
        log.info("merge: the input and output embeddings no longer share their weight (trained separately); the "
                 "model's config now says tie_word_embeddings: false.")
