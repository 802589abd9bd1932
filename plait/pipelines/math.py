"""Math: GSM8K word problems -> an integer answer, reasoning first.

Rows are read as they are (`{question, answer, final}`): `final` (the number after `####`) is
the gold answer; the worked solution in `answer` is kept as `solution`, which labeled demos
can show. The output is typed `int`: under the constrained adapter the model can only write
an integer there, so the exact-match metric compares numbers, not formatting.
"""

from __future__ import annotations

from typing import Any

import dspy


class SolveWordProblem(dspy.Signature):
    """Solve the grade-school math word problem. Reason step by step, then give the final answer
    as a whole number."""

    question: str = dspy.InputField()
    answer: int = dspy.OutputField()


class Math(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.solve = dspy.ChainOfThought(SolveWordProblem)

    def forward(self, question: str) -> dspy.Prediction:
        return self.solve(question=question)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> dspy.Example:
        final = str(row["final"]).replace(",", "").strip()
        return dspy.Example(question=row["question"], answer=int(final)).with_inputs("question")
