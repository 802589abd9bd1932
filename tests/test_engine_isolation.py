"""One request must never hurt another: on the embedded SmolLM2, bad requests are refused at
the door or fail alone, long prompts do not stall decoding rows, memory stays in its budget
(sequences are preempted and recomputed, with identical outputs), and cancelled work stops."""

import threading
import time

import pytest

from plait.backends.runtime.cancellation import CancelScope
from plait.backends.runtime.engine import Engine
from plait.errors import RequestCancelledError

CHATS = [f"Write two sentences about the number {n}." for n in range(6)]


def _ids(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer.encode(engine.chat_prompt([{"role": "user", "content": text}]))


@pytest.fixture
def fresh(smollm):
    """Engines on the session's weights, closed after the test."""
    made: list[Engine] = []

    def make(**options) -> Engine:
        made.append(Engine(smollm.model, smollm.tokenizer, f"isolation-{len(made)}", "llama", **options))
        return made[-1]

    yield make
    for engine in made:
        engine.close()


def _wait_idle(engine: Engine, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (engine.scheduler.rows or engine.scheduler.waiting) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.scheduler.rows and not engine.scheduler.waiting


def test_bad_requests_are_refused_at_the_door_and_hurt_no_one(fresh):
    engine = fresh()
    handles = [engine.submit(_ids(engine, c), max_tokens=24) for c in CHATS]
    vocab = engine.info.vocab_size
    for bad in ([1, 2, vocab], [1, -1, 3]):
        with pytest.raises(ValueError, match="out of range"):
            engine.submit(bad, max_tokens=4)
    # a vanishing temperature asks for the most likely token: decoded greedily, no NaN
    tiny = engine.submit(_ids(engine, CHATS[0]), max_tokens=24, temperature=1e-40)
    results = [h.wait(120) for h in handles]
    assert all(r.finish_reason in ("stop", "length") and r.error is None for r in results)
    assert tiny.wait(120).token_ids == results[0].token_ids


def test_a_failing_pass_fails_its_own_rows_only(fresh):
    """A forward pass that raises for one row's tokens: that row fails, the rows batched with it
    are recomputed alone and finish, and the engine keeps serving."""
    engine = fresh()
    poison = engine.tokenizer.encode(" POISON")[0]
    assert not any(poison in _ids(engine, c) for c in CHATS)
    model = engine.scheduler.model

    def failing(ids, batch=None, **kwargs):
        if (ids == poison).any():
            raise RuntimeError("this row's tokens break the model")
        return model(ids, batch, **kwargs)

    engine.scheduler.model = failing
    good = [engine.submit(_ids(engine, c), max_tokens=16) for c in CHATS[:3]]
    bad = engine.submit(_ids(engine, "Say POISON"), max_tokens=16)
    more = [engine.submit(_ids(engine, c), max_tokens=16) for c in CHATS[3:]]
    with pytest.raises(RuntimeError, match="break the model"):
        bad.wait(120)
    assert bad.finish_reason == "error"
    for handle in good + more:
        assert handle.wait(120).finish_reason in ("stop", "length")
    assert engine.generate(_ids(engine, CHATS[0]), max_tokens=8).token_ids


def test_preempted_sequences_are_recomputed_with_identical_outputs(smollm, fresh):
    """Four sequences that do not fit the budget together: the newest are preempted and resumed
    later, and every output is the one the sequence gives alone."""
    prompts = [_ids(smollm, f"Tell me a story about a {animal}.") for animal in ("cat", "fox", "owl", "eel")]
    alone = [smollm.generate(p, max_tokens=60).token_ids for p in prompts]
    per_token = smollm.pool.bytes_for(1, 1)
    budget_mb = max(1, int(2.2 * (len(prompts[0]) + 60) * per_token / 2**20))
    tight = fresh(memory_budget_mb=budget_mb, prefix_cache=False)
    handles = [tight.submit(p, max_tokens=60) for p in prompts]
    assert [h.wait(300).token_ids for h in handles] == alone
    stats = tight.stats()
    assert stats.preemptions > 0
    assert tight.pool.nbytes() <= budget_mb * 2**20


def test_memory_goes_back_after_a_burst(fresh):
    engine = fresh(prefix_cache=False)
    idle = engine.pool.nbytes()
    handles = [engine.submit(_ids(engine, c * 20), max_tokens=8) for c in CHATS]
    for handle in handles:
        handle.wait(300)
    assert engine.stats().max_decode_batch > 1  # the burst really ran together
    _wait_idle(engine)
    deadline = time.monotonic() + 10
    while engine.pool.nbytes() > idle and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.pool.nbytes() <= idle


def test_a_long_prompt_does_not_stall_decoding_rows(fresh):
    """With a step budget of 64 tokens, a 700-token prompt is prefilled in chunks while a short
    chat decodes a token every step: the chat finishes before the long prompt's prefill."""
    engine = fresh(step_tokens=64, prefix_cache=False)
    passes: list[tuple[int, int]] = []  # (real tokens, step)
    model = engine.scheduler.model

    def recording(ids, batch=None, **kwargs):
        real = ids.numel() if batch is None or batch.new_tokens is None else int(batch.new_tokens.sum())
        passes.append((real, engine.scheduler.steps))
        return model(ids, batch, **kwargs)

    engine.scheduler.model = recording
    chat = engine.submit(_ids(engine, CHATS[0]), max_tokens=12)
    while not chat.token_ids:  # the chat is decoding
        time.sleep(0.01)
    long = engine.submit(_ids(engine, "Summarise this. " + "The river runs to the sea. " * 100), max_tokens=4)
    chat.wait(120)
    assert not long.token_ids  # its prefill (700+ tokens in chunks of <= 64) is still going
    long.wait(120)
    per_step: dict[int, int] = {}
    for real, step in passes:
        per_step[step] = per_step.get(step, 0) + real
    assert max(per_step.values()) <= 64


def test_a_cancel_scope_stops_its_requests_and_refuses_more(fresh):
    engine = fresh()
    started = threading.Event()
    outcome: dict = {}

    def program(scope: CancelScope) -> None:
        with scope:
            handle = engine.submit(_ids(engine, "Write a very long poem about rivers."), max_tokens=400)
            started.set()
            outcome["first"] = handle.wait(120)
            try:
                engine.submit(_ids(engine, "and another"), max_tokens=4)
            except RequestCancelledError as exc:
                outcome["refused"] = exc

    scope = CancelScope()
    worker = threading.Thread(target=program, args=(scope,))
    worker.start()
    started.wait(30)
    time.sleep(0.3)
    scope.cancel()
    worker.join(60)
    assert outcome["first"].finish_reason == "cancelled" and len(outcome["first"].token_ids) < 400
    assert "refused" in outcome
    _wait_idle(engine)


def test_a_shared_request_runs_on_while_one_of_its_callers_remains(fresh):
    """Two callers share one deterministic request (same share key); the first one's scope is
    cancelled: the request runs on for the second, and stops when both have gone."""
    engine = fresh()
    prompt = _ids(engine, "Write a very long poem about mountains.")
    first, second = CancelScope(), CancelScope()
    with first:
        a = engine.submit(prompt, max_tokens=300, share_key="poem")
    with second:
        b = engine.submit(prompt, max_tokens=300, share_key="poem")
    assert a is b
    first.cancel()
    time.sleep(0.5)
    assert not a.done and not a.cancelled  # still generating for the second caller
    second.cancel()
    assert a.wait(60).finish_reason == "cancelled"
