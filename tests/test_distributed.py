"""Distributed training on CPU with 2 processes (gloo): DDP and FSDP2 (Lightning's ModelParallelStrategy).

One worker run (this file executed as a script, which Lightning re-launches once per extra rank) trains every
scenario below on a tiny Llama folder and writes each rank's full adapter per scenario; the tests then compare
those files. The reference for FSDP2 is DDP on the same data and seed; the reference for both is a single-process
run (world size 1 over the same global batch), so a wrong gradient average or a lost shard shows up.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
STEPS = 4  # optimizer steps of a run; resumed runs start from the checkpoint written after step 2
ROWS, SEQ, BATCH = 4, 12, 2  # 4 rows = one step (2 ranks x batch 2) per epoch, so a resumed step sees the same rows
MASKED = (1, 9, 3, 10)  # label prefixes masked in the token-weighting runs: 11, 3, 9 and 2 labeled tokens per row
QLORA = importlib.util.find_spec("lightning_lora.quant.nf4") is not None


# --------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from tiny_assets import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory):
    """Run the worker once (Lightning launches the second rank); return (output folder, combined log)."""
    out = tmp_path_factory.mktemp("runs")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(out), str(base)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=str(HERE.parent))  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return out, log


def _load(out: Path, tag: str, rank: int = 0) -> dict:
    from safetensors.torch import load_file

    return load_file(out / f"{tag}.rank{rank}.safetensors")


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    assert all(a[k].shape == b[k].shape for k in a), {k: (a[k].shape, b[k].shape) for k in a if a[k].shape != b[k].shape}
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _peft_key(key: str) -> str:
    """Our state-dict key -> PEFT's file key (written independently of peft_io, from REFERENCE section 6)."""
    module, _, suffix = key.rpartition(".adapters.default.")
    suffix = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "magnitude": "lora_magnitude_vector"}[suffix]
    return f"base_model.model.{module}.{suffix}"


def _exported(out: Path, tag: str) -> dict:
    from safetensors.torch import load_file

    return load_file(out / f"{tag}.export" / "adapter" / "adapter_model.safetensors")


def _single_process(base: Path, tmp: Path, quantize=None, masked=None, mean_of_means=False) -> dict:
    """The reference: one process, one device, the same 4 rows per step as the two ranks together. With ``masked``
    (label prefixes masked per row) SGD; ``mean_of_means``: 4 accumulated micro-batches of one row, each its mean."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_lora import adapter_state_dict
    from lightning_lora.train.callback import AdapterCallback
    from lightning_lora.train.module import LoRAModule

    pl.seed_everything(7, verbose=False)
    optimizer = _optimizer if masked is None else _sgd
    callbacks, batch, accumulate = [], 2 * BATCH, 1
    if mean_of_means:  # the loss before token weighting: each micro-batch's mean, averaged by Lightning
        module, batch, accumulate = _plain_module(str(base), own_loss=True, optimizer=optimizer), 1, ROWS
        callbacks = [AdapterCallback(_adapter("lora"), target="model")]
    else:
        module = LoRAModule(str(base), adapter=_adapter("lora"), optimizer=optimizer, quantize=quantize)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp,
                         accumulate_grad_batches=accumulate, callbacks=callbacks)  # fmt: skip
    trainer.fit(module, DataLoader(_dataset(384, masked), batch_size=batch, shuffle=False))
    return {k: v.detach().clone() for k, v in adapter_state_dict(module.model).items()}


@pytest.mark.slow
def test_ddp_adapters_identical_on_both_ranks_and_match_one_process(runs, base, tmp_path):
    out, _ = runs
    for tag in ("ddp_lora", "ddp_dora"):
        assert _max_diff(_load(out, tag, 0), _load(out, tag, 1)) == 0.0
    trained = _load(out, "ddp_lora")
    assert min(v.abs().max().item() for k, v in trained.items() if k.endswith("lora_B")) > 1e-3  # it trained
    # DDP averages the two ranks' gradients: the same as one process on both ranks' rows.
    assert _max_diff(trained, _single_process(base, tmp_path)) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_token_weighted_loss_over_micro_batches_and_ranks_steps_like_one_big_batch(runs, base, tmp_path, strategy):
    """2 ranks x 2 accumulated micro-batches of one row each, 11 / 9 and 3 / 2 labeled tokens (SGD: the update is the
    gradient), train like one process on the 4 rows at once: the step's loss is divided by its 25 labeled tokens."""
    out, _ = runs
    trained = _load(out, f"{strategy}_tokens")
    assert _max_diff(trained, _load(out, f"{strategy}_tokens", 1)) == 0.0
    one_batch = _single_process(base, tmp_path, masked=MASKED)
    assert _max_diff(trained, one_batch) < 1e-5
    if strategy == "ddp":  # the test can fail: the mean of the micro-batches' means trains differently
        assert _max_diff(one_batch, _single_process(base, tmp_path, masked=MASKED, mean_of_means=True)) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_chunked_labeled_loss_trains_like_hugging_face_loss(runs, strategy):
    """train/loss.py's causal_lm_loss in a user's training_step gives the adapter that HF's loss gives (DDP, FSDP2)."""
    out, _ = runs
    assert _max_diff(_load(out, f"{strategy}_dora_ownloss"), _load(out, f"{strategy}_dora")) < 1e-5


