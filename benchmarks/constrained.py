"""Constrained decoding on the embedded SmolLM2-135M-Instruct: what the grammar costs and saves.

    .venv/bin/python benchmarks/constrained.py              # 6 rows per signature
    .venv/bin/python benchmarks/constrained.py --rows 2     # smoke run

For DSPy chat-format completions of several signatures on real rows from ../shared/data, each
prompt formatted by DSPy's own ChatAdapter, three peers run in the same process on the same
engine, one request at a time, greedy:

  * constrained       — decoded under the signature's grammar, forced spans appended in one pass
                        each (jump-forward), as plait.ConstrainedAdapter does;
  * no jump-forward   — the same grammar, but every token sampled (forced tokens one pass each);
  * DSPy ChatAdapter  — no grammar at all, what DSPy does with a local model today.

Reported per signature: completion tokens, the share that was forced, forward passes with and
without jump-forward (and the cut), grammar time per decode step (mask + forced) against the
step time, and first-call parse failures with DSPy's ChatAdapter parser (each failure of the
unconstrained peer is a second, JSON-mode call in DSPy). Benchmarks are not tests: this prints
a table and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import dspy
import pydantic
from dspy.utils.exceptions import AdapterParseError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plait.backends.grammar.constraint import TokenConstraint, compile_constraint  # noqa: E402
from plait.backends.runtime.engine import Engine  # noqa: E402
from plait.modules.signature_grammar import GrammarOptions, chat_grammar  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


class Verdict(pydantic.BaseModel):
    stars: int = pydantic.Field(ge=1, le=5)
    headline: str = pydantic.Field(max_length=40)


class TypedReview(dspy.Signature):
    """Classify the movie review."""

    text: str = dspy.InputField()
    positive: bool = dspy.OutputField()
    confidence: float = dspy.OutputField()
    verdict: Verdict = dspy.OutputField()
    keywords: list[str] = dspy.OutputField()


def _rows(name: str, count: int) -> list[dict]:
    with open(DATA / name / "dev.jsonl") as f:
        return [json.loads(line) for _, line in zip(range(count), f)]


def workloads(rows: int) -> dict[str, list[tuple[type[dspy.Signature], dict]]]:
    sentiment = dspy.Signature("text -> sentiment: Literal['negative', 'positive'], confidence: float")
    qa = dspy.Signature("context, question -> answer")
    cot = dspy.ChainOfThought("question -> answer: int").predict.signature
    return {
        "sst2 Literal+float": [(sentiment, {"text": r["text"]}) for r in _rows("sst2", rows)],
        "sst2 typed (bool, model, list)": [(TypedReview, {"text": r["text"]}) for r in _rows("sst2", rows)],
        "squad str": [
            (qa, {"context": r["context"][:1500], "question": r["question"]}) for r in _rows("squad", rows)
        ],
        "gsm8k CoT int": [(cot, {"question": r["question"]}) for r in _rows("gsm8k", rows)],
    }


class Timed:
    """A constraint that times its own work per decode step.

    Without jump-forward it returns no forced span except a budget's close (so free text still
    ends where the constrained peer's does): every grammar-forced token is then sampled, one
    forward pass each, from a mask that allows only the forced text.
    """

    def __init__(self, inner: TokenConstraint, jump_forward: bool = True):
        self.inner, self.jump_forward = inner, jump_forward
        self.seconds, self.steps = 0.0, 0

    def mask(self):
        start = time.perf_counter()
        mask = self.inner.mask()
        self.seconds += time.perf_counter() - start
        self.steps += 1
        return mask

    def forced(self) -> list[int]:
        start = time.perf_counter()
        forced = self.inner.forced()
        if not self.jump_forward and not self.inner.proposed_budget_close:
            forced = []
        self.seconds += time.perf_counter() - start
        return forced

    def advance(self, token_ids: list[int]) -> None:
        start = time.perf_counter()
        self.inner.advance(token_ids)
        self.seconds += time.perf_counter() - start

    def is_finished(self) -> bool:
        return self.inner.is_finished()


@dataclass
class Tally:
    tokens: list[int] = field(default_factory=list)
    forced: list[int] = field(default_factory=list)
    passes: list[int] = field(default_factory=list)
    grammar_ms: list[float] = field(default_factory=list)
    grammar_s: float = 0.0
    wall_s: float = 0.0
    failures: int = 0
    runs: int = 0

    def add(self, result, wall: float, timed: Timed | None, parsed: bool) -> None:
        u = result.usage
        self.tokens.append(u.completion_tokens)
        self.forced.append(u.forced_tokens)
        self.passes.append(u.forward_passes)
        self.wall_s += wall
        if timed is not None and timed.steps:
            self.grammar_ms.append(1000 * timed.seconds / timed.steps)
            self.grammar_s += timed.seconds
        self.failures += not parsed
        self.runs += 1


def run(engine: Engine, signature, inputs, max_tokens: int, mode: str) -> tuple:
    messages = dspy.ChatAdapter().format(signature, [], inputs)
    timed = None
    kwargs = {"max_tokens": max_tokens, "temperature": 0.0}
    if mode != "dspy":
        spec = chat_grammar(signature, GrammarOptions(max_tokens=max_tokens))
        timed = Timed(compile_constraint(spec, engine.tokenizer), jump_forward=mode == "constrained")
        kwargs["constraint"] = timed
    start = time.perf_counter()
    result = engine.chat(messages, **kwargs)
    wall = time.perf_counter() - start
    try:
        dspy.ChatAdapter().parse(signature, result.text)
        parsed = True
    except AdapterParseError:
        parsed = False
    return result, wall, timed, parsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=6, help="rows per signature")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()

    engine = Engine.load(args.model)
    modes = ("constrained", "no jump-forward", "dspy")
    totals = {m: Tally() for m in modes}
    print(f"model {args.model}, {args.rows} rows per signature, max_tokens {args.max_tokens}, greedy\n")
    header = (
        f"{'signature':32} {'tokens':>6} {'forced':>7} {'passes jf':>9} {'no-jf':>6} {'cut':>5} "
        f"{'grammar ms/step':>15} {'% of wall':>9} {'fail: plait':>11} {'dspy':>5}"
    )
    print(header)
    print("-" * len(header))
    for name, cases in workloads(args.rows).items():
        tallies = {m: Tally() for m in modes}
        for signature, inputs in cases:
            for mode in modes:  # interleaved, so background load hits all peers alike
                outcome = run(engine, signature, inputs, args.max_tokens, mode)
                tallies[mode].add(*outcome)
                totals[mode].add(*outcome)
        _row(name, tallies)
    print("-" * len(header))
    _row("all", totals)
    print(
        "\ntokens/forced/passes: mean per completion of the constrained peer (passes include the prompt's);"
        "\n'no-jf' = passes of the same grammar with every forced token sampled one pass each;"
        "\ncut = 1 - passes jf / no-jf; grammar ms/step = mask + forced + advance per sampled token;"
        "\n% of wall = grammar time / generation wall time; fail = completions ChatAdapter.parse rejects"
        "\n(for DSPy's ChatAdapter each one costs a second, JSON-mode call)."
    )


def _row(name: str, tallies: dict[str, Tally]) -> None:
    c, n, d = tallies["constrained"], tallies["no jump-forward"], tallies["dspy"]
    mean = statistics.fmean
    forced_share = sum(c.forced) / max(sum(c.tokens), 1)
    cut = 1 - sum(c.passes) / max(sum(n.passes), 1)
    print(
        f"{name:32} {mean(c.tokens):6.1f} {forced_share:7.0%} {mean(c.passes):9.1f} {mean(n.passes):6.1f} "
        f"{cut:5.0%} {statistics.median(c.grammar_ms):15.3f} {c.grammar_s / c.wall_s:9.2%} "
        f"{c.failures:>5}/{c.runs:<5} {d.failures:>2}/{d.runs}"
    )


if __name__ == "__main__":
    main()
