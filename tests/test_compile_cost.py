"""Idealized cost in compile and eval: calls priced and stored, candidates and their Pareto
front, the cost-aware pick (and picking again from a stored run at no cost), the CLI flags.
The machinery runs on an instant keyword engine that declares a tiny architecture; the last
test runs `plait compile` and `plait eval` on the embedded model (~10 s: 3 dev rows, one random
candidate)."""

import dataclasses
import json
from types import SimpleNamespace

import pytest
from sqlalchemy import select

from plait.backends.clients.local import PlaitEngine
from plait.backends.models.cost import architecture, call_cost
from plait.backends.models.llama import LlamaConfig
from plait.compilers import load_artifact
from plait.compilers.errors import SelectionError
from plait.compilers.pricing import CallPricer
from plait.compilers.recording import RecordingEngine
from plait.compilers.runner import CompileConfig, EvalConfig, compile_program, evaluate_program
from plait.compilers.selection import Candidate, Selection, pareto_front, parse_objective, pick
from plait.compilers.trials import demo_count
from plait.compilers.usage import Usage, UsageMeter
from plait.store import Store
from plait.store.models import LMCall
from tests.lifecycle_fixtures import (
    KeywordEngine,
    cli_main,
    keyword_lm,
    shared_weights,
    sst2_rows,
    write_jsonl,
)

