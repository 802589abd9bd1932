"""How often the embedded model writes a field's placeholder (`{answer}`) as its value.

ChatAdapter's system prompt shows the output format as `[[ ## answer ## ]]\\n{answer}`, and a
135M model under ConstrainedAdapter copies it. This runs ChainOfThought on shared SST-2 and
SQuAD rows twice in one process, with the grammar that forbids a value that is only its own
placeholder (`GrammarOptions.forbid_placeholders`, the default) and without it, and counts the
text fields (reasoning and answer) whose whole value is the placeholder.

    .venv/bin/python benchmarks/placeholders.py [--rows 12]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import dspy

import plait

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def rows(name: str, count: int) -> list[dict]:
    with (DATA / name / "dev.jsonl").open() as f:
        return [json.loads(line) for _, line in zip(range(count), f)]


def run(forbid: bool, count: int) -> tuple[int, int, float]:
    """(placeholder fields, text fields, seconds) over `count` SST-2 and `count` SQuAD rows."""
    adapter = plait.ConstrainedAdapter(text_tokens=48, reasoning_tokens=64)
    adapter.grammar_options = dataclasses.replace(adapter.grammar_options, forbid_placeholders=forbid)
    sentiment = dspy.ChainOfThought("sentence -> sentiment")
    extract = dspy.ChainOfThought("context, question -> answer")
    copied = fields = 0
    start = time.perf_counter()
    with dspy.context(adapter=adapter):
        outputs = [sentiment(sentence=r["text"]) for r in rows("sst2", count)]
        outputs += [extract(context=r["context"], question=r["question"]) for r in rows("squad", count)]
    for out in outputs:
        for name, value in out.items():
            fields += 1
            copied += str(value).strip() == "{" + name + "}"
    return copied, fields, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=12, help="rows of each dataset")
    args = parser.parse_args()
    dspy.configure(lm=plait.LM("smollm2-135m", cache=False, max_tokens=160))
    before = run(False, args.rows)
    after = run(True, args.rows)
    print(
        f"ChainOfThought under ConstrainedAdapter, SmolLM2-135M, {args.rows} SST-2 + {args.rows} SQuAD rows"
    )
    for label, (copied, fields, seconds) in (
        ("placeholders allowed", before),
        ("forbidden (default)", after),
    ):
        print(f"{label:>22}: {copied}/{fields} text fields were their own placeholder ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
