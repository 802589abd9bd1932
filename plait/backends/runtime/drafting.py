"""Drafting for speculative decoding: cheap guesses of a row's next tokens, and how many to guess.

A draft costs little to make and is checked exactly: the scheduler feeds the row's pending
tokens and the draft in one multi-token pass and keeps the drafted tokens the model itself
would have produced (see `Scheduler._verify`). A good draft turns k one-token passes into one
pass of k + 1 tokens; a bad one costs a slightly wider pass, so `DraftLength` stops a row from
drafting while its drafts keep failing.

`PromptLookup` is the model-free drafter (n-gram prompt lookup): DSPy programs copy a great
deal — extraction and RAG answers quote the context, JSON output echoes keys and values — so
the continuation of the latest n-gram's previous occurrence is often exactly what comes next.
"""

import argparse
from dataclasses import dataclass
from typing import Any, Protocol

SPECULATIVE_METHODS = ("ngram", "mtp")
"""What `speculative=` accepts: prompt lookup, or the checkpoint's own MTP heads."""

MIN_NGRAM = 2
"""Shortest suffix looked up: a single token matches too often to predict what follows it."""

MAX_NGRAM = 4
"""Longest suffix looked up (the longest match wins; longer ones add cost, not hits)."""

MAX_BACKOFF_STEPS = 32
"""A row whose drafts keep failing waits at most this many steps before drafting again."""


class Drafter(Protocol):
    """What the scheduler asks of a row's drafter."""

    def propose(self, output_ids: list[int], count: int) -> list[int]:
        """Up to `count` tokens likely to follow the prompt and `output_ids` (the row's output
        so far; it only grows, and its last tokens are the ones about to be fed)."""
        ...


class PromptLookup:
    """Proposes the tokens that followed the most recent earlier occurrence of the context's
    last n tokens (n from `MAX_NGRAM` down to `MIN_NGRAM`), in the prompt or the output so far.

    The index maps each n-gram to where its latest occurrence ends and is built incrementally
    as the output grows, one lag behind the end: the suffix being looked up is not yet in it,
    so a lookup finds the occurrence before it.
    """

    def __init__(self, prompt_ids: list[int]):
        self.tokens: list[int] = list(prompt_ids)
        self._prompt_length = len(prompt_ids)
        self._ends: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # n-grams ending at positions <= this are in `_ends`

    def propose(self, output_ids: list[int], count: int) -> list[int]:
        """Up to `count` tokens to follow prompt + `output_ids` (the output only grows)."""
        tokens = self.tokens
        tokens.extend(output_ids[len(tokens) - self._prompt_length :])
        self._index_until(len(tokens) - 1)
        for n in range(min(MAX_NGRAM, len(tokens) - 1), MIN_NGRAM - 1, -1):
            end = self._ends.get(tuple(tokens[-n:]))
            if end is not None:
                return tokens[end : end + count]
        return []

    def _index_until(self, last_end: int) -> None:
        """Index the n-grams that end at positions `_indexed + 1 .. last_end` (exclusive ends)."""
        tokens = self.tokens
        for end in range(max(self._indexed + 1, MIN_NGRAM), last_end + 1):
            for n in range(MIN_NGRAM, min(MAX_NGRAM, end) + 1):
                self._ends[tuple(tokens[end - n : end])] = end
        self._indexed = max(self._indexed, last_end)


