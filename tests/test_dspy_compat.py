"""DSPy compatibility: tutorial-style DSPy programs whose only change is the LM line,
`plait.LM("smollm2-135m", ...)` with `plait.ConstrainedAdapter()`, run on the embedded model
with rows of the shared datasets. Each test checks that the DSPy feature's own mechanism ran
(calls made, events seen, order kept, state saved), never that the small model is right."""

import asyncio
import json
import re
from typing import Literal

import dspy
import pytest
from dspy.utils.callback import BaseCallback

import plait

pytestmark = pytest.mark.slow

STOPWORD_TEXT = (
    "a an and are as at be by did do for from how in is of on or the to was were what which who with"
)
STOPWORDS = frozenset(STOPWORD_TEXT.split())


@pytest.fixture(scope="module")
def lm(smollm):
    """fp32, on the session's engine: these tests compare threaded and async runs with a
    sequential one token for token (the int4 default agrees only to bf16 rounding there)."""
    lm = plait.LM("smollm2-135m", dtype="fp32", cache=False, max_tokens=48)
    lm.engine._engine = smollm
    return lm


@pytest.fixture(autouse=True)
def configured(lm):
    """What a tutorial's `dspy.configure(lm=..., adapter=...)` line does, for one test."""
    with dspy.context(lm=lm, adapter=plait.ConstrainedAdapter()):
        yield


def rows(data_dir, name: str, count: int, offset: int = 0, file: str = "dev.jsonl") -> list[dict]:
    with open(data_dir / name / file) as handle:
        lines = handle.readlines()[offset : offset + count]
    return [json.loads(line) for line in lines]


def squad_examples(data_dir, count: int, offset: int = 0) -> list[dspy.Example]:
    return [
        dspy.Example(context=r["context"], question=r["question"], answer=r["answers"][0]).with_inputs(
            "context", "question"
        )
        for r in rows(data_dir, "squad", count, offset)
    ]


def words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOPWORDS}


class WordOverlap:
    """A retriever for the tests: passages ranked by the words they share with the query."""

    def __init__(self, passages: list[dict]):
        self.passages = [f"{p['title']} | {p['text']}" for p in passages]
        self.words = [words(p) for p in self.passages]
        self.queries: list[str] = []

    def __call__(self, query: str, k: int = 2) -> list[str]:
        self.queries.append(query)
        scores = [len(words(query) & w) for w in self.words]
        ranked = sorted(range(len(self.passages)), key=lambda i: -scores[i])  # stable: ties keep order
        return [self.passages[i] for i in ranked[:k]]


@pytest.fixture(scope="module")
def hotpot_corpus(data_dir) -> list[dict]:
    """The paragraphs of HotPotQA's first dev questions (the corpus lists them in that order)."""
    return rows(data_dir, "hotpotqa", 50, file="corpus.jsonl")


class Recorder(BaseCallback):
    """Every callback event DSPy sends, in order: (event, payload)."""

    def __init__(self):
        self.events: list[tuple[str, object]] = []

    def on_module_start(self, call_id, instance, inputs):
        self.events.append(("module_start", instance))

    def on_module_end(self, call_id, outputs, exception):
        self.events.append(("module_end", outputs))

    def on_lm_start(self, call_id, instance, inputs):
        self.events.append(("lm_start", (instance, inputs)))

    def on_lm_end(self, call_id, outputs, exception):
        self.events.append(("lm_end", (outputs, exception)))

    def of(self, kind: str) -> list:
        return [payload for event, payload in self.events if event == kind]


def prompt_text(entry_or_inputs: dict) -> str:
    """The text of the messages of an LM call (a history entry or on_lm_start's inputs)."""
    return "\n".join(str(m["content"]) for m in entry_or_inputs["messages"])


@pytest.fixture(scope="module")
def squad_reference(data_dir, lm) -> tuple[list[dspy.Example], list[str]]:
    """Three SQuAD questions and the answers a sequential, greedy run gives them."""
    examples = squad_examples(data_dir, 3)
    qa = dspy.Predict("context, question -> answer")
    with dspy.context(lm=lm, adapter=plait.ConstrainedAdapter()):
        answers = [qa(**ex.inputs()).answer for ex in examples]
    assert len(set(answers)) == len(answers)  # distinct answers: a wrong order shows
    return examples, answers


# ---- running programs ----------------------------------------------------------------------------


