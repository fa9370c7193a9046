"""Generation metrics of replies against reference responses (torchmetrics' implementations).

- **exact match**: the share of replies equal to their reference once whitespace is normalized (``" ".join(split())``).
- **ROUGE-L F1** (Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries", section 3): with the longest
  common subsequence of words LCS(X, Y) of reply X (m words) and reference Y (n words), P = LCS/m, R = LCS/n,
  F1 = 2PR/(P + R); mean over examples. Words as torchmetrics (and Google's ``rouge-score``) tokenize: lower case,
  letters and digits.
- **chrF** (Popovic 2015, WMT, "chrF: character n-gram F-score"): character n-grams (n = 1..6, whitespace removed)
  counted over the whole corpus; per order P_n = matches/reply n-grams, R_n = matches/reference n-grams,
  F_n = (1 + b^2) P_n R_n / (b^2 P_n + R_n) with b = 2 (recall weighs more), chrF = 100 x mean_n F_n
  (sacrebleu's scale: 0-100).
"""

from __future__ import annotations

from collections.abc import Sequence


def _normal(text: str) -> str:
    return " ".join(str(text).split())


def exact_match(replies: Sequence[str], references: Sequence[str]) -> float:
    """Share of replies equal to their reference after whitespace normalization."""
    _check(replies, references)
    return sum(_normal(a) == _normal(b) for a, b in zip(replies, references)) / len(replies)


def rouge_l(replies: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 of each reply against its reference (torchmetrics)."""
    from torchmetrics.functional.text import rouge_score

    _check(replies, references)
    return float(rouge_score(list(replies), list(references), rouge_keys="rougeL")["rougeL_fmeasure"])


def chrf(replies: Sequence[str], references: Sequence[str]) -> float:
    """Corpus-level chrF (n = 1..6 characters, beta 2) on a 0-100 scale (torchmetrics)."""
    from torchmetrics.functional.text import chrf_score

    _check(replies, references)
    return 100.0 * float(chrf_score(list(replies), [[r] for r in references], n_word_order=0))


def text_metrics(replies: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``{"exact_match", "rouge_l", "chrf"}`` of ``replies`` against ``references`` (module docstring)."""
    return {"exact_match": exact_match(replies, references), "rouge_l": rouge_l(replies, references),
            "chrf": chrf(replies, references)}  # fmt: skip


def _check(replies: Sequence[str], references: Sequence[str]) -> None:
    if len(replies) != len(references) or not replies:
        raise ValueError(f"need as many replies as references, at least one; got {len(replies)} and {len(references)}.")


__all__ = ["chrf", "exact_match", "rouge_l", "text_metrics"]
