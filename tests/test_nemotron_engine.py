"""A tiny Nemotron-H checkpoint directory end to end: registry → loader → scheduler → tokens.

The scheduler moves sequences between slots and batches their decode steps; with Mamba layers
that means conv/SSM state travels too. Greedy tokens must equal transformers' `generate`.
"""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from plait.backends.runtime.engine import Engine
from tests.nemotron_fixtures import write_checkpoint


def _byte_tokenizer(directory) -> None:
    """A 256-token byte-level vocabulary (no merges) so any text maps into the tiny model's ids."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(directory / "tokenizer.json"))
    eos = sorted(alphabet)[2]
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "eos_token": eos,
                "chat_template": (
                    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
                ),
            }
        )
    )


@pytest.fixture(scope="module", params=["dense", "moe"])
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = write_checkpoint(directory, request.param, seed=5)
    _byte_tokenizer(directory)
    engine = Engine.load(str(directory))
    yield engine, hf_model
    engine.close()


def _reference(hf_model, ids: list[int], max_tokens: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=2, pad_token_id=0
        )
    tokens = out[0, len(ids) :].tolist()
    return tokens[: tokens.index(2)] if 2 in tokens else tokens


def test_engine_greedy_equals_transformers(checkpoint):
    engine, hf_model = checkpoint
    assert engine.info.family == "nemotron_h"
    ids = engine.tokenizer.encode(engine.chat_prompt([{"role": "user", "content": "hello mamba"}]))
    assert engine.generate(ids, max_tokens=20).token_ids == _reference(hf_model, ids, 20)


def test_concurrent_requests_match_transformers_one_by_one(checkpoint):
    engine, hf_model = checkpoint
    prompts = ["a", "the quick brown fox", "jumps over", "the lazy dog, twice over", "zz", "mixture"]
    budgets = [3, 17, 9, 20, 5, 12]  # different finishing times: rows are moved between slots
    ids = [engine.tokenizer.encode(p) for p in prompts]
    expected = [_reference(hf_model, i, n) for i, n in zip(ids, budgets)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(lambda a: engine.generate(a[0], max_tokens=a[1]).token_ids, zip(ids, budgets)))
    assert got == expected


def test_chunked_prefill_in_the_scheduler(checkpoint):
    engine, hf_model = checkpoint
    small = Engine(engine.model, engine.tokenizer, "chunks", "nemotron_h", prefill_chunk=5)
    try:
        ids = engine.tokenizer.encode("a prompt long enough to need several chunks of five")
        assert small.generate(ids, max_tokens=10).token_ids == _reference(hf_model, ids, 10)
    finally:
        small.close()


def _submit_together(engine: Engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy tokens of prompts submitted at once (admitted in one scheduler step, normally)."""
    requests = [engine.submit(ids, max_tokens=max_tokens) for ids in prompts]
    return [r.wait().token_ids for r in requests]


def test_prompts_arriving_together_share_padded_prefill_passes(checkpoint):
    """Mamba state does not absorb the padding of a multi-row pass, so a hybrid batches
    concurrent prompts of different lengths into one prefill pass like an attention-only
    model, with exactly the tokens of one-by-one generation; padding is not counted as
    computed tokens."""
    engine, _ = checkpoint
    padded = Engine(engine.model, engine.tokenizer, "padded", "nemotron_h", prefix_cache=False)
    try:
        assert padded.scheduler.padded_passes
        prompts = [engine.tokenizer.encode(f"one fact about the number {7**n}, please") for n in range(6)]
        assert len({len(p) for p in prompts}) > 1
        alone = [padded.generate(ids, max_tokens=8).token_ids for ids in prompts]
        before = padded.stats()
        assert _submit_together(padded, prompts, 8) == alone
        stats = padded.stats().since(before)
        assert stats.multi_token_passes < len(prompts)
        assert stats.multi_token_padding > 0
        assert stats.multi_token_tokens == sum(len(p) for p in prompts)
    finally:
        padded.close()


def test_padded_passes_with_the_prefix_cache(checkpoint):
    """With the prefix cache, a hybrid's passes stop at block boundaries and each row's Mamba
    state is checkpointed after its pass: padded passes must leave exactly the rows' states
    there. Prompts prefilled together, then longer prompts resuming from those checkpoints
    (also together), give the tokens of an engine without a cache."""
    engine, _ = checkpoint
    plain = Engine(engine.model, engine.tokenizer, "plain", "nemotron_h", prefix_cache=False)
    cached = Engine(engine.model, engine.tokenizer, "cached", "nemotron_h", prefix_block_size=16)
    try:
        tok = engine.tokenizer.encode
        bases = [
            tok(f"{word} is where the story of this prompt starts; it goes on {n} times")
            for n, word in enumerate(["north", "south-west", "east", "far west", "up"])
        ]
        longer = [ids + tok(f" and then some more, {n}") for n, ids in enumerate(bases)]
        for prompts in (bases, longer):
            expected = [plain.generate(ids, max_tokens=6).token_ids for ids in prompts]
            before = cached.stats()
            assert _submit_together(cached, prompts, 6) == expected
            stats = cached.stats().since(before)
            assert stats.multi_token_padding > 0
        assert cached.prefix_cache.hit_tokens >= 16 * len(longer)  # the second round resumed
    finally:
        plain.close()
        cached.close()