def test_parallel_returns_one_result_per_input_in_order(squad_reference):
    """`dspy.Parallel`: one prediction per (module, example) pair, in the pairs' order, the same
    as calling the module on each input one after another."""
    examples, answers = squad_reference
    qa = dspy.Predict("context, question -> answer")
    results = dspy.Parallel(num_threads=3, disable_progress_bar=True)([(qa, ex) for ex in examples])
    assert len(results) == len(examples)
    assert all(isinstance(r, dspy.Prediction) for r in results)
    assert [r.answer for r in results] == answers


def test_batch_keeps_the_examples_order(squad_reference):
    """`Module.batch`: predictions come back in the order of the examples given (here reversed)."""
    examples, answers = squad_reference
    qa = dspy.Predict("context, question -> answer")
    results = qa.batch(examples[::-1], num_threads=3, disable_progress_bar=True)
    assert [r.answer for r in results] == answers[::-1]


def test_acall_under_asyncio(squad_reference):
    """`Module.acall`: the async path (DSPy's async engine) gives the sync answers, also when
    several programs run at once under `asyncio.gather`."""
    examples, answers = squad_reference
    qa = dspy.Predict("context, question -> answer")

    async def run() -> list[dspy.Prediction]:
        return await asyncio.gather(*(qa.acall(**ex.inputs()) for ex in examples[:2]))

    results = asyncio.run(run())
    assert [r.answer for r in results] == answers[:2]


# ---- observing programs --------------------------------------------------------------------------


def test_track_usage_reports_tokens_per_lm(lm):
    """`track_usage=True`: the prediction's `get_lm_usage()` holds this LM's prompt and
    completion tokens, summed over the program's two calls."""

    class Summarise(dspy.Module):
        def __init__(self):
            super().__init__()
            self.topic = dspy.Predict("text -> topic")
            self.headline = dspy.Predict("text, topic -> headline")

        def forward(self, text: str) -> dspy.Prediction:
            topic = self.topic(text=text).topic
            return self.headline(text=text, topic=topic)

    with dspy.context(track_usage=True):
        prediction = Summarise()(text="The city council approved a new bike lane on Main Street.")
    usage = prediction.get_lm_usage()
    assert set(usage) == {lm.model}
    calls = [entry["usage"] for entry in lm.history[-2:]]
    for key in ("prompt_tokens", "completion_tokens"):
        assert usage[lm.model][key] > 0
        assert usage[lm.model][key] == sum(call[key] for call in calls)


def test_callbacks_see_module_and_lm_events(lm):
    """`dspy.context(callbacks=[...])`: a callback sees the modules start and end around the LM
    call's start and end, with the LM, its messages and its outputs."""
    recorder = Recorder()
    cot = dspy.ChainOfThought("question -> answer")
    with dspy.context(callbacks=[recorder]):
        prediction = cot(question="What is the capital of France?")
    kinds = [event for event, _ in recorder.events]
    assert kinds.count("lm_start") == kinds.count("lm_end") == 1
    assert kinds[0] == "module_start" and kinds[-1] == "module_end"
    assert kinds.index("module_start") < kinds.index("lm_start") < kinds.index("lm_end")
    assert isinstance(recorder.of("module_start")[0], dspy.ChainOfThought)
    (instance, inputs) = recorder.of("lm_start")[0]
    assert instance is lm and "capital of France" in prompt_text(inputs)
    (outputs, exception) = recorder.of("lm_end")[0]
    assert exception is None and "[[ ## answer ## ]]" in str(outputs)
    assert recorder.of("module_end")[-1] is prediction


def test_inspect_history_prints_the_last_call(capsys):
    """`dspy.inspect_history(n=1)`: prints the last call's messages and its response."""
    qa = dspy.Predict("question -> answer")
    prediction = qa(question="Which ocean lies between Europe and North America?")
    capsys.readouterr()
    dspy.inspect_history(n=1)
    printed = capsys.readouterr().out
    assert "Which ocean lies between Europe and North America?" in printed
    assert "Response:" in printed and "[[ ## answer ## ]]" in printed
    assert prediction.answer.strip() in printed


# ---- sampling ------------------------------------------------------------------------------------

STORY = "Invent a new planet: give its name and describe its weather in one sentence."


