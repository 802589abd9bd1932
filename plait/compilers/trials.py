"""Recording what an optimizer does, while it does it.

Two hooks, both plain DSPy extension points:

- `TrialRecorder` is a DSPy callback. Optimizers that score candidate programs (random search,
  MIPROv2) call `dspy.Evaluate`; each such call becomes a `Trial` row (number, state hash,
  score, demos, idealized cost per example) the moment it ends. The cost is what the run's
  meter counted between the evaluation's start and end: optimizers evaluate one candidate at a
  time, so those are the candidate's calls.
- `RecordingMetric` wraps the metric the optimizer is given: every example it scores (a
  bootstrapped demo checked, a candidate scored on one example) becomes an `Evaluation` row
  with phase "optimize", tagged with the state hash of the candidate being evaluated.

A resumed run replays the optimizer from recorded LM calls, so it calls these hooks again for
work already stored; both skip rows that already exist, so replay never duplicates them.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from dspy.utils.callback import BaseCallback

from plait.compilers.evaluation import prediction_dict
from plait.compilers.hashing import example_hash, state_hash
from plait.compilers.usage import Usage, UsageMeter


def demo_count(program: Any) -> int:
    """Demos over all of a program's predictors (they make its prompts long, hence its cost)."""
    return sum(len(getattr(predictor, "demos", None) or ()) for predictor in program.predictors())


class TrialRecorder(BaseCallback):
    """Numbers each `dspy.Evaluate` call of the optimizer and stores it as a trial."""

    def __init__(
        self,
        store: Any,
        run_id: int,
        meter: UsageMeter,
        first_number: int = 1,
        on_trial: Callable[[int, float | None], None] | None = None,
    ):
        self.store = store
        self.run_id = run_id
        self.meter = meter
        self.next_number = first_number
        self.on_trial = on_trial
        self.current_state = ""  # the candidate being evaluated now ("" outside evaluations)
        self._open: dict[str, tuple[int, str, int, int, Usage]] = {}
        self._lock = threading.Lock()

    def on_evaluate_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        program = inputs.get("program")
        devset = inputs.get("devset") or getattr(instance, "devset", None) or []
        with self._lock:
            number, self.next_number = self.next_number, self.next_number + 1
            digest = state_hash(program) if program is not None else ""
            demos = demo_count(program) if program is not None else 0
            self._open[call_id] = (number, digest, len(devset), demos, self.meter.snapshot())
            self.current_state = digest

    def on_evaluate_end(self, call_id: str, outputs: Any | None, exception: Exception | None = None) -> None:
        with self._lock:
            opened = self._open.pop(call_id, None)
            self.current_state = ""
        if opened is None:
            return
        number, digest, size, demos, before = opened
        score = getattr(outputs, "score", None) if exception is None else None
        cost = self.meter.snapshot().since(before).cost
        self.store.record_trial(
            self.run_id,
            number,
            score=score,
            state_hash=digest,
            params={
                "phase": "optimize",
                "examples": size,
                "demos": demos,
                **({"error": repr(exception)} if exception else {}),
            },
            ideal_seconds_per_example=None if cost is None or not size else cost / size,
        )
        if self.on_trial is not None:
            self.on_trial(number, score)


class RecordingMetric:
    """The optimizer's metric, writing each score to the store as it is computed."""

    def __init__(
        self,
        metric: Callable[..., Any],
        store: Any,
        run_id: int,
        recorder: TrialRecorder,
        on_call: Callable[[], None] | None = None,
    ):
        self.metric = metric
        self.store = store
        self.run_id = run_id
        self.recorder = recorder
        self.on_call = on_call
        self.__name__ = getattr(metric, "__name__", "metric")
        self._lock = threading.Lock()
        # Rows a previous attempt already wrote: replaying them must not write them again.
        self._already = Counter(
            (row.state_hash, row.example_hash, row.score)
            for row in store.evaluations(run_id, phase="optimize")
        )

    def __call__(self, example: Any, prediction: Any, trace: Any = None, *args: Any, **kwargs: Any) -> Any:
        value = self.metric(example, prediction, trace, *args, **kwargs)
        raw = getattr(value, "score", value)
        try:
            score = float(raw)
        except (TypeError, ValueError):
            score = 0.0
        key = (self.recorder.current_state, example_hash(example), score)
        with self._lock:
            replayed = self._already[key] > 0
            if replayed:
                self._already[key] -= 1
        if not replayed:
            self.store.record_evaluation(
                self.run_id,
                phase="optimize",
                state_hash=key[0],
                example_hash=key[1],
                score=score,
                prediction=prediction_dict(prediction),
            )
        if self.on_call is not None:
            self.on_call()
        return value