PROGRAM = "plait.pipelines.sentiment:Sentiment"
TINY = LlamaConfig(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


class PricedEngine(KeywordEngine):
    """Answers by keywords only when the prompt holds demos (zero-shot it always says
    "negative"), counts every message's tokens, and declares a tiny architecture to be priced."""

    cost_architecture = architecture(TINY)

    def complete(self, request):
        if len(request.messages) > 2:  # a system message, demos as user/assistant turns, the input
            response = super().complete(request)
        else:
            response = super().complete(_without_keywords(request))
        text = "".join(getattr(part, "text", "") for message in request.messages for part in message.parts)
        usage = dataclasses.replace(response.usage, input_tokens=len(text) // 4)
        return dataclasses.replace(response, usage=usage)


def _without_keywords(request):
    """The request with its input sentence emptied, so the keyword rule answers "negative"."""
    last = request.messages[-1]
    parts = [
        dataclasses.replace(p, text=p.text.rsplit("[[ ## text ## ]]", 1)[0] + "[[ ## text ## ]]\n")
        if hasattr(p, "text")
        else p
        for p in last.parts
    ]
    return dataclasses.replace(
        request, messages=(*request.messages[:-1], dataclasses.replace(last, parts=parts))
    )


# ---- the pick rule and the front -------------------------------------------------------------
def candidate(trial, score, cost_ms, demos=0):
    return Candidate(
        trial, f"trial {trial}", f"h{trial}", score, None if cost_ms is None else cost_ms / 1000, demos
    )


CANDIDATES = [
    candidate(0, 70.0, 1.0),
    candidate(1, 80.0, 2.0),
    candidate(2, 79.5, 1.5),
    candidate(3, 78.0, 2.5),  # dominated by 1 and 2
    candidate(4, 80.0, 3.0),  # dominated by 1 (same score, dearer)
    candidate(5, 90.0, None),  # not priced: never on the front, never picked by cost
]


def test_pareto_front_is_the_undominated_priced_candidates_cheapest_first():
    assert [c.trial for c in pareto_front(CANDIDATES)] == [0, 2, 1]
    assert pareto_front([candidate(0, 50, 1), candidate(1, 50, 1)]) == [candidate(0, 50, 1)]


@pytest.mark.parametrize(
    "selection,trial",
    [
        (Selection(score_tolerance=1.0), 2),  # 79.5 is within 1 point of 80 and cheaper
        (Selection(score_tolerance=0.0), 1),
        (Selection(score_tolerance=20.0), 0),
        (Selection(cost_weight=0.0), 1),  # ties on score go to the cheaper
        (Selection(cost_weight=2.0), 2),  # 80-4=76, 79.5-3=76.5, 70-2=68
        (Selection(cost_weight=20.0), 0),
        (Selection(max_cost_ms=1.6), 2),  # the best score under the cap
        (Selection(max_cost_ms=1.6, score_tolerance=10.0), 0),
    ],
)
def test_pick(selection, trial):
    assert pick(CANDIDATES, selection).trial == trial


def test_pick_refuses_what_it_cannot_do():
    with pytest.raises(SelectionError, match="cheapest costs 1 ms"):
        pick(CANDIDATES, Selection(max_cost_ms=0.5))
    with pytest.raises(SelectionError, match="no candidate has an idealized cost"):
        pick([candidate(0, 50, None)], Selection(score_tolerance=1))
    with pytest.raises(SelectionError, match="use one"):
        Selection(cost_weight=1.0, score_tolerance=1.0)
    with pytest.raises(SelectionError, match="at least 0"):
        Selection(max_cost_ms=-1.0)


@pytest.mark.parametrize(
    "text,weight",
    [("score", 0.0), ("score - 2*cost", 2.0), ("SCORE-0.5 cost", 0.5), ("score - 1e-3*cost", 1e-3)],
)
def test_objective(text, weight):
    assert parse_objective(text) == weight


@pytest.mark.parametrize("text", ["cost", "score + 2*cost", "score - cost*2", "2*score", ""])
def test_bad_objective(text):
    with pytest.raises(SelectionError, match="--objective expects"):
        parse_objective(text)


# ---- pricing and recording -------------------------------------------------------------------
def test_usage_cost_is_unknown_when_any_call_is_unpriced():
    usage = Usage(calls=2, ideal_seconds=1.5)
    assert usage.cost == 1.5
    usage.add(Usage(calls=1, unpriced=1))
    assert usage.cost is None and usage.since(Usage(calls=1, unpriced=1)).cost == 1.5


def test_a_plait_engine_is_priced_from_its_models_config_others_are_not():
    loaded = SimpleNamespace(model=SimpleNamespace(config=TINY), closed=False)
    pricer = CallPricer(PlaitEngine("tiny", engine=loaded))
    assert pricer(300, 20, 15) == call_cost(architecture(TINY), 300, 20, 15).seconds
    assert CallPricer(KeywordEngine())(300, 20, 15) is None


def test_a_call_recorded_before_costs_were_is_priced_when_replayed(store):
    run, _ = store.start_run(kind="eval", key="k", program_path=PROGRAM, signature_hash="s", config={})
    recorder = RecordingEngine(PricedEngine(), store, run.id, UsageMeter())
    store.record_lm_call(run.id, "old", {"response": {"usage": {"input_tokens": 40, "output_tokens": 9}}})
    replayed = recorder._usage(store.cached_lm_call(run.id, "old"), replayed=True)
    assert replayed.ideal_seconds == call_cost(architecture(TINY), 40, 9).seconds and replayed.replayed


def test_compile_prices_candidates_and_picks_again_from_the_stored_run(store, sst2, tmp_path):
    train, dev = sst2
    config = CompileConfig(
        program=PROGRAM,
        trainset=str(train),
        devset=str(dev),
        out=str(tmp_path / "best.json"),
        optimizer="random-search",
        optimizer_args={"num_candidate_programs": 2, "max_labeled_demos": 0},
        threads=2,
        adapter="chat",
    )
    result = compile_program(config, store, lm=keyword_lm(PricedEngine()))
    run = store.get_run(result.run_id)
    assert run.ideal_seconds == pytest.approx(result.usage.cost) and run.ideal_seconds > 0
    assert all(e.ideal_seconds > 0 for e in store.evaluations(run.id, phase="baseline"))
    with store.session() as session:  # every call's record holds its cost
        assert all(r["ideal_seconds"] > 0 for r in session.scalars(select(LMCall.response)))
    by_demos = sorted(result.candidates, key=lambda c: c.demos)
    assert by_demos[0].demos == 0 and by_demos[-1].demos > 0
    assert by_demos[0].ideal_seconds < by_demos[-1].ideal_seconds  # demos make prompts, prompts cost
    assert result.best.demos > 0 and result.best.score > result.before.score  # demos help here
    assert result.picked == result.best  # no selection: the optimizer's pick
    assert result.front[0].demos == 0 and result.front[-1].score == result.best.score
    summary = run.summary["candidates"]
    assert [c["trial"] for c in summary] == [c.trial for c in result.candidates]
    assert sum(c["picked"] for c in summary) == 1 and any(c["front"] for c in summary)

    # The same command with a cost rule resumes the run: nothing runs again, the pick changes.
    engine = PricedEngine()
    cheap = compile_program(
        dataclasses.replace(
            config, out=str(tmp_path / "cheap.json"), selection=Selection(score_tolerance=100.0)
        ),
        store,
        lm=keyword_lm(engine),
    )
    assert cheap.run_id == result.run_id and engine.calls == 0
    assert cheap.picked.demos == 0 and cheap.after.score == result.before.score
    assert cheap.after.ideal_seconds_per_example == pytest.approx(result.before.ideal_seconds_per_example)
    saved = load_artifact(tmp_path / "cheap.json")
    assert demo_count(saved.program) == 0 and saved.meta["selection"]["score_tolerance"] == 100.0
    assert store.get_run(result.run_id).score_after == result.before.score

    with pytest.raises(SelectionError, match="raise --max-cost"):
        compile_program(
            dataclasses.replace(config, selection=Selection(max_cost_ms=1e-9)), store, lm=keyword_lm()
        )


def test_eval_reports_cost_per_example(store, sst2):
    _, dev = sst2
    config = EvalConfig(program=PROGRAM, devset=str(dev), threads=2, adapter="chat")
    outcome = evaluate_program(config, store, lm=keyword_lm(PricedEngine()))
    costs = [r.ideal_seconds for r in outcome.report.results]
    assert all(c > 0 for c in costs)
    assert outcome.report.ideal_seconds_per_example == pytest.approx(sum(costs) / len(costs))
    assert store.get_run(outcome.run_id).ideal_seconds == pytest.approx(sum(costs))
    unpriced = evaluate_program(config, store, lm=keyword_lm(KeywordEngine()))  # same run, reused rows
    assert unpriced.report.ideal_seconds_per_example == outcome.report.ideal_seconds_per_example
    fresh = evaluate_program(dataclasses.replace(config, fresh=True), store, lm=keyword_lm(KeywordEngine()))
    assert fresh.report.ideal_seconds_per_example is None


# ---- the CLI -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags,match",
    [
        (["--objective", "cost"], "--objective expects"),
        (["--objective", "score", "--score-tolerance", "1"], "not allowed with argument"),
        (["--max-cost", "-1"], "must be a number at least 0"),
        (["--score-tolerance", "lots"], "expected a number"),
    ],
)
def test_bad_cost_flags_are_one_line_and_exit_2(tmp_path, capsys, flags, match):
    argv = [
        "compile",
        PROGRAM,
        "--trainset",
        "t.jsonl",
        "--devset",
        "d.jsonl",
        "--out",
        str(tmp_path / "o.json"),
    ]
    assert cli_main([*argv, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_cost_aware_compile_and_eval_on_the_embedded_model(tmp_path, monkeypatch, data_dir, capsys):
    home = tmp_path / "home"
    shared_weights(home)
    monkeypatch.setenv("PLAIT_HOME", str(home))
    monkeypatch.delenv("PLAIT_DATABASE_URL", raising=False)
    train = write_jsonl(tmp_path / "train.jsonl", sst2_rows(data_dir, "train", 6))
    dev = write_jsonl(tmp_path / "dev.jsonl", sst2_rows(data_dir, "dev", 3))
    artifact = tmp_path / "cheap.json"
    argv = ["--devset", str(dev), "--threads", "3", "--max-tokens", "32"]
    compile_argv = ["compile", PROGRAM, "--trainset", str(train), "--out", str(artifact), *argv]
    compile_argv += ["--optimizer", "random-search", "--optimizer-arg", "num_candidate_programs=1"]
    assert cli_main([*compile_argv, "--score-tolerance", "100"]) == 0
    err = capsys.readouterr().err
    assert "idealized ms / example" in err and "candidates on the dev set" in err and "front" in err
    assert "picked: the cheapest within 100 points of the best score" in err
    assert demo_count(load_artifact(artifact).program) == 0  # the zero-shot program is the cheapest

    (run,) = Store.open().runs(kind="compile")
    assert run.ideal_seconds > 0 and any(c["front"] for c in run.summary["candidates"])

    report = tmp_path / "report.json"
    assert (
        cli_main(
            ["eval", PROGRAM, "--compiled", str(artifact), *argv, "--show", "2", "--json-out", str(report)]
        )
        == 0
    )
    assert "ideal ms" in capsys.readouterr().err
    document = json.loads(report.read_text())
    costs = [r["ideal_seconds"] for r in document["results"]]
    assert all(c > 0 for c in costs) and document["cost_reference"].startswith("H100-SXM")
    assert document["usd_per_million_examples"] == pytest.approx(
        document["ideal_seconds_per_example"] * 2.5 / 3600 * 1e6
    )
    assert document["ideal_seconds_per_example"] == pytest.approx(sum(costs) / len(costs))
