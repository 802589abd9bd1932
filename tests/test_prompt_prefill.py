"""Prompt-aware prefill: prompts computed before the calls that need them, outputs unchanged.

`Engine.prefill` (pinned or in the background), the scheduler keeping background prefills out
of the way of generation, the static prefix of a DSPy predictor, and a program's stage hint —
on the embedded model at fp32, where a token's result does not depend on how its prompt was
split into passes, so outputs must be identical with and without.
"""

from __future__ import annotations

import time

import dspy
import pytest

from plait.backends.clients.local import PlaitEngine
from plait.backends.runtime.engine import Engine
from plait.backends.runtime.prefix_cache import block_hashes
from plait.backends.runtime.scheduler import BACKGROUND_CHUNK
from plait.modules.adapter import ConstrainedAdapter
from plait.modules.field_events import on_fields_closed
from plait.modules.prefill import pin_static_prefixes, prefill_stage, stage_prefill, static_prefix
from plait.pipelines.multihop import MultiHop
from tests.test_compile_aware import _lm

INSTRUCTIONS = "Answer each question about the passage in one short sentence. " * 8


def _fresh(smollm, **options) -> Engine:
    return Engine(smollm.model, smollm.tokenizer, smollm.model_id, "llama", **options)


@pytest.fixture
def engine(smollm):
    fresh = _fresh(smollm)
    yield fresh
    fresh.close()


def test_a_prefilled_prompt_is_restored_by_the_request_that_starts_with_it(engine, smollm):
    block = engine.prefix_cache.block_size
    prefix = engine.prompt_ids(INSTRUCTIONS)
    whole = len(prefix) // block * block
    prefill = engine.prefill(prefix).wait()
    assert prefill.finish_reason == "stop" and prefill.token_ids == []
    stats = engine.stats()
    assert (stats.prefills, stats.prefill_tokens_computed, stats.requests) == (1, whole, 0)

    prompt = prefix + engine.prompt_ids(" What is it about?")
    result = engine.generate(prompt, max_tokens=8)
    assert result.usage.cached_tokens == whole
    reference = _fresh(smollm, prefix_cache=False)
    try:
        assert result.token_ids == reference.generate(prompt, max_tokens=8).token_ids
    finally:
        reference.close()

    again = engine.prefill(prefix).wait()  # all cached: nothing is computed
    assert again.usage.cached_tokens == whole and engine.stats().prefill_tokens_computed == whole
    assert engine.prefill(prefix[: block - 1]).wait().usage.prompt_tokens == 0  # under a block: nothing


def test_pinned_blocks_outlive_eviction(smollm):
    engine = _fresh(smollm, prefix_cache_mb=1)  # about one fp32 block of this model
    try:
        block = engine.prefix_cache.block_size
        prefix = engine.prompt_ids(INSTRUCTIONS)[: 3 * block]
        engine.prefill(prefix, pin=True).wait()
        hashes = block_hashes(prefix, block)
        assert engine.prefix_cache.cached_blocks(hashes) == 3
        for n in range(4):  # other prompts churn the cache far past its budget
            engine.generate(f"Count from {n} to {n + 40}, one number a line.", max_tokens=4)
        assert engine.prefix_cache.cached_blocks(hashes) == 3
        assert engine.prefix_cache.pinned_bytes == sum(b.nbytes for b in engine.prefix_cache.blocks.values())
        unpinned = engine.prompt_ids("Count from 7 to 90, one number a line.")
        assert engine.prefix_cache.cached_blocks(block_hashes(unpinned, block)) == 0
    finally:
        engine.close()


def test_a_background_prefill_steps_aside_while_a_request_generates(engine):
    scheduler = engine.scheduler
    passes: list[tuple[int, bool]] = []  # (tokens of a background chunk, a generation in its slots)
    run_pass = scheduler._multi_token_pass

    def recording(slots, chunks):
        rows = [scheduler.rows[s] for s in slots]
        generating = any(r.request.prefill is None for r in scheduler.rows)
        passes.extend((len(c), generating) for r, c in zip(rows, chunks) if r.request.prefill is not None)
        run_pass(slots, chunks)

    scheduler._multi_token_pass = recording
    long_prompt = engine.prompt_ids(INSTRUCTIONS * 3)
    prefill = engine.prefill(long_prompt, background=True)
    while not passes:  # it has begun, in an idle engine
        time.sleep(0.005)
    generation = engine.submit("Write a long list of fruits, one a line:", max_tokens=40)
    generation.wait()
    assert not prefill.done  # it waited for the generation, and finishes after it
    prefill.wait()
    assert len(generation.token_ids) == 40
    assert not any(generating for _, generating in passes)
    assert all(tokens <= BACKGROUND_CHUNK for tokens, _ in passes)
    block = engine.prefix_cache.block_size
    whole = len(long_prompt) // block * block
    assert engine.prefix_cache.cached_blocks(block_hashes(long_prompt, block)) == whole // block
    # set aside, it kept what it had computed: at most its last block was computed twice
    assert whole <= engine.stats().prefill_tokens_computed <= whole + block


