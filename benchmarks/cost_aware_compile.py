"""Cost-aware compile on SST-2: the best-score pick of random search vs the cheapest candidate
within a tolerance of its score, both scored on held-out dev rows, in one run.

    .venv/bin/python benchmarks/cost_aware_compile.py              # 64 train, 100 dev, 200 held out
    .venv/bin/python benchmarks/cost_aware_compile.py --smoke      # 16 train, 12 dev, 12 held out
    .venv/bin/python benchmarks/cost_aware_compile.py --db sqlite:///runs.db   # keep (and resume) the runs

The program is plait's `Sentiment` pipeline on the embedded SmolLM2-135M-Instruct; the compile
is what `plait compile --optimizer random-search` runs, with demo-set sizes drawn from 1 to
`--max-demos` bootstrapped demos (`max_labeled_demos=0`, so a candidate's size is its own),
scored on the first `--dev` dev rows:

  1. compile without a cost rule: the optimizer keeps its best-scoring candidate;
  2. the same compile with `--score-tolerance` (default 1 point): it resumes run 1 from the store
     (no LM call is made again) and picks the cheapest candidate within the tolerance;
  3. both picks are evaluated on the next `--held-out` dev rows, which no step above saw.

Cost is idealized (plait.backends.models.cost): seconds per example on the reference
accelerator (H100-SXM, bf16 weights, batch 1, no prefix cache), from the model's architecture
and each call's tokens. It is deterministic, so the ratio needs no repeats; the wall times
printed beside it are this machine's and depend on its load. The goal (#17 item 3): the
cost-aware pick >= 30% cheaper per held-out example than the best-score pick, at most 1 point
lower held-out accuracy. Benchmarks are not tests: this prints and asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "sst2"
os.environ.setdefault("PLAIT_HOME", str(ROOT / ".plait"))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("TQDM_DISABLE", "1")  # BootstrapFewShot's progress bar

PROGRAM = "plait.pipelines.sentiment:Sentiment"
GOAL_CHEAPER, GOAL_POINTS = 0.30, 1.0


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=64, help="train rows (the bootstrap's examples)")
    p.add_argument("--dev", type=int, default=100, help="dev rows the candidates are scored on")
    p.add_argument("--held-out", type=int, default=200, help="dev rows after those, for the picks")
    p.add_argument("--candidates", type=int, default=6, help="random demo sets (num_candidate_programs)")
    p.add_argument("--max-demos", type=int, default=8, help="the largest demo set drawn")
    p.add_argument("--tolerance", type=float, default=GOAL_POINTS, help="score points below the best")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--dtype", default=None, help="engine weights: fp32 | bf16 (default: the checkpoint's)")
    p.add_argument("--db", help="database URL (default: a temporary SQLite file)")
    p.add_argument("--smoke", action="store_true", help="16 train, 12 dev, 12 held out, 2 candidates")
    args = p.parse_args()
    if args.smoke:
        args.train, args.dev, args.held_out, args.candidates = 16, 12, 12, 2
    return args


def _write_rows(path: Path, source: Path, start: int, count: int) -> Path:
    with source.open() as rows:
        lines = [line for _, line in zip(range(start + count), rows, strict=False)][start:]
    path.write_text("".join(lines))
    return path


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{1000 * seconds:.4f}"


def main() -> None:
    args = _args()
    logging.basicConfig(level=logging.WARNING)
    import plait
    from plait.compilers.commands import dspy_quiet
    from plait.compilers.runner import CompileConfig, EvalConfig, compile_program, evaluate_program
    from plait.compilers.selection import Selection
    from plait.store import Store

    work = Path(tempfile.mkdtemp(prefix="plait-cost-"))
    train = _write_rows(work / "train.jsonl", DATA / "train.jsonl", 0, args.train)
    dev = _write_rows(work / "dev.jsonl", DATA / "dev.jsonl", 0, args.dev)
    store = Store.open(args.db or f"sqlite:///{work / 'runs.db'}")
    options = {"dtype": args.dtype} if args.dtype else {}
    lm = plait.LM("smollm2-135m", cache=False, temperature=0.0, **options)
    config = CompileConfig(
        program=PROGRAM,
        trainset=str(train),
        devset=str(dev),
        out=str(work / "best.json"),
        optimizer="random-search",
        optimizer_args={
            "num_candidate_programs": args.candidates,
            "max_bootstrapped_demos": args.max_demos,
            "max_labeled_demos": 0,
        },
        threads=args.threads,
    )
    print(
        f"SST-2: {args.train} train rows, {args.dev} dev rows for the candidates, dev rows "
        f"{args.dev}..{args.dev + args.held_out - 1} held out; random search, {args.candidates} random "
        f"demo sets of 1..{args.max_demos} demos; model {lm.engine.engine.model_id}, "
        f"{args.threads} threads; load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    started = time.perf_counter()
    with dspy_quiet():
        best = compile_program(config, store, lm=lm)
        compiled_s = time.perf_counter() - started
        cheap = compile_program(
            dataclasses.replace(
                config, out=str(work / "cheap.json"), selection=Selection(score_tolerance=args.tolerance)
            ),
            store,
            lm=lm,
        )
        repick_s = time.perf_counter() - started - compiled_s
        held_out = {}
        for name, artifact in (("best-score", best.artifact), ("cost-aware", cheap.artifact)):
            held_out[name] = evaluate_program(
                EvalConfig(
                    program=PROGRAM,
                    devset=str(DATA / "dev.jsonl"),
                    compiled=artifact,
                    offset=args.dev,
                    limit=args.held_out,
                    threads=args.threads,
                ),
                store,
                lm=lm,
            ).report
    total_s = time.perf_counter() - started

    front = {c.state_hash for c in best.front}
    print("\ncandidates on the dev rows (idealized cost on H100-SXM)")
    print(f"{'trial':>5} {'demos':>5} {'dev acc':>8} {'ideal ms/ex':>12} {'front':>5}  pick")
    for c in sorted(best.candidates, key=lambda c: (c.cost_ms or 0.0, -c.score)):
        marks = [
            n
            for n, p in (("best-score", best.picked), ("cost-aware", cheap.picked))
            if p.state_hash == c.state_hash
        ]
        star = "*" if c.state_hash in front else ""
        print(
            f"{c.trial:>5} {c.demos:>5} {c.score:>8.1f} {_ms(c.ideal_seconds):>12} {star:>5}  "
            + ", ".join(marks)
        )

    print(f"\npicks on {args.held_out} held-out dev rows")
    print(
        f"{'pick':>10} {'demos':>5} {'dev acc':>8} {'held-out acc':>12} {'ideal ms/ex':>12} {'tokens/ex':>9}"
    )
    for name, result in (("best-score", best), ("cost-aware", cheap)):
        report = held_out[name]
        print(
            f"{name:>10} {result.picked.demos:>5} {result.picked.score:>8.1f} {report.score:>12.1f} "
            f"{_ms(report.ideal_seconds_per_example):>12} {report.tokens_per_example:>9.0f}"
        )
    a, b = held_out["best-score"], held_out["cost-aware"]
    cheaper = 1 - b.ideal_seconds_per_example / a.ideal_seconds_per_example
    lower = a.score - b.score
    met = cheaper >= GOAL_CHEAPER and lower <= GOAL_POINTS
    print(
        f"\ncost-aware vs best-score on held-out rows: {100 * cheaper:.1f}% cheaper per example, "
        f"{lower:+.1f} points lower accuracy -> goal (>= {100 * GOAL_CHEAPER:.0f}% cheaper, <= "
        f"{GOAL_POINTS:g} point lower): {'met' if met else 'NOT met'}"
    )
    cheapest = min(best.candidates, key=lambda c: c.ideal_seconds or 0.0)
    same = best.picked.state_hash == cheap.picked.state_hash
    if same and best.picked.state_hash == cheapest.state_hash:
        print(
            f"note: the best-score pick ({best.picked.demos} demos, {best.picked.score:.1f} on the dev "
            "rows) is already the cheapest candidate: there is nothing cheaper to pick"
        )
    elif same:
        print(
            f"note: no cheaper candidate scored within {args.tolerance:g} points of the best on the dev rows"
        )
    elif not met:
        print(
            f"note: on the {args.dev} dev rows the cost-aware pick scored {cheap.picked.score:.1f} vs "
            f"{best.picked.score:.1f}; held-out accuracy differs by {lower:+.1f} points "
            f"({lower * args.held_out / 100:+.0f} of {args.held_out} rows)"
        )
    if same and a.score != b.score:
        print(
            "note: the same program scored differently in its two held-out evaluations: the engine's "
            "outputs varied between them"
        )
    print(
        f"wall: compile {compiled_s:.0f} s, re-pick from the store {repick_s:.1f} s, held-out evals "
        f"{total_s - compiled_s - repick_s:.0f} s; load {os.getloadavg()[0]:.1f}"
    )
    summary = {
        "best": {"demos": best.picked.demos, "dev": best.picked.score, "held_out": a.score},
        "cost_aware": {"demos": cheap.picked.demos, "dev": cheap.picked.score, "held_out": b.score},
        "held_out_ideal_ms": [1000 * a.ideal_seconds_per_example, 1000 * b.ideal_seconds_per_example],
        "cheaper": cheaper,
        "points_lower": lower,
        "goal_met": met,
    }
    print(json.dumps(summary))
    store.close()


if __name__ == "__main__":
    main()
