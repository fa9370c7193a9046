"""Method knowledge stays in ``methods/`` (STYLE lesson 11; issue #22): outside it, no code names a method's branch
classes, tensors or starts. Docstrings, comments and prose messages may explain them; identifiers and keys may not.
The import side is an import-linter contract (pyproject.toml: "Method knowledge stays in methods/")."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_lora"
NAMES = re.compile(r"\b(?:LoRA|DoRA|VeRA)Branch\b|lora_(?:embedding_)?[AB]\b|lora_magnitude_vector|\bmagnitude\b|"
                   r"lambda_[bd]\b|vera_[AB]\b|(?i:pissa|loftq|rslora)|init_lora_[AB]|SVD_INITS")
ALLOWED = {  # (file, name): why
    ("train/optim.py", "lora_A"): "LoRA+'s public optimizer-group names (the roles slow/fast pick the group)",
    ("train/optim.py", "lora_B"): "LoRA+'s public optimizer-group names (the roles slow/fast pick the group)",
    ("io/gguf.py", "lora_A.weight"): "llama.cpp adapters are plain LoRA (gguf stream: to go through factors())",
    ("io/gguf.py", "lora_B.weight"): "llama.cpp adapters are plain LoRA (gguf stream: to go through factors())",
}


def named_in_code(path: Path) -> list[tuple[int, str]]:
    """(line, text) of identifiers and of key-like strings (no whitespace) that are not docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)}  # fmt: skip
    found = []
    for node in ast.walk(tree):
        text = (node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute)
                else node.arg if isinstance(node, (ast.arg, ast.keyword)) and node.arg
                else node.name if isinstance(node, (ast.alias, ast.FunctionDef, ast.ClassDef))
                else node.value if isinstance(node, ast.Constant) and isinstance(node.value, str)
                and id(node) not in docstrings and not re.search(r"\s", node.value) else None)  # fmt: skip
        if text and NAMES.search(text):
            found.append((getattr(node, "lineno", 0), text))
    return found


def test_no_method_names_outside_methods():
    offending = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("methods/"):
            continue
        offending += [f"{rel}:{line}: {text}" for line, text in named_in_code(path) if (rel, text) not in ALLOWED]
    assert not offending, "method knowledge outside methods/:\n" + "\n".join(offending)


def test_the_check_finds_what_it_looks_for(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('"""lora_A in a docstring is fine."""\nx = branch.lora_A\ny = "init_lora_A"\nz = "use pissa here"\n')
    assert [text for _, text in named_in_code(sample)] == ["lora_A", "init_lora_A"]
