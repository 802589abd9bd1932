"""What the free-text budgets cost a sampled call: ChainOfThought at temperature 0.7.

A sampled 135M model rarely ends a free-text field by itself, so a call runs until the grammar's
budgets close its fields. This runs ChainOfThought on shared SQuAD rows under ConstrainedAdapter
with the old budgets (reasoning 512, text 256, grace 32) and with the current defaults
(`GrammarOptions`), in one process, and prints seconds and output tokens per call (medians).

    .venv/bin/python benchmarks/sampled_budgets.py [--rows 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import dspy

import plait
from plait.modules.signature_grammar import GrammarOptions

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
OLD = {"reasoning_tokens": 512, "text_tokens": 256, "grace_tokens": 32}


def run(lm: dspy.LM, budgets: dict[str, int], rows: list[dict]) -> tuple[float, float]:
    """Median (seconds, output tokens) of one sampled ChainOfThought call per row."""
    extract = dspy.ChainOfThought("context, question -> answer")
    seconds, tokens = [], []
    with dspy.context(lm=lm, adapter=plait.ConstrainedAdapter(**budgets)):
        for row in rows:
            start = time.perf_counter()
            extract(context=row["context"], question=row["question"])
            seconds.append(time.perf_counter() - start)
            tokens.append(lm.history[-1]["usage"]["completion_tokens"])
    return statistics.median(seconds), statistics.median(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=6)
    args = parser.parse_args()
    with (DATA / "squad" / "dev.jsonl").open() as f:
        rows = [json.loads(line) for _, line in zip(range(args.rows), f)]
    lm = plait.LM("smollm2-135m", cache=False, temperature=0.7, max_tokens=1024)
    defaults = GrammarOptions()
    new = {k: getattr(defaults, k) for k in OLD}
    old_s, old_t = run(lm, OLD, rows)
    new_s, new_t = run(lm, new, rows)
    print(f"ChainOfThought, SmolLM2-135M, temperature 0.7, {args.rows} SQuAD rows, medians per call")
    print(f"  old budgets {OLD}: {old_s:.1f} s, {old_t:.0f} output tokens")
    print(f"  defaults    {new}: {new_s:.1f} s, {new_t:.0f} output tokens ({old_s / new_s:.2f}x faster)")


if __name__ == "__main__":
    main()
