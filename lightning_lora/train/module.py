"""``LoRAModule``: fine-tune a Hugging Face causal LM with an adapter (LoRA, DoRA, VeRA; optionally over NF4).

The base model is loaded, quantized (QLoRA) and injected in ``configure_model`` (idempotent), so under sharded
strategies it is built inside Lightning's init contexts. Training minimises the causal-LM loss on ``batch["labels"]``
(-100 = ignored), with the output head run on the labeled positions only, in chunks (``train/loss.py``), averaged
over the labeled tokens of the whole optimizer step, every accumulated micro-batch and every rank (``step_loss.py``);
batches may be packed (``position_ids`` restarting per example, no ``attention_mask``); validation reports the
token-weighted mean loss and perplexity exp(mean loss). Checkpoints hold
only the trainable tensors (the adapter), not the frozen base, and resume exactly, mid-epoch too: optimizer state,
the data loader's position and every rank's RNG states (adapter dropout) are restored (``train/resume.py``).

Example::

    module = LoRAModule("smollm2-135m-instruct", adapter=LoRA(r=8), export_dir="out")
    Trainer(max_steps=100).fit(module, InstructionDataModule(source="chatterbot"))
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.aggregation import MeanMetric

from lightning_lora.core.dtypes import dtype_name
from lightning_lora.core.heap import release_host_memory
from lightning_lora.core.layer import AdapterConfig
from lightning_lora.io.checkpoint import keep_adapter_only, write_facts
from lightning_lora.io.export import check_export_dir
from lightning_lora.io.models import load_causal_lm, load_tokenizer
from lightning_lora.io.tokens import add_new_tokens, add_to_tokenizer, check_new_tokens
from lightning_lora.methods.lora import LoRA
from lightning_lora.quant.nf4 import NF4
from lightning_lora.quant.prepare import check_start, prepare
from lightning_lora.train.attention import use_packed_attention
from lightning_lora.train.card_facts import run_facts
from lightning_lora.train.checkpointing import check_mode, enable_checkpointing, offloading
from lightning_lora.train.compiling import check_compile, compile_layers
from lightning_lora.train.distributed import export_from_rank_zero, shard_for
from lightning_lora.train.eval_report import evaluate_at_end
from lightning_lora.train.guards import ExportDirLock, FiniteLossGuard, check_finite_adapter
from lightning_lora.train.lean_swap import use_lean_activations
from lightning_lora.train.loss import CHUNK_SIZE, causal_lm_loss, packing_refusal
from lightning_lora.train.memory import check_optimizer_supported, memory_report
from lightning_lora.train.optim import optimizer_class, param_groups
from lightning_lora.train.resume import ExactResume
from lightning_lora.train.step_loss import TokenWeightedLoss


def enable_adapter_subclass_mode() -> None:
    """Let jsonargparse (LightningCLI) parse ``adapter:`` as ``class_path``/``init_args``.

    jsonargparse treats dataclasses as fixed nested groups by default; our adapter configs are dataclasses with
    subclasses (LoRA, DoRA, VeRA), so we enable subclass mode for ``AdapterConfig`` (and NF4 stays a plain group).
    """
    try:
        from jsonargparse import set_parsing_settings
    except ImportError:  # pragma: no cover - jsonargparse is only needed for the CLI
        return
    set_parsing_settings(subclasses_enabled=[AdapterConfig])


enable_adapter_subclass_mode()


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` with the usual LoRA learning rate (2e-4) as its default; the default ``optimizer``.

    ``fused=None`` (default) takes torch's fused step (one kernel over all tensors, the same update up to rounding)
    when every parameter is a floating tensor on a CPU, CUDA or XPU device, else torch's own choice. A LoRA of
    SmolLM2 has 420 small tensors: its step takes ~4 ms fused on one CPU thread, ~17 ms in the per-tensor loop.
    """

    def __init__(self, params, lr: float = 2e-4, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, fused: bool | None = None):  # fmt: skip
        # a group's params may be any iterable or one tensor (as torch allows): read each once, pass on the list
        params = [{**g, "params": _listed(g["params"])} if isinstance(g, dict) else g for g in params]
        if fused is None:
            tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
            fused = all(p.is_floating_point() and p.device.type in _FUSED_DEVICES for p in tensors) or None
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)


_FUSED_DEVICES = ("cpu", "cuda", "xpu")  # where torch's fused AdamW runs


def _listed(params) -> list:
    return [params] if isinstance(params, torch.Tensor) else list(params)