@pytest.mark.slow
def test_ddp_checkpoint_written_once_adapter_only_and_resumes(runs):
    out, log = runs
    writes = [line for line in log.splitlines() if line.startswith("CKPT-WRITE ddp_lora")]
    files = sorted((out / "ddp_lora.ckpt").glob("*.ckpt"))
    assert len(files) == STEPS and len(writes) == STEPS and all(w.endswith("rank=0") for w in writes)
    state = torch.load(files[-1], map_location="cpu", weights_only=True)["state_dict"]
    assert sorted(state) == sorted("model." + k for k in _load(out, "ddp_lora"))  # adapter only, no base
    # resumed from step 2 (model and optimizer state) -> identical to the uninterrupted run
    assert _max_diff(_load(out, "ddp_resume"), _load(out, "ddp_lora")) < 1e-6


@pytest.mark.slow
def test_export_happens_once_with_the_trained_adapter(runs):
    out, log = runs
    for tag, source in (("ddp_lora", "ddp_lora"), ("fsdp_lora", "ddp_lora"), ("fsdp_dora", "ddp_dora")):
        assert log.count(f"adapter (PEFT format) written to {out / tag}.export/adapter") == 1
        assert (out / f"{tag}.export" / "merged").is_dir()
        exported, reference = _exported(out, tag), _load(out, source)
        assert _max_diff(exported, {_peft_key(k): v for k, v in reference.items()}) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_fsdp2_adapter_is_full_and_equals_ddp(runs, method):
    """The base and the adapter were sharded (DTensors); what is saved holds every rank's rows and equals DDP's.
    DoRA's row norm reads the full base weight (FSDP gathers the layer for forward), so it matches too."""
    import json

    out, _ = runs
    for rank in (0, 1):
        assert json.loads((out / f"fsdp_{method}.rank{rank}.json").read_text())["sharded"] is True
        assert _max_diff(_load(out, f"fsdp_{method}", rank), _load(out, f"ddp_{method}")) < 1e-6
    if method == "dora":
        magnitudes = [v for k, v in _load(out, "fsdp_dora").items() if k.endswith("magnitude")]
        assert len(magnitudes) == 14 and all(m.shape[0] in (64, 96, 32) for m in magnitudes)


@pytest.mark.slow
def test_fsdp2_checkpoint_holds_full_adapter_and_resumes(runs):
    out, _ = runs
    state = torch.load(out / "fsdp_lora.ckpt" / "epoch=3-step=4.ckpt", map_location="cpu", weights_only=True)
    full = {k.removeprefix("model."): v for k, v in state["state_dict"].items()}
    assert _max_diff(full, _load(out, "ddp_lora")) < 1e-6  # full rows, not rank 0's shard
    assert _max_diff(_load(out, "fsdp_resume"), _load(out, "fsdp_lora")) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resumed_mid_epoch_equals_uninterrupted_with_dropout_and_shuffling(runs, strategy):
    """8 steps vs 4 + 4: SIGTERM reached rank 0 alone during step 4; every rank stopped after it with one last.ckpt
    (mid-epoch: 5 steps an epoch), and the resumed run (dropout 0.2, the data shuffled by the library's resumable
    loader) gives every rank's per-step losses and the adapter bit for bit. Each rank trained on its own batches
    (their losses differ), and the adapter moved."""
    import json

    out, _ = runs
    for rank in (0, 1):
        full = json.loads((out / f"{strategy}_exact.rank{rank}.json").read_text())["losses"]
        cut = json.loads((out / f"{strategy}_exact_cut.rank{rank}.json").read_text())
        resumed = json.loads((out / f"{strategy}_exact_resume.rank{rank}.json").read_text())["losses"]
        assert cut["stopped"] == {"signum": 15, "step": EXACT_STEPS,
                                  "checkpoint": str(out / f"{strategy}_exact_cut.ckpt" / "last.ckpt")}  # fmt: skip
        assert len(full) == 2 * EXACT_STEPS and cut["losses"] == full[:EXACT_STEPS] and resumed == full[EXACT_STEPS:]
        a, b = _load(out, f"{strategy}_exact", rank), _load(out, f"{strategy}_exact_resume", rank)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ranks = [json.loads((out / f"{strategy}_exact.rank{r}.json").read_text())["losses"] for r in (0, 1)]
    assert ranks[0] != ranks[1]
    assert max(v.abs().max().item() for k, v in _load(out, f"{strategy}_exact").items() if k.endswith("lora_B")) > 1e-3


