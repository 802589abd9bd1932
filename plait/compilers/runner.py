"""The compile and eval runs behind `plait compile` and `plait eval`.

A compile run: score the program as written on the dev set (baseline), run the optimizer on
the train set, score the result on the dev set, pick among the candidates by score and
idealized cost when asked (`selection.py`), save the artifact. Every LM call, every
per-example score and every trial goes to the store as it happens, under a run whose key
hashes everything that decides the result; running the same command again finds that run and
resumes it: stored evaluations are reused and the optimizer replays its recorded LM calls, so
work finished before a crash is never done twice. How the result is picked is not part of that
key: the same command with another `--objective`, `--max-cost` or `--score-tolerance` replays
the stored run and picks again, at no cost.

Progress is reported to a `Progress` object (the CLI draws rich bars; the library default
only logs), so this module has no terminal code.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import dspy

from plait.backends.models.cost import REFERENCE
from plait.compilers import metrics as metric_lib
from plait.compilers import optimizers
from plait.compilers.artifact import load_artifact, save_artifact
from plait.compilers.data import read_jsonl, to_examples
from plait.compilers.errors import OptimizerError
from plait.compilers.evaluation import EvalReport, ExampleResult, evaluate
from plait.compilers.hashing import digest, example_hash, signature_hash, state_hash
from plait.compilers.loading import instantiate, load_program_class
from plait.compilers.metrics import MAX_METRIC_ERRORS
from plait.compilers.outputs import check_output_file
from plait.compilers.recording import recording_lm
from plait.compilers.runtime import make_lm, select_adapter
from plait.compilers.selection import Candidate, Selection, pareto_front, pick
from plait.compilers.trials import RecordingMetric, TrialRecorder, demo_count
from plait.compilers.usage import Usage, UsageMeter
from plait.version import __version__

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


class Progress(Protocol):
    """What a run reports while it works. `total` is None when unknown (the optimizer)."""

    def start(self, phase: str, total: int | None) -> None: ...
    def advance(self, phase: str, result: ExampleResult | None = None) -> None: ...
    def finish(self, phase: str, summary: str) -> None: ...


class LogProgress:
    def start(self, phase: str, total: int | None) -> None:
        log.info("%s: %s", phase, f"{total} examples" if total else "started")

    def advance(self, phase: str, result: ExampleResult | None = None) -> None:
        pass

    def finish(self, phase: str, summary: str) -> None:
        log.info("%s: %s", phase, summary)


@dataclass
class CompileConfig:
    program: str
    trainset: str
    devset: str
    out: str
    metric: str = "accuracy"
    optimizer: str = "bootstrap"
    train_limit: int | None = None
    dev_limit: int | None = None
    threads: int = 4
    seed: int = 0
    model: str = DEFAULT_MODEL
    adapter: str = "auto"
    max_tokens: int | None = None
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    program_args: dict[str, Any] = field(default_factory=dict)
    fresh: bool = False  # start a new run even if one with the same key exists
    max_metric_errors: int = MAX_METRIC_ERRORS  # metric exceptions in a row that stop the run
    selection: Selection = field(default_factory=Selection)  # not part of the run's key


@dataclass
class CompileResult:
    run_id: int
    resumed: bool
    attempts: int
    before: EvalReport
    after: EvalReport  # of the picked candidate
    artifact: str
    artifact_sha256: str
    seconds: float
    usage: Usage
    trials: int
    uses_devset: bool
    n_train: int
    candidates: list[Candidate]  # whole programs scored on the dev set, baseline first
    best: Candidate  # the optimizer's own pick
    picked: Candidate  # what the artifact holds: `best` unless a cost-aware selection chose
    selection: Selection

    @property
    def front(self) -> list[Candidate]:
        return pareto_front(self.candidates)

    @property
    def tokens(self) -> int:
        """All tokens of the run: LM calls made or replayed now, plus stored examples reused."""
        reused = sum(r.tokens for report in (self.before, self.after) for r in report.results if r.reused)
        return self.usage.total_tokens + reused


@dataclass
class EvalConfig:
    program: str
    devset: str
    metric: str = "accuracy"
    compiled: str | None = None
    limit: int | None = None
    offset: int = 0
    threads: int = 4
    model: str | None = None  # default: the artifact's model, else DEFAULT_MODEL
    adapter: str = "auto"
    max_tokens: int | None = None
    program_args: dict[str, Any] = field(default_factory=dict)
    fresh: bool = False
    max_metric_errors: int = MAX_METRIC_ERRORS


def _rows_digest(examples: list[Any]) -> str:
    return digest([example_hash(example) for example in examples])


def compile_program(
    config: CompileConfig, store: Any, progress: Progress | None = None, *, lm: Any = None
) -> CompileResult:
    """Run (or resume) the compile described by `config`; returns scores, cost and artifact.

    `lm` replaces the plait LM built from `config.model` (any `dspy.LM` with a custom engine,
    e.g. a remote one); its calls are recorded like the default's."""
    progress = progress or LogProgress()
    started = time.perf_counter()
    # What can be checked without the program, data or model is checked first: a typo in a
    # setting must not cost a baseline evaluation.
    optimizers.check_overrides(config.optimizer, config.optimizer_args)
    check_output_file(config.out, "--out")
    cls = load_program_class(config.program)
    program = instantiate(cls, config.program_args)
    signature = signature_hash(program)
    trainset = to_examples(cls, read_jsonl(config.trainset, limit=config.train_limit), source=config.trainset)
    devset = to_examples(cls, read_jsonl(config.devset, limit=config.dev_limit), source=config.devset)
    metric = metric_lib.resolve_metric(config.metric)

    identity = {
        "program": config.program,
        "signature_hash": signature,
        "init": config.program_args,
        "trainset": _rows_digest(trainset),
        "devset": _rows_digest(devset),
        "metric": config.metric,
        "optimizer": config.optimizer,
        "optimizer_args": config.optimizer_args,
        "seed": config.seed,
        "model": config.model,
        "adapter": config.adapter,
        "max_tokens": config.max_tokens,
        "initial_state": state_hash(program),
    }
    described = {
        **identity,
        "trainset_path": config.trainset,
        "devset_path": config.devset,
        "n_train": len(trainset),
        "n_dev": len(devset),
        "out": config.out,
        "threads": config.threads,
    }
    run, resumed = store.start_run(
        kind="compile",
        key=digest(identity),
        program_path=config.program,
        signature_hash=signature,
        config=described,
        resume=not config.fresh,
    )
    if resumed:
        log.info("resuming compile run %d (attempt %d)", run.id, run.attempts)
    meter = UsageMeter()
    lm = recording_lm(lm or make_lm(config.model, max_tokens=config.max_tokens), store, run.id, meter)
    adapter = select_adapter(lm, config.adapter)
    scoring = (devset, metric, lm, adapter, config.threads, meter, store, run.id)
    try:
        before = _scored(program, *scoring, "baseline", progress, config.max_metric_errors)
        store.record_trial(
            run.id,
            0,
            score=before.score,
            state_hash=before.state_hash,
            params={"phase": "baseline", "examples": before.n, "demos": demo_count(program)},
            ideal_seconds_per_example=before.ideal_seconds_per_example,
        )
        store.update_run(run.id, score_before=before.score)

        compiled, trials, uses_devset = _optimize(
            config, program, trainset, devset, metric, lm, adapter, store, run.id, meter, progress
        )
        optimized = _scored(compiled, *scoring, "final", progress, config.max_metric_errors)
        best = _candidate(trials + 1, "optimizer's pick", compiled, optimized)
        candidates = _candidates(
            _candidate(0, "baseline", program, before),
            best,
            getattr(compiled, "candidate_programs", None),
            store.trials(run.id),
            len(devset),
        )
        picked = pick(candidates, config.selection) if config.selection.active else best
        after = optimized
        if picked.state_hash != best.state_hash:  # its rows and LM calls are mostly in the store
            after = _scored(picked.program, *scoring, "picked", progress, config.max_metric_errors)
            compiled = picked.program
        store.record_trial(
            run.id,
            trials + 1,
            score=after.score,
            state_hash=after.state_hash,
            params={"phase": "final", "examples": after.n, "demos": demo_count(compiled)},
            ideal_seconds_per_example=after.ideal_seconds_per_example,
        )

        extra = {
            "run_id": run.id,
            "metric": config.metric,
            "optimizer": config.optimizer,
            "score_before": before.score,
            "score_after": after.score,
            "devset": config.devset,
            "n_dev": len(devset),
            "n_train": len(trainset),
            "adapter": config.adapter,
            "max_tokens": config.max_tokens,
            "ideal_seconds_per_example": after.ideal_seconds_per_example,
            "cost_reference": REFERENCE.name,
            "selection": config.selection.to_json(),
        }
        sha = save_artifact(
            compiled,
            config.out,
            program_path=config.program,
            model=config.model,
            extra=extra,
            init=config.program_args,
        )
        store.record_artifact(
            program_path=config.program,
            signature_hash=signature,
            path=str(Path(config.out).resolve()),
            sha256=sha,
            model=config.model,
            plait_version=__version__,
            run_id=run.id,
            score=after.score,
        )
        seconds = time.perf_counter() - started
        result = CompileResult(
            run_id=run.id,
            resumed=resumed,
            attempts=run.attempts,
            before=before,
            after=after,
            artifact=config.out,
            artifact_sha256=sha,
            seconds=seconds,
            usage=meter.snapshot(),
            trials=trials,
            uses_devset=uses_devset,
            n_train=len(trainset),
            candidates=candidates,
            best=best,
            picked=picked,
            selection=config.selection,
        )
        front = {c.state_hash for c in result.front}
        store.finish_run(
            run.id,
            score_after=after.score,
            tokens=result.tokens,
            seconds=seconds,
            ideal_seconds=result.usage.cost,
            summary={
                "usage": result.usage.to_dict(),
                "trials": trials + 2,
                "reused_examples": before.reused + after.reused,
                "artifact": config.out,
                "artifact_sha256": sha,
                "uses_devset": uses_devset,
                "cost_reference": REFERENCE.name,
                "selection": config.selection.to_json(),
                "candidates": [
                    {
                        "trial": c.trial,
                        "label": c.label,
                        "state_hash": c.state_hash,
                        "demos": c.demos,
                        "score": c.score,
                        "ideal_seconds_per_example": c.ideal_seconds,
                        "front": c.state_hash in front,
                        "best": c.state_hash == best.state_hash,
                        "picked": c.state_hash == picked.state_hash,
                    }
                    for c in candidates
                ],
            },
        )
        return result
    except BaseException as exc:
        store.finish_run(
            run.id,
            status="failed",
            error=f"{type(exc).__name__}: {exc}"[:2000],
            seconds=time.perf_counter() - started,
        )
        raise


