"""The engine's cached paths against its own full forward, and the scheduler's behaviour."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from plait.backends.models.state import Batch
from plait.backends.runtime.engine import Engine
from plait.backends.runtime.state_pool import StatePool
from plait.errors import (
    CheckpointError,
    ContextLengthError,
    EngineOverloadedError,
    MemoryBudgetError,
    ModelNotFoundError,
)

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def _ids(engine, text):
    return engine.tokenizer.encode(engine.chat_prompt([{"role": "user", "content": text}]))


def _pool(engine, slots=1):
    model = engine.model
    return StatePool(model.state_specs(torch.float32), max_length=engine.max_length, slots=slots)


@torch.inference_mode()
def test_incremental_decode_equals_full_forward(smollm):
    ids = _ids(smollm, "Tell me a story about a robot.")
    full = smollm.logits(ids)
    pool = _pool(smollm)
    prompt = 20
    logits = smollm.model(torch.tensor([ids[:prompt]]), Batch(pool, 0, torch.tensor([0])))
    torch.testing.assert_close(logits[0], full[:prompt], atol=1e-4, rtol=0)
    for pos in range(prompt, len(ids)):
        step = smollm.model(torch.tensor([[ids[pos]]]), Batch(pool, 0, torch.tensor([pos])))
        torch.testing.assert_close(step[0, 0], full[pos], atol=1e-4, rtol=0)


@torch.inference_mode()
def test_chunked_prefill_equals_one_pass(smollm):
    ids = _ids(smollm, "Explain photosynthesis briefly.")
    full = smollm.logits(ids)
    pool = _pool(smollm)
    done = 0
    for size in [7, 1, 13, 5, 100]:
        chunk = ids[done : done + size]
        if not chunk:
            break
        out = smollm.model(torch.tensor([chunk]), Batch(pool, 0, torch.tensor([done])))
        torch.testing.assert_close(out[0], full[done : done + len(chunk)], atol=1e-4, rtol=0)
        done += len(chunk)
    assert done == len(ids)


@torch.inference_mode()
def test_padded_multi_row_pass_equals_each_row_alone(smollm):
    """Rows of different lengths, some continuing a cached prefix, in one right-padded pass:
    each row's last logits and the cache it leaves (seen through the next decode step) equal
    the row computed alone."""
    texts = ["Name a planet.", "Write a haiku about rain in the mountains.", "What is 2+2?"]
    prompts = [_ids(smollm, t) for t in texts]
    starts = [0, 9, 4]  # rows 1 and 2 already hold a cached prefix
    pool = _pool(smollm, slots=3)
    for slot, (ids, start) in enumerate(zip(prompts, starts)):
        if start:
            smollm.model(torch.tensor([ids[:start]]), Batch(pool, slot, torch.tensor([0])))
    chunks = [ids[start:] for ids, start in zip(prompts, starts)]
    width = max(len(c) for c in chunks)
    padded = torch.tensor([c + [c[-1]] * (width - len(c)) for c in chunks])
    batch = Batch(pool, 0, torch.tensor(starts), torch.tensor([len(c) for c in chunks]))
    last = smollm.model(padded, batch, last_only=True)[:, -1]
    nxt = last.argmax(-1)
    after = smollm.model(nxt[:, None], Batch(pool, 0, torch.tensor([len(p) for p in prompts])))[:, -1]
    for row, ids in enumerate(prompts):
        full = smollm.logits(ids + [int(nxt[row])])
        torch.testing.assert_close(last[row], full[len(ids) - 1], atol=1e-4, rtol=0)
        torch.testing.assert_close(after[row], full[len(ids)], atol=1e-4, rtol=0)


def test_prompts_arriving_together_share_prefill_passes(smollm):
    engine = Engine(smollm.model, smollm.tokenizer, "padded", "llama", prefix_cache=False)
    try:
        prompts = [_ids(smollm, f"Tell me one fact about the number {n}.") for n in range(6)]
        alone = [engine.generate(ids, max_tokens=6).token_ids for ids in prompts]
        before = engine.stats()
        requests = [engine.submit(ids, max_tokens=6) for ids in prompts]  # admitted in one step
        together = [r.wait().token_ids for r in requests]
        assert together == alone
        assert engine.stats().since(before).multi_token_passes < len(prompts)
    finally:
        engine.close()


def test_scheduler_chunked_prefill_gives_same_tokens(smollm):
    small = Engine(smollm.model, smollm.tokenizer, "chunked", "llama", prefill_chunk=8)
    try:
        ids = _ids(smollm, "List three animals.")
        assert small.generate(ids, max_tokens=20).token_ids == smollm.generate(ids, max_tokens=20).token_ids
    finally:
        small.close()


def test_batch_does_not_change_a_requests_tokens(smollm):
    prompts = [
        "Name a planet.",
        "Write a haiku about rain.",
        "What is 2+2?",
        "Describe a cat in detail.",
        "Say hello in French.",
        "Why is the sky blue? Explain at length.",
    ]
    lengths = [5, 30, 8, 40, 12, 25]  # rows finish at different times: slots get compacted mid-batch
    alone = [smollm.generate(_ids(smollm, p), max_tokens=n).token_ids for p, n in zip(prompts, lengths)]
    steps_before = smollm.scheduler.steps
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(
            pool.map(
                lambda a: smollm.generate(_ids(smollm, a[0]), max_tokens=a[1]).token_ids,
                zip(prompts, lengths),
            )
        )
    assert together == alone
    # batched: far fewer scheduler iterations than the tokens generated
    assert smollm.scheduler.steps - steps_before < sum(len(t) for t in alone)


def test_greedy_answer_and_usage(smollm):
    result = smollm.chat(QUESTION, max_tokens=16)
    assert "Paris" in result.text
    assert result.finish_reason == "stop"
    assert result.usage.prompt_tokens == len(smollm.tokenizer.encode(smollm.chat_prompt(QUESTION)))
    assert result.usage.completion_tokens == len(result.token_ids) > 0


def test_stop_strings_and_max_tokens(smollm):
    stopped = smollm.chat(QUESTION, max_tokens=16, stop=["Paris"])
    assert stopped.finish_reason == "stop" and "Paris" not in stopped.text and stopped.text
    limited = smollm.chat([{"role": "user", "content": "Write a long essay about oceans."}], max_tokens=5)
    assert limited.finish_reason == "length" and len(limited.token_ids) == 5


def test_seeded_sampling_is_reproducible(smollm):
    msgs = [{"role": "user", "content": "Invent a name for a dragon."}]
    a = smollm.chat(msgs, max_tokens=20, temperature=1.0, seed=7)
    b = smollm.chat(msgs, max_tokens=20, temperature=1.0, seed=7)
    c = smollm.chat(msgs, max_tokens=20, temperature=1.0, seed=8)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    greedy = smollm.chat(msgs, max_tokens=20)
    assert smollm.chat(msgs, max_tokens=20, temperature=0.7, top_k=1, seed=3).token_ids == greedy.token_ids
    assert smollm.chat(msgs, max_tokens=20, temperature=0.7, top_p=1e-6, seed=3).token_ids == greedy.token_ids


def test_stream_deltas_add_up_to_the_text(smollm):
    prompt = smollm.chat_prompt([{"role": "user", "content": "Count from one to ten in words."}])
    pieces = list(smollm.stream(prompt, max_tokens=30))
    assert len(pieces) > 3
    assert "".join(pieces) == smollm.generate(prompt, max_tokens=30).text


def test_abandoned_stream_frees_its_slot(smollm):
    prompt = smollm.chat_prompt([{"role": "user", "content": "Write a very long poem."}])
    stream = smollm.stream(prompt, max_tokens=200)
    next(stream)
    stream.close()
    deadline = time.time() + 10
    while smollm.scheduler.rows and time.time() < deadline:
        time.sleep(0.05)
    assert not smollm.scheduler.rows
    assert "Paris" in smollm.chat(QUESTION, max_tokens=16).text


def test_prompt_longer_than_context_is_a_clear_error(smollm):
    with pytest.raises(ContextLengthError, match="context window"):
        smollm.generate([100] * (smollm.max_length + 1), max_tokens=4)


def test_memory_budget(smollm):
    tight = Engine(smollm.model, smollm.tokenizer, "tight", "llama", memory_budget_mb=40)
    try:
        with pytest.raises(MemoryBudgetError, match="budget"):
            tight.generate([100] * 2000, max_tokens=4)
        assert tight.generate(_ids(smollm, "Hi"), max_tokens=3).token_ids  # still serving
    finally:
        tight.close()


def test_full_queue_pushes_back(smollm):
    busy = Engine(smollm.model, smollm.tokenizer, "busy", "llama", max_batch_size=1, max_queue=2)
    try:
        ids = _ids(smollm, "Write a long essay about mountains.")
        handles, refused = [], 0
        for _ in range(6):
            try:
                handles.append(busy.submit(ids, max_tokens=60))
            except EngineOverloadedError:
                refused += 1
        assert refused >= 1
        for h in handles:  # everything accepted is still answered
            assert len(h.wait(120).token_ids) == 60
    finally:
        busy.close()


def test_unknown_model_and_corrupt_checkpoint(tmp_path):
    with pytest.raises(ModelNotFoundError):
        Engine.load("no-such-model")
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(CheckpointError):
        Engine.load(str(bad))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError):
        Engine.load(str(tmp_path / "hf"))


def test_many_threads_submitting_at_once(smollm):
    errors = []

    def worker(i):
        try:
            out = smollm.generate(_ids(smollm, f"Say the number {i}."), max_tokens=6)
            assert out.token_ids
        except Exception as exc:  # collected: assertion errors in threads would be lost
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors


@torch.inference_mode()
def test_bf16_decode_follows_its_full_forward(smollm):
    import copy

    model = copy.deepcopy(smollm.model).to(torch.bfloat16)
    ids = _ids(smollm, "Tell me about bf16.")
    full = model(torch.tensor([ids]))[0]
    pool = StatePool(model.state_specs(torch.bfloat16), max_length=smollm.max_length)
    model(torch.tensor([ids[:-3]]), Batch(pool, 0, torch.tensor([0])))
    for pos in range(len(ids) - 3, len(ids)):
        step = model(torch.tensor([[ids[pos]]]), Batch(pool, 0, torch.tensor([pos])))[0, 0]
        assert (step - full[pos]).abs().max() < 0.03 * full[pos].abs().max()  # bf16 rounding only
        assert int(step.argmax()) == int(full[pos].argmax())
