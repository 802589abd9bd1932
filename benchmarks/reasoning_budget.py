"""What a thinking budget costs: forward passes and wall time of a ChainOfThought call.

A tiny random hybrid (Mamba + attention + MLP, Nano-9B-v2's chat dialect, from
tests/chat_fixtures.py) answers `dspy.ChainOfThought("question -> answer: int")` through
`plait.LM(reasoning=...)` with budgets 0, 64 and 256 thinking tokens, beside the same call with
thinking off (the template's own `<think></think>`), which is the peer each row is divided by.
A random model never closes its block on its own, so every budget is spent in full: the rows
show the cost of the budget itself, and that `</think>` is forced on time.

    .venv/bin/python benchmarks/reasoning_budget.py [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ holds the fixture writer

import dspy

import plait
from plait.backends.runtime.engine import Engine
from tests.chat_fixtures import write_chat_checkpoint

SETTINGS = ("off", 0, 64, 256)


def measure(engine: Engine, directory: Path, setting: object, runs: int) -> dict[str, float]:
    lm = plait.LM(str(directory), reasoning=setting, cache=False, max_tokens=700)
    lm.engine._engine = engine
    adapter = plait.ConstrainedAdapter(reasoning_tokens=32, text_tokens=32)
    predict = dspy.ChainOfThought("question -> answer: int")
    seconds, passes, thinking = [], [], []
    with dspy.context(lm=lm, adapter=adapter):
        for i in range(runs + 1):  # the first call warms the grammar cache
            before, start = engine.stats(), time.perf_counter()
            predict(question=f"What is {i} times 7?")
            if i == 0:
                continue
            seconds.append(time.perf_counter() - start)
            passes.append(engine.stats().since(before).passes)
            reasoning = lm.history[-1]["outputs"][0]
            text = reasoning.get("reasoning_content", "") if isinstance(reasoning, dict) else ""
            thinking.append(len(engine.tokenizer.encode(text)) if text else 0)
    return {
        "seconds": statistics.median(seconds),
        "passes": statistics.median(passes),
        "thinking_tokens": statistics.median(thinking),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        write_chat_checkpoint(directory, "nano_v2", "dense")
        engine = Engine.load(str(directory))
        try:
            rows = {setting: measure(engine, directory, setting, args.runs) for setting in SETTINGS}
        finally:
            engine.close()
    base = rows["off"]
    print(f"ChainOfThought on a tiny hybrid (nano_v2 dialect), median of {args.runs} calls, 1 process")
    header = ("reasoning", "thinking tok", "passes", "wall ms", "x off (passes)", "x off (wall)")
    print(" ".join(f"{h:>14}" for h in header))
    for setting, row in rows.items():
        cells = (
            str(setting),
            f"{row['thinking_tokens']:.0f}",
            f"{row['passes']:.0f}",
            f"{row['seconds'] * 1000:.1f}",
            f"{row['passes'] / base['passes']:.2f}",
            f"{row['seconds'] / base['seconds']:.2f}",
        )
        print(" ".join(f"{c:>14}" for c in cells))


if __name__ == "__main__":
    main()