@pytest.mark.slow
@pytest.mark.skipif(not QLORA, reason="lightning_lora.quant.nf4 (NF4) is not available")
def test_fsdp2_qlora_float_storage_trains_like_one_process_uint8(runs, base, tmp_path):
    """NF4 with quant_storage=float32 shards under FSDP2 (here with gradient checkpointing) and trains exactly like
    unsharded NF4 in uint8 storage without checkpointing."""
    import json

    from lightning_lora.quant.nf4 import NF4

    out, _ = runs
    assert json.loads((out / "fsdp_qlora.rank0.json").read_text())["sharded"] is True
    trained = _load(out, "fsdp_qlora")
    assert _max_diff(trained, _load(out, "fsdp_qlora", 1)) == 0.0
    assert _max_diff(trained, _single_process(base, tmp_path, quantize=NF4())) < 1e-5


@pytest.mark.skipif(not QLORA, reason="lightning_lora.quant.nf4 (NF4) is not available")
def test_float_quant_storage_gives_the_same_forward_as_uint8():
    from tiny_models import tiny_llama

    from lightning_lora.quant.nf4 import NF4, quantize

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    outputs = {}
    for storage in ("uint8", "float32", "bfloat16"):
        model = quantize(tiny_llama(), NF4(quant_storage=storage))
        data = model.model.layers[0].self_attn.q_proj.weight
        assert data.dtype == getattr(torch, storage) and data.is_floating_point() == (storage != "uint8")
        with torch.no_grad():
            outputs[storage] = model.train()(ids).logits  # train mode: the path FSDP training runs
    assert torch.equal(outputs["float32"], outputs["uint8"]) and torch.equal(outputs["bfloat16"], outputs["uint8"])


