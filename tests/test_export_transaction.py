"""Exports are one transaction (io/transaction.py, io/export.py): a failure at any point, in any format, leaves the
previous export byte for byte; leftovers of killed runs are removed by the next export, which says so; modes follow
the umask; errors name the path and the cause.

Faults tried: a writer failing with "disk full" after the adapter is staged, an immutable export folder, a file-size
limit (RLIMIT_FSIZE, in a subprocess running the export command), SIGKILL in the middle of the merged folder (in a
subprocess); an export_dir that is a file; a folder left by an older release.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_assets import make_tiny_model_dir
from tiny_models import perturb_adapters

import lightning_lora as ll
from lightning_lora.commands.export import export_checkpoint
from lightning_lora.core.verbs import adapter_state_dict
from lightning_lora.io import export as export_io
from lightning_lora.io.checkpoint import write_facts
from lightning_lora.io.models import load_causal_lm

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("base") / "llama")


def make_checkpoint(base: Path, path: Path, seed: int) -> Path:
    """An adapter-only checkpoint as LoRAModule writes it, with random adapter values (``seed``)."""
    model, _ = load_causal_lm(str(base))
    ll.inject(model, ll.LoRA(r=4, alpha=8))
    perturb_adapters(model, seed=seed)
    checkpoint = {"state_dict": {"model." + k: v for k, v in adapter_state_dict(model).items()}}
    write_facts(checkpoint, adapter=ll.LoRA(r=4, alpha=8), adapter_name="default", base_model=str(base),
                run={"data": "tiny pairs", "steps": 7, "val_loss": 1.5})  # fmt: skip
    torch.save(checkpoint, path)
    return path


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """{relative path: (sha256 or "dir", mode)} of everything under ``folder``, itself included."""
    out = {".": ("dir", folder.stat().st_mode)}
    for p in sorted(folder.rglob("*")):
        digest = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        out[str(p.relative_to(folder))] = (digest, p.stat().st_mode)
    return out


@pytest.fixture(scope="module")
def ckpts(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return make_checkpoint(base, root / "a.ckpt", 0), make_checkpoint(base, root / "b.ckpt", 1)


@pytest.fixture
def previous(ckpts, tmp_path):
    """A complete export of checkpoint a (adapter, merged, adapter.gguf) and its snapshot."""
    out = tmp_path / "exp"
    export_checkpoint(ckpts[0], out, exports=["peft", "merged", "gguf"])
    return out, snapshot(out)


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


SCRIPT = textwrap.dedent(
    """
    import os, resource, signal, sys
    mode, ckpt, out = sys.argv[1:4]
    if mode == "kill":  # SIGKILL once the merged model's weights are written, before its tokenizer
        import lightning_lora.io.export as export_io
        def save_pretrained_then_die(model, tokenizer, path, dtype=None):
            model.save_pretrained(path)
            os.kill(os.getpid(), signal.SIGKILL)
        export_io.save_merged = save_pretrained_then_die
    else:  # the export command under a 100 kB file-size limit: the merged weights (~450 kB) cannot be written
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
    from lightning_lora.__main__ import main
    main(["export", "--ckpt_path", ckpt, "--export_dir", out])
    """
)


@pytest.fixture(scope="module")
def killed_runs(base, ckpts, tmp_path_factory):
    """Both subprocess faults, started side by side over copies of the same previous export."""
    runs = {}
    for mode in ("kill", "fsize"):
        out = tmp_path_factory.mktemp(mode) / "exp"
        export_checkpoint(ckpts[0], out)
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        proc = subprocess.Popen([sys.executable, "-c", SCRIPT, mode, str(ckpts[1]), str(out)], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        runs[mode] = (proc, out, snapshot(out))
    yield runs
    for proc, _, _ in runs.values():
        if proc.poll() is None:
            proc.kill()


# ------------------------------------------------------------------------------------------------- faults
def test_disk_full_in_a_later_format_keeps_the_previous_set(previous, ckpts, monkeypatch):
    """Before: the new adapter was swapped in, then the merged model failed: a mixed export. Now: nothing changes."""
    out, before = previous

    def disk_full(model, tokenizer, path, dtype=None):
        path.mkdir(exist_ok=True)
        (path / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path / "model.safetensors"))

    monkeypatch.setattr(export_io, "save_merged", disk_full)
    with pytest.raises(OSError, match=rf"writing {out}/merged/model.safetensors failed: disk full\. Free some space"):
        export_checkpoint(ckpts[1], out, exports=["peft", "merged", "gguf"])
    assert snapshot(out) == before and siblings(out) == []


def test_immutable_export_folder_keeps_the_previous_set(previous, ckpts):
    out, before = previous
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i needs root and a file system that supports it")
    try:
        with pytest.raises(OSError, match=rf"{out}.*operation not permitted \(an immutable"):
            export_checkpoint(ckpts[1], out)
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)
    assert snapshot(out) == before and siblings(out) == []


def test_an_immutable_old_folder_does_not_block_exports(previous, ckpts, caplog):
    """Before: the new adapter went in, then renaming the immutable merged/ failed: a mixed export. Now the new set
    goes in whole; the old one, which cannot be deleted, is left beside it (said) and later exports go on."""
    out, before = previous
    if subprocess.run(["chattr", "+i", str(out / "merged")], capture_output=True).returncode != 0:
        pytest.skip("chattr +i needs root and a file system that supports it")
    try:
        with caplog.at_level(logging.WARNING, logger="lightning_lora"):
            export_checkpoint(ckpts[1], out)
            export_checkpoint(ckpts[0], out, exports=["peft"])
        assert snapshot(out)["adapter/adapter_model.safetensors"] == before["adapter/adapter_model.safetensors"]
        assert snapshot(out)["merged/model.safetensors"] != before["merged/model.safetensors"]
        (left,) = siblings(out)
        assert caplog.text.count(f"could not remove {out.parent / left}") == 1, caplog.text
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        stale = out.parent / f".exp.staging-{dead.pid}-0a1b2c3d"  # as a later process sees it: its writer is gone
        (out.parent / left).rename(stale)
        with caplog.at_level(logging.WARNING, logger="lightning_lora"):
            export_checkpoint(ckpts[1], out, exports=["peft"])
        assert f"could not remove {stale}, left by an interrupted write" in caplog.text and stale.exists()
    finally:
        for path in out.parent.glob(".exp.*/merged"):
            subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.slow
def test_file_size_limit_in_a_subprocess_keeps_the_previous_export(killed_runs):
    proc, out, before = killed_runs["fsize"]
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"writing {out}/merged" in errors[0], err[-3000:]  # safetensors names no file
    assert "file-size limit reached (ulimit -f)" in errors[0] and "previous content" in errors[0], errors
    assert snapshot(out) == before and siblings(out) == []


@pytest.mark.slow
def test_sigkill_mid_write_keeps_the_previous_export_and_the_next_export_cleans_up(killed_runs, ckpts, caplog):
    proc, out, before = killed_runs["kill"]
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    assert snapshot(out) == before
    stale = siblings(out)
    assert len(stale) == 1 and stale[0].startswith(f".{out.name}.staging-{proc.pid}-"), stale
    with caplog.at_level(logging.WARNING, logger="lightning_lora"):
        export_checkpoint(ckpts[1], out)
    assert siblings(out) == []
    assert f"removed {out.parent / stale[0]}, left by an interrupted write" in caplog.text
    assert snapshot(out) != before  # the new export is in


# --------------------------------------------------------------------------------------------- semantics
def test_only_the_formats_asked_for_are_written(previous, ckpts):
    """Before: --format gguf also rewrote the merged folder. Now: the merged files are the very same inodes."""
    out, before = previous
    inode = (out / "merged" / "model.safetensors").stat().st_ino
    paths = export_checkpoint(ckpts[1], out, exports=["gguf-merged:q8_0"])
    assert list(paths) == ["gguf-merged:q8_0"] and paths["gguf-merged:q8_0"] == out / "merged-q8_0.gguf"
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k != "merged-q8_0.gguf"} == before
    assert (out / "merged" / "model.safetensors").stat().st_ino == inode  # carried over, not rewritten


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_modes_follow_the_umask(ckpts, tmp_path, umask):
    """Before: 0600 files in 0700 folders whatever the umask. Now: 0666/0777 minus the umask."""
    old = os.umask(umask)
    try:
        export_checkpoint(ckpts[0], tmp_path / "exp", exports=["peft", "merged", "gguf"])
    finally:
        os.umask(old)
    modes = {(p.is_dir(), p.stat().st_mode & 0o777) for p in [tmp_path / "exp", *(tmp_path / "exp").rglob("*")]}
    assert modes == {(True, 0o777 & ~umask), (False, 0o666 & ~umask)}, modes


def test_export_dir_that_is_a_file_is_refused_before_training(ckpts, tmp_path):
    from lightning_lora.train.module import LoRAModule

    (tmp_path / "exp").write_text("notes")
    with pytest.raises(NotADirectoryError, match=f"{tmp_path / 'exp'} is a file, not a folder"):
        LoRAModule("unused", export_dir=str(tmp_path / "exp"))
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        export_checkpoint(ckpts[0], tmp_path / "exp")
    assert (tmp_path / "exp").read_text() == "notes"


def test_leftover_of_an_older_release_is_removed_and_said(previous, ckpts, caplog):
    """Before: a killed export left a 514 MB .merged.tmp-* folder forever."""
    out, _ = previous
    (out / ".merged.tmp-k2x9q1w_").mkdir()
    (out / ".merged.tmp-k2x9q1w_" / "model.safetensors").write_bytes(b"x" * 100)
    with caplog.at_level(logging.WARNING, logger="lightning_lora"):
        export_checkpoint(ckpts[1], out, exports=["peft"])
    assert not (out / ".merged.tmp-k2x9q1w_").exists() and "merged.tmp-k2x9q1w_, left by an interrupted" in caplog.text


def test_the_current_folder_is_refused_as_export_dir(ckpts, tmp_path, monkeypatch):
    """Swapping the folder the process runs in would leave it in the deleted old one."""
    (tmp_path / "exp").mkdir()
    monkeypatch.chdir(tmp_path / "exp")
    for where in (".", str(tmp_path)):
        with pytest.raises(ValueError, match="is the current folder or holds it"):
            export_checkpoint(ckpts[0], where, exports=["peft"])
    assert list((tmp_path / "exp").iterdir()) == []


def test_without_an_atomic_exchange_a_swap_cut_in_half_is_repaired(tmp_path, monkeypatch, caplog):
    """Where renameat2(RENAME_EXCHANGE) is missing the swap is two renames; a kill between them leaves the old folder
    aside, and the next write puts it back before it starts."""
    from lightning_lora.io import transaction

    monkeypatch.setattr(transaction, "_exchange", lambda a, b: False)
    out = tmp_path / "exp"
    for text in ("one", "two"):
        with transaction.staged(out, carry=True) as stage:
            (stage / f"{text}.txt").write_text(text)
    assert sorted(p.name for p in out.iterdir()) == ["one.txt", "two.txt"] and siblings(out) == []
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out.rename(tmp_path / f".exp.old-{dead.pid}-0a1b2c3d")  # killed after the first rename
    with caplog.at_level(logging.WARNING, logger="lightning_lora"), pytest.raises(RuntimeError):
        with transaction.staged(out, carry=True):
            raise RuntimeError("a writer fails")
    assert sorted(p.name for p in out.iterdir()) == ["one.txt", "two.txt"] and siblings(out) == []
    assert f"restored {out} from .exp.old-{dead.pid}-0a1b2c3d" in caplog.text
