"""Prefix cache: shared prompt prefixes are computed once, and results never change."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from plait.backends.runtime.engine import Engine
from plait.backends.runtime.prefix_cache import block_hashes
from tests.nemotron_fixtures import write_checkpoint
from tests.test_nemotron_engine import _byte_tokenizer

INSTRUCTIONS = (
    "You are a careful assistant. Read the question, think about what it asks, and answer with "
    "a short, factual sentence. Examples follow. " * 6
)
QUESTIONS = [
    "What is the capital of Italy?",
    "How many legs does a spider have?",
    "What color is grass?",
    "Who wrote Hamlet?",
    "What is frozen water called?",
    "What is 3 plus 4?",
]


def _prompt(engine, question):
    return engine.tokenizer.encode(
        engine.chat_prompt(
            [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": question}]
        )
    )


def test_block_hash_chain_identifies_prefixes():
    a = block_hashes(list(range(100)), 16)
    b = block_hashes(list(range(40)) + [999] + list(range(41, 100)), 16)
    assert len(a) == 6
    assert a[:2] == b[:2] and a[2] != b[2] and a[3] != b[3]  # a change poisons every later block


@pytest.fixture(scope="module")
def reference(smollm):
    engine = Engine(smollm.model, smollm.tokenizer, "no-prefix-cache", "llama", prefix_cache=False)
    yield engine
    engine.close()


def test_shared_prefix_is_computed_once_and_tokens_do_not_change(smollm, reference):
    cached = Engine(smollm.model, smollm.tokenizer, "prefix-cache", "llama", prefix_cache=True)
    try:
        prompts = [_prompt(smollm, q) for q in QUESTIONS]
        expected = [reference.generate(p, max_tokens=12).token_ids for p in prompts]
        first = cached.generate(prompts[0], max_tokens=12)
        assert first.usage.cached_tokens == 0 and first.token_ids == expected[0]
        results = [cached.generate(p, max_tokens=12) for p in prompts[1:]]
        assert [r.token_ids for r in results] == expected[1:]
        shared = len(INSTRUCTIONS) // 8  # far more than a block of tokens is shared
        assert all(r.usage.cached_tokens >= shared for r in results)
        total = sum(len(p) for p in prompts)
        assert cached.scheduler.prompt_tokens_computed < total / 2
    finally:
        cached.close()


def test_concurrent_requests_wait_for_the_prefix_in_flight(smollm, reference):
    cached = Engine(smollm.model, smollm.tokenizer, "prefix-in-flight", "llama", prefix_cache=True)
    try:
        prompts = [_prompt(smollm, q) for q in QUESTIONS]
        expected = [reference.generate(p, max_tokens=8).token_ids for p in prompts]
        with ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(lambda p: cached.generate(p, max_tokens=8).token_ids, prompts))
        assert got == expected
        prefix = len(prompts[0]) - 20
        # the shared prefix was computed about once, not once per request
        assert (
            cached.scheduler.prompt_tokens_computed < prefix + 2 * sum(len(p) - prefix for p in prompts) + 128
        )
    finally:
        cached.close()


@pytest.fixture(scope="module", params=["dense", "moe"])
def hybrid(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"prefix-{request.param}")
    write_checkpoint(directory, request.param, seed=11)
    _byte_tokenizer(directory)
    plain = Engine.load(str(directory), prefix_cache=False)
    yield directory, plain
    plain.close()


def test_hybrid_model_resumes_from_mamba_checkpoints(hybrid):
    directory, plain = hybrid
    engine = Engine.load(str(directory), prefix_block_size=16)  # chunk_size 8: blocks of 16
    try:
        assert engine.prefix_cache.block_size == 16 and engine.prefix_cache.has_fixed_state
        base = "the shared instructions of a compiled predictor, then: "
        tok = engine.tokenizer.encode
        long_a, long_b = tok(base + "first question?"), tok(base + "second, different one")
        early = tok(base[:20] + " diverges early from the rest of it all")
        usages = []
        for ids in [long_a, long_b, early, long_a]:
            result = engine.generate(ids, max_tokens=10)
            assert result.token_ids == plain.generate(ids, max_tokens=10).token_ids
            usages.append(result.usage.cached_tokens)
        shared = len(tok(base))
        assert shared % 16 != 0  # the shared part does not end on a block boundary
        assert usages[0] == 0
        assert usages[1] == shared // 16 * 16  # resumed at the deepest boundary inside the shared part
        assert usages[2] == len(tok(base[:20])) // 16 * 16 > 0  # a shallower checkpoint survives the "split"
        assert usages[3] == (len(long_a) - 1) // 16 * 16  # its own blocks, all but the last token
    finally:
        engine.close()


def test_eviction_under_a_tiny_budget_keeps_results_right(hybrid):
    directory, plain = hybrid
    engine = Engine.load(str(directory), prefix_block_size=8, prefix_cache_mb=0)
    try:
        engine.prefix_cache.budget_bytes = 40_000  # a few blocks only: constant eviction
        tok = engine.tokenizer.encode
        prompts = [tok(f"prompt number {i} with a shared beginning and a tail {i * 7}") for i in range(6)]
        for ids in prompts + prompts[::-1]:
            assert engine.generate(ids, max_tokens=6).token_ids == plain.generate(ids, max_tokens=6).token_ids
        assert engine.prefix_cache.nbytes <= 40_000
    finally:
        engine.close()


def test_prompts_of_constrained_requests_are_cached_too(smollm):
    from plait.backends.grammar.constraint import compile_constraint

    cached = Engine(smollm.model, smollm.tokenizer, "prefix-constrained", "llama", prefix_cache=True)
    try:
        for question in QUESTIONS[:2]:
            constraint = compile_constraint(["yes", "no"], smollm.tokenizer, smollm.info.vocab_size)
            result = cached.generate(_prompt(smollm, question), max_tokens=4, constraint=constraint)
            assert result.text in ("yes", "no")
        assert result.usage.cached_tokens >= 64  # the second prompt resumed from the first's blocks
    finally:
        cached.close()


def test_a_hybrid_prefill_leaves_mamba_checkpoints_a_request_resumes_from(hybrid):
    """`Engine.prefill` on a Mamba hybrid: one block per pass, each checkpointed, so a later
    request restores every whole block and its tokens are those of an uncached run."""
    directory, plain = hybrid
    engine = Engine.load(str(directory), prefix_block_size=16)
    try:
        tok = engine.tokenizer.encode
        prefix = tok("the shared instructions of a compiled predictor, pinned at start-up: ")
        engine.prefill(prefix, pin=True).wait()
        whole = len(prefix) // 16 * 16
        assert engine.stats().prefill_tokens_computed == whole
        ids = prefix + tok("and the question?")
        result = engine.generate(ids, max_tokens=10)
        assert result.usage.cached_tokens == whole
        assert result.token_ids == plain.generate(ids, max_tokens=10).token_ids
    finally:
        engine.close()


def test_tokens_a_grammar_forces_after_the_prompt_run_as_prompt_tokens_in_any_pass(smollm):
    """The tokens a grammar forces before anything is sampled (ChatAdapter's first field
    marker) run as prompt tokens, in the prompt's last pass or, when the pass boundary falls
    between them, in a pass of their own. They ran as generated tokens in the second case, so
    on the int4 default (4-bit weights for generated tokens, bf16 for prompt tokens) what the
    prefix cache restored decided which weights ran them, and a greedy answer changed with it
    (a HotPotQA ChainOfThought call asked from 8 threads changed in 2 of 6 runs)."""
    from plait.backends.grammar.constraint import compile_constraint

    engine = Engine(
        smollm.model, smollm.tokenizer, "prefix-forced", "llama", prefix_cache=True, prefill_chunk=32
    )
    try:
        ids = _prompt(engine, QUESTIONS[0])
        block = engine.prefix_cache.block_size
        engine.prefill(ids[: (len(ids) // block - 1) * block]).wait()  # leaves a tail of 17-32 tokens
        passes: list[tuple[bool, int]] = []
        forward = engine.scheduler._forward

        def recorded(first_slot, rows, pass_ids, *args, prompt=False, **kwargs):
            passes.append((prompt, pass_ids.shape[1]))
            return forward(first_slot, rows, pass_ids, *args, prompt=prompt, **kwargs)

        engine.scheduler._forward = recorded
        choices = ["The answer to that is yes, certainly", "The answer to that is no, certainly"]
        constraint = compile_constraint(choices, engine.tokenizer, engine.info.vocab_size)
        result = engine.generate(ids, max_tokens=12, constraint=constraint)
    finally:
        engine.close()
    assert result.text in choices
    tail, forced = len(ids) - result.usage.cached_tokens, 5  # "The answer to that is"
    assert tail <= 32 < tail + forced  # the boundary falls inside the forced tokens
    assert passes[:2] == [(True, 32), (True, tail + forced - 32)]
