"""Speculative decoding (prompt lookup) on vs off, same run: decode speed, passes, exactness.

DSPy programs copy: extraction and RAG answers quote their context, JSON echoes the prompt.
`speculative="ngram"` drafts the continuation of the latest n-gram's earlier occurrence and
verifies it in one multi-token pass, so a copied span costs one pass per draft instead of one
per token. This measures what that buys on SmolLM2-135M (fp32, CPU), greedy, for four tasks:

* squad:  SQuAD extraction, `context, question -> answer` (copy the answering sentence) under
          `plait.ConstrainedAdapter`;
* hotpot: HotPotQA answers from the gold supporting paragraphs (`AnswerFromContext` of
          plait.pipelines.rag) under `plait.ConstrainedAdapter`;
* json:   a JSON-schema echo of a SQuAD row (title, question, the answering sentence);
* free:   "Write a short story about ..." with no grammar (prompt lookup rarely helps here;
          the goal is that it costs nothing).

The DSPy tasks run once through `plait.LM` with and without speculation (their completion
texts must match), and the prompts and grammars the adapter produced are recorded; every
timed run then submits those same prompts and grammars straight to the two engines (plain and
speculative, loaded side by side), as one request (batch 1) or eight at once (batch 8),
alternating which engine goes first.

Measured per run, from the streamed deltas of each request: decode tok/s = output tokens made
after every row of the run had its first token / seconds from then to the run's end (prefill
left out: it is the same work with or without drafts); e2e tok/s counts all output tokens over
the whole run (the prompts are already in both engines' prefix caches after the reference
run, so e2e is close to decode). Output tokens include the ones a grammar forces (the DSPy
field markers). ratio and e2e are medians of the paired on/off ratios (one pair per row at
batch 1, per repeat at batch 8); the tok/s columns are medians of the runs. passes/tok = model
passes (prefill included) per output token, ms/pass = forward seconds per pass, accept =
accepted / drafted tokens, tok/req = output tokens per request. Outputs must be
token-identical: a request that is not is printed with its first differing token, and the
script exits non-zero.

    .venv/bin/python benchmarks/speculative.py [--rows 6] [--draft-tokens 4 | 2,4,6]
        [--tasks squad,hotpot,json,free] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import dspy

import plait
from plait.backends.grammar.constraint import TokenConstraint, compile_constraint
from plait.backends.runtime.engine import Engine
from plait.backends.runtime.request import Request
from plait.backends.runtime.turn import ChatTurn
from plait.pipelines.rag import AnswerFromContext

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MODEL = "smollm2-135m"
TASKS = ("squad", "hotpot", "json", "free")
MAX_TOKENS = {"squad": 64, "hotpot": 64, "json": 96, "free": 96}
BATCH = 8
GOALS = {("squad", 1): 1.6, ("squad", BATCH): 1.2, ("free", 1): 0.97, ("free", BATCH): 0.97}
"""Minimum decode tok/s ratio (on/off) the issue asks for."""

EXTRACT = dspy.Signature(
    "context, question -> answer",
    "Copy, word for word, the sentence of the context that answers the question.",
)
TOPICS = [
    "a lighthouse keeper who finds a message in a bottle",
    "a robot that learns to paint",
    "a dragon afraid of the dark",
    "two friends lost in a desert city",
    "a baker who can taste memories",
    "the last train out of a snowy town",
    "a cat that becomes mayor",
    "a girl who builds a radio to talk to the stars",
]


@dataclass(frozen=True)
class Job:
    """One request: a rendered prompt, its grammar for a given engine (None: free text)."""

    prompt: str
    grammar: Callable[[Engine], TokenConstraint | None]
    max_tokens: int


@dataclass
class Cell:
    """What one (task, batch size, engine) did over its runs."""

    decode: list[float] = field(default_factory=list)  # decode tok/s per run
    e2e: list[float] = field(default_factory=list)  # end-to-end tok/s per run
    passes: int = 0
    forward_seconds: float = 0.0
    requests: int = 0
    tokens: int = 0
    drafted: int = 0
    accepted: int = 0


# ---- the tasks ---------------------------------------------------------------------------------


def squad_rows(count: int) -> list[dict]:
    """The first `count` SQuAD dev rows with distinct contexts."""
    rows, seen = [], set()
    with (DATA / "squad" / "dev.jsonl").open() as f:
        for line in f:
            row = json.loads(line)
            if row["context"] not in seen:
                seen.add(row["context"])
                rows.append(row)
            if len(rows) == count:
                break
    return rows


def hotpot_inputs(count: int) -> list[dict]:
    """HotPotQA dev questions with their gold supporting paragraphs as the context."""
    inputs = []
    with (DATA / "hotpotqa" / "dev.jsonl").open() as f:
        for _, line in zip(range(count), f):
            row = json.loads(line)
            gold = {title for title, _ in row["supporting_facts"]}
            context = [f"{title}: {''.join(text)}" for title, text in row["context"] if title in gold]
            inputs.append({"context": context, "question": row["question"]})
    return inputs


def dspy_jobs(
    lms: list[dspy.LM], signature: type[dspy.Signature], inputs: list[dict], task: str
) -> tuple[list[Job], int]:
    """Run `signature` on `inputs` through each LM under ConstrainedAdapter (their completion
    texts must agree: differences are printed and counted) and return the requests the first
    one sent (the adapter's prompts and grammars, replayed as they are on every engine) and the
    count of texts that differ."""
    client = lms[0].engine
    turns: list[ChatTurn] = []
    start = client.start

    def record(request, stream=False):
        call = start(request, stream)
        turns.append(call.turn)
        return call

    client.start = record  # on this client instance only, while the reference run lasts
    texts = []
    try:
        for lm in lms:
            predict = dspy.Predict(signature)
            with dspy.context(lm=lm, adapter=plait.ConstrainedAdapter()):
                for x in inputs:
                    predict(**x)
            texts.append([entry["outputs"][0] for entry in lm.history[-len(inputs) :]])
    finally:
        client.start = start
    assert len(turns) == len(inputs), f"{task}: expected one LM call per row, got {len(turns)}"
    differ = 0
    for lm, other in zip(lms[1:], texts[1:]):
        same = sum(a == b for a, b in zip(texts[0], other))
        differ += len(inputs) - same
        k = lm.engine.engine_options["draft_tokens"]
        print(f"{task}: through plait.LM, K={k} vs off: {same}/{len(inputs)} completion texts identical")
        for i, (a, b) in enumerate(zip(texts[0], other)):
            if a != b:
                print(f"  row {i} differs:\n    off {a!r}\n    on  {b!r}")
    budget = MAX_TOKENS[task]
    return [Job(t.prompt, lambda e, t=t: t.constraint(e, budget), budget) for t in turns], differ


def json_jobs(engine: Engine, count: int) -> list[Job]:
    """Echo a SQuAD row as JSON: every value is copied from the prompt."""
    schema = {
        "type": "object",
        "properties": {k: {"type": "string"} for k in ("title", "question", "sentence")},
        "required": ["title", "question", "sentence"],
    }
    budget = MAX_TOKENS["json"]

    def grammar(e: Engine) -> TokenConstraint:
        return compile_constraint(schema, e.tokenizer, e.info.vocab_size, max_tokens=budget)

    jobs = []
    for row in squad_rows(count):
        ask = (
            f"Title: {row['title']}\nContext: {row['context']}\nQuestion: {row['question']}\n\n"
            "Reply with JSON: the title, the question, and the sentence of the context that "
            "answers it, each copied exactly."
        )
        jobs.append(Job(engine.chat_prompt([{"role": "user", "content": ask}]), grammar, budget))
    return jobs


def free_jobs(engine: Engine, count: int) -> list[Job]:
    prompts = [f"Write a short story about {TOPICS[i % len(TOPICS)]}." for i in range(count)]
    return [
        Job(engine.chat_prompt([{"role": "user", "content": p}]), lambda e: None, MAX_TOKENS["free"])
        for p in prompts
    ]


def task_jobs(task: str, lms: list[dspy.LM], count: int) -> tuple[list[Job], int]:
    """`count` requests of `task` (`lms`: the plain LM first, then the speculative ones), and
    how many DSPy completion texts differed between the LMs."""
    if task == "squad":
        inputs = [{"context": r["context"], "question": r["question"]} for r in squad_rows(count)]
        return dspy_jobs(lms, EXTRACT, inputs, task)
    if task == "hotpot":
        return dspy_jobs(lms, AnswerFromContext, hotpot_inputs(count), task)
    plain = lms[0].engine.engine
    return (json_jobs(plain, count) if task == "json" else free_jobs(plain, count)), 0


# ---- timing ------------------------------------------------------------------------------------


def follow(request: Request, started: float) -> list[tuple[float, int]]:
    """(seconds since `started`, output tokens so far) at each streamed delta and at the end."""
    marks = [(time.perf_counter() - started, len(request.token_ids)) for _ in request.deltas()]
    request.wait()
    return [*marks, (time.perf_counter() - started, len(request.token_ids))]


def rates(marks: list[list[tuple[float, int]]]) -> tuple[float, float]:
    """(decode tok/s, end-to-end tok/s) of one run: decode counts the tokens made after every
    row had its first one, over the time from then to the run's end."""
    start = max(m[0][0] for m in marks)
    end = max(m[-1][0] for m in marks)
    total = sum(m[-1][1] for m in marks)
    before = sum(max((n for t, n in m if t <= start), default=0) for m in marks)
    decode = (total - before) / (end - start) if end > start else float("nan")
    return decode, total / end


def run(engine: Engine, jobs: list[Job], cell: Cell) -> tuple[list[Request], float]:
    """Submit `jobs` at once (greedy, streamed) and wait for all; the requests and the run's
    decode tok/s (the run is added to `cell`)."""
    grammars = [j.grammar(engine) for j in jobs]  # compiled before the clock starts
    before = engine.stats()
    started = time.perf_counter()
    requests = [
        engine.submit(j.prompt, constraint=g, stream=True, temperature=0.0, max_tokens=j.max_tokens)
        for j, g in zip(jobs, grammars)
    ]
    with ThreadPoolExecutor(len(requests)) as pool:
        marks = list(pool.map(lambda r: follow(r, started), requests))
    spent = engine.stats().since(before)
    decode, e2e = rates(marks)
    cell.decode.append(decode)
    cell.e2e.append(e2e)
    cell.passes += spent.passes
    cell.forward_seconds += spent.forward_seconds
    cell.requests += len(requests)
    cell.tokens += sum(len(r.token_ids) for r in requests)
    cell.drafted += spent.drafted_tokens
    cell.accepted += spent.accepted_tokens
    return requests, decode


def report(
    tasks: list[str],
    ks: list[int],
    cells: dict[tuple[str, int, str], Cell],
    ratios: dict[tuple[str, int, str], list[float]],
    different: dict[tuple[str, int, str], int],
) -> None:
    """The table (medians; ratio and e2e are medians of paired on/off runs) and the goals."""
    print(
        f"{'task':7}{'batch':>6}{'K':>3}{'tok/req':>8}{'off tok/s':>10}{'on tok/s':>9}{'ratio':>7}{'e2e':>6}"
        f"{'passes/tok off→on':>19}{'ms/pass off→on':>16}{'accept':>7}  identical"
    )
    for task in tasks:
        for batch in (1, BATCH):
            off = cells[task, batch, "off"]
            for k in ks:
                on, name = cells[task, batch, f"k={k}"], f"k={k}"
                median = statistics.median
                e2e = median(a / b for a, b in zip(on.e2e, off.e2e))
                passes = f"{off.passes / off.tokens:.2f} → {on.passes / on.tokens:.2f}"
                ms = [f"{1e3 * c.forward_seconds / c.passes:.0f}" for c in (off, on)]
                print(
                    f"{task:7}{batch:>6}{k:>3}{off.tokens / off.requests:8.0f}{median(off.decode):10.1f}"
                    f"{median(on.decode):9.1f}{median(ratios[task, batch, name]):7.2f}{e2e:6.2f}"
                    f"{passes:>19}{' → '.join(ms):>16}{on.accepted / max(on.drafted, 1):7.2f}"
                    f"  {on.requests - different[task, batch, name]}/{on.requests}"
                )
    for (task, batch), goal in GOALS.items():
        for k in ks:
            if task in tasks:
                got = statistics.median(ratios[task, batch, f"k={k}"])
                verdict = "met" if got >= goal else "MISSED"
                print(f"goal {task} batch {batch} K={k}: decode ≥ {goal:.2f}x, got {got:.3f}x: {verdict}")


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=6, help="requests per task at batch 1")
    parser.add_argument("--draft-tokens", default="4", help="draft length(s), e.g. 4 or 2,4,6")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--repeats", type=int, default=1, help="runs of the batch of 8")
    args = parser.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = set(tasks) - set(TASKS)
    if unknown:
        parser.error(f"unknown task(s) {sorted(unknown)}; known: {', '.join(TASKS)}")
    ks = [int(k) for k in args.draft_tokens.split(",")]
    began = time.perf_counter()

    lms = [plait.LM(MODEL, cache=False, temperature=0.0)]
    lms += [plait.LM(MODEL, speculative="ngram", draft_tokens=k, cache=False, temperature=0.0) for k in ks]
    engines = {"off": lms[0].engine.engine} | {f"k={k}": lm.engine.engine for k, lm in zip(ks, lms[1:])}
    for engine in engines.values():  # first calls allocate and warm up
        engine.generate("Warm up.", max_tokens=8)
    count = max(args.rows, BATCH)

    cells: dict[tuple[str, int, str], Cell] = defaultdict(Cell)
    ratios: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    different: dict[tuple[str, int, str], int] = defaultdict(int)
    for task in tasks:
        jobs, different[task, 0, "plait.LM"] = task_jobs(task, lms, count)
        plan = [(1, [j]) for j in jobs[: args.rows]] + [(BATCH, jobs[:BATCH])] * args.repeats
        for n, (batch, group) in enumerate(plan):
            order = list(engines.items())
            if n % 2:
                order.reverse()
            done = {name: run(engine, group, cells[task, batch, name]) for name, engine in order}
            for k in ks:
                name = f"k={k}"
                ratios[task, batch, name].append(done[name][1] / done["off"][1])
                for i, (a, b) in enumerate(zip(done["off"][0], done[name][0])):
                    if a.token_ids != b.token_ids or a.finish_reason != b.finish_reason:
                        different[task, batch, name] += 1
                        at = first_difference(a.token_ids, b.token_ids)
                        print(
                            f"NOT IDENTICAL: {task} batch {batch} run {n} request {i} {name}: first "
                            f"difference at token {at} (off {a.token_ids[at : at + 4]}, on "
                            f"{b.token_ids[at : at + 4]}; finish {a.finish_reason}/{b.finish_reason})"
                        )
        print(f"{task}: done ({time.perf_counter() - began:.0f} s)", flush=True)

    print(f"\nSmolLM2-135M fp32 CPU, greedy; batch 1: {args.rows} rows, batch {BATCH}: {args.repeats} run(s)")
    report(tasks, ks, cells, ratios, different)
    print(f"total {time.perf_counter() - began:.0f} s")
    if any(different.values()):
        sys.exit('speculation changed some outputs (see NOT IDENTICAL and "differs" above)')


if __name__ == "__main__":
    main()
