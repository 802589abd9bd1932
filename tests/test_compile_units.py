"""The compile/eval machinery without the real model: metrics, datasets, optimizers, recording
and resume, on `KeywordEngine` (instant, deterministic). The real model runs in
test_compile_cli.py."""

import json
from collections import Counter

import dspy
import pytest

from plait.compilers import DatasetError, MetricError, OptimizerError, load_artifact
from plait.compilers.data import read_jsonl, to_examples
from plait.compilers.evaluation import evaluate
from plait.compilers.metrics import contains, exact_match, f1, resolve_metric
from plait.compilers.optimizers import parse_optimizer_args
from plait.compilers.runner import CompileConfig, EvalConfig, compile_program, evaluate_program
from plait.pipelines.sentiment import Sentiment
from tests.lifecycle_fixtures import (
    METRIC_BUG,
    Crash,
    KeywordEngine,
    keyword_lm,
    write_jsonl,
)

PROGRAM = "plait.pipelines.sentiment:Sentiment"


# ---- metrics -------------------------------------------------------------------------------
def test_builtin_metrics():
    qa = dspy.Example(question="q", answer="The Eiffel Tower", answers=["Eiffel tower", "tower"]).with_inputs(
        "question"
    )
    assert exact_match(qa, dspy.Prediction(answer="eiffel tower.")) == 1.0
    assert exact_match(qa, dspy.Prediction(answer="the tower")) == 1.0  # an alias from `answers`
    assert exact_match(qa, dspy.Prediction(answer="Paris")) == 0.0
    assert f1(qa, dspy.Prediction(answer="the big tower")) == pytest.approx(2 / 3)
    assert contains(qa, dspy.Prediction(answer="It is the Eiffel Tower!")) == 1.0
    number = dspy.Example(question="q", answer=18).with_inputs("question")
    assert exact_match(number, dspy.Prediction(reasoning="...", answer=18)) == 1.0
    assert exact_match(number, dspy.Prediction(answer=17)) == 0.0
    with pytest.raises(MetricError):
        exact_match(number, dspy.Prediction(other=1))


def test_metric_resolution():
    assert resolve_metric("accuracy") is resolve_metric("exact_match")
    assert resolve_metric("plait.compilers.metrics:f1") is f1
    for bad in [
        "nope",
        "no.such.module:f",
        "plait.compilers.metrics:nothing",
        "plait.compilers.metrics:BUILTIN",
    ]:
        with pytest.raises(MetricError):
            resolve_metric(bad)


# ---- datasets ------------------------------------------------------------------------------
def test_jsonl_rows_limit_offset_and_errors(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"i": i} for i in range(5)])
    assert [r["i"] for r in read_jsonl(path, limit=2, offset=1)] == [1, 2]
    with pytest.raises(DatasetError):
        read_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(DatasetError):
        read_jsonl(path, offset=5)
    (tmp_path / "bad.jsonl").write_text('{"ok": 1}\nnot json\n')
    with pytest.raises(DatasetError, match="bad.jsonl:2"):
        read_jsonl(tmp_path / "bad.jsonl")


def test_rows_become_examples():
    (example,) = to_examples(Sentiment, [{"text": "fine", "label": 1}])
    assert example.label == "positive" and set(example.inputs().keys()) == {"text"}

    class Plain(dspy.Module):  # no from_row: the forward parameters are the inputs
        def forward(self, question, context=None):
            pass

    (plain,) = to_examples(Plain, [{"question": "q", "context": "c", "answer": "a"}])
    assert set(plain.inputs().keys()) == {"question", "context"} and plain.answer == "a"
    with pytest.raises(DatasetError, match="question"):
        to_examples(Plain, [{"text": "x"}])
    with pytest.raises(DatasetError, match="from_row"):
        to_examples(Sentiment, [{"sentence": "x"}])


def test_optimizer_args():
    assert parse_optimizer_args(["k=4", "auto=light", 'x="y"', "flag=true"]) == {
        "k": 4,
        "auto": "light",
        "x": "y",
        "flag": True,
    }
    with pytest.raises(OptimizerError):
        parse_optimizer_args(["novalue"])


# ---- compile on the keyword engine ---------------------------------------------------------
def _config(sst2, tmp_path, **overrides):
    train, dev = sst2
    values = {
        "program": PROGRAM,
        "trainset": str(train),
        "devset": str(dev),
        "out": str(tmp_path / "out.json"),
        "optimizer": "bootstrap",
        "threads": 2,
        "adapter": "chat",
    }
    values.update(overrides)
    return CompileConfig(**values)