def test_shard_refuses_integer_storage_and_tensor_parallel_meshes():
    from tiny_models import tiny_llama

    from lightning_lora.train.distributed import data_parallel_mesh, decoder_layers, shard

    model = tiny_llama()
    assert [type(m).__name__ for m in decoder_layers(model)] == ["LlamaDecoderLayer"] * 2
    model.model.layers[0].mlp.up_proj.weight = torch.nn.Parameter(torch.zeros(3, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(ValueError, match="quant_storage"):
        shard(model, device_mesh=None)

    class Mesh:  # Lightning's default ModelParallelStrategy mesh on 2 devices: (data_parallel=1, tensor_parallel=2)
        mesh_dim_names = ("data_parallel", "tensor_parallel")

        def __getitem__(self, name):
            return type("Sub", (), {"size": lambda self: 2 if name == "tensor_parallel" else 1})()

    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        data_parallel_mesh(Mesh())


# --------------------------------------------------------------------------- worker (runs in each rank)
def _dataset(vocab: int, masked: tuple[int, ...] | None = None):
    """ROWS random rows, every position labeled, or the first ``masked[i]`` labels of row i masked (-100)."""
    gen = torch.Generator().manual_seed(123)
    ids = torch.randint(5, vocab, (ROWS, SEQ), generator=gen)
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids]
    for row, m in zip(rows, masked or ()):
        row["labels"][:m] = -100
    return rows


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _adapter(kind: str):
    from lightning_lora import DoRA, LoRA

    return {"lora": LoRA(r=4, alpha=8), "dora": DoRA(r=4, alpha=8)}[kind]


def _optimizer(params):
    from lightning_lora.train.module import AdamW

    return AdamW(params, lr=1e-2)  # large lr: 4 steps move the adapter visibly


def _sgd(params):
    return torch.optim.SGD(params, lr=1.0)  # the update is the gradient itself (AdamW hides a common factor)


def _plain_module(base: str, own_loss: bool = False, optimizer=_optimizer):
    """A user's own LightningModule (for AdapterCallback): builds the HF model in configure_model; its loss is
    Hugging Face's, or with ``own_loss`` our ``causal_lm_loss`` (as the README shows)."""
    import lightning.pytorch as pl

    class Plain(pl.LightningModule):
        def configure_model(self):
            if getattr(self, "model", None) is None:
                from transformers import AutoModelForCausalLM

                self.model = AutoModelForCausalLM.from_pretrained(base)

        def training_step(self, batch, batch_idx):
            if own_loss:
                from lightning_lora.train.loss import causal_lm_loss

                return causal_lm_loss(self.model, batch["input_ids"], batch["labels"], batch.get("attention_mask"))
            return self.model(**batch).loss

        def configure_optimizers(self):
            return optimizer([p for p in self.parameters() if p.requires_grad])

    return Plain()


def _fit(out: Path, tag: str, base: str, strategy, adapter: str, *, callback=False, ckpt_path=None, quantize=None,
         devices=2, batch=BATCH, checkpoint=False, export=False, gradient_checkpointing=False, own_loss=False,
         masked=None, accumulate=1):  # fmt: skip
    """Train ``STEPS`` steps, optionally checkpointing every step to out/<tag>.ckpt/ and exporting to
    out/<tag>.export/; write each rank's full adapter to out/<tag>.rank<r>.safetensors (and whether it was sharded).
    """
    import time
    import json

    import lightning.pytorch as pl
    from lightning.pytorch.plugins import TorchCheckpointIO
    from torch.utils.data import DataLoader

    from lightning_lora.train.distributed import full_adapter_state, is_sharded
    from lightning_lora.io.files import save_tensors
    from lightning_lora.train.module import LoRAModule

    class CountingIO(TorchCheckpointIO):  # says which rank writes each checkpoint file
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            print(f"CKPT-WRITE {tag} rank={_rank()}", flush=True)
            super().save_checkpoint(checkpoint, path, storage_options)

    pl.seed_everything(7, verbose=False)
    start = time.perf_counter()
    export_dir = str(out / f"{tag}.export") if export else None
    callbacks = [pl.callbacks.ModelCheckpoint(dirpath=out / f"{tag}.ckpt", every_n_epochs=1, save_top_k=-1)] if checkpoint else []
    if callback:
        from lightning_lora.train.callback import AdapterCallback

        module = _plain_module(base, own_loss)
        callbacks.append(AdapterCallback(_adapter(adapter), target="model", export_dir=export_dir))
    else:
        module = LoRAModule(base, adapter=_adapter(adapter), optimizer=_optimizer if masked is None else _sgd,
                            export_dir=export_dir, quantize=quantize, gradient_checkpointing=gradient_checkpointing)  # fmt: skip
    plugins = [CountingIO()] if strategy == "ddp" else None
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=STEPS, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, plugins=plugins,
                         enable_checkpointing=checkpoint, num_sanity_val_steps=0,
                         accumulate_grad_batches=accumulate)  # fmt: skip
    trainer.fit(module, DataLoader(_dataset(384, masked), batch_size=batch, shuffle=False), ckpt_path=ckpt_path)
    sharded = is_sharded(module.model)
    state = full_adapter_state(module.model)  # collective under FSDP2: every rank gathers every row
    save_tensors({k: v.contiguous() for k, v in state.items()}, out / f"{tag}.rank{_rank()}.safetensors")
    (out / f"{tag}.rank{_rank()}.json").write_text(json.dumps({"sharded": sharded}))
    print(f"FIT {tag} rank={_rank()} {time.perf_counter() - start:.1f} s", flush=True)


EXACT_STEPS = 4  # exact-resume runs: 2 * EXACT_STEPS steps, or EXACT_STEPS resumed from the step-EXACT_STEPS checkpoint


