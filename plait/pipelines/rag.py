"""RAG: retrieve passages for the question, answer from them (SQuAD or HotPotQA).

    plait compile plait.pipelines.rag:RAG --program-arg index=idx/hotpotqa \
        --trainset hotpotqa/dev.jsonl --devset ... --metric exact_match

Rows are read as they are: HotPotQA's `{question, answer}`; SQuAD's `{question, answers: [...]}`
becomes `answer` (the first) plus `answers` (all aliases, which the built-in metrics accept).
"""

from __future__ import annotations

from typing import Any

import dspy

from plait.pipelines.retrieval import Retriever, resolve, search


class AnswerFromContext(dspy.Signature):
    """Answer the question using the context. Give a short answer: a few words, often a name,
    date or number, taken from the context."""

    context: list[str] = dspy.InputField(desc="passages that may contain the answer")
    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


def qa_example(row: dict[str, Any]) -> dspy.Example:
    """`{question, answer}` or `{question, answers: [...]}` -> an example with both fields."""
    answers = row.get("answers")
    if answers:
        return dspy.Example(question=row["question"], answer=answers[0], answers=list(answers)).with_inputs(
            "question"
        )
    return dspy.Example(question=row["question"], answer=str(row["answer"])).with_inputs("question")


class RAG(dspy.Module):
    """Retrieve `k` passages, then answer (with `reasoning=True`, think first)."""

    def __init__(
        self,
        index: str | None = None,
        k: int = 3,
        reasoning: bool = False,
        passage_chars: int = 500,
        retriever: Retriever | None = None,
    ) -> None:
        super().__init__()
        self.index, self.k, self.passage_chars, self.retriever = index, k, passage_chars, retriever
        self.answer = (dspy.ChainOfThought if reasoning else dspy.Predict)(AnswerFromContext)

    def forward(self, question: str) -> dspy.Prediction:
        rm = resolve(self.index, self.retriever, pipeline="RAG")
        context = search(rm, question, self.k, self.passage_chars)
        prediction = self.answer(context=context, question=question)
        return dspy.Prediction(context=context, **prediction)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> dspy.Example:
        return qa_example(row)