@pytest.mark.parametrize("optimizer", ["labeled", "bootstrap", "random-search"])
def test_compile_records_everything(store, sst2, tmp_path, optimizer):
    engine = KeywordEngine()
    config = _config(
        sst2,
        tmp_path,
        optimizer=optimizer,
        optimizer_args={"num_candidate_programs": 2} if optimizer == "random-search" else {},
    )
    result = compile_program(config, store, lm=keyword_lm(engine))
    run = store.get_run(result.run_id)
    assert run.status == "finished" and run.score_before == result.before.score
    assert run.score_after == result.after.score and run.tokens == result.tokens > 0
    assert [e.phase for e in store.evaluations(run.id, phase="baseline")] == ["baseline"] * 10
    assert len(store.evaluations(run.id, phase="final")) in (0, 10)  # 0: final state == baseline state
    trials = store.trials(run.id)
    assert trials[0].params["phase"] == "baseline" and trials[-1].params["phase"] == "final"
    if optimizer == "random-search":  # each candidate program scored on the dev set is a trial
        assert result.trials >= 2 and len(trials) == result.trials + 2
        assert all(t.score is not None for t in trials)
    if optimizer == "bootstrap":  # the optimizer's metric calls are stored as they happen
        assert store.evaluations(run.id, phase="optimize")
    loaded = load_artifact(tmp_path / "out.json")
    assert loaded.meta["score_after"] == result.after.score and loaded.meta["run_id"] == run.id
    assert store.artifacts(PROGRAM)[-1].sha256 == loaded.sha256
    assert store.lm_call_count(run.id) == engine.calls  # every call recorded once


def test_crashed_compile_resumes_without_redoing_work(store, sst2, tmp_path):
    config = _config(sst2, tmp_path)
    with pytest.raises(Crash):
        compile_program(config, store, lm=keyword_lm(KeywordEngine(crash_after=6)))
    (run,) = store.runs(kind="compile")
    assert run.status == "failed"
    done_before = {e.example_hash: e.id for e in store.evaluations(run.id, phase="baseline")}
    calls_before = store.lm_call_count(run.id)
    assert 0 < len(done_before) < 10 and calls_before >= len(done_before)

    engine = KeywordEngine()
    result = compile_program(config, store, lm=keyword_lm(engine))
    assert result.run_id == run.id and result.resumed and store.get_run(run.id).attempts == 2
    baseline = store.evaluations(run.id, phase="baseline")
    assert len(baseline) == 10 and len({e.example_hash for e in baseline}) == 10
    for example, row_id in done_before.items():  # finished examples were not evaluated again
        assert [e.id for e in baseline if e.example_hash == example] == [row_id]
    assert result.before.reused == len(done_before)
    assert engine.calls == store.lm_call_count(run.id) - calls_before  # no LM call made twice
    assert result.usage.replayed == 0  # reused examples skip even the replay

    # A third run replays everything from the store: no LM call at all.
    again = KeywordEngine()
    third = compile_program(config, store, lm=keyword_lm(again))
    assert again.calls == 0 and third.after.score == result.after.score
    optimize = store.evaluations(run.id, phase="optimize")
    assert max(Counter((e.state_hash, e.example_hash) for e in optimize).values()) == 1  # replay wrote none


def test_fresh_starts_a_new_run(store, sst2, tmp_path):
    first = compile_program(_config(sst2, tmp_path, optimizer="labeled"), store, lm=keyword_lm())
    second = compile_program(_config(sst2, tmp_path, optimizer="labeled", fresh=True), store, lm=keyword_lm())
    assert second.run_id != first.run_id and not second.resumed


def test_unknown_optimizer_and_bad_metric_fail_before_any_call(store, sst2, tmp_path):
    engine = KeywordEngine()
    with pytest.raises(OptimizerError):
        compile_program(_config(sst2, tmp_path, optimizer="nope"), store, lm=keyword_lm(engine))
    with pytest.raises(MetricError):
        compile_program(_config(sst2, tmp_path, metric="nope"), store, lm=keyword_lm(engine))
    assert engine.calls == 0 and store.runs() == []


def test_eval_reuses_its_stored_results(store, sst2, tmp_path):
    _, dev = sst2
    config = EvalConfig(program=PROGRAM, devset=str(dev), limit=6, adapter="chat", threads=3)
    first = evaluate_program(config, store, lm=keyword_lm())
    assert first.report.n == 6 and first.report.parse_failures == 0 and first.report.reused == 0
    engine = KeywordEngine()
    second = evaluate_program(config, store, lm=keyword_lm(engine))
    assert second.run_id == first.run_id and second.report.reused == 6 and engine.calls == 0
    assert second.report.score == first.report.score
    rows = json.loads(dev.read_text().splitlines()[0])
    expected = "positive" if any(w in rows["text"] for w in ("charming", "hope")) else "negative"
    assert second.report.results[0].prediction["label"] == expected