def test_n_completions_at_temperature(lm):
    """`n=3` at temperature 1.0: three completions, parsed each, in one LM call (one history
    entry with three outputs); they are sampled, so they are not all the same."""
    before = len(lm.history)
    prediction = dspy.Predict("request -> answer", n=3, temperature=1.0, max_tokens=32)(request=STORY)
    answers = prediction.completions.answer
    assert len(answers) == 3 and all(isinstance(a, str) and a for a in answers)
    assert len(lm.history) == before + 1 and len(lm.history[-1]["outputs"]) == 3
    assert len(set(answers)) > 1


def test_rollout_ids_sample_apart_and_replay_from_the_cache(lm, monkeypatch):
    """`rollout_id` with DSPy's cache on (an in-memory cache via `dspy.configure_cache`): at
    temperature 1.0 two rollout ids are two samples, and a rollout id asked again is answered
    from the cache without running the engine."""
    monkeypatch.setattr(dspy, "cache", dspy.cache)  # restored after the test
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=True)
    cached = lm.copy(cache=True, temperature=1.0, max_tokens=32)
    write = dspy.Predict("request -> answer")
    scheduler = lm.engine.engine.scheduler
    with dspy.context(lm=cached):
        first = write(request=STORY, config={"rollout_id": 1}).answer
        second = write(request=STORY, config={"rollout_id": 2}).answer
        steps = scheduler.steps
        again = write(request=STORY, config={"rollout_id": 1}).answer
    assert again == first and scheduler.steps == steps
    assert first != second


def test_best_of_n_runs_n_rollouts_and_keeps_the_best():
    """`dspy.BestOfN`: below the threshold it calls the LM N times, each on a copy with its own
    rollout id at temperature 1.0, and returns the highest-rewarded prediction; a reward at the
    threshold stops it after the first call."""
    rewarded: list[tuple[str, float]] = []

    def reward(args: dict, prediction: dspy.Prediction) -> float:
        rewarded.append((prediction.answer, float(len(prediction.answer))))
        return rewarded[-1][1]

    question = {"question": "Name a colour of the rainbow."}
    recorder = Recorder()
    best = dspy.BestOfN(dspy.Predict("question -> answer"), N=3, reward_fn=reward, threshold=1e9)
    with dspy.context(callbacks=[recorder]):
        prediction = best(**question)
    lms = [instance for instance, _ in recorder.of("lm_start")]
    assert [m.kwargs["rollout_id"] for m in lms] == [0, 1, 2]
    assert all(m.kwargs["temperature"] == 1.0 for m in lms)
    assert len(rewarded) == 3
    assert prediction.answer == max(rewarded, key=lambda pair: pair[1])[0]  # first of the best

    rewarded.clear()
    recorder = Recorder()
    early = dspy.BestOfN(dspy.Predict("question -> answer"), N=3, reward_fn=reward, threshold=0.0)
    with dspy.context(callbacks=[recorder]):
        prediction = early(**question)
    assert len(recorder.of("lm_start")) == 1 and len(rewarded) == 1
    assert prediction.answer == rewarded[0][0]


class Answer(dspy.Module):
    def __init__(self):
        super().__init__()
        self.answer = dspy.Predict("question -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        return self.answer(question=question)


def test_refine_writes_feedback_and_retries_with_it(capsys):
    """`dspy.Refine`: a reward below the threshold makes DSPy ask the LM for feedback
    (`OfferFeedback`: a discussion and advice per module, a `dict[str, str]`), then rerun the
    module, with the advice as a `hint_` input when there is any; with equal rewards the first
    prediction is kept."""
    answers: list[str] = []

    def reward(args: dict, prediction: dspy.Prediction) -> float:
        answers.append(prediction.answer)
        return 0.0

    recorder = Recorder()
    refine = dspy.Refine(Answer(), N=2, reward_fn=reward, threshold=1.0)
    with dspy.context(callbacks=[recorder]):
        prediction = refine(question="What is the largest planet of the solar system?")
    assert "failed" not in capsys.readouterr().out  # Refine prints an attempt's error and goes on
    prompts = [prompt_text(inputs) for _, inputs in recorder.of("lm_start")]
    assert len(prompts) == 3 and len(answers) == 2
    assert "[[ ## advice ## ]]" in prompts[1] and "[[ ## hint_ ## ]]" not in prompts[0]
    (feedback,) = [p for p in recorder.of("module_end") if isinstance(p, dspy.Prediction) and "advice" in p]
    assert isinstance(feedback.discussion, str) and isinstance(feedback.advice, dict)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in feedback.advice.items())
    # Refine passes the advice on only when the model gave some (`if not advice` in DSPy)
    assert ("[[ ## hint_ ## ]]" in prompts[2]) == bool(feedback.advice)
    if feedback.advice:
        assert feedback.advice.get("answer", "N/A").strip() in prompts[2]
    assert prediction.answer == answers[0]


