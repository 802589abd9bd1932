"""Metrics by name (`accuracy`, `exact_match`, `f1`, `contains`) or `module:function`.

A built-in metric compares each output field the prediction has with the example's field of
the same name (the gold label). An example may carry several acceptable answers as a list in
the same field, or in a plural field (`answers` for `answer`, as SQuAD rows do): the best match
counts. Text is normalised SQuAD-style (case, punctuation, articles, whitespace), so "The
Eiffel Tower." equals "eiffel tower". Scores are floats in [0, 1]; `plait eval` reports their
mean x 100.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable
from typing import Any

from plait.compilers.errors import MetricError
from plait.compilers.loading import load_object

Metric = Callable[..., float]

#: A metric that raises on this many examples in a row is broken, not strict: the run stops with
#: its error (`plait eval/compile --max-metric-errors`) instead of scoring every example 0.
MAX_METRIC_ERRORS = 5

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(value: Any) -> str:
    text = str(value).lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _golds(example: Any, field: str) -> list[Any]:
    golds: list[Any] = []
    for name in (field, f"{field}s"):
        value = example.get(name) if hasattr(example, "get") else None
        if value is None:
            continue
        golds.extend(value if isinstance(value, (list, tuple)) else [value])
    return golds


def _pairs(example: Any, prediction: Any) -> list[tuple[Any, list[Any]]]:
    """(predicted value, gold values) for every labelled field the prediction has."""
    labels = example.labels() if hasattr(example, "labels") else example
    pairs = []
    names = list(labels.keys())
    for field in names:
        if field.endswith("s") and field[:-1] in names:
            continue  # `answers` is read as the aliases of `answer`
        predicted = prediction.get(field) if hasattr(prediction, "get") else getattr(prediction, field, None)
        if predicted is None and field.endswith("s") and hasattr(prediction, "get"):
            predicted = prediction.get(field[:-1])  # gold `answers`, output `answer`
        if predicted is not None:
            pairs.append((predicted, _golds(example, field)))
    if not pairs:
        raise MetricError(f"the prediction has none of the example's label fields {names}")
    return pairs


def _mean(scores: list[float]) -> float:
    return sum(scores) / len(scores)


def exact_match(example: Any, prediction: Any, trace: Any = None) -> float:
    return _mean(
        [float(any(normalize(p) == normalize(g) for g in golds)) for p, golds in _pairs(example, prediction)]
    )


def _f1(predicted: str, gold: str) -> float:
    p, g = normalize(predicted).split(), normalize(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if not p or not g:
        return float(p == g)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def f1(example: Any, prediction: Any, trace: Any = None) -> float:
    return _mean(
        [max((_f1(str(p), str(g)) for g in golds), default=0.0) for p, golds in _pairs(example, prediction)]
    )


def contains(example: Any, prediction: Any, trace: Any = None) -> float:
    return _mean(
        [
            float(any(normalize(g) and normalize(g) in normalize(p) for g in golds))
            for p, golds in _pairs(example, prediction)
        ]
    )


BUILTIN: dict[str, Metric] = {
    "accuracy": exact_match,
    "exact_match": exact_match,
    "em": exact_match,
    "f1": f1,
    "contains": contains,
}


def resolve_metric(name: str) -> Metric:
    """A built-in metric by name, or any `module:function` / `file.py:function`."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise MetricError(
            f"unknown metric {name!r}: use one of {', '.join(sorted(BUILTIN))} or module:function"
        )
    try:
        metric = load_object(name)
    except Exception as exc:
        raise MetricError(f"cannot load metric {name!r}: {exc}") from exc
    if not callable(metric):
        raise MetricError(f"metric {name!r} is not callable")
    return metric
