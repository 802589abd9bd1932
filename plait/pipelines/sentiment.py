"""Sentiment: SST-2 movie-review sentences -> "negative" | "positive".

Dataset rows are read as they are (`{"text": ..., "label": 0 | 1}`); `from_row` turns the
0/1 label into the words the program outputs, so the metric compares like with like.
The output is a `Literal`: under `plait.ConstrainedAdapter` the model can only emit one of the
two labels, so every prediction parses even on a 135M model.
"""

from __future__ import annotations

from typing import Any, Literal

import dspy

LABELS = ("negative", "positive")


class ClassifySentiment(dspy.Signature):
    """Classify the sentiment of a sentence from a movie review."""

    text: str = dspy.InputField()
    label: Literal["negative", "positive"] = dspy.OutputField()


class Sentiment(dspy.Module):
    """One constrained prediction per sentence; compiling adds few-shot demonstrations."""

    def __init__(self) -> None:
        super().__init__()
        self.classify = dspy.Predict(ClassifySentiment)

    def forward(self, text: str) -> dspy.Prediction:
        return self.classify(text=text)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> dspy.Example:
        label = row["label"]
        if not isinstance(label, str):
            label = LABELS[int(label)]
        return dspy.Example(text=row["text"], label=label).with_inputs("text")