class Answer(dspy.Signature):
    """Answer the question using the context."""

    context: list[str] = dspy.InputField()
    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


def _answerer() -> dspy.Predict:
    predictor = dspy.Predict(Answer)
    predictor.demos = [
        dspy.Example(context=["Paris is in France."], question="Capital of France?", answer="Paris")
    ]
    return predictor


def test_the_static_prefix_is_pinned_and_restored_by_every_call(engine, smollm):
    adapter = ConstrainedAdapter()
    sync = PlaitEngine("smollm2-135m", engine=engine)
    predictor = _answerer()
    prefix = static_prefix(predictor, adapter, sync)
    inputs = {"context": ["Rome is in Italy."], "question": "Where is Rome?"}
    real = sync.prompt_ids(adapter.format(predictor.signature, predictor.demos, inputs))
    assert len(prefix) > 100 and real[: len(prefix)] == prefix
    other = {"context": ["[1] «A list»"], "question": "Q?"}  # inputs that start with punctuation
    assert (
        sync.prompt_ids(adapter.format(predictor.signature, predictor.demos, other))[: len(prefix)] == prefix
    )
    # it ends where the first input's value begins (the last shared token dropped)
    assert engine.tokenizer.decode(prefix).rstrip().endswith("[[ ## context ## ]]")

    lm = _lm(engine, max_tokens=16)
    program = dspy.Module()
    program.answer = predictor
    [pinned] = pin_static_prefixes(program, lm, adapter)
    block = engine.prefix_cache.block_size
    assert pinned.predictor == "answer" and pinned.tokens == len(prefix) and pinned.computed > 0
    with dspy.context(lm=lm, adapter=adapter):
        answer = predictor(**inputs).answer
    assert lm.history[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == len(prefix) // block * block

    plain = _fresh(smollm, prefix_cache=False)
    try:
        with dspy.context(lm=_lm(plain, max_tokens=16), adapter=adapter):
            assert predictor(**inputs).answer == answer
    finally:
        plain.close()


def _retriever(query: str, k: int) -> list[str]:
    """Deterministic passages that depend on the query (a stand-in index for a unit test)."""
    words = [w for w in query.split() if w.isalpha()][:3] or ["none"]
    return [f"Passage {i} on {' '.join(words)}: it names {words[0]} and what is known." for i in range(k)]


def test_a_stage_hint_prefills_the_answer_prompt_in_idle_time_and_changes_no_output(smollm):
    outputs, cached, prefills = {}, {}, {}
    for enabled in (False, True):
        engine = _fresh(smollm)
        try:
            lm = _lm(engine, max_tokens=24)
            program = MultiHop(retriever=_retriever, hops=2, k=2)
            program.answer = _answerer()
            with dspy.context(lm=lm, adapter=ConstrainedAdapter()), stage_prefill(enabled):
                prediction = program(question="Who directed the film Ed Wood?")
            outputs[enabled] = (prediction.queries, prediction.context, prediction.answer)
            deadline = time.monotonic() + 10  # hints still queued were cancelled with the call
            while (engine.scheduler.waiting or engine.scheduler.rows) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not engine.scheduler.waiting and not engine.scheduler.rows
            cached[enabled] = lm.history[-1]["usage"]["prompt_tokens_details"]["cached_tokens"]
            prefills[enabled] = engine.stats().prefills
        finally:
            engine.close()
    assert outputs[True] == outputs[False]
    assert prefills == {False: 0, True: 2}  # one hint per hop
    assert cached[True] > cached[False]  # the answer call restored the passages found before it


def test_a_stage_hint_is_ignored_off_plait_and_when_disabled():
    lm = dspy.utils.DummyLM([{"answer": "x"}])
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()), stage_prefill(True):
        assert prefill_stage(_answerer(), question="q") is None
    assert prefill_stage(_answerer(), question="q") is None  # off outside stage_prefill


class Plan(dspy.Signature):
    """Write a search query for the question, then notes on what to look for."""

    question: str = dspy.InputField()
    query: str = dspy.OutputField()
    notes: str = dspy.OutputField()


def test_an_output_field_reaches_the_program_when_its_grammar_closes_it(engine):
    lm = _lm(engine, max_tokens=48)
    planner = dspy.Predict(Plan)
    closed: list[tuple[str, str, int, int]] = []  # (field, value, LM calls returned, decode passes)

    def seen(field: str, value: str) -> None:
        closed.append((field, value, len(lm.history), engine.stats().decode_passes))

    with dspy.context(lm=lm, adapter=ConstrainedAdapter()), on_fields_closed(seen, ["query", "notes"]):
        prediction = planner(question="Which river flows through Paris?")
    assert [(f, v) for f, v, _, _ in closed] == [("query", prediction.query), ("notes", prediction.notes)]
    assert all(returned == 0 for _, _, returned, _ in closed)  # each before the call returned
    # the query was in the program's hands while the notes were still being generated (the
    # notes take many decode steps; the callback runs within one of the query's close)
    assert closed[0][1] and closed[0][3] < engine.stats().decode_passes
    assert engine.stats().requests == 1
