"""Scoring a program on a dataset, one stored row per example, resumable.

`evaluate()` is what `plait eval` and the before/after scores of `plait compile` use. Each
example's result (score, prediction, parse failure, tokens, latency, idealized cost) is written
to the store the moment it is known, keyed by (run, program state hash, example hash); when the
same run evaluates the same program state again (a resumed run), those examples are read back
instead of being run. Examples run on `threads` threads so plait's engine can batch their LM calls.

A program that fails on an example scores 0 there and the run goes on. A metric that raises is
different: that is the scorer failing, not the program. Its examples score 0 but are not
stored (a resumed run, after the metric is fixed, scores them again; their LM calls replay from
the store), and `max_metric_errors` failures in a row stop the run with the metric's error.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import dspy
from dspy.utils.exceptions import AdapterParseError

from plait.compilers.errors import MetricError
from plait.compilers.hashing import example_hash, state_hash
from plait.compilers.metrics import MAX_METRIC_ERRORS
from plait.compilers.usage import Usage, UsageMeter

log = logging.getLogger(__name__)

#: Called after each example: (result, finished so far, total).
OnResult = Callable[["ExampleResult", int, int], None]


@dataclass
class ExampleResult:
    index: int
    example_hash: str
    score: float
    prediction: dict[str, Any]
    parse_failure: bool = False
    error: str | None = None
    tokens: int = 0
    latency_ms: float = 0.0
    reused: bool = False  # read back from the store, not run now
    ideal_seconds: float | None = None  # idealized cost of its LM calls; None: not priced

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalReport:
    """Score in 0-100, the per-example results (in dataset order) and what it cost."""

    score: float
    n: int
    parse_failures: int
    errors: int
    results: list[ExampleResult]
    state_hash: str
    seconds: float
    usage: Usage = field(default_factory=Usage)
    reused: int = 0

    @property
    def tokens_per_example(self) -> float:
        return sum(r.tokens for r in self.results) / max(self.n, 1)

    @property
    def ideal_seconds_per_example(self) -> float | None:
        """Mean idealized cost of an example (reused ones included, from the store); None when
        any example's calls were not priced."""
        costs = [r.ideal_seconds for r in self.results]
        if not costs or any(c is None for c in costs):
            return None
        return sum(costs) / len(costs)

    def to_json(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "n": self.n,
            "parse_failures": self.parse_failures,
            "errors": self.errors,
            "state_hash": self.state_hash,
            "seconds": round(self.seconds, 3),
            "ideal_seconds_per_example": self.ideal_seconds_per_example,
            "reused": self.reused,
            "usage": self.usage.to_dict(),
            "results": [r.to_json() for r in self.results],
        }


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        if hasattr(value, "model_dump"):
            return value.model_dump(mode="json")
        if isinstance(value, (list, tuple)):
            return [_jsonable(v) for v in value]
        if isinstance(value, dict):
            return {str(k): _jsonable(v) for k, v in value.items()}
        return str(value)


def prediction_dict(prediction: Any) -> dict[str, Any]:
    data = prediction.toDict() if hasattr(prediction, "toDict") else dict(prediction or {})
    return {key: _jsonable(value) for key, value in data.items()}


def _score(metric: Callable[..., Any], example: Any, prediction: Any) -> float:
    value = metric(example, prediction, None)
    if isinstance(value, dspy.Prediction) and "score" in value:  # GEPA-style feedback metrics
        value = value.score
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise MetricError(f"the metric returned {value!r}, not a number or bool") from exc


class MetricFailures:
    """Counts the metric's exceptions in a row (in the order examples finish); at `limit` the
    metric is taken to be broken and the run stops with a `MetricError` that quotes it."""

    def __init__(self, metric: Callable[..., Any], limit: int):
        self.name = getattr(metric, "__name__", "the metric")
        self.limit = limit
        self.in_a_row = 0
        self.broken = False  # at the limit, or on a MetricError: examples not yet started are skipped
        self._lock = threading.Lock()

    def scored(self) -> None:
        with self._lock:
            self.in_a_row = 0

    def failed(self, error: Exception) -> None:
        with self._lock:
            self.in_a_row += 1
            if self.in_a_row < self.limit:
                return
            self.broken = True
        raise MetricError(
            f"the metric {self.name} raised on {self.limit} examples in a row, last: "
            f"{type(error).__name__}: {error}; fix it and run again (scored examples are kept)"
        ) from error


