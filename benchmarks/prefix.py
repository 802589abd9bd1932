"""Prefix cache: N requests sharing a long prompt prefix, cache on vs off, same run.

The shape of a compiled DSPy predictor on a dev set: the same instructions + demos, then one
row's input. Reports prompt tokens actually computed, end-to-end wall time (requests submitted
concurrently, as DSPy's Evaluate threads do), and checks the outputs are identical.

    .venv/bin/python benchmarks/prefix.py [--requests 100] [--max-tokens 8] [--repeats 3]
"""

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from plait.backends.runtime.engine import Engine

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def prompts(engine: Engine, count: int) -> list[list[int]]:
    rows = [json.loads(line) for line in open(DATA / "train.jsonl")]
    demos = "\n\n".join(
        f"Sentence: {r['text']}\nSentiment: {'positive' if r['label'] else 'negative'}" for r in rows[:24]
    )
    instructions = f"Classify the sentiment of each movie-review sentence.\n\n{demos}"
    dev = [json.loads(line) for line in open(DATA / "dev.jsonl")][:count]
    return [
        engine.tokenizer.encode(
            engine.chat_prompt(
                [
                    {"role": "system", "content": instructions},
                    {"role": "user", "content": f"Sentence: {r['text']}\nSentiment:"},
                ]
            )
        )
        for r in dev
    ]


def run(engine: Engine, batch: list[list[int]], max_tokens: int, threads: int) -> tuple[float, int, list]:
    before = engine.scheduler.prompt_tokens_computed
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        outputs = list(pool.map(lambda ids: engine.generate(ids, max_tokens=max_tokens).token_ids, batch))
    return time.perf_counter() - started, engine.scheduler.prompt_tokens_computed - before, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=16, help="concurrent callers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)

    base = Engine.load("smollm2-135m", prefix_cache=False)
    batch = prompts(base, args.requests)
    lengths = [len(p) for p in batch]
    shared = min(len(p) for p in batch)
    for i in range(shared):
        if len({p[i] for p in batch}) > 1:
            shared = i
            break
    print(
        f"{len(batch)} requests, prompt tokens median {statistics.median(lengths):.0f}, "
        f"shared prefix {shared} tokens, {args.max_tokens} new tokens each, {args.threads} callers"
    )

    results: dict[str, list[tuple[float, int]]] = {"off": [], "on": []}
    reference = None
    for _ in range(args.repeats):
        for mode in ("off", "on"):
            engine = (
                base
                if mode == "off"
                else Engine(base.model, base.tokenizer, "prefix-on", "llama", prefix_cache=True)
            )
            wall, computed, outputs = run(engine, batch, args.max_tokens, args.threads)
            reference = reference or outputs
            assert outputs == reference, "the prefix cache changed an output"
            results[mode].append((wall, computed))
            if engine is not base:
                engine.close()
    base.close()

    def med(mode: str, i: int) -> float:
        return statistics.median(r[i] for r in results[mode])

    print(f"{'':10}{'wall s':>10}{'prompt tokens computed':>26}")
    for mode in ("off", "on"):
        print(f"cache {mode:4}{med(mode, 0):10.1f}{med(mode, 1):26.0f}")
    print(
        f"ratio (off/on): prefill tokens {med('off', 1) / med('on', 1):.1f}x fewer, "
        f"end to end {med('off', 0) / med('on', 0):.2f}x faster; outputs identical: True"
    )


if __name__ == "__main__":
    main()
