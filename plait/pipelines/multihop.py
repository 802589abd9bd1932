"""MultiHop: the DSPy paper's multi-hop QA program, for HotPotQA.

Each hop writes a search query from the question and what has been found so far, retrieves
`k` passages and adds the new ones to the context; the answer is generated from the context
gathered over all hops. Compiling gives each hop's query writer its own demonstrations.

After each hop the answer's prompt so far (its instructions, demos and the passages found) is
known: under `plait serve` it is prefilled in the engine's idle time (`prefill_stage`), so the
answer call computes only what the last hop added.
"""

from __future__ import annotations

from typing import Any

import dspy

from plait.modules.prefill import prefill_stage
from plait.pipelines.rag import AnswerFromContext, qa_example
from plait.pipelines.retrieval import Retriever, resolve, search


class WriteSearchQuery(dspy.Signature):
    """Write a short search query that finds the missing information needed to answer the question."""

    context: list[str] = dspy.InputField(desc="passages found so far")
    question: str = dspy.InputField()
    query: str = dspy.OutputField()


class MultiHop(dspy.Module):
    def __init__(
        self,
        index: str | None = None,
        hops: int = 2,
        k: int = 2,
        passage_chars: int = 400,
        retriever: Retriever | None = None,
    ) -> None:
        super().__init__()
        self.index, self.k, self.passage_chars, self.retriever = index, k, passage_chars, retriever
        self.write_query = [dspy.Predict(WriteSearchQuery) for _ in range(hops)]
        self.answer = dspy.Predict(AnswerFromContext)

    def forward(self, question: str) -> dspy.Prediction:
        rm = resolve(self.index, self.retriever, pipeline="MultiHop")
        context: list[str] = []
        queries: list[str] = []
        for write_query in self.write_query:
            query = write_query(context=context, question=question).query.strip() or question
            queries.append(query)
            for passage in search(rm, query, self.k, self.passage_chars):
                if passage not in context:
                    context.append(passage)
            prefill_stage(self.answer, context=context, question=question)  # its prompt so far
        prediction = self.answer(context=context, question=question)
        return dspy.Prediction(context=context, queries=queries, **prediction)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> dspy.Example:
        return qa_example(row)
