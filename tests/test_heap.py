"""core/heap.py: free pages inside glibc's heap go back to the OS, pages in use stay; a quantized model stops pinning\nits checkpoint file, a full-precision one is left mapped."""

import ctypes
import gc
import platform
from pathlib import Path

import pytest
import torch

from lightning_lora.core.heap import release_free_heap

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")


def resident() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@glibc
def test_freed_heap_pages_leave_the_resident_set_and_live_ones_keep_their_bytes():
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, count = 64 * 1024, 640  # below glibc's mmap threshold: from the heap, 40 MiB in all
    blocks = [libc.malloc(size) for _ in range(count)]
    for b in blocks:
        ctypes.memset(b, 7, size)  # resident
    keep = blocks[1::64]  # a few stay in use, scattered: the free space is not at the heap's top
    for b in blocks:
        if b not in keep:
            libc.free(b)
    before = resident()
    assert release_free_heap()
    released = before - resident()
    assert released > 20 * 2**20, f"only {released / 2**20:.1f} MiB of ~39 MiB free heap went back"
    assert all(ctypes.string_at(b, size) == b"\x07" * size for b in keep)  # live blocks untouched
    for b in keep:
        libc.free(b)


def mapped_files() -> set[str]:
    return {line.split(maxsplit=5)[5] for line in Path("/proc/self/maps").read_text().splitlines()
            if len(line.split(maxsplit=5)) == 6}


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/self/maps")
def test_a_quantized_model_stops_pinning_its_checkpoint_file_with_the_same_values(tmp_path):
    """transformers maps the safetensors file and uses its bytes as parameters; after NF4 replaced the linear
    weights, the embeddings and norms still held the whole file mapped. Copied out: the mapping goes, the model's
    output is bitwise the same and tied weights stay one tensor."""
    from transformers import LlamaForCausalLM

    from lightning_lora import NF4
    from lightning_lora.core.heap import own_file_mapped_tensors, release_host_memory
    from lightning_lora.quant.nf4 import quantize
    from tiny_models import tiny_llama

    # bitsandbytes' first quantization in a process looks for an optional kernel package; under pytest the failed
    # import's traceback is kept, and with it that call's frame and the layers it replaced. Done once beforehand.
    quantize(tiny_llama(1), NF4(blocksize=64))
    source = tiny_llama()
    source.config.tie_word_embeddings = True
    source.tie_weights()
    source.save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    checkpoint = str(tmp_path / "model.safetensors")
    assert checkpoint in mapped_files()  # the premise: parameters read from the mapped file
    quantize(model, NF4(blocksize=64))
    ids = torch.arange(12)[None]
    with torch.no_grad():
        before = model(ids).logits
    copied = own_file_mapped_tensors(model)
    assert "model.embed_tokens.weight" in copied and "model.norm.weight" in copied
    gc.collect()
    assert checkpoint not in mapped_files()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    release_host_memory(model)  # nothing left to copy: a no-op on the model
    assert own_file_mapped_tensors(model) == []


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/self/maps")
def test_a_full_precision_model_that_reads_its_whole_file_is_left_mapped(tmp_path):
    """Copying every parameter would hold the file and its copy at once: twice the model, for nothing."""
    from transformers import LlamaForCausalLM

    from lightning_lora.core.heap import own_file_mapped_tensors
    from tiny_models import tiny_llama

    tiny_llama().save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert str(tmp_path / "model.safetensors") in mapped_files()
    assert own_file_mapped_tensors(model) == []
