"""Metric functions, pure and small enough to check by hand.

- exact match: the answer a program can check, taken from a generated response
  (:func:`extract_answer`: the text after "The answer is", else the first line), compared after
  :func:`normalize_answer` (case, spaces, a final full stop, thousands separators);
- accuracy: the share of predicted labels equal to the reference labels;
- perplexity: ``exp(total negative log-likelihood / tokens)``;
- the domain average (mean score of the scored domains) and a geometric mean of perplexities.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

__all__ = [
    "normalize_answer",
    "extract_answer",
    "exact_match",
    "exact_match_rate",
    "accuracy",
    "perplexity",
    "geometric_mean",
    "mean",
]

_ANSWER = re.compile(r"the answer is\s*:?\s*", re.IGNORECASE)
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no surrounding quotes or final full stop, ``1,000`` → ``1000``."""
    t = " ".join(text.strip().split()).lower()
    t = _THOUSANDS.sub("", t)
    t = t.strip("\"'`")
    while t.endswith((".", "!")):
        t = t[:-1].rstrip()
    return t


def extract_answer(text: str) -> str:
    """The checkable answer in a response: the sentence after the last "The answer is", else
    the first non-empty line."""
    matches = list(_ANSWER.finditer(text))
    if matches:
        rest = text[matches[-1].end():].split("\n", 1)[0]
        return re.split(r"\.\s", rest, maxsplit=1)[0].strip()  # up to the end of the sentence
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def exact_match(prediction: str, reference: str) -> bool:
    """True when the prediction's answer equals the reference's, normalised."""
    return normalize_answer(extract_answer(prediction)) == normalize_answer(extract_answer(reference))


def exact_match_rate(predictions: Sequence[str], references: Sequence[str]) -> float:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return float("nan")
    return sum(exact_match(p, r) for p, r in zip(predictions, references, strict=True)) / len(references)


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of labels predicted exactly (labels compared normalised)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return float("nan")
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True))
    return hits / len(references)


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood per token); inf for no tokens."""
    if n_tokens <= 0:
        return float("inf")
    return math.exp(nll_sum / n_tokens)


def geometric_mean(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan")
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def mean(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")