def _fit_exact(out: Path, tag: str, base: str, strategy, ckpt_path=None, cut=False) -> None:
    """The library's shuffled, resumable loader (20 rows, batch 2 per rank: 5 steps an epoch) and dropout 0.2. With
    ``cut``, rank 0 alone gets SIGTERM during step EXACT_STEPS: ``Interrupts`` stops every rank after that step
    with a last.ckpt. Writes each rank's per-step losses (and how it stopped) and full adapter."""
    import json

    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_lora import LoRA
    from lightning_lora.io.files import save_tensors
    from lightning_lora.train.distributed import full_adapter_state
    from lightning_lora.train.interrupts import Interrupted, Interrupts
    from lightning_lora.train.module import LoRAModule
    from lightning_lora.train.resume import RunCheckpoint
    from lightning_lora.train.sampler import EpochSampler, ResumableLoader

    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()}
            for r in torch.randint(5, 384, (20, SEQ), generator=torch.Generator().manual_seed(5))]  # fmt: skip

    class Data(pl.LightningDataModule):
        def train_dataloader(self):  # built inside the fit: the sampler splits over the started ranks
            return ResumableLoader(rows, batch_size=BATCH, sampler=EpochSampler(len(rows), BATCH, seed=3))

    class Losses(pl.Callback):
        losses: list = []

        def on_train_batch_start(self, trainer, *args):
            if cut and trainer.global_rank == 0 and trainer.global_step == EXACT_STEPS - 1:
                os.kill(os.getpid(), signal.SIGTERM)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))

    pl.seed_everything(7, verbose=False)
    module = LoRAModule(base, adapter=LoRA(r=4, alpha=8, dropout=0.2), optimizer=_optimizer)
    extra = [Interrupts(), RunCheckpoint(dirpath=out / f"{tag}.ckpt")] if cut else []
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=2 * EXACT_STEPS, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Losses(), *extra],
                         enable_checkpointing=cut, num_sanity_val_steps=0)  # fmt: skip
    stopped = None
    try:
        trainer.fit(module, datamodule=Data(), ckpt_path=ckpt_path)
    except Interrupted as stop:
        stopped = {"signum": stop.signum, "step": stop.step, "checkpoint": stop.checkpoint}
    state = full_adapter_state(module.model)
    save_tensors({k: v.contiguous() for k, v in state.items()}, out / f"{tag}.rank{_rank()}.safetensors")
    (out / f"{tag}.rank{_rank()}.json").write_text(json.dumps({"losses": Losses.losses, "stopped": stopped}))


def worker(out: Path, base: str) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    def fsdp():
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False)

    _fit(out, "ddp_lora", base, "ddp", "lora", checkpoint=True, export=True)
    _fit(out, "ddp_resume", base, "ddp", "lora", ckpt_path=out / "ddp_lora.ckpt" / "epoch=1-step=2.ckpt")
    _fit(out, "fsdp_lora", base, fsdp(), "lora", checkpoint=True, export=True)
    _fit(out, "fsdp_resume", base, fsdp(), "lora", ckpt_path=out / "fsdp_lora.ckpt" / "epoch=1-step=2.ckpt")
    for name, make in (("ddp", lambda: "ddp"), ("fsdp", fsdp)):
        _fit_exact(out, f"{name}_exact", base, make())
        _fit_exact(out, f"{name}_exact_cut", base, make(), cut=True)
        _fit_exact(out, f"{name}_exact_resume", base, make(), ckpt_path=out / f"{name}_exact_cut.ckpt" / "last.ckpt")
    _fit(out, "ddp_dora", base, "ddp", "dora", callback=True)
    _fit(out, "fsdp_dora", base, fsdp(), "dora", callback=True, export=True)
    # 2 ranks x 2 micro-batches of one row, unequal label counts (rank 0 reads rows 0 and 2, rank 1 rows 1 and 3)
    _fit(out, "ddp_tokens", base, "ddp", "lora", batch=1, accumulate=2, masked=MASKED)
    _fit(out, "fsdp_tokens", base, fsdp(), "lora", batch=1, accumulate=2, masked=MASKED)
    _fit(out, "ddp_dora_ownloss", base, "ddp", "dora", callback=True, own_loss=True)
    _fit(out, "fsdp_dora_ownloss", base, fsdp(), "dora", callback=True, own_loss=True)
    if QLORA:
        from lightning_lora.quant.nf4 import NF4

        _fit(out, "fsdp_qlora", base, fsdp(), "lora", quantize=NF4(quant_storage="float32"), export=True,
             gradient_checkpointing=True)

if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2])