def _scored(
    program: Any,
    examples: list[Any],
    metric: Any,
    lm: Any,
    adapter: Any,
    threads: int,
    meter: UsageMeter,
    store: Any,
    run_id: int,
    phase: str,
    progress: Progress,
    max_metric_errors: int,
) -> EvalReport:
    progress.start(phase, len(examples))
    report = evaluate(
        program,
        examples,
        metric,
        lm=lm,
        adapter=adapter,
        threads=threads,
        meter=meter,
        store=store,
        run_id=run_id,
        phase=phase,
        on_result=lambda result, done, total: progress.advance(phase, result),
        max_metric_errors=max_metric_errors,
    )
    progress.finish(
        phase,
        f"{report.score:.1f} on {report.n} examples"
        + (f" ({report.reused} reused from the store)" if report.reused else ""),
    )
    return report


def _candidate(trial: int, label: str, program: Any, report: EvalReport) -> Candidate:
    return Candidate(
        trial,
        label,
        report.state_hash,
        report.score,
        report.ideal_seconds_per_example,
        demo_count(program),
        program,
    )


def _candidates(
    baseline: Candidate,
    best: Candidate,
    candidate_programs: Any,
    trials: list[Any],
    n_dev: int,
) -> list[Candidate]:
    """Every whole program scored on the full dev set: the baseline, the candidates the
    optimizer attached to its result (random search's `candidate_programs`) with their recorded
    trials, and the optimizer's pick; one per program state, the earliest trial kept."""
    programs: dict[str, Any] = {}
    for entry in candidate_programs if isinstance(candidate_programs, list) else []:
        if isinstance(entry, dict) and entry.get("program") is not None:
            programs.setdefault(state_hash(entry["program"]), entry["program"])
    found = {baseline.state_hash: baseline}
    for trial in trials:
        whole = trial.params.get("phase") == "optimize" and trial.params.get("examples") == n_dev
        if whole and trial.score is not None and trial.state_hash in programs:
            found.setdefault(
                trial.state_hash,
                Candidate(
                    trial.number,
                    f"trial {trial.number}",
                    trial.state_hash,
                    trial.score,
                    trial.ideal_seconds_per_example,
                    int(trial.params.get("demos", 0)),
                    programs[trial.state_hash],
                ),
            )
    found.setdefault(best.state_hash, best)
    return list(found.values())