def optimizer_defaults(optimizer: Any) -> dict[str, Any]:
    """``lr`` and ``weight_decay`` an optimizer callable would use: its bound keywords, else its signature defaults."""
    target, keywords = optimizer_class(optimizer)
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        params = {}
    out = {}
    for key in ("lr", "weight_decay"):
        if key in keywords:
            out[key] = keywords[key]
        elif key in params and params[key].default is not inspect.Parameter.empty:
            out[key] = params[key].default
    if not isinstance(out.get("lr"), (int, float)):
        raise ValueError(
            f"lr_ratio (LoRA+) needs the optimizer's learning rate, but {optimizer!r} does not give a numeric lr; "
            "set it explicitly, e.g. `optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 2e-4}}`."
        )
    out.setdefault("weight_decay", 0.0)
    return out


class LoRAModule(LightningModule):
    """Adapter fine-tuning of a causal LM (see the module docstring).

    Args:
        base_model: a built-in alias (``smollm2-135m-instruct``), a local Hugging Face folder, or a cached hub id.
        adapter: the adapter config (``LoRA()``, ``DoRA(...)``, ``VeRA(...)``); default LoRA r=8 on all linear layers.
        quantize: ``NF4(...)`` to quantize the base before injecting (QLoRA), or None.
        optimizer: a callable ``params -> Optimizer`` (LightningCLI: ``class_path``/``init_args``); default AdamW
            with lr 2e-4.
        lr_scheduler: optional callable ``optimizer -> LRScheduler``, stepped every optimizer step.
        lr_ratio: LoRA+ (arXiv:2402.12354): when set, the optimizer gets ``param_groups(model, lr, lr_ratio,
            weight_decay)`` with ``lr``/``weight_decay`` taken from the optimizer callable's arguments (or its
            defaults), so B matrices learn ``lr_ratio`` times faster than A.
        gradient_checkpointing: recompute activations in backward: ``True`` whole decoder layers (Hugging Face's
            ``gradient_checkpointing_enable``), ``"mlp"`` each layer's MLP only: about half the activations for
            about a sixth more time (``train/checkpointing.py``).
        offload_activations: on an accelerator, keep the tensors autograd saves for backward in pinned host memory
            during training steps (with checkpointing: the layer inputs); nothing on CPU.
        export_dir: when set, the ``exports`` are written there at the end of training, as one transaction.
        exports: the formats (``io/export.py``): ``peft`` (``adapter/``), ``merged`` (``merged/``), ``gguf``
            (``adapter.gguf``), ``gguf-merged[:f16|bf16|q8_0]`` (``merged-<type>.gguf``); default ``[peft, merged]``.
        dtype: dtype to load the base in (``"float32"`` default, ``"bfloat16"``, ``"auto"``).
        trust_remote_code: allow code shipped with the model (off by default).
        adapter_name: the adapter's name on the model.
        loss_chunk_size: labeled tokens per chunk of the output head + cross-entropy (``train/loss.py``); the loss
            never holds more than this many rows of logits.
        lean_activations: run the model's RMSNorms, SwiGLU MLPs and rotary embedding as functions that keep only
            their inputs for backward (``train/lean.py``), where a probe shows the model computes the same
            (``train/lean_swap.py``); elsewhere nothing changes.
        evaluate: at the end of ``fit``, before the export, evaluate the base (adapter off) and the trained adapter
            side by side on the first validation examples (``True``: 32; a number: that many): loss, perplexity,
            exact match, ROUGE-L and chrF of greedy replies (``train/evaluate.py``). ``evaluation.json`` and
            ``evaluation.md`` go to ``export_dir`` (else the log folder), and the adapter's model card shows the table.
        new_tokens: tokens to add (e.g. a chat template's markers): the tokenizer gets them, the embeddings grow to
            match, and the adapter trains only their rows (``io/tokens.py``); exports carry them.
        compile: ``torch.compile`` each decoder layer (regional compilation, ``train/compiling.py``) after every
            other swap, where a probe step shows the same logits and gradients; ``True`` with torch's defaults
            (inductor), or a dict of ``torch.compile`` options (e.g. ``{backend: aot_eager}``). Off by default:
            compiling costs time up front (measured in BENCHMARKS.md).
    """

    def __init__(
        self,
        base_model: str,
        adapter: AdapterConfig = LoRA(),
        quantize: NF4 | None = None,  # type: ignore[valid-type]
        optimizer: OptimizerCallable = AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_ratio: float | None = None,
        gradient_checkpointing: bool | Literal["mlp"] = False,
        offload_activations: bool = False,
        export_dir: str | None = None,
        dtype: str | None = None,
        trust_remote_code: bool = False,
        adapter_name: str = "default",
        exports: list[str] | None = None,
        loss_chunk_size: int = CHUNK_SIZE,
        lean_activations: bool = True,
        evaluate: bool | int = False,
        new_tokens: list[str] | None = None,
        compile: bool | dict[str, Any] = False,
    ):
        super().__init__()
        check_start(adapter, quantize)  # e.g. init="loftq" without quantize: say so now, not after loading the model
        if lr_ratio is not None and not lr_ratio > 0:
            raise ValueError(f"lr_ratio must be > 0 (LoRA+ uses 16 to 20) or None, got {lr_ratio}.")
        self.base_model = str(base_model)
        self.adapter = dataclasses.replace(adapter)  # own copy: the default instance is shared
        self.new_tokens = check_new_tokens(new_tokens, adapter)
        self.quantize = quantize
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.lr_ratio = lr_ratio
        check_mode(gradient_checkpointing)  # now, not after loading the model
        self.gradient_checkpointing = gradient_checkpointing
        self.offload_activations = offload_activations
        if export_dir is not None:
            check_export_dir(export_dir, exports)  # a file there, or a format typo: now, not after training
        self.export_dir = export_dir
        self.exports = exports
        self.exported: dict = {}  # {format: path} written at the end of training
        self.dtype_name = dtype_name(dtype, "LoRAModule dtype", auto=True)
        self.trust_remote_code = trust_remote_code
        self.adapter_name = adapter_name
        if loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size must be a positive number of tokens, got {loss_chunk_size}.")
        self.loss_chunk_size = loss_chunk_size
        self.lean_activations = lean_activations
        if not isinstance(evaluate, (bool, int)) or (not isinstance(evaluate, bool) and evaluate < 1):
            raise ValueError(f"evaluate must be true, false or a positive number of examples, got {evaluate!r}.")
        self.evaluate = evaluate
        self.compile_options = check_compile(compile)  # None (off) or torch.compile's options
        self.model: nn.Module | None = None
        self._tokenizer = None
        self.strict_loading = False  # checkpoints hold only the adapter
        self.val_loss = MeanMetric()
        self._step_start: float | None = None
        self._step_loss = TokenWeightedLoss()  # divides by the step's labeled tokens, logs train_loss

    # ---------------------------------------------------------------- model
    @property
    def tokenizer(self):
        """The base model's tokenizer, loaded on first use (data modules read it in their ``setup``), with the
        ``new_tokens``."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.base_model, trust_remote_code=self.trust_remote_code)
            if self.new_tokens:
                add_to_tokenizer(self._tokenizer, self.new_tokens)
        return self._tokenizer

    def configure_model(self) -> None:
        """Load the base, quantize it (if asked), inject the adapter, swap in what is proven (packed attention,
        checkpointing, lean activations), compile the decoder layers (if asked). A second call does nothing."""
        if self.model is not None:
            return
        model, tokenizer = load_causal_lm(self.base_model, dtype=self.dtype_name, trust_remote_code=self.trust_remote_code)
        if self._tokenizer is None:
            self._tokenizer = tokenizer
        adapter = add_new_tokens(model, self.tokenizer, self.adapter, self.new_tokens)  # resized, their rows train
        prepare(model, adapter, self.adapter_name, self.quantize)  # quantize, inject, init (PiSSA/LoftQ)
        use_packed_attention(model)  # packed rows: attention per example, shared prefixes (train/attention.py)
        enable_checkpointing(model, self.gradient_checkpointing)
        if self.lean_activations:  # where proven, norms, SwiGLU and RoPE keep only their inputs (train/lean.py)
            use_lean_activations(model)  # after checkpointing: a recomputed MLP keeps its checkpointed forward
        if self.compile_options is not None:  # last: the probe step runs the layers as they will train
            compile_layers(model, **self.compile_options)
        model.train()  # loaders return eval mode; Lightning keeps submodule modes (adapter dropout must run)
        self.model = shard_for(self, model)  # FSDP2 under ModelParallelStrategy; unchanged otherwise

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def _loss(self, batch: dict, step: TokenWeightedLoss | None = None) -> torch.Tensor:
        """Cross-entropy over the labeled tokens, head run on those rows only, in chunks (``train/loss.py``): their
        mean, or with ``step`` their sum (divided by the whole optimizer step's labeled tokens, ``step_loss.py``)."""
        return causal_lm_loss(self.model, batch["input_ids"], batch["labels"], attention_mask=batch.get("attention_mask"),
                              position_ids=batch.get("position_ids"), chunk_size=self.loss_chunk_size, step=step)

    # ---------------------------------------------------------------- steps
    def on_fit_start(self) -> None:
        data = getattr(self.trainer, "datamodule", None)
        if getattr(data, "packing", False):  # refused here, not at the first packed batch after validation
            why = packing_refusal(self.model, share_prefix=getattr(data, "share_prefix", False))
            if why:
                raise ValueError(why)
        if self.trainer.is_global_zero:
            optimizer = self.trainer.optimizers[0] if self.trainer.optimizers else None
            memory_report(self.model, optimizer)

    def on_train_start(self) -> None:
        release_host_memory(self.model)  # the checkpoint file's pages and the heap's free ones (core/heap.py)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        with offloading(self.offload_activations, self.device, self.model):
            return self._loss(batch, self._step_loss)  # the sum; train_loss (the step's mean) is logged before the step

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._step_start is None:
            return
        seconds = time.perf_counter() - self._step_start
        mask = batch.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else int(batch.get("num_tokens", batch["input_ids"].numel()))
        self.log("tokens_per_s", tokens / max(seconds, 1e-9), prog_bar=True, batch_size=1)

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        # HF averages over the predicted tokens (labels shifted by one); weight batches by that count.
        tokens = (batch["labels"][:, 1:] != -100).sum()
        if tokens > 0:
            self.val_loss.update(loss.detach(), weight=tokens)
        return loss

    def _reset_loss(self) -> None:
        # Outside inference mode: states reset inside trainer.validate() would be inference tensors, and the next
        # in-place update during fit's validation (run under no_grad) would fail.
        with torch.inference_mode(False):
            self.val_loss.reset()

    def _mean_loss(self) -> torch.Tensor:
        mean = self.val_loss.compute()
        self._reset_loss()
        return mean

    def on_validation_epoch_start(self) -> None:
        self._reset_loss()

    def on_validation_epoch_end(self) -> None:
        mean = self._mean_loss()  # token-weighted mean over every rank (torchmetrics syncs)
        self.log("val_loss", mean, prog_bar=True)
        self.log("val_ppl", torch.exp(mean), prog_bar=True)

    test_step = validation_step
    on_test_epoch_start = on_validation_epoch_start

    def on_test_epoch_end(self) -> None:
        mean = self._mean_loss()
        self.log("test_loss", mean)
        self.log("test_ppl", torch.exp(mean))

    def configure_callbacks(self) -> list:
        """Guards and exact resume, each once (a fit after ``trainer.validate`` would otherwise replace the first
        ones, with a warning): a NaN/inf loss or validation stops the run naming the step, one fit per
        ``export_dir`` (``guards.py``), the RNG states saved and restored with checkpoints (``resume.py``); the loss
        is token-weighted over each optimizer step (``step_loss.py``)."""
        present = self._trainer.callbacks if self._trainer is not None else []
        kinds = {type(c) for c in present}
        wanted = [c for c in (FiniteLossGuard(), ExactResume(), ExportDirLock(self.export_dir)) if type(c) not in kinds]
        if not any(c is self._step_loss for c in present):
            wanted.append(self._step_loss)
        return wanted

    # ---------------------------------------------------------------- optimizers
    def configure_optimizers(self):
        if self.lr_ratio is not None:
            defaults = optimizer_defaults(self.optimizer)
            params = param_groups(self.model, defaults["lr"], self.lr_ratio, defaults["weight_decay"])
        else:
            params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("LoRAModule: nothing to train (no parameter requires grad); check adapter.target_modules.")
        check_optimizer_supported(self.optimizer, self.device)  # a bitsandbytes optimizer that fails here says so now
        optimizer = self.optimizer(params)
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "step"}}

    # ---------------------------------------------------------------- checkpoints and export
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only the adapter (and any other trainable tensor, all finite), plus the run facts an offline export
        needs."""
        if self.model is not None:
            check_finite_adapter(self._trainer, self.model)  # never replace a good checkpoint with a NaN adapter
            keep_adapter_only(checkpoint, self, self.model, "model.")
        write_facts(checkpoint, adapter=self.adapter, adapter_name=self.adapter_name, base_model=self.base_model,
                    quantize=self.quantize, dtype=self.dtype_name, run=run_facts(self._trainer),
                    new_tokens=self.new_tokens)  # fmt: skip

    def run_facts(self) -> dict:
        """What the model card says of this run (``train/card_facts.py``)."""
        return run_facts(self.trainer)

    def on_train_end(self) -> None:
        run = self.run_facts()
        if self.evaluate:
            table = evaluate_at_end(self, self.evaluate, self.export_dir)
            if table:
                run["evaluation"] = table
        if self.export_dir is None:
            return
        # Every rank calls it (FSDP2 gathers the adapter's shards); only rank 0 writes.
        self.exported = export_from_rank_zero(
            self.model, self.export_dir, is_global_zero=self.trainer.is_global_zero, name=self.adapter_name,
            exports=self.exports, base_model=self.base_model, tokenizer=self._tokenizer, dtype=self.dtype_name,
            trust_remote_code=self.trust_remote_code, run=run)



__all__ = ["AdamW", "LoRAModule", "enable_adapter_subclass_mode", "optimizer_defaults"]
