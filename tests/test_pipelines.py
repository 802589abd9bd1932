"""Reference pipelines: each reads its shared dataset's rows as they are, wires its modules
and tools correctly (DSPy's DummyLM plays the model; a stub plays the retriever), and
round-trips through an artifact. The real model runs them in test_compile_cli.py."""

import json

import dspy
import pytest
from dspy.utils.dummies import DummyLM

from plait.compilers import load_artifact, save_artifact
from plait.compilers.data import to_examples
from plait.compilers.metrics import exact_match
from plait.pipelines.agent import Agent
from plait.pipelines.calculator import calculate
from plait.pipelines.math import Math
from plait.pipelines.multihop import MultiHop
from plait.pipelines.rag import RAG
from plait.pipelines.retrieval import ENV_INDEX, RetrieverMissingError, passage_text
from plait.pipelines.sentiment import Sentiment


def _rows(data_dir, name, count=3):
    with open(data_dir / name / "dev.jsonl") as handle:
        return [json.loads(next(handle)) for _ in range(count)]


class StubRetriever:
    def __init__(self):
        self.queries = []

    def __call__(self, query, k=5):
        self.queries.append(query)
        return [{"title": f"T{i}", "text": f"passage {i} about {query}"} for i in range(k)]


def test_rows_are_read_as_they_are(data_dir):
    (sst,) = to_examples(Sentiment, _rows(data_dir, "sst2", 1))
    assert sst.label in ("negative", "positive")
    squad = to_examples(RAG, _rows(data_dir, "squad"))
    assert squad[0].answer == squad[0].answers[0] and set(squad[0].inputs().keys()) == {"question"}
    hotpot = to_examples(MultiHop, _rows(data_dir, "hotpotqa"))
    assert hotpot[0].answer == "yes" and "context" not in hotpot[0]  # the big context stays out
    gsm = to_examples(Math, _rows(data_dir, "gsm8k"))
    assert gsm[0].answer == 18 and isinstance(gsm[0].answer, int)
    assert to_examples(Agent, _rows(data_dir, "gsm8k", 1))[0].answer == "18"  # `final`, not the solution
    assert to_examples(Agent, _rows(data_dir, "hotpotqa", 1))[0].answer == "yes"


def test_rag_retrieves_then_answers():
    rm = StubRetriever()
    with dspy.context(lm=DummyLM([{"answer": "Denver Broncos"}]), adapter=dspy.ChatAdapter()):
        prediction = RAG(retriever=rm, k=2)(question="Who won?")
    assert rm.queries == ["Who won?"] and len(prediction.context) == 2
    assert prediction.answer == "Denver Broncos" and prediction.context[0].startswith("T0 | passage 0")


def test_multihop_queries_each_hop_and_dedupes_context():
    rm = StubRetriever()
    lm = DummyLM([{"query": "first hop"}, {"query": "first hop"}, {"answer": "yes"}])
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        prediction = MultiHop(retriever=rm, hops=2, k=2)(question="Same nationality?")
    assert prediction.queries == ["first hop", "first hop"] and rm.queries == ["first hop", "first hop"]
    assert len(prediction.context) == 2  # the second hop found nothing new
    assert prediction.answer == "yes"
    assert [name for name, _ in MultiHop(hops=3).named_predictors()] == [
        "write_query[0]",
        "write_query[1]",
        "write_query[2]",
        "answer",
    ]


def test_math_outputs_an_int():
    lm = DummyLM([{"reasoning": "16 - 3 - 4 = 9, 9 * 2 = 18", "answer": "18"}])
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        prediction = Math()(question="ducks?")
    assert prediction.answer == 18
    assert exact_match(dspy.Example(question="q", answer=18).with_inputs("question"), prediction) == 1.0


def test_agent_calls_its_tools():
    rm = StubRetriever()
    lm = DummyLM(
        [
            {
                "next_thought": "compute",
                "next_tool_name": "calculator",
                "next_tool_args": {"expression": "(16-3-4)*2"},
            },
            {"next_thought": "look up", "next_tool_name": "search", "next_tool_args": {"query": "ducks"}},
            {"next_thought": "done", "next_tool_name": "finish", "next_tool_args": {}},
            {"reasoning": "the calculator said 18", "answer": "18"},
        ]
    )
    agent = Agent(retriever=rm, k=1)
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        prediction = agent(question="How much?")
    assert prediction.answer == "18" and rm.queries == ["ducks"]
    assert prediction.trajectory["observation_0"] == "18"
    assert "search" not in Agent().react.tools and "calculator" in Agent().react.tools


