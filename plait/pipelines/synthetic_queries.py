"""Synthetic queries: passage -> a search query it answers (InPars-style data for `plait index tune`).

    writer = QueryWriter(plait.LM("smollm2-135m"))
    writer(["Hamlet is a tragedy written by William Shakespeare ..."])   # ["who wrote hamlet"]

`WriteQuery` is an ordinary DSPy program, so it can be compiled like any other (demos of good
queries for a corpus lift a small model most); `QueryWriter` runs it over many passages at once
under `plait.ConstrainedAdapter`: the query field is decoded under its grammar with a small
token budget, so every answer parses and none runs on, and the passages arrive at the engine
concurrently, which batches their decode steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import dspy

from plait.modules.adapter import ConstrainedAdapter

#: Passages are cut to this many characters: the prompt (prefill) is most of a query's cost on
#: CPU, and a query is about a passage's first sentences far more often than its last ones.
PASSAGE_CHARS = 600
#: Tokens of the query field: SciFact's and HotPotQA's questions are 10-25 tokens.
QUERY_TOKENS = 32


class PassageToQuery(dspy.Signature):
    """Write a search query that the passage answers: a short question or claim a reader
    would type into a search engine to find this passage. Use the passage's key terms."""

    passage: str = dspy.InputField()
    query: str = dspy.OutputField(desc="one line, under 20 words")


class WriteQuery(dspy.Module):
    """One constrained prediction per passage; compiling adds demonstrations.

    Zero-shot on purpose: with a hand-written demonstration SmolLM2-135M copied the demo's
    query for a third of 50 SciFact passages; without, it mostly restates the passage's title or
    first sentence (which the tuner's filter keeps when the passage ranks first for it)."""

    def __init__(self) -> None:
        super().__init__()
        self.write = dspy.Predict(PassageToQuery)

    def forward(self, passage: str) -> dspy.Prediction:
        return self.write(passage=passage)


def clip(passage: str, chars: int = PASSAGE_CHARS) -> str:
    """The passage cut at a word boundary to at most `chars` characters."""
    text = " ".join(passage.split())
    return text if len(text) <= chars else text[:chars].rsplit(" ", 1)[0]


class QueryWriter:
    """Passages -> one query each, generated `threads` at a time on `lm` (a plait LM).

    A call is deterministic: greedy decoding, and DSPy's cache off so a rerun after a crash
    really generates (the index's query file, not DSPy's cache, is what makes tuning resumable).
    """

    def __init__(
        self,
        lm: dspy.LM,
        program: dspy.Module | None = None,
        threads: int = 16,
        passage_chars: int = PASSAGE_CHARS,
        query_tokens: int = QUERY_TOKENS,
    ) -> None:
        # Greedy and uncached: see the class docstring.
        self.lm = lm.copy(temperature=0.0, max_tokens=query_tokens + 16, cache=False)
        self.program = program or WriteQuery()
        self.threads = threads
        self.passage_chars = passage_chars
        self.adapter = ConstrainedAdapter(text_tokens=query_tokens, grace_tokens=0)

    @property
    def name(self) -> str:
        """What the index manifest records as the generator."""
        return f"{type(self.program).__name__} on {self.lm.model}"

    def _one(self, passage: str) -> str:
        with dspy.context(lm=self.lm, adapter=self.adapter):
            prediction = self.program(passage=clip(passage, self.passage_chars))
        return " ".join(str(prediction.query).split())

    def __call__(self, passages: Sequence[str]) -> list[str]:
        if len(passages) <= 1 or self.threads == 1:
            return [self._one(p) for p in passages]
        with ThreadPoolExecutor(
            max_workers=min(self.threads, len(passages)), thread_name_prefix="plait-qgen"
        ) as pool:
            return list(pool.map(self._one, passages))