# ---- saving --------------------------------------------------------------------------------------


def test_labeled_few_shot_program_saves_and_loads(data_dir, lm, tmp_path):
    """`LabeledFewShot(k=2)` then `program.save(path)` / `new.load(path)` (JSON): the demos come
    back equal, they are in the prompt, and both programs answer alike."""
    trainset = [
        dspy.Example(question=r["question"], answer=r["answers"][0]).with_inputs("question")
        for r in rows(data_dir, "squad", 4, offset=30)
    ]
    compiled = dspy.LabeledFewShot(k=2).compile(dspy.Predict("question -> answer"), trainset=trainset)
    assert len(compiled.demos) == 2
    path = tmp_path / "program.json"
    compiled.save(str(path))
    saved = json.loads(path.read_text())
    assert len(saved["demos"]) == 2
    loaded = dspy.Predict("question -> answer")
    loaded.load(str(path))
    assert [dict(d) for d in loaded.demos] == [d.toDict() for d in compiled.demos]  # loaded as dicts

    question = "Who won Super Bowl 50?"
    answer = compiled(question=question).answer
    assert all(demo.question in prompt_text(lm.history[-1]) for demo in compiled.demos)
    assert loaded(question=question).answer == answer


# ---- tutorial programs ---------------------------------------------------------------------------


def test_react_calls_a_python_tool(data_dir, hotpot_corpus):
    """`dspy.ReAct` with a `dspy.Tool` over a Python function: the trajectory names a tool at
    each step, each `search` step ran the function and observed its result, and the
    prediction has an answer."""
    retriever = WordOverlap(hotpot_corpus)

    def search(query: str) -> list[str]:
        """Search Wikipedia paragraphs; returns the two that best match the query."""
        return retriever(query, k=2)

    agent = dspy.ReAct("question -> answer", tools=[dspy.Tool(search)], max_iters=2)
    question = rows(data_dir, "hotpotqa", 1)[0]["question"]
    prediction = agent(question=question)
    trajectory = prediction.trajectory
    steps = sorted(int(k.rsplit("_", 1)[1]) for k in trajectory if k.startswith("tool_name_"))
    assert steps == list(range(len(steps))) and steps
    names = [trajectory[f"tool_name_{i}"] for i in steps]
    assert set(names) <= {"search", "finish"}
    searches = [i for i, name in zip(steps, names, strict=True) if name == "search"]
    assert len(retriever.queries) == len(searches)
    for i, query in zip(searches, retriever.queries, strict=True):
        assert trajectory[f"tool_args_{i}"] == {"query": query}
        assert trajectory[f"observation_{i}"] == WordOverlap(hotpot_corpus)(query, k=2)
    assert isinstance(prediction.answer, str) and prediction.answer.strip()


