"""Scoring a program on a dataset, one stored row per example, resumable.

`evaluate()` is what `plait eval` and the before/after scores of `plait compile` use. Each
example's result (score, prediction, parse failure, tokens, latency) is written to the store the
moment it is known, keyed by (run, program state hash, example hash); when the same run
evaluates the same program state again (a resumed run), those examples are read back instead
of being run. Examples run on `threads` threads so plait's engine can batch their LM calls.
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

    def to_json(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "n": self.n,
            "parse_failures": self.parse_failures,
            "errors": self.errors,
            "state_hash": self.state_hash,
            "seconds": round(self.seconds, 3),
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
) -> EvalReport:
    """Run `program` on every example and score it with `metric`.

    With `store` and `run_id`, results are written as they finish and already-stored results
    for this program state are reused. `lm`/`adapter` default to DSPy's configured ones.
    """
    meter = meter or UsageMeter()
    current = state_hash(program)
    hashes = [example_hash(example) for example in examples]
    cached = store.cached_evaluations(run_id, current) if store is not None and run_id is not None else {}
    results: list[ExampleResult | None] = [None] * len(examples)
    done = 0
    lock = threading.Lock()
    context = {key: value for key, value in (("lm", lm), ("adapter", adapter)) if value is not None}
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
        example = examples[index]
        begin = time.perf_counter()
        parse_failure, error, prediction, score = False, None, {}, 0.0
        with dspy.context(**context), meter.measure() as usage:
            try:
                output = program(**example.inputs())
                prediction = prediction_dict(output)
                score = _score(metric, example, output)
            except AdapterParseError as exc:
                parse_failure, error = True, f"parse failure: {exc}"[:2000]
            except MetricError:
                raise
            except Exception as exc:  # a failing example scores 0; the run goes on
                error = f"{type(exc).__name__}: {exc}"[:2000]
                log.debug("example %d failed", index, exc_info=True)
        result = ExampleResult(
            index,
            hashes[index],
            score,
            prediction,
            parse_failure,
            error,
            usage.total_tokens,
            (time.perf_counter() - begin) * 1000,
        )
        if store is not None and run_id is not None:
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
                )
            )
    before = meter.snapshot()
    if todo:
        with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="plait-eval") as pool:
            for future in [pool.submit(run_one, index) for index in todo]:
                future.result()  # re-raises MetricError (a broken metric stops the run)
    usage = meter.snapshot()
    for name in ("calls", "replayed", "prompt_tokens", "completion_tokens", "forced_tokens"):
        setattr(usage, name, getattr(usage, name) - getattr(before, name))
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
