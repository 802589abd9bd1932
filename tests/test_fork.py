"""n samples of one prompt from one prefill (`Engine.submit_n`, `Scheduler.submit_group`).

The prompt is computed once; the other samples start from copies of its state and draw their
first token from the same logits with generators of their own. What must hold: sample i of
a seeded group is token for token what a separate request with seed + i gives (fp32, where
a request's tokens do not depend on its batch), the first tokens follow the model's
distribution, a hybrid's Mamba state is copied along, and a group that is cancelled, cut
short or closed leaves no row, slot or waiting caller behind.
"""

import asyncio
import time

import dspy
import pytest
import torch
from dspy.lm15 import Config, Message, Request

import plait
from plait.backends.clients.local import CandidateCount, Candidates, LocalCall
from plait.backends.grammar.constraint import TokenConstraint, compile_constraint
from plait.backends.grammar.spec import GrammarSpec
from plait.backends.runtime.cancellation import CancelScope
from plait.backends.runtime.engine import Engine
from plait.errors import EngineClosedError
from tests.nemotron_fixtures import write_checkpoint
from tests.test_nemotron_engine import _byte_tokenizer

PROMPT = "Here is a short story about a dragon who"
SAMPLED = dict(temperature=1.0, max_tokens=12)


@pytest.fixture(scope="module")
def engine(smollm):
    """The session's fp32 weights without a prefix cache: every separate request computes its
    own prompt, so the fork is compared against plain prefills."""
    engine = Engine(smollm.model, smollm.tokenizer, "fork", "llama", prefix_cache=False)
    yield engine
    engine.close()


def _separate(engine: Engine, prompt, seeds: list[int], **sampling) -> list[list[int]]:
    return [engine.generate(prompt, seed=seed, **sampling).token_ids for seed in seeds]


def _idle(engine: Engine) -> bool:
    """Whether the engine holds no row and no queued request within a few seconds (a finished
    request's caller wakes before the scheduler frees its slot)."""
    deadline = time.monotonic() + 10
    while engine.scheduler.rows or engine.scheduler.waiting:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_n_samples_come_from_one_prefill(engine):
    prompt = engine.prompt_ids(PROMPT)
    before = engine.stats()
    results = engine.generate_n(prompt, 5, seed=11, **SAMPLED)
    work = engine.stats().since(before)
    assert len(results) == 5 and all(r.token_ids for r in results)
    assert work.requests == 5 and work.forked == 4
    assert work.prompt_tokens_computed == len(prompt)  # one prefill, not five
    assert work.max_decode_batch == 5  # the samples decode together
    assert len({tuple(r.token_ids) for r in results}) > 1
    assert _idle(engine)


def test_sample_i_is_the_separate_request_seeded_seed_plus_i(engine):
    forked = [r.token_ids for r in engine.generate_n(PROMPT, 5, seed=40, **SAMPLED)]
    assert forked == _separate(engine, PROMPT, [40, 41, 42, 43, 44], **SAMPLED)
    again = [r.token_ids for r in engine.generate_n(PROMPT, 5, seed=40, **SAMPLED)]
    assert again == forked  # seeded groups reproduce
    other = [r.token_ids for r in engine.generate_n(PROMPT, 5, seed=45, **SAMPLED)]
    assert other != forked


def test_top_k_top_p_and_stop_strings_per_sample(engine):
    settings = dict(temperature=0.8, top_k=20, top_p=0.9, stop=["."], max_tokens=16)
    forked = [r.token_ids for r in engine.generate_n(PROMPT, 3, seed=5, **settings)]
    assert forked == _separate(engine, PROMPT, [5, 6, 7], **settings)


def test_grammar_per_sample(engine):
    """Each sample runs its own constraint; what the grammar forces before the first sample
    is part of the shared prefill."""
    spec = GrammarSpec.regex(r"Answer: (yes|no|maybe|unclear), because [a-z ]{1,40}\.")
    settings = dict(temperature=1.0, max_tokens=24)

    def grammar() -> TokenConstraint:
        return compile_constraint(spec, engine.tokenizer, engine.info.vocab_size)

    before = engine.stats()
    results = engine.generate_n(PROMPT, 4, constraints=[grammar() for _ in range(4)], seed=21, **settings)
    assert engine.stats().since(before).forked == 3
    assert all(r.text.startswith("Answer: ") for r in results)
    separate = [engine.generate(PROMPT, constraint=grammar(), seed=21 + i, **settings) for i in range(4)]
    assert [r.token_ids for r in results] == [r.token_ids for r in separate]