@dataclass
class DraftLength:
    """How many tokens a row drafts next, from how its last drafts fared.

    A fully accepted draft earns one more token (up to `limit`); a partly accepted one shrinks
    to what was accepted plus one. A draft with nothing accepted also makes the row skip
    drafting for a while, twice as long after each further failure (up to `MAX_BACKOFF_STEPS`),
    so free text the drafter cannot predict runs at plain decoding's speed.

    `rate(prior)` is the chance that the row's next drafted token is kept: its kept tokens
    against its drafts cut short, starting from two pseudo-drafts at `prior` (the engine's
    rate over every row so far, so a new row starts where its kind of work stands).
    """

    limit: int
    current: int = 0
    failures: int = 0
    wait: int = 0
    kept: int = 0
    cut: int = 0

    def __post_init__(self) -> None:
        self.current = self.current or self.limit

    def wanted(self) -> int:
        """Tokens to draft this step (0: not this step)."""
        if self.wait > 0:
            self.wait -= 1
            return 0
        return self.current

    def rate(self, prior: float) -> float:
        return (self.kept + 2 * prior) / (self.kept + self.cut + 2)

    def record(self, drafted: int, accepted: int) -> None:
        self.kept += accepted
        self.cut += accepted < drafted
        if accepted == drafted:
            self.current = min(self.current + 1, self.limit)
            self.failures = 0
            return
        self.current = max(1, accepted + 1)
        if accepted:
            self.failures = 0
            return
        self.failures += 1
        self.wait = min(2**self.failures - 1, MAX_BACKOFF_STEPS)


MARGIN = 1.05
"""Drafts must promise this much more speed than they risk: a wrong estimate costs less."""


def expected_kept(rate: float, drafted: int) -> float:
    """Tokens expected to be kept of `drafted`, each kept with chance `rate` if all before it were."""
    return sum(rate**j for j in range(1, drafted + 1))


def best_length(line: tuple[float, float], decoding: int, longest: int, rate: float) -> int:
    """The draft length (0..longest) that gives one of `decoding` rows the most tokens per
    second: its share of a plain step is fixed / decoding + per_token, and each drafted token
    adds per_token and `rate`^j expected tokens."""
    fixed, per_token = line
    share = fixed / decoding + per_token
    speeds = [(1 + expected_kept(rate, d)) / (share + per_token * d) for d in range(longest + 1)]
    return max(range(longest + 1), key=lambda d: (speeds[d] > MARGIN * speeds[0], speeds[d]))


def draft_plan(
    line: tuple[float, float] | None, decoding: int, drafts: list[int], expected: list[float]
) -> str:
    """How a step with drafts should run, if at all: `decoding` rows each feed one token, of
    which the drafting ones add `drafts[i]` tokens expected to keep `expected[i]`.

    "plain": drop the drafts (one decode pass of `decoding` tokens pays better); "separate": a
    pass of the drafting rows padded to the longest draft, plus a decode pass for the others;
    "merged": one pass with the others padded to the longest draft too (padding costs
    positions, a second pass costs its fixed part). Costs come from `line` (`PassCosts.line()`:
    fixed seconds per pass, seconds per position); with no line yet, drafts run "separate"."""
    if not drafts:
        return "plain"
    if line is None:
        return "separate"
    fixed, per_token = line
    width = 1 + max(drafts)
    others = decoding - len(drafts)
    separate = fixed + per_token * len(drafts) * width + (fixed + per_token * others if others else 0.0)
    merged = fixed + per_token * decoding * width
    best = min(separate, merged)
    if (decoding + sum(expected)) * (fixed + per_token * decoding) <= MARGIN * decoding * best:
        return "plain"
    return "merged" if merged < separate else "separate"


def padding_pays(line: tuple[float, float] | None, padding: int) -> bool:
    """Whether padding a pass by `padding` positions costs less than running a second pass
    (None: no costs known yet; then padding is kept to a quarter of a pass by the caller)."""
    return line is not None and padding * line[1] < line[0]


def add_speculation_arguments(parser: argparse.ArgumentParser) -> None:
    """`--speculative` and `--draft-tokens`, for the commands that load an engine."""
    parser.add_argument(
        "--speculative",
        choices=SPECULATIVE_METHODS,
        default=None,
        help="speculative decoding: draft tokens by prompt lookup (ngram) or the checkpoint's MTP "
        "heads (mtp) and verify them in one pass; the output tokens are the same",
    )
    parser.add_argument(
        "--draft-tokens", type=int, default=4, help="most tokens a sequence drafts per step (default 4)"
    )


def speculation_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options `add_speculation_arguments` set (none when speculation is off)."""
    if args.speculative is None:
        return {}
    return {"speculative": args.speculative, "draft_tokens": args.draft_tokens}