def test_calculator_is_arithmetic_only():
    assert calculate("(16 - 3 - 4) * 2") == "18"
    assert calculate("1,000 / 8") == "125"
    assert calculate("sqrt(16) + 2^3") == "12"
    for hostile in ["__import__('os').system('true')", "9**9**9", "1/0", "open('x')", "[1]*10**9"]:
        assert calculate(hostile).startswith("error:")


def test_retrieval_pipelines_say_how_to_get_an_index(monkeypatch):
    monkeypatch.delenv(ENV_INDEX, raising=False)
    with (
        dspy.context(lm=DummyLM([{"answer": "x"}]), adapter=dspy.ChatAdapter()),
        pytest.raises(RetrieverMissingError, match="index"),
    ):
        RAG()(question="q")
    assert passage_text({"title": "A", "text": "x" * 50}, 20) == "A | " + "x" * 13 + "..."
    served = {"title": "A", "text": "A | body", "long_text": "A | body"}  # plait index serve's answer
    assert passage_text(served, 100) == "A | body"


@pytest.mark.parametrize(
    "program, init",
    [
        (RAG, {"index": "idx", "k": 2, "reasoning": True}),
        (MultiHop, {"index": "idx", "hops": 3}),
        (Math, {}),
        (Agent, {"index": "idx", "max_iters": 3}),
    ],
)
def test_every_pipeline_round_trips_through_an_artifact(tmp_path, program, init):
    compiled = program(**init)
    for _, predictor in compiled.named_predictors():
        predictor.signature = predictor.signature.with_instructions("compiled instructions")
    path = tmp_path / "a.json"
    target = f"{program.__module__}:{program.__name__}"
    save_artifact(compiled, path, program_path=target, model="smollm2-135m", init=init)
    loaded = load_artifact(path)
    assert loaded.program.dump_state() == compiled.dump_state()
    assert all(
        p.signature.instructions == "compiled instructions" for _, p in loaded.program.named_predictors()
    )


@pytest.mark.slow
def test_pipelines_on_the_embedded_model_and_a_real_index(tmp_path, data_dir, monkeypatch):
    """RAG, MultiHop, Math and Agent through `plait eval`'s runner on SmolLM2, with a ColBERT-serve
    index of the HotPotQA paragraphs of the questions asked: every answer parses, retrieval finds
    the questions' own paragraphs."""
    from plait.compilers.runner import EvalConfig, evaluate_program
    from plait.retrievers import build_index
    from plait.store import Store

    monkeypatch.delenv(ENV_INDEX, raising=False)
    questions = _rows(data_dir, "hotpotqa", 2)
    docs = [
        {"id": f"{q['id']}-{i}", "title": title, "text": "".join(sentences)}
        for q in questions
        for i, (title, sentences) in enumerate(q["context"])
    ]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    index = build_index(corpus, tmp_path / "idx")
    (tmp_path / "hotpot.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (tmp_path / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(data_dir, "gsm8k", 1)))

    store = Store.open(f"sqlite:///{tmp_path / 'runs.db'}")
    cases = [
        ("plait.pipelines.rag:RAG", "hotpot.jsonl", {"index": str(index), "k": 2}, "f1"),
        ("plait.pipelines.multihop:MultiHop", "hotpot.jsonl", {"index": str(index), "hops": 2, "k": 1}, "f1"),
        ("plait.pipelines.math:Math", "gsm8k.jsonl", {}, "accuracy"),
        ("plait.pipelines.agent:Agent", "hotpot.jsonl", {"index": str(index), "max_iters": 2}, "f1"),
    ]
    try:
        for program, data, init, metric in cases:
            config = EvalConfig(
                program=program,
                devset=str(tmp_path / data),
                metric=metric,
                limit=1 if "agent" in program else None,
                threads=2,
                max_tokens=192,
                program_args=init,
            )
            report = evaluate_program(config, store).report
            assert report.parse_failures == 0 and report.errors == 0, (program, report.results)
            prediction = report.results[0].prediction
            assert prediction.get("answer") not in (None, ""), (program, prediction)
            if "context" in prediction:
                titles = {title for title, _ in questions[0]["context"]}
                assert any(passage.split(" | ")[0] in titles for passage in prediction["context"])
    finally:
        store.close()