def test_greedy_samples_are_computed_once(engine):
    before = engine.stats()
    results = engine.generate_n(PROMPT, 4, max_tokens=8)
    work = engine.stats().since(before)
    assert work.requests == 1 and work.shared == 3 and work.forked == 0
    assert len({tuple(r.token_ids) for r in results}) == 1
    assert results[0].token_ids == engine.generate(PROMPT, max_tokens=8).token_ids


def test_first_tokens_follow_the_models_distribution(engine):
    """First tokens of 40 groups of 8 against softmax of the prompt's logits (chi-square,
    p > 0.001 on a fixed set of seeds: deterministic). A fork that reused one row's draw for
    its whole group would make most groups 8 copies of one token: counted directly."""
    ids = engine.prompt_ids("My favourite animal is the")
    probs = torch.softmax(engine.logits(ids)[-1].float(), -1)
    groups = [engine.submit_n(ids, 8, seed=1000 * g, temperature=1.0, max_tokens=1) for g in range(40)]
    firsts = [[r.wait().token_ids[0] for r in group] for group in groups]
    tokens = torch.tensor([t for group in firsts for t in group])

    expected = probs * len(tokens)
    kept = torch.nonzero(expected >= 5).flatten()  # bins with enough mass; the rest lumped together
    observed = torch.bincount(tokens, minlength=len(probs))[kept].float()
    observed = torch.cat([observed, (len(tokens) - observed.sum()).reshape(1)])
    expected = torch.cat([expected[kept], (len(tokens) - expected[kept].sum()).reshape(1)])
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    dof = len(kept)
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(chi2 / 2)))
    assert len(kept) >= 3, "the prompt's first token should have several likely choices"
    assert p_value > 1e-3, f"chi2={chi2:.1f} over {dof} degrees of freedom"

    all_same = sum(len(set(group)) == 1 for group in firsts)
    assert float(probs.max()) < 0.7  # so 8 equal draws are rare: at most 40 * 0.7**7 = 3.3 groups
    assert all_same <= 40 * float(probs.max()) ** 7 + 2


def test_group_larger_than_the_batch(smollm):
    """Samples that find no slot when their leader is admitted are computed on their own; each
    still gives its seed's tokens."""
    small = Engine(smollm.model, smollm.tokenizer, "small", "llama", prefix_cache=False, max_batch_size=2)
    try:
        forked = [r.token_ids for r in small.generate_n(PROMPT, 5, seed=70, **SAMPLED)]
        assert forked == _separate(small, PROMPT, [70, 71, 72, 73, 74], **SAMPLED)
        assert small.stats().forked == 1
    finally:
        small.close()


def test_speculative_rows_fork_too(smollm):
    """With prompt-lookup drafting on (whatever drafts cost), a group's rows draft and verify
    once forked, and each still gives its seed's tokens."""
    drafting = Engine(
        smollm.model, smollm.tokenizer, "ngram", "llama", prefix_cache=False, speculative="ngram"
    )
    drafting.scheduler.weigh_drafts = False
    try:
        prompt = "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown"
        settings = dict(temperature=0.5, max_tokens=16)
        forked = [r.token_ids for r in drafting.generate_n(prompt, 3, seed=8, **settings)]
        assert drafting.stats().forked == 2 and drafting.stats().drafted_tokens > 0
        assert forked == _separate(drafting, prompt, [8, 9, 10], **settings)
    finally:
        drafting.close()


def test_cancelled_leader_hands_its_prompt_to_the_next_sample(engine):
    """Whenever the first sample is cancelled (queued, mid-prefill or decoding), the others
    finish with their own seeds' tokens."""
    requests = engine.submit_n(PROMPT, 4, seed=90, **SAMPLED)
    requests[0].cancel()
    rest = [r.wait(60).token_ids for r in requests[1:]]
    assert requests[0].finish_reason in ("cancelled", "stop", "length")
    assert rest == _separate(engine, PROMPT, [91, 92, 93], **SAMPLED)
    assert _idle(engine)


