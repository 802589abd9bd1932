"""The runtime's parts on their own: the incremental detokenizer, batched sampling, the state
pool's blocks and the cancellation scope. (The engine end to end: test_engine.py,
test_engine_isolation.py.)"""

import random
import subprocess
import sys

import pytest
import torch

from plait.backends.models.state import SEQ, StateSpec
from plait.backends.runtime.cancellation import CancelScope, current_scope
from plait.backends.runtime.detokenizer import IncrementalDetokenizer
from plait.backends.runtime.sampling import SamplingParams, sample_rows
from plait.backends.runtime.state_pool import TOKEN_BLOCK, StatePool
from plait.errors import MemoryBudgetError, RequestCancelledError
from tests.constrained_fixtures import smollm2_tokenizer

TOKENIZER = smollm2_tokenizer()


class CountingDecode:
    """The tokenizer's decode, counting how many ids it was asked to decode in all."""

    def __init__(self) -> None:
        self.ids = 0
        self.calls = 0

    def __call__(self, ids: list[int]) -> str:
        self.ids += len(ids)
        self.calls += 1
        return TOKENIZER.decode(ids)


def _random_output(length: int, seed: int) -> list[int]:
    """Token ids of real text with multi-byte characters (split over byte tokens) and spaces."""
    rng = random.Random(seed)
    words = ["the", " ocean", " café", " naïve", " 東京", " 🌊", "\n", " résumé", ",", " ünïcödé"]
    text = "".join(rng.choice(words) for _ in range(length))
    return TOKENIZER.encode(text)


def _detokenize(ids: list[int], stop=(), step: int = 1, decode=None) -> tuple[str, str]:
    """(text, everything streamed) when `ids` arrive `step` at a time."""
    detok = IncrementalDetokenizer(decode or TOKENIZER.decode, stop)
    streamed = "".join(detok.add(ids[i : i + step]) for i in range(0, len(ids), step))
    streamed += detok.finish()
    return detok.text, streamed


@pytest.mark.parametrize("seed", range(5))
def test_detokenizer_text_equals_decoding_everything(seed):
    ids = _random_output(300, seed)
    for step in (1, 3):
        text, streamed = _detokenize(ids, step=step)
        assert text == TOKENIZER.decode(ids) == streamed


def test_detokenizer_cost_is_linear_in_the_output():
    """Decoding a 4,000-token output asks the tokenizer for a few ids per token, not the whole
    output again per token (that would be ~8 million ids here)."""
    ids = _random_output(2000, 7)
    assert len(ids) > 3000
    decode = CountingDecode()
    text, _ = _detokenize(ids, decode=decode)
    assert text == TOKENIZER.decode(ids)
    assert decode.ids <= 8 * len(ids), decode.ids
    assert decode.calls <= 2 * len(ids) + 2


def test_detokenizer_stop_strings_cut_the_text_and_hold_back_their_start():
    ids = TOKENIZER.encode("The answer is 42. END of story")
    text, streamed = _detokenize(ids, stop=("END",))
    assert text == streamed == "The answer is 42. "
    # the text stops at the first stop string to appear; among those that appear in the same
    # piece of text, the first one listed wins
    assert _detokenize(ids, stop=("story", "42"))[0] == "The answer is "
    assert _detokenize(ids, stop=("story", "42"), step=len(ids))[0] == "The answer is 42. END of "
    detok = IncrementalDetokenizer(TOKENIZER.decode, ("END",))
    pieces = [detok.add([i]) for i in TOKENIZER.encode("x E")]
    assert "".join(pieces) == "x"  # " E" may begin "END": held back until it cannot
    assert detok.add(TOKENIZER.encode("ND")) == " " and detok.stopped and detok.text == "x "