def _optimize(
    config: CompileConfig,
    program: Any,
    trainset: list[Any],
    devset: list[Any],
    metric: Any,
    lm: Any,
    adapter: Any,
    store: Any,
    run_id: int,
    meter: UsageMeter,
    progress: Progress,
) -> tuple[Any, int, bool]:
    """Run the optimizer with its trials and metric calls recorded; returns (program, trials,
    whether it selected on the dev set)."""
    phase = "optimize"
    progress.start(phase, None)
    recorder = TrialRecorder(store, run_id, meter, first_number=1)
    recording_metric = RecordingMetric(
        metric, store, run_id, recorder, on_call=lambda: progress.advance(phase)
    )
    plan = optimizers.build(
        config.optimizer,
        recording_metric,
        trainset=trainset,
        devset=devset,
        threads=config.threads,
        seed=config.seed,
        lm=lm,
        overrides=config.optimizer_args,
    )
    # Optimizers draw from `random` (demo shuffles, candidate seeds): a fixed seed makes a
    # resumed run replay the same choices, hence the same recorded LM calls.
    random.seed(config.seed)
    try:
        import numpy

        numpy.random.seed(config.seed)
    except ImportError:
        pass
    with dspy.context(lm=lm, adapter=adapter, callbacks=[recorder]):
        try:
            compiled = plan.optimizer.compile(program.deepcopy(), **plan.compile_kwargs)
        except OptimizerError:
            raise
        except Exception as exc:  # DSPy's optimizers raise anything; report it in one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise OptimizerError(
                f"{config.optimizer} failed: {type(exc).__name__}: {first[:300]} "
                f"(everything up to here is stored: re-run to resume)"
            ) from exc
    trials = recorder.next_number - 1
    progress.finish(phase, f"{trials} candidate evaluations" if trials else "done")
    return compiled, trials, plan.uses_devset