def test_a_cancelled_group_leaves_nothing_behind(engine):
    with CancelScope() as scope:
        requests = engine.submit_n(PROMPT, 5, temperature=1.0, max_tokens=200)
    scope.cancel()
    for request in requests:
        request.wait(60)
    assert {r.finish_reason for r in requests} <= {"cancelled", "stop"}
    assert _idle(engine)
    assert len(engine.generate(PROMPT, max_tokens=4).token_ids) == 4


def test_closing_fails_a_group_in_flight(smollm):
    closing = Engine(smollm.model, smollm.tokenizer, "closing", "llama")
    requests = closing.submit_n(PROMPT * 20, 5, temperature=1.0, max_tokens=200)
    closing.close()
    assert not closing.scheduler.thread.is_alive()
    for request in requests:
        assert request.done
        if request.finish_reason == "error":
            with pytest.raises(EngineClosedError):
                request.wait()
    with pytest.raises(EngineClosedError):
        closing.submit_n(PROMPT, 2, temperature=1.0)


def test_hybrid_samples_copy_the_mamba_state(tmp_path):
    write_checkpoint(tmp_path, "dense", seed=5)
    _byte_tokenizer(tmp_path)
    hybrid = Engine.load(str(tmp_path), prefix_cache=False)
    try:
        prompt = "a hybrid model keeps Mamba state beside its KV cache"
        settings = dict(temperature=1.0, max_tokens=10)
        before = hybrid.stats()
        forked = [r.token_ids for r in hybrid.generate_n(prompt, 4, seed=3, **settings)]
        assert hybrid.stats().since(before).forked == 3
        assert forked == _separate(hybrid, prompt, [3, 4, 5, 6], **settings)
    finally:
        hybrid.close()


def test_dspy_n_samples_come_from_one_prefill(smollm):
    """DSPy completes a request n times and never says n: the LM's callback reads it, and the
    first completion of a sampled request forks the group. Seeded ones stay shared."""
    lm = plait.LM("smollm2-135m", cache=False, max_tokens=8)
    engine = lm.engine.engine
    before = engine.stats()
    outputs = lm("Name a colour.", n=4, temperature=1.0)
    work = engine.stats().since(before)
    assert len(outputs) == 4 and work.requests == 4 and work.forked == 3

    before = engine.stats()
    outputs = asyncio.run(lm.acall("Name a colour.", n=3, temperature=1.0))
    assert len(outputs) == 3 and engine.stats().since(before).forked == 2

    predict = dspy.Predict("question -> answer", n=3)  # sets temperature 0.7 for n > 1
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        before = engine.stats()
        prediction = predict(question="What colour is the sky?")
    assert len(prediction.completions) == 3 and engine.stats().since(before).forked >= 2

    before = engine.stats()
    seeded = lm("Name a colour.", n=3, temperature=1.0, seed=2)
    work = engine.stats().since(before)
    assert len(set(seeded)) == 1 and work.requests == 1 and work.shared == 2 and work.forked == 0
    assert _idle(engine)


def test_candidates_a_dspy_call_did_not_take_are_cancelled(smollm):
    lm = plait.LM("smollm2-135m", cache=False)
    engine = lm.engine
    story = Message.user("Write a long story.")
    request = Request(model=lm.model, messages=(story,), config=Config(temperature=1.0, max_tokens=200))
    started: list[LocalCall] = []

    def start() -> list[LocalCall]:
        started.extend(engine.start_n(request, 3))
        return started

    candidates = Candidates(3)
    first = candidates.take(request, start)
    candidates.cancel_rest()  # what the LM's callback does when the call ends
    assert first.handle.wait(60).finish_reason in ("stop", "length")
    assert [c.handle.wait(60).finish_reason for c in started[1:]] == ["cancelled", "cancelled"]
    assert _idle(engine.engine)

    count = CandidateCount()  # once the call is over, completions are single requests again
    count.on_lm_start("call", lm, {"kwargs": {"n": 2}})
    count.on_lm_end("call", None)
    before = engine.engine.stats()
    engine.complete(Request(model=lm.model, messages=(story,), config=Config(temperature=1.0, max_tokens=2)))
    assert engine.engine.stats().since(before).forked == 0