def test_a_metric_that_always_raises_stops_the_run_with_its_error(store, sst2, tmp_path, monkeypatch):
    """It used to score every example 0 and exit 0: a broken scorer looked like a bad program."""
    monkeypatch.setitem(METRIC_BUG, "on", True)
    _, dev = sst2
    config = EvalConfig(
        program=PROGRAM,
        devset=str(dev),
        metric="tests.lifecycle_fixtures:buggy_metric",
        adapter="chat",
        threads=2,
    )
    engine = KeywordEngine()
    with pytest.raises(
        MetricError, match="buggy_metric raised on 5 examples in a row.*KeyError: 'gold_label'"
    ):
        evaluate_program(config, store, lm=keyword_lm(engine))
    (run,) = store.runs()
    assert run.status == "failed"
    assert engine.calls <= 5 + config.threads < 10  # stopped, not run to the end
    assert store.evaluations(run.id) == []  # unscored examples are not kept as zeros
    with pytest.raises(MetricError, match="on 2 examples in a row"):
        compile_program(
            _config(sst2, tmp_path, metric=config.metric, max_metric_errors=2), store, lm=keyword_lm()
        )

    monkeypatch.setitem(METRIC_BUG, "on", False)  # the metric fixed, the same command again
    replay = KeywordEngine()
    fixed = evaluate_program(config, store, lm=keyword_lm(replay))
    assert fixed.run_id == run.id and fixed.resumed and store.get_run(run.id).status == "finished"
    assert fixed.report.n == 10 and fixed.report.reused == 0 and fixed.report.errors == 0
    assert fixed.report.score > 0 and replay.calls == 10 - engine.calls  # recorded calls replayed


def test_a_metric_that_raises_now_and_then_scores_those_examples_0(store, tmp_path):
    rows = [{"text": f"{'x' if i % 3 == 0 else 'a'} good film {i}", "label": 1} for i in range(9)]
    config = EvalConfig(
        program=PROGRAM,
        devset=str(write_jsonl(tmp_path / "dev.jsonl", rows)),
        metric="tests.lifecycle_fixtures:picky_metric",
        adapter="chat",
        threads=1,
        max_metric_errors=2,
    )
    report = evaluate_program(config, store, lm=keyword_lm()).report
    assert report.n == 9 and report.errors == 3 and report.score == pytest.approx(100 * 6 / 9, abs=0.01)
    assert all(r.error.startswith("metric failed: ValueError") for r in report.results if r.index % 3 == 0)


def test_evaluate_counts_parse_failures():
    class Garbage(KeywordEngine):
        def complete(self, request):
            response = super().complete(request)
            return response.__class__(
                id=None,
                model=response.model,
                message=dspy.lm15.Message.assistant([dspy.lm15.TextPart("no markers at all")]),
                finish_reason="stop",
                usage=response.usage,
            )

    lm = dspy.LM("plait/garbage", engine=Garbage(), cache=False, num_retries=0)
    examples = to_examples(Sentiment, [{"text": "good", "label": 1}, {"text": "bad", "label": 0}])
    report = evaluate(
        Sentiment(), examples, exact_match, lm=lm, adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)
    )
    assert report.parse_failures == 2 and report.score == 0.0 and all(r.error for r in report.results)


@pytest.mark.parametrize(
    "optimizer, args",
    [
        ("labeled", {}),
        ("bootstrap", {}),
        ("random-search", {"num_candidate_programs": 1}),
        ("simba", {"max_steps": 1, "bsize": 4}),
        ("gepa", {"max_metric_calls": 30}),
        ("mipro", {"auto": None, "num_trials": 2, "num_candidates": 2}),
    ],
)
def test_every_optimizer_runs_and_replays_from_the_store(store, sst2, tmp_path, optimizer, args):
    if optimizer == "mipro":
        pytest.importorskip("optuna")
    config = _config(sst2, tmp_path, optimizer=optimizer, optimizer_args=args)
    first = compile_program(config, store, lm=keyword_lm())
    assert store.get_run(first.run_id).status == "finished"
    compiled = load_artifact(tmp_path / "out.json")
    assert compiled.meta["optimizer"] == optimizer
    engine = KeywordEngine()
    again = compile_program(config, store, lm=keyword_lm(engine))
    assert engine.calls == 0 and again.after.score == first.after.score  # all of it replayed
    assert load_artifact(tmp_path / "out.json").program.dump_state() == compiled.program.dump_state()


def test_an_optimizer_failure_is_one_plait_error(store, sst2, tmp_path):
    with pytest.raises(OptimizerError, match="resume"):  # an int, but one DSPy cannot sample with
        compile_program(
            _config(sst2, tmp_path, optimizer="labeled", optimizer_args={"k": -1}), store, lm=keyword_lm()
        )
    assert store.runs()[0].status == "failed"


@pytest.mark.parametrize(
    "optimizer, args, match",
    [
        ("bootstrap", {"max_rounds": "x"}, "expects int"),
        ("bootstrap", {"max_bootstraped_demos": 2}, "no such setting; it takes max_bootstrapped_demos"),
        ("gepa", {"auto": "huge"}, "expects Optional"),
        ("simba", {"trainset": []}, "plait sets trainset"),
    ],
)
def test_bad_optimizer_args_fail_before_any_work(store, sst2, tmp_path, optimizer, args, match):
    engine = KeywordEngine()
    with pytest.raises(OptimizerError, match=match):
        compile_program(
            _config(sst2, tmp_path, optimizer=optimizer, optimizer_args=args), store, lm=keyword_lm(engine)
        )
    assert engine.calls == 0 and store.runs() == []
