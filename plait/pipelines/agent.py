"""Agent: ReAct with a calculator and (when an index is given) a search tool.

The model alternates thought -> tool call -> observation for up to `max_iters` steps, then
answers. Under plait's constrained adapter the tool name is one of the tools and the arguments
match the tool's JSON schema, so a small model's tool calls always parse.

Rows: HotPotQA `{question, answer}` or GSM8K `{question, final}` (the number is the answer).
"""

from __future__ import annotations

from typing import Any

import dspy

from plait.pipelines.calculator import calculate
from plait.pipelines.retrieval import ENV_INDEX, Retriever, resolve, search


class AnswerWithTools(dspy.Signature):
    """Answer the question. Use the calculator for arithmetic and search for facts. Give a short
    final answer."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


class Agent(dspy.Module):
    def __init__(
        self,
        index: str | None = None,
        k: int = 3,
        max_iters: int = 4,
        passage_chars: int = 300,
        retriever: Retriever | None = None,
    ) -> None:
        super().__init__()
        import os

        self.index, self.k, self.passage_chars, self.retriever = index, k, passage_chars, retriever
        tools: list[Any] = [dspy.Tool(calculate, name="calculator")]
        if index or retriever is not None or os.environ.get(ENV_INDEX):
            tools.append(dspy.Tool(self.search, name="search"))
        self.react = dspy.ReAct(AnswerWithTools, tools=tools, max_iters=max_iters)

    def search(self, query: str) -> list[str]:
        """Search the knowledge base; returns the most relevant passages."""
        return search(
            resolve(self.index, self.retriever, pipeline="Agent"), query, self.k, self.passage_chars
        )

    def forward(self, question: str) -> dspy.Prediction:
        return self.react(question=question)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> dspy.Example:
        answer = row["final"] if "final" in row else row["answer"]
        return dspy.Example(question=row["question"], answer=str(answer)).with_inputs("question")
