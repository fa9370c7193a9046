"""``AdapterCallback``: add an adapter to any existing LightningModule by adding one callback to its Trainer.

Example::

    trainer = Trainer(callbacks=[AdapterCallback(LoRA(r=8), target="model", export_dir="out")])
    trainer.fit(MyModule())          # MyModule keeps its own training_step and configure_optimizers

What it does, in Lightning's hook order (REFERENCE section 4):

- ``setup``: wraps the module instance's ``configure_model`` with a plain function that runs the original and then
  quantizes (optional) and injects. Lightning calls ``configure_model`` right after ``setup``, so this covers a model
  built in ``__init__``, in ``setup`` or in ``configure_model`` (Lightning issue 19658). Injection is idempotent.
- The base is frozen by ``inject``, before ``configure_optimizers`` runs: an optimizer over
  ``filter(lambda p: p.requires_grad, self.parameters())`` or over ``self.parameters()`` trains only the adapter.
  LoRA+ (arXiv:2402.12354) is one line in your ``configure_optimizers``::

      return torch.optim.AdamW(lightning_lora.param_groups(self, lr=2e-4, lr_ratio=16))

- Checkpoints hold only the adapter (and any other parameter that requires grad). The filter is installed on the
  module's ``on_save_checkpoint``, because ``Callback.on_save_checkpoint`` is skipped with
  ``ModelCheckpoint(save_weights_only=True)``; ``strict_loading`` is set to False so such checkpoints load and resume.
- ``on_train_end``: with ``export_dir``, writes the ``exports`` (default ``<dir>/adapter`` in PEFT format and
  ``<dir>/merged``) as one transaction (rank 0 only).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from lightning_lora.core.heap import release_host_memory
from lightning_lora.core.layer import AdapterConfig
from lightning_lora.core.verbs import adapter_names
from lightning_lora.io.checkpoint import keep_adapter_only, write_facts
from lightning_lora.io.export import check_export_dir
from lightning_lora.io.tokens import add_new_tokens, check_new_tokens
from lightning_lora.methods.lora import LoRA
from lightning_lora.quant.prepare import check_start, prepare
from lightning_lora.train.card_facts import run_facts
from lightning_lora.train.distributed import export_from_rank_zero, hf_source, shard_for
from lightning_lora.train.guards import check_finite_adapter, check_finite_loss

_ORIGINAL = "_lightning_lora_original_hooks"


class AdapterCallback(Callback):
    """Inject ``adapter`` into ``pl_module`` (or its attribute ``target``) and keep checkpoints adapter-only.

    Args:
        adapter: the adapter config (``LoRA(...)``, ``DoRA(...)``, ``VeRA(...)``); default ``LoRA()``.
        quantize: ``NF4(...)`` to quantize the target's linear layers first (QLoRA), or None.
        target: attribute of the LightningModule that holds the model (e.g. ``"model"``, dotted paths allowed);
            None adapts the whole LightningModule.
        export_dir: when set, the ``exports`` are written there at the end of training, as one transaction.
        name: the adapter's name.
        exports: the formats (``io/export.py``): ``peft``, ``merged``, ``gguf``, ``gguf-merged[:f16|bf16|q8_0]``;
            default ``[peft, merged]``. Before writing, the merged model runs a probe batch: a Hugging Face
            language model's own, else the LightningModule's ``example_input_array`` when the adapter covers it
            (``target=None``); without either, only the tensors are checked for NaN/inf.
        new_tokens: tokens to add: when the adapter is injected (after ``configure_model``), they join
            ``pl_module.tokenizer`` (tokenize your data after that), the target's embeddings grow to match and the
            adapter trains only their rows (``io/tokens.py``).

    Raises:
        TypeError: ``adapter`` is not an adapter config.
        AttributeError: (at setup) the module has no attribute ``target`` after ``configure_model``.
    """

    def __init__(
        self,
        adapter: AdapterConfig | None = None,
        quantize: Any = None,
        target: str | None = None,
        export_dir: str | None = None,
        name: str = "default",
        exports: list[str] | None = None,
        new_tokens: list[str] | None = None,
    ):
        adapter = LoRA() if adapter is None else adapter
        self.new_tokens = check_new_tokens(new_tokens, adapter)
        check_start(adapter, quantize)
        if target is not None and (not isinstance(target, str) or not target):
            raise ValueError(f"target must be an attribute name of your LightningModule (e.g. 'model') or None, got {target!r}.")
        self.adapter = adapter
        self.quantize = quantize
        self.target = target
        if export_dir is not None:
            check_export_dir(export_dir, exports)
        self.export_dir = export_dir
        self.name = name
        self.exports = exports
        self.exported: dict = {}  # {format: path} written at the end of training

    # ------------------------------------------------------------------ helpers
    def target_module(self, pl_module: LightningModule) -> nn.Module:
        """The module the adapter goes on."""
        if self.target is None:
            return pl_module
        module = pl_module
        for part in self.target.split("."):
            module = getattr(module, part, None)
            if module is None:
                raise AttributeError(
                    f"AdapterCallback(target={self.target!r}): {type(pl_module).__name__} has no module at "
                    f"{self.target!r} after configure_model; build your model in __init__, setup or configure_model, "
                    "or pass the right attribute name (None adapts the whole LightningModule)."
                )
        if not isinstance(module, nn.Module):
            raise TypeError(f"AdapterCallback(target={self.target!r}) is a {type(module).__name__}, not an nn.Module.")
        return module

    def _prefix(self) -> str:
        return "" if self.target is None else self.target + "."

    def inject_into(self, pl_module: LightningModule) -> nn.Module:
        """Quantize (optional) and inject into the target, once; return the target."""
        model = self.target_module(pl_module)
        if self.name in adapter_names(model):
            return model
        tokenizer = getattr(pl_module, "tokenizer", None)
        if self.new_tokens and tokenizer is None:
            raise ValueError("AdapterCallback(new_tokens=...) adds them to pl_module.tokenizer, which "
                             f"{type(pl_module).__name__} does not have; set self.tokenizer in your module.")
        adapter = add_new_tokens(model, tokenizer, self.adapter, self.new_tokens)  # resized, their rows train
        prepare(model, adapter, self.name, self.quantize)  # in place: quantize, inject, init (PiSSA/LoftQ)
        return model

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if _ORIGINAL in vars(pl_module):
            return
        originals = {"configure_model": pl_module.configure_model, "on_save_checkpoint": pl_module.on_save_checkpoint}
        object.__setattr__(pl_module, _ORIGINAL, originals)
        callback = self

        # Plain functions (not functools.wraps): Lightning's is_overridden would follow __wrapped__ to the base
        # class's empty hook and skip it.
        def configure_model() -> None:
            originals["configure_model"]()
            shard_for(pl_module, callback.inject_into(pl_module))  # FSDP2 under ModelParallelStrategy

        def on_save_checkpoint(checkpoint: dict) -> None:
            originals["on_save_checkpoint"](checkpoint)
            check_finite_adapter(pl_module._trainer, callback.target_module(pl_module))  # never a NaN checkpoint
            keep_adapter_only(checkpoint, pl_module, callback.target_module(pl_module), callback._prefix())
            write_facts(checkpoint, adapter=callback.adapter, adapter_name=callback.name, quantize=callback.quantize,
                        run=run_facts(trainer), new_tokens=callback.new_tokens)  # fmt: skip

        object.__setattr__(pl_module, "configure_model", configure_model)
        object.__setattr__(pl_module, "on_save_checkpoint", on_save_checkpoint)
        pl_module.strict_loading = False

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Put the module's own hooks back (the adapter stays); a later fit wraps them again."""
        originals = vars(pl_module).pop(_ORIGINAL, None)
        if originals is not None:
            for hook in originals:
                vars(pl_module).pop(hook, None)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        release_host_memory(pl_module)  # the checkpoint file's pages and the heap's free ones (core/heap.py)

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Any) -> None:
        check_finite_loss(trainer, loss)  # NaN/inf: stop before it updates the adapter, naming the step

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.export_dir is None:
            return
        model = self.target_module(pl_module)
        # Every rank calls it (FSDP2 gathers the adapter's shards); only rank 0 writes.
        example = getattr(pl_module, "example_input_array", None) if self.target is None else None
        self.exported = export_from_rank_zero(
            model, self.export_dir, is_global_zero=trainer.is_global_zero, name=self.name, exports=self.exports,
            base_model=hf_source(model) if self.quantize else None, tokenizer=getattr(pl_module, "tokenizer", None),
            run=run_facts(trainer), share=(trainer,), probe_input=example)

