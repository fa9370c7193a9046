"""A tokenizer in GGUF metadata, as llama.cpp's ``convert_hf_to_gguf.py`` writes it (``add_tokenizer``).

Two kinds, chosen as the converter chooses them:

- SentencePiece (Gemma, Llama 2, Mistral 7B, Phi-3 mini): when the tokenizer's source folder holds its
  ``tokenizer.model``, llama.cpp's ``llama`` tokenizer gets every piece with its score and type (normal, unknown,
  control, unused, byte), then the added tokens of ``added_tokens.json`` and ``tokenizer_config.json``
  (``conversion/base.py`` ``_create_vocab_sentencepiece``; Phi-3 has its own variant, ``conversion/phi.py``).
- byte-level BPE (SmolLM2, Llama 3, Qwen, Phi-4): llama.cpp's ``gpt2`` tokenizer gets the tokens, their types, the
  merges and the pre-tokenizer type (``get_vocab_base``); llama.cpp knows a pre-tokenizer by name, which we read off
  the tokenizer's own regex (``PRE_TOKENIZER_REGEXES``).

Both pad the vocabulary to the model's rows with ``[PAD<i>]`` tokens and add the special ids, the chat template and
``add_bos_token``/``add_eos_token`` (exactly when the Hugging Face tokenizer adds BOS/EOS).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from lightning_lora.io.gguf_hparams import require_gguf

log = logging.getLogger(__name__)

# llama.cpp's pre-tokenizer types by the regex of a ``Split`` before a ``ByteLevel(use_regex=False)`` (the regexes
# llama.cpp's src/llama-vocab.cpp quotes as "original regex from tokenizer.json" for each type): Qwen2 splits digits
# one by one, Llama 3 in groups of up to three.
_HEAD = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_TOKENIZER_REGEXES = {_HEAD + r"\p{N}" + _TAIL: "qwen2", _HEAD + r"\p{N}{1,3}" + _TAIL: "llama-bpe"}
SPIECE_UNDERLINE = "\u2581"


def pre_tokenizer(spec: dict | None) -> str:
    """llama.cpp's pre-tokenizer type for a tokenizer.json ``pre_tokenizer`` (the ones llama.cpp knows)."""
    parts = (spec or {}).get("pretokenizers") if (spec or {}).get("type") == "Sequence" else [spec or {}]
    kinds = [(p.get("type"), p.get("individual_digits"), p.get("use_regex", True)) for p in parts]
    if kinds == [("ByteLevel", None, True)]:
        return "gpt-2"
    if kinds == [("Digits", True, None), ("ByteLevel", None, True)]:
        return "smollm"
    if kinds == [("Split", None, True), ("ByteLevel", None, False)]:
        found = PRE_TOKENIZER_REGEXES.get((parts[0].get("pattern") or {}).get("Regex"))
        if found:
            return found
    log.warning("GGUF export: unknown pre-tokenizer %s; llama.cpp will use its default one.", spec)
    return "default"


def looks_special(token: str) -> bool:
    """Added tokens llama.cpp treats as control tokens even when not marked special (``does_token_look_special``)."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))  # fmt: skip


def _bpe_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    gguf = require_gguf()
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            token = by_id[i]
            if not added[i].normalized:  # llama.cpp assumes added tokens pre-normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            special = added[i].special or looks_special(token)
            tokens.append(token if special else token.replace(SPIECE_UNDERLINE, " "))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _spm_vocab(model_file: Path, folder: Path, vocab_size: int, phi3: bool):
    """Pieces, scores and types of a SentencePiece model, then the added tokens (the converter's two variants)."""
    from sentencepiece import SentencePieceProcessor

    T = require_gguf().TokenType  # noqa: N806 - the converter's SentencePieceTokenTypes, same values
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(model_file))
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores, types = [-10000.0] * vocab_size, [T.UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i], scores[i] = sp.IdToPiece(i).encode(), sp.GetScore(i)
        types[i] = (T.UNKNOWN if sp.IsUnknown(i) else T.CONTROL if sp.IsControl(i) else T.UNUSED if sp.IsUnused(i)
                    else T.BYTE if sp.IsByte(i) else T.NORMAL)  # fmt: skip

    def read(name: str) -> dict:
        path = folder / name
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    added = list(read("added_tokens.json").items())
    decoder = [(int(i), d) for i, d in read("tokenizer_config.json").get("added_tokens_decoder", {}).items()]
    if phi3:
        decoder += [(int(d["id"]), d) for d in read("tokenizer.json").get("added_tokens", [])]
    for content, i in added:
        if i < vocab_size:
            tokens[i], scores[i], types[i] = content.encode(), -1000.0, T.USER_DEFINED
    for i, data in decoder:
        if i >= vocab_size:
            continue
        content = data["content"]
        control = data.get("special") or (not phi3 and looks_special(content))
        if not control and not phi3:
            content = content.replace(SPIECE_UNDERLINE, " ")
        tokens[i], scores[i], types[i] = content.encode(), -1000.0, T.CONTROL if control else T.USER_DEFINED
    return tokens, scores, types