class RAG(dspy.Module):
    def __init__(self, retrieve: WordOverlap, k: int = 3):
        super().__init__()
        self.retrieve, self.k = retrieve, k
        self.respond = dspy.ChainOfThought("context, question -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        context = self.retrieve(question, k=self.k)
        return dspy.Prediction(context=context, **self.respond(context=context, question=question))


def test_rag_answers_from_retrieved_paragraphs(data_dir, hotpot_corpus, lm):
    """A small RAG program (retrieve, then `ChainOfThought("context, question -> answer")`) on a
    HotPotQA question: the retrieved paragraphs are in the prompt, and the prediction has a
    reasoning and an answer."""
    row = rows(data_dir, "hotpotqa", 1, offset=1)[0]
    prediction = RAG(WordOverlap(hotpot_corpus))(question=row["question"])
    assert len(prediction.context) == 3
    assert {title for title, _ in row["supporting_facts"]} & {p.split(" | ")[0] for p in prediction.context}
    prompt = prompt_text(lm.history[-1])
    assert all(passage in prompt for passage in prediction.context)
    assert isinstance(prediction.reasoning, str) and prediction.reasoning.strip()
    assert isinstance(prediction.answer, str) and prediction.answer.strip()


class MultiHop(dspy.Module):
    def __init__(self, retrieve: WordOverlap, hops: int = 2, k: int = 2):
        super().__init__()
        self.retrieve, self.k = retrieve, k
        self.write_query = [dspy.Predict("context, question -> search_query") for _ in range(hops)]
        self.respond = dspy.Predict("context, question -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        context, queries = [], []
        for write_query in self.write_query:
            query = write_query(context=context, question=question).search_query
            queries.append(query)
            context += [p for p in self.retrieve(query, k=self.k) if p not in context]
        return dspy.Prediction(
            context=context, queries=queries, **self.respond(context=context, question=question)
        )


def test_multi_hop_retrieves_twice_then_answers(data_dir, hotpot_corpus, lm):
    """Multi-hop QA: each hop writes a query from the context so far and retrieves with it;
    the second hop's prompt holds the first hop's paragraphs; one answer call at the end."""
    retriever = WordOverlap(hotpot_corpus)
    row = rows(data_dir, "hotpotqa", 1, offset=2)[0]
    before = len(lm.history)
    prediction = MultiHop(retriever)(question=row["question"])
    calls = lm.history[before:]
    assert len(calls) == 3
    assert retriever.queries == prediction.queries and len(prediction.queries) == 2
    assert all(isinstance(q, str) and q.strip() for q in prediction.queries)
    first_hop = retriever(prediction.queries[0], k=2)
    assert all(p in prompt_text(calls[1]) for p in first_hop)
    assert all(p in prompt_text(calls[2]) for p in prediction.context)
    assert 2 <= len(prediction.context) <= 4
    assert isinstance(prediction.answer, str) and prediction.answer.strip()


class ExtractEntities(dspy.Signature):
    """Extract the named entities (people, organisations, places, events) mentioned in the text."""

    text: str = dspy.InputField()
    entities: list[str] = dspy.OutputField(desc="each entity as it is written in the text")


def test_entity_extraction_outputs_a_list_of_strings(data_dir, lm):
    """A typed output field (`list[str]`), with one demo (SmolLM2-135M answers `[]` without
    one): the prediction holds a non-empty list of strings, parsed from the JSON list the LM
    wrote."""
    first_sentence = [row["context"].split(". ")[0] for row in rows(data_dir, "squad", 91)]
    extract = dspy.Predict(ExtractEntities)
    extract.demos = [dspy.Example(text=first_sentence[30], entities=["Panthers", "Cam Newton", "NFL"])]
    prediction = extract(text=first_sentence[90])
    assert isinstance(prediction.entities, list) and prediction.entities
    assert all(isinstance(entity, str) for entity in prediction.entities)
    written = lm.history[-1]["outputs"][0].split("[[ ## entities ## ]]")[1].split("[[ ## completed")[0]
    assert json.loads(written) == prediction.entities


def test_math_answer_is_a_float(data_dir):
    """`ChainOfThought("question -> answer: float")` on a GSM8K question: the answer parses as a
    float (whether it is right is the model's business)."""
    question = rows(data_dir, "gsm8k", 1)[0]["question"]
    prediction = dspy.ChainOfThought("question -> answer: float")(question=question)
    assert isinstance(prediction.answer, float)
    assert isinstance(prediction.reasoning, str) and prediction.reasoning.strip()


class Sentiment(dspy.Signature):
    """Classify the sentiment of a movie review."""

    text: str = dspy.InputField()
    sentiment: Literal["negative", "positive"] = dspy.OutputField()


def test_classification_evaluated_with_dspy_evaluate(data_dir):
    """A `Literal` output on SST-2 rows, scored by `dspy.Evaluate` with a metric over 6 rows:
    the score is a percentage of the per-row scores, and every row has its prediction."""
    labels = ("negative", "positive")
    devset = [
        dspy.Example(text=r["text"], sentiment=labels[r["label"]]).with_inputs("text")
        for r in rows(data_dir, "sst2", 6)
    ]

    def accuracy(example, prediction, trace=None) -> bool:
        return example.sentiment == prediction.sentiment

    evaluate = dspy.Evaluate(devset=devset, metric=accuracy, num_threads=3, display_progress=False)
    result = evaluate(dspy.Predict(Sentiment))
    assert isinstance(result.score, float) and 0 <= result.score <= 100
    assert [example for example, _, _ in result.results] == devset
    assert all(prediction.sentiment in labels for _, prediction, _ in result.results)
    scores = [score for _, _, score in result.results]
    assert result.score == round(100 * sum(scores) / len(devset), 2)
