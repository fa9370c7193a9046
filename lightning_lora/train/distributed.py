"""Adapters under Lightning's distributed strategies: DDP as is, FSDP2 (``ModelParallelStrategy``) via ``shard``.

DDP (``strategy="ddp"``) needs nothing special: only the adapter requires grad, so DDP all-reduces only its
gradients, every rank holds the same full adapter, and checkpoints/exports are written by rank 0.

FSDP2 (Zhao et al. 2023, arXiv:2304.11277; PyTorch ``fully_shard``) shards every parameter on dim 0 across the
data-parallel ranks: rank k keeps rows [k*ceil(n/W), (k+1)*ceil(n/W)) of each tensor, frozen base and adapter alike.
``shard(model, mesh)`` applies ``fully_shard`` to each decoder layer, then to the root. Inside a layer's forward FSDP
all-gathers the layer's parameters, so an adapter sees the full base weight there: DoRA's row norm
``||W + s B A||_row`` is computed from the full W, exactly as without sharding. Outside forward (saving, exporting,
merging) parameters are ``DTensor`` shards: ``gathered(model)`` swaps them for full tensors (a collective: call it
on every rank), and ``full_adapter_state(model)`` returns the full adapter tensors (``DTensor.full_tensor()``), so a
saved adapter holds every rank's rows, not only rank 0's shard.

QLoRA under FSDP: FSDP cannot shard integer tensors, so the NF4 data must be stored in a float dtype
(bitsandbytes ``quant_storage=torch.float32`` or ``bfloat16``); the bytes are the same, only their dtype label
differs. The quantization state (absmax, code) is not a parameter and stays whole on every rank.

Example (inside a LightningModule trained with ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)``)::

    def configure_model(self):
        ...build and inject...
        shard(self.model, self.device_mesh)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lightning_lora.core.verbs import adapter_layers, adapter_state_dict
from lightning_lora.io.export import export


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(model: nn.Module) -> bool:
    """True when any parameter of ``model`` is a ``DTensor`` (the model went through ``fully_shard``)."""
    DTensor = _dtensor_type()
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor: ``DTensor.full_tensor()`` (an all-gather: every rank must call it) or ``tensor`` itself."""
    DTensor = _dtensor_type()
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def data_parallel_mesh(device_mesh):
    """The mesh FSDP shards over: the ``data_parallel`` dimension of Lightning's 2-D mesh, or a 1-D mesh as given.

    Raises:
        ValueError: the mesh has a tensor-parallel dimension larger than 1 (we only shard, we do not split layers).
    """
    names = device_mesh.mesh_dim_names or ()
    if "data_parallel" not in names:
        return device_mesh
    if "tensor_parallel" in names and device_mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"shard: the device mesh has tensor_parallel size {device_mesh['tensor_parallel'].size()}; adapters are "
            "trained with FSDP (data parallel) only. Use ModelParallelStrategy(data_parallel_size=<number of "
            "devices>, tensor_parallel_size=1) (Lightning's default puts every device on the tensor-parallel axis)."
        )
    return device_mesh["data_parallel"]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: Hugging Face's ``_no_split_modules`` classes (``LlamaDecoderLayer``,
    ``GPT2Block``, ...), else the children of the largest ``nn.ModuleList``."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard(model: nn.Module, device_mesh, reshard_after_forward: bool = True, mp_policy=None) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` to every decoder layer of ``model`` and then to ``model`` itself (in place).

    Call it after ``inject`` (and after quantizing, for QLoRA): FSDP sizes its buffers from the parameters present
    when it shards. Sharding twice does nothing.

    Args:
        device_mesh: Lightning's ``self.device_mesh`` (its ``data_parallel`` dimension is used) or a 1-D mesh.
        reshard_after_forward: free the gathered layer after forward (ZeRO-3, less memory); False keeps it for
            backward (ZeRO-2, one all-gather less).
        mp_policy: an optional ``torch.distributed.fsdp.MixedPrecisionPolicy``.

    Raises:
        ValueError: an integer (packed 4-bit) parameter, which FSDP cannot shard; or a tensor-parallel mesh.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if isinstance(model, FSDPModule):
        return model
    integer = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if integer:
        raise ValueError(
            f"shard: FSDP cannot shard integer parameters ({len(integer)}, e.g. {integer[0]!r}): quantize with a float "
            "storage dtype (bitsandbytes quant_storage=torch.float32 or torch.bfloat16, i.e. NF4(quant_storage=...))."
        )
    mesh = data_parallel_mesh(device_mesh)
    group, src = mesh.get_group(), mesh.mesh.flatten()[0].item()
    with torch.no_grad():  # every rank starts from rank 0's adapter (FSDP keeps each rank's own rows as they are)
        for param in model.parameters():
            if param.requires_grad:
                torch.distributed.broadcast(param.data, src=src, group=group)
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    kwargs["mp_policy"] = mp_policy if mp_policy is not None else MixedPrecisionPolicy()
    for block in decoder_layers(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


@contextmanager
def gathered(model: nn.Module, adapters_only: bool = True) -> Iterator[nn.Module]:
    """Inside the block, the sharded (``DTensor``) parameters of ``model``'s adapters (all of them with
    ``adapters_only=False``) are replaced by full, detached tensors; the shards are put back on exit.

    A collective under FSDP2: every rank must enter it (typically ``with gathered(m): if rank == 0: save(m)``).
    Nothing may run forward or step the optimizer inside. Without sharding it does nothing.
    """
    DTensor = _dtensor_type()
    owners = [module for layer in adapter_layers(model).values() for part in (layer.adapters, layer.trained)
              for top in part.values() for module in top.modules()]  # branches, and trained copies, rows, biases
    if not adapters_only:
        owners = list(model.modules())
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module in owners:
            for name, param in list(module._parameters.items()):
                if isinstance(param, DTensor):
                    full = nn.Parameter(param.full_tensor().detach(), requires_grad=False)
                    module._parameters[name] = full
                    swapped.append((module, name, param))
        yield model
    finally:
        for module, name, param in reversed(swapped):
            module._parameters[name] = param


def full_adapter_state(model: nn.Module, name: str | None = None) -> dict[str, Tensor]:
    """``adapter_state_dict(model, name)`` with every sharded tensor gathered in full (collective under FSDP2)."""
    return {k: full_tensor(v).detach().clone() for k, v in adapter_state_dict(model, name).items()}


def shard_for(pl_module: nn.Module, model: nn.Module) -> nn.Module:
    """``shard(model, pl_module.device_mesh)`` when the strategy gives the LightningModule a device mesh
    (``ModelParallelStrategy``); otherwise (single device, DDP) ``model`` unchanged. Call it in ``configure_model``."""
    mesh = getattr(pl_module, "_device_mesh", None)
    return model if mesh is None else shard(model, mesh)


def hf_source(model: nn.Module) -> str | None:
    """The local folder a Hugging Face model was loaded from, if known."""
    from pathlib import Path

    path = getattr(model, "name_or_path", None)
    return str(path) if path and Path(str(path)).is_dir() else None


def export_from_rank_zero(model: nn.Module, export_dir, *, is_global_zero: bool, base_model: str | None = None,
                          **kwargs) -> dict:  # fmt: skip
    """``export.export(model, export_dir, base_model=..., **kwargs)`` written once, by rank 0, with full adapters;
    returns its paths on rank 0 (``{}`` elsewhere).

    Every rank must call it (under FSDP2 the adapter is gathered from all ranks first). A sharded model cannot be
    copied to merge, so under FSDP2 the merge uses the base's source folder (``base_model``, else the folder the
    model was loaded from).

    Raises:
        ValueError: (every rank) the model is sharded and no source of its base weights is known.
    """
    if is_sharded(model) and base_model is None:
        base_model = hf_source(model)
        if base_model is None:
            raise ValueError(
                "export under FSDP2: the merged model is rebuilt from the base's source, but this model does not say "
                "where it was loaded from; load it with from_pretrained(<folder>) or export offline from a checkpoint."
            )
    sharded = is_sharded(model)
    with gathered(model):
        if is_global_zero:  # a sharded model cannot run its probe batch alone: the merged copy runs it
            return export(model, export_dir, base_model=base_model, runs_alone=not sharded, **kwargs)
    return {}


__all__ = ["data_parallel_mesh", "decoder_layers", "export_from_rank_zero", "full_adapter_state", "full_tensor",
           "gathered", "hf_source", "is_sharded", "shard", "shard_for"]  # fmt: skip
