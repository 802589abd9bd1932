"""n samples of one prompt: one prefill forked into n rows vs n separate concurrent requests.

The prompt is ~500 tokens of SQuAD dev paragraphs (../shared/data/squad) and a question, in
the chat template; each repeat takes the next paragraphs, so no run finds another's prompt
cached. Peers, each timed end to end (submit to the last sample's last token):

* fork: `Engine.submit_n(prompt, n)`: one prefill, n rows decoding from copies of its state;
* separate, no prefix cache: n requests submitted at once, each computing the whole prompt;
* separate, prefix cache on (cleared before each run, as a fresh prompt finds it): the engine
  as users run it; the first request computes the prompt, the others wait for its blocks
  and compute only the part after the last full block.

Sample i is seeded seed + i in every peer; at a batch-invariant precision (fp32) the fork's
samples equal the separate ones token for token, and the run counts how many do here.

    .venv/bin/python benchmarks/fork.py [--n 5] [--prompt-tokens 500] [--max-tokens 32] [--repeats 5]
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from plait.backends.runtime.engine import Engine
from plait.backends.runtime.request import Request

Submit = Callable[[Engine, list[int], int], list[Request]]
"""Submits a peer's requests for n samples of a prompt with a seed."""

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad"


def prompts(engine: Engine, count: int, tokens: int) -> list[list[int]]:
    """`count` chat prompts of about `tokens` tokens: consecutive distinct paragraphs, cut to
    fit, then the question of the first one."""
    rows = [json.loads(line) for line in (DATA / "dev.jsonl").open()]
    question = {r["context"]: r["question"] for r in rows}
    paragraphs = list(question)
    built, at = [], 0
    for _ in range(count):
        first, context = paragraphs[at], []
        while len(context) < tokens:
            context += engine.tokenizer.encode("\n\n" + paragraphs[at])
            at += 1
        text = engine.tokenizer.decode(context[: tokens - 60])  # room for the template and question
        text += f"\n\nQuestion: {question[first]}\nAnswer in one sentence."
        built.append(engine.prompt_ids(engine.chat_prompt([{"role": "user", "content": text}])))
    return built


def timed(engine: Engine, submit: Submit, ids: list[int], seed: int) -> tuple[float, int, list[list[int]]]:
    """Seconds, prompt tokens computed, and each sample's tokens."""
    before = engine.stats()
    started = time.perf_counter()
    outputs = [request.wait().token_ids for request in submit(engine, ids, seed)]
    seconds = time.perf_counter() - started
    return seconds, engine.stats().since(before).prompt_tokens_computed, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=500)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cached = Engine.load("smollm2-135m")  # the default precision (int4 on CPU)
    plain = Engine(cached.model, cached.tokenizer, cached.model_id, cached.info.family, prefix_cache=False)
    batch = prompts(cached, args.repeats + 1, args.prompt_tokens)  # the first one warms up
    sampling = dict(temperature=args.temperature, max_tokens=args.max_tokens)
    print(
        f"{cached.model_id} on {cached.device}: n={args.n} samples of a "
        f"{statistics.median(len(p) for p in batch):.0f}-token prompt, {args.max_tokens} new tokens "
        f"each (max), temperature {args.temperature}, {args.repeats} repeats"
    )

    def fork(engine: Engine, ids: list[int], seed: int) -> list[Request]:
        return engine.submit_n(ids, args.n, seed=seed, **sampling)

    def separate(engine: Engine, ids: list[int], seed: int) -> list[Request]:
        return [engine.submit(ids, seed=seed + i, **sampling) for i in range(args.n)]

    peers = {
        "fork": (cached, fork),
        "separate, no prefix cache": (plain, separate),
        "separate, prefix cache on": (cached, separate),
    }
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in peers}
    same = total = 0
    for repeat, ids in enumerate(batch):
        seed = args.seed + 100 * repeat
        outputs = {}
        for name, (engine, submit) in peers.items():
            cached.clear_prefix_cache()
            seconds, computed, outputs[name] = timed(engine, submit, ids, seed)
            if repeat:
                results[name].append((seconds, computed))
        if repeat:
            reference = outputs["separate, no prefix cache"]
            same += sum(a == b for a, b in zip(outputs["fork"], reference))
            total += args.n

    fork_time = statistics.median(s for s, _ in results["fork"])
    for name, runs in results.items():
        median = statistics.median(s for s, _ in runs)
        computed = statistics.median(c for _, c in runs)
        ratio = "" if name == "fork" else f"   fork is {median / fork_time:.2f}x faster"
        print(f"{name:28s} {median:6.2f} s median, {computed:5.0f} prompt tokens computed{ratio}")
    print(f"fork samples token-identical to the separate ones of the same seed: {same}/{total}")
    plain.close()
    cached.close()


if __name__ == "__main__":
    main()