def _sentencepiece_file(tokenizer) -> Path | None:
    for candidate in (getattr(tokenizer, "vocab_file", None), Path(str(tokenizer.name_or_path)) / "tokenizer.model"):
        if candidate and Path(candidate).name == "tokenizer.model" and Path(candidate).is_file():
            return Path(candidate)
    return None


def add_tokenizer(writer, tokenizer, vocab_size: int, config=None, arch: str = "llama") -> None:
    """Write ``tokenizer`` into ``writer``'s metadata as the converter does for llama.cpp architecture ``arch``, padded
    to ``vocab_size``; the model ``config``'s special token ids fill in those the tokenizer lacks (as the converter
    reads config.json).

    Raises:
        ValueError: neither a SentencePiece model (its ``tokenizer.model`` found) nor a byte-level BPE; more tokens
            than ``vocab_size``.
    """
    gguf = require_gguf()
    if len(tokenizer.get_vocab()) > vocab_size:
        raise ValueError(f"GGUF export: the tokenizer has {len(tokenizer.get_vocab())} tokens but the model only "
                         f"{vocab_size}.")  # fmt: skip
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    spm = _sentencepiece_file(tokenizer)
    kind = (spec.get("model") or {}).get("type")
    byte_level = kind == "BPE" and (spec.get("decoder") or {}).get("type") == "ByteLevel"
    if spm is None and not byte_level:
        raise ValueError(
            "GGUF export writes SentencePiece tokenizers (with their tokenizer.model next to the tokenizer) and "
            f"byte-level BPE ones; this tokenizer is {type(tokenizer).__name__} with model {kind!r} and no "
            f"tokenizer.model in {tokenizer.name_or_path!r}."
        )
    with tempfile.TemporaryDirectory() as tmp:  # the converter reads added tokens, special ids, merges from files
        folder = Path(tmp)
        tokenizer.save_pretrained(folder)
        if config is not None:
            config.to_json_file(folder / "config.json")
        if spm is not None:
            tokens, scores, types = _spm_vocab(spm, folder, vocab_size, phi3=arch == "phi3")
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
            writer.add_token_list(tokens)
            writer.add_token_scores(scores)
            writer.add_token_types(types)
            if arch in ("gemma2", "gemma3"):
                writer.add_add_space_prefix(False)
        else:
            tokens, types = _bpe_vocab(tokenizer, vocab_size)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(pre_tokenizer(spec.get("pre_tokenizer")))
            writer.add_token_list(tokens)
            writer.add_token_types(types)
        prefix = json.loads((folder / "tokenizer_config.json").read_text()).get("add_prefix_space")
        if arch == "llama" and prefix is not None:
            writer.add_add_space_prefix(prefix)
        special = gguf.SpecialVocab(folder, load_merges=spm is None, n_vocab=len(tokens))
        if special.chat_template is None and getattr(tokenizer, "chat_template", None):
            special.chat_template = tokenizer.chat_template
        probe = tokenizer("a").input_ids  # llama.cpp must add BOS/EOS exactly when this tokenizer does
        for kind in ("bos", "eos"):
            tid = getattr(tokenizer, f"{kind}_token_id", None)
            special.add_special_token[kind] = tid is not None and (probe[:1] if kind == "bos" else probe[-1:]) == [tid]
        special.add_to_gguf(writer, quiet=True)