def evaluate(
    program: Any,
    examples: Sequence[Any],
    metric: Callable[..., Any],
    *,
    lm: Any = None,
    adapter: Any = None,
    threads: int = 4,
    meter: UsageMeter | None = None,
    store: Any = None,
    run_id: int | None = None,
    phase: str = "eval",
    on_result: OnResult | None = None,
    max_metric_errors: int = MAX_METRIC_ERRORS,
) -> EvalReport:
    """Run `program` on every example and score it with `metric`.

    With `store` and `run_id`, results are written as they finish and already-stored results
    for this program state are reused. `lm`/`adapter` default to DSPy's configured ones.
    `max_metric_errors` metric exceptions in a row raise `MetricError`.
    """
    meter = meter or UsageMeter()
    current = state_hash(program)
    hashes = [example_hash(example) for example in examples]
    cached = store.cached_evaluations(run_id, current) if store is not None and run_id is not None else {}
    results: list[ExampleResult | None] = [None] * len(examples)
    done = 0
    lock = threading.Lock()
    context = {key: value for key, value in (("lm", lm), ("adapter", adapter)) if value is not None}
    metric_failures = MetricFailures(metric, max_metric_errors)
    start = time.perf_counter()

    def finish(result: ExampleResult) -> None:
        nonlocal done
        with lock:
            results[result.index] = result
            done += 1
            count = done
        if on_result is not None:
            on_result(result, count, len(examples))

    def run_one(index: int) -> None:
        if metric_failures.broken:
            return
        example = examples[index]
        begin = time.perf_counter()
        parse_failure, error, prediction, score = False, None, {}, 0.0
        metric_error: Exception | None = None
        with dspy.context(**context), meter.measure() as usage:
            try:
                output = program(**example.inputs())
                prediction = prediction_dict(output)
            except AdapterParseError as exc:
                parse_failure, error = True, f"parse failure: {exc}"[:2000]
            except Exception as exc:  # a failing example scores 0; the run goes on
                error = f"{type(exc).__name__}: {exc}"[:2000]
                log.debug("example %d failed", index, exc_info=True)
            else:
                try:
                    score = _score(metric, example, output)
                except MetricError:
                    metric_failures.broken = True  # the rest of the run cannot be scored
                    raise
                except Exception as exc:
                    metric_error, error = exc, f"metric failed: {type(exc).__name__}: {exc}"[:2000]
        if metric_error is not None:
            metric_failures.failed(metric_error)
        elif error is None:
            metric_failures.scored()
        result = ExampleResult(
            index,
            hashes[index],
            score,
            prediction,
            parse_failure,
            error,
            usage.total_tokens,
            (time.perf_counter() - begin) * 1000,
            ideal_seconds=usage.cost,
        )
        if store is not None and run_id is not None and metric_error is None:
            store.record_evaluation(
                run_id,
                phase=phase,
                state_hash=current,
                example_hash=result.example_hash,
                example_index=index,
                score=score,
                prediction=prediction,
                parse_failure=parse_failure,
                error=error,
                tokens=result.tokens,
                latency_ms=result.latency_ms,
                ideal_seconds=result.ideal_seconds,
            )
        finish(result)

    todo = []
    for index, digest_ in enumerate(hashes):
        row = cached.get(digest_)
        if row is None:
            todo.append(index)
        else:
            finish(
                ExampleResult(
                    index,
                    digest_,
                    row.score,
                    row.prediction,
                    row.parse_failure,
                    row.error,
                    row.tokens,
                    row.latency_ms,
                    reused=True,
                    ideal_seconds=row.ideal_seconds,
                )
            )
    before = meter.snapshot()
    if todo:
        with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="plait-eval") as pool:
            for future in [pool.submit(run_one, index) for index in todo]:
                future.result()  # re-raises MetricError (a broken metric stops the run)
    usage = meter.snapshot().since(before)
    final = [r for r in results if r is not None]
    n = len(final)
    return EvalReport(
        score=round(100.0 * sum(r.score for r in final) / n, 2) if n else 0.0,
        n=n,
        parse_failures=sum(r.parse_failure for r in final),
        errors=sum(r.error is not None and not r.parse_failure for r in final),
        results=final,
        state_hash=current,
        seconds=time.perf_counter() - start,
        usage=usage,
        reused=len(examples) - len(todo),
    )