def test_detokenizer_holds_an_incomplete_character_until_it_completes():
    ids = TOKENIZER.encode("🌊")
    assert len(ids) > 1  # a 4-byte character over several byte tokens
    detok = IncrementalDetokenizer(TOKENIZER.decode)
    assert [detok.add([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1:]) == "🌊"
    cut = IncrementalDetokenizer(TOKENIZER.decode)
    cut.add(ids[:1])
    assert cut.finish() == TOKENIZER.decode(ids[:1])  # at the end, what there is, as decoded


def test_sampling_a_batch():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    logits[2] = float("nan")
    logits[3] = float("-inf")  # a grammar that allows nothing
    params = [
        SamplingParams(),
        SamplingParams(temperature=1e-40),
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=0.8),
    ]
    tokens = sample_rows(logits, params, [None, None, torch.Generator(), torch.Generator()])
    assert tokens[0] == int(logits[0].argmax()) and tokens[1] == int(logits[1].argmax())
    assert tokens[2] is None and tokens[3] is None  # those rows fail alone


def test_a_sampled_row_does_not_depend_on_its_batch():
    logits = torch.randn(6, 100, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=1.0, top_k=20, top_p=0.9)] * 6
    alone = sample_rows(logits[3:4], params[:1], [torch.Generator().manual_seed(5)])
    together = sample_rows(logits, params, [torch.Generator().manual_seed(s) for s in (1, 2, 3, 5, 6, 7)])
    assert together[3] == alone[0]


def test_nan_temperature_is_refused():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=float("nan"))


def _kv_pool(budget_mb: float | None = None) -> StatePool:
    spec = {"k": StateSpec((2, SEQ, 16), torch.float32)}  # 128 bytes a token
    budget = None if budget_mb is None else int(budget_mb * 2**20)
    return StatePool([spec, dict(spec)], max_length=4096, budget_bytes=budget)


def test_the_pool_grows_and_shrinks_in_blocks_and_keeps_its_contents():
    pool = _kv_pool()
    pool.fit(3, 300)
    assert pool.slots >= 3 and pool.capacity >= 300 and pool.capacity % TOKEN_BLOCK == 0
    pool.layers[0]["k"][2, :, 299] = 7.0
    grown = pool.nbytes()
    pool.fit(3, 301)  # a token more: no reallocation
    assert pool.nbytes() == grown
    pool.fit(30, 2000)
    assert pool.slots >= 30 and pool.capacity >= 2000 and pool.layers[0]["k"][2, :, 299].eq(7).all()
    pool.fit(3, 300)  # the burst is over: memory goes back
    assert pool.nbytes() < grown * 2 and pool.layers[0]["k"][2, :, 299].eq(7).all()
    pool.fit(0, 1)
    assert pool.slots * pool.capacity <= 4 * TOKEN_BLOCK


def test_the_pool_stays_in_its_budget():
    pool = _kv_pool(budget_mb=1)  # 4,096 token-slots of 256 bytes (2 layers x 128)
    assert pool.fits(2, 2000) and not pool.fits(3, 2000)
    pool.fit(2, 2000)  # fits exactly: rounding up for growth room must not leave the budget
    assert pool.nbytes() <= 2**20
    with pytest.raises(MemoryBudgetError, match="budget"):
        pool.fit(3, 2000)


def test_a_cancel_scope_cancels_what_was_submitted_in_it_and_refuses_more():
    class Handle:
        def __init__(self):
            self.cancelled, self.done = False, False

        def release(self):
            self.cancelled = True

    first, second = Handle(), Handle()
    with CancelScope() as scope:
        assert current_scope() is scope
        scope.register(first)
        scope.check()
        scope.cancel()
        assert first.cancelled
        with pytest.raises(RequestCancelledError):
            scope.check()
        scope.register(second)  # registered after the cancel: cancelled at once
        assert second.cancelled
    assert current_scope() is None


def test_free_heap_pages_go_back_to_the_os():
    """A fragmented heap (most blocks freed, a few kept between them) keeps its pages until
    `release_free_memory` gives them back. In a child process: the test's own heap is left alone."""
    code = (
        "from plait.backends.runtime.host_memory import release_free_memory\n"
        "def rss():\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('RssAnon'))\n"
        "blocks = [bytearray(64 * 1024) for _ in range(4000)]\n"
        "keep = blocks[::50]\n"
        "del blocks\n"
        "before = rss()\n"
        "released = release_free_memory()\n"
        "print(released, (before - rss()) // 1024)\n"
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    out = child.stdout.split()
    assert out[0] == "True" and int(out[1]) > 150, out  # MiB given back of the ~250 freed
