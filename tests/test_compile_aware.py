"""What DSPy's evaluation and optimizers do to the engine, on the embedded SmolLM2.

DSPy's `Evaluate` and optimizers call the LM from a pool of threads, ask for `n>1` candidates by
completing the same request `n` times, and re-submit stragglers. Each test runs a fresh engine on
the session's weights (its own prefix cache and counters) and asserts on what it computed.
"""

import asyncio
import json
import os

import dspy
import pytest
from dspy.utils.parallelizer import ParallelExecutor

from plait.backends.clients.local import AsyncPlaitEngine, PlaitEngine
from plait.backends.runtime.engine import Engine
from plait.modules.adapter import ConstrainedAdapter


class DescribeFeeling(dspy.Signature):
    """Describe, in a few words, the feeling of a sentence from a movie review."""

    text: str = dspy.InputField()
    feeling: str = dspy.OutputField()


DEMOS = [
    dspy.Example(text="a gorgeous , witty , seductive movie .", feeling="delighted and charmed"),
    dspy.Example(
        text="the plot is nothing but boilerplate clichés from start to finish .", feeling="bored and annoyed"
    ),
    dspy.Example(text="it 's a charming and often affecting journey .", feeling="warm and moved"),
    dspy.Example(text="unflinchingly bleak and desperate", feeling="gloomy and uneasy"),
]


@pytest.fixture
def engine(smollm):
    """A fresh engine on the session's weights: an empty prefix cache, counters from zero."""
    fresh = Engine(smollm.model, smollm.tokenizer, smollm.model_id, "llama")
    yield fresh
    fresh.close()


def _lm(engine: Engine, **defaults) -> dspy.LM:
    sync = PlaitEngine("smollm2-135m", engine=engine)
    return dspy.LM(
        "plait/smollm2-135m",
        engine=sync,
        async_engine=AsyncPlaitEngine(sync),
        cache=False,
        num_retries=0,
        **defaults,
    )


def _messages(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_threaded_evaluate_computes_the_shared_prefix_once_and_batches(engine, data_dir):
    rows = [json.loads(line) for line in (data_dir / "sst2" / "dev.jsonl").open()][:8]
    devset = [dspy.Example(text=r["text"]).with_inputs("text") for r in rows]
    program = dspy.Predict(DescribeFeeling)
    program.demos = DEMOS  # a compiled predictor: instructions + demos, shared by every row
    adapter = ConstrainedAdapter(text_tokens=6)
    lm = _lm(engine, temperature=0.0, max_tokens=32)

    before = engine.stats()
    with dspy.context(lm=lm, adapter=adapter):
        result = dspy.Evaluate(
            devset=devset,
            metric=lambda ex, pred, trace=None: bool(pred.feeling.strip()),
            num_threads=8,
            display_progress=False,
        )(program)
    stats = engine.stats().since(before)
    assert result.score == 100.0 and stats.requests == len(devset)

    prompts = [
        engine.prompt_ids(
            engine.chat_prompt(adapter.format(DescribeFeeling, demos=DEMOS, inputs={"text": ex.text}))
        )
        for ex in devset
    ]
    shared = min(len(os.path.commonprefix([prompts[0], p])) for p in prompts[1:])  # noqa: RUF071 (text)
    own = sum(len(p) - shared for p in prompts)
    block = engine.prefix_cache.block_size
    # the demos make a shared prefix longer than all the rows' slack together: a second
    # computation of it could not hide in the bound below
    assert shared > (len(prompts) + 1) * block
    assert stats.prompt_tokens == sum(map(len, prompts))
    # the shared prefix is computed once; every row computes its own part (+ < 1 block)
    assert stats.prompt_tokens_computed <= shared + own + len(prompts) * block
    assert stats.prompt_tokens_computed < stats.prompt_tokens / 2
    # concurrent rows share decode passes
    assert stats.max_decode_batch > 1 and stats.mean_decode_batch > 1.5
    assert stats.mean_rows_in_flight > 1.5


def test_n_deterministic_candidates_are_computed_once(engine):
    lm = _lm(engine, max_tokens=12)
    before = engine.stats()
    greedy = lm(messages=_messages("Name a colour."), n=3, temperature=0.0)
    seeded = lm(messages=_messages("Name an animal."), n=3, temperature=1.0, seed=11)
    stats = engine.stats().since(before)
    assert len(greedy) == 3 and len(set(greedy)) == 1 and greedy[0]
    assert len(seeded) == 3 and len(set(seeded)) == 1 and seeded[0]  # a seed fixes the sample
    assert stats.requests == 2 and stats.shared == 4

    async def candidates():
        return await lm.acall(messages=_messages("Name a fruit."), n=3, temperature=0.0)

    before = engine.stats()
    answers = asyncio.run(candidates())
    stats = engine.stats().since(before)
    assert len(answers) == 3 and len(set(answers)) == 1
    assert stats.requests == 1 and stats.shared == 2


def test_n_sampled_candidates_are_distinct_samples(engine):
    lm = _lm(engine, max_tokens=24)
    before = engine.stats()
    samples = lm(messages=_messages("Invent a name for a new island and describe it."), n=3, temperature=1.0)
    stats = engine.stats().since(before)
    assert len(samples) == 3 and len(set(samples)) == 3
    assert stats.requests == 3 and stats.shared == 0

    before = engine.stats()
    with dspy.context(lm=lm, adapter=ConstrainedAdapter(text_tokens=12)):
        # DSPy raises a near-zero temperature for n>1: these are samples too
        prediction = dspy.Predict(DescribeFeeling, n=3)(text="a sweet , funny film .")
    stats = engine.stats().since(before)
    assert len(prediction.completions.feeling) == 3 and stats.requests == 3 and stats.shared == 0


def test_a_straggler_resubmission_joins_the_request_in_flight(engine):
    lm = _lm(engine, temperature=0.0, max_tokens=120)
    messages = _messages("Count from 1 to 100, separated by commas.")
    before = engine.stats()
    # DSPy re-submits a task still running after `timeout` s when at most `straggler_limit`
    # remain (and then the copy, a second later): every copy joins the first request
    executor = ParallelExecutor(num_threads=8, timeout=1, straggler_limit=3, disable_progress_bar=True)
    [answer] = executor.execute(lambda m: lm(messages=m)[0], [messages])
    stats = engine.stats().since(before)
    assert answer.count(",") > 20
    assert stats.requests == 1 and stats.shared >= 1  # the copies waited on the first
