"""What the free-text budgets cost a sampled call: ChainOfThought at temperature 0.7.

A sampled 135M model rarely ends a free-text field by itself, so a call runs until the grammar's
budgets close its fields, unless the end-of-field hint (`GrammarOptions.hint_from`) gets it to
end them first. This runs ChainOfThought on shared SQuAD rows under ConstrainedAdapter with the
old budgets (reasoning 512, text 256, grace 32), with the current default budgets but the hint
off, and with the current defaults (`GrammarOptions`), in one process, and prints seconds and
output tokens per call (medians). Each row's call has its own seed, the same in every run, so
runs differ only where their budgets or the hint change a choice. `--no-old` skips the old
budgets.

    .venv/bin/python benchmarks/sampled_budgets.py [--rows 6] [--no-old]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import dspy

import plait
from plait.modules.signature_grammar import GrammarOptions

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
OLD = {"reasoning_tokens": 512, "text_tokens": 256, "grace_tokens": 32}


def run(lm: dspy.LM, budgets: dict[str, int], rows: list[dict], hint: bool = True) -> tuple[float, float]:
    """Median (seconds, output tokens) of one sampled ChainOfThought call per row. The old
    budgets predate the hint: `hint=False` runs them (or the defaults) without it."""
    extract = dspy.ChainOfThought("context, question -> answer")
    adapter = plait.ConstrainedAdapter(**budgets)
    if not hint:
        adapter.grammar_options = dataclasses.replace(adapter.grammar_options, hint_from=0.0)
    seconds, tokens = [], []
    with dspy.context(lm=lm, adapter=adapter):
        for seed, row in enumerate(rows):
            start = time.perf_counter()
            extract(context=row["context"], question=row["question"], config={"seed": seed})
            seconds.append(time.perf_counter() - start)
            tokens.append(lm.history[-1]["usage"]["completion_tokens"])
    return statistics.median(seconds), statistics.median(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=6)
    parser.add_argument("--no-old", action="store_true", help="skip the old budgets")
    args = parser.parse_args()
    with (DATA / "squad" / "dev.jsonl").open() as f:
        rows = [json.loads(line) for _, line in zip(range(args.rows), f)]
    lm = plait.LM("smollm2-135m", cache=False, temperature=0.7, max_tokens=1024)
    defaults = GrammarOptions()
    new = {k: getattr(defaults, k) for k in OLD}
    print(f"ChainOfThought, SmolLM2-135M, temperature 0.7, {args.rows} SQuAD rows, medians per call")
    if not args.no_old:
        old_s, old_t = run(lm, OLD, rows, hint=False)
        print(f"  old budgets {OLD}, no hint: {old_s:.1f} s, {old_t:.0f} output tokens")
    off_s, off_t = run(lm, new, rows, hint=False)
    print(f"  defaults    {new}, no hint: {off_s:.1f} s, {off_t:.0f} output tokens")
    on_s, on_t = run(lm, new, rows)
    print(
        f"  defaults    {new}, hint from {defaults.hint_from}: {on_s:.1f} s, {on_t:.0f} output tokens "
        f"({off_s / on_s:.2f}x faster than no hint)"
    )


if __name__ == "__main__":
    main()