@dataclass
class EvalResult:
    run_id: int
    resumed: bool
    report: EvalReport
    model: str
    compiled: str | None


def evaluate_program(
    config: EvalConfig, store: Any, progress: Progress | None = None, *, lm: Any = None
) -> EvalResult:
    """Score a program (as written, or from a compiled artifact) on a dataset, recorded in the
    store. `lm` replaces the plait LM for the configured model."""
    progress = progress or LogProgress()
    if config.compiled:  # the program the user named, checked against the artifact's
        loaded = load_artifact(config.compiled, init=config.program_args or None, program=config.program)
        program, cls = loaded.program, type(loaded.program)
        model = config.model or loaded.model
        artifact_sha = loaded.sha256
    else:
        cls = load_program_class(config.program)
        program = instantiate(cls, config.program_args)
        model = config.model or DEFAULT_MODEL
        artifact_sha = None
    examples = to_examples(
        cls, read_jsonl(config.devset, limit=config.limit, offset=config.offset), source=config.devset
    )
    metric = metric_lib.resolve_metric(config.metric)
    signature = signature_hash(program)
    identity = {
        "program": config.program,
        "signature_hash": signature,
        "state": state_hash(program),
        "artifact_sha256": artifact_sha,
        "devset": _rows_digest(examples),
        "metric": config.metric,
        "model": model,
        "adapter": config.adapter,
        "max_tokens": config.max_tokens,
    }
    described = {
        **identity,
        "devset_path": config.devset,
        "n": len(examples),
        "offset": config.offset,
        "compiled": config.compiled,
    }
    run, resumed = store.start_run(
        kind="eval",
        key=digest(identity),
        program_path=config.program,
        signature_hash=signature,
        config=described,
        resume=not config.fresh,
    )
    meter = UsageMeter()
    lm = recording_lm(lm or make_lm(model, max_tokens=config.max_tokens), store, run.id, meter)
    adapter = select_adapter(lm, config.adapter)
    try:
        report = _scored(
            program,
            examples,
            metric,
            lm,
            adapter,
            config.threads,
            meter,
            store,
            run.id,
            "eval",
            progress,
            config.max_metric_errors,
        )
    except BaseException as exc:
        store.finish_run(run.id, status="failed", error=f"{type(exc).__name__}: {exc}"[:2000])
        raise
    store.finish_run(
        run.id,
        score_after=report.score,
        tokens=sum(r.tokens for r in report.results),
        seconds=report.seconds,
        ideal_seconds=_total_cost(report),
        summary={
            "usage": report.usage.to_dict(),
            "n": report.n,
            "parse_failures": report.parse_failures,
            "reused_examples": report.reused,
            "ideal_seconds_per_example": report.ideal_seconds_per_example,
            "cost_reference": REFERENCE.name,
        },
    )
    return EvalResult(run.id, resumed, report, model, config.compiled)


def _total_cost(report: EvalReport) -> float | None:
    """Idealized seconds of every example of a report (reused ones included)."""
    per_example = report.ideal_seconds_per_example
    return None if per_example is None else per_example * report.n
