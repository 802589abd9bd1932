"""Served RAG and MultiHop latency: prompt-aware prefill against stage after stage.

    python benchmarks/program_latency.py                      # 16 HotPotQA questions per client count (1, 8)
    python benchmarks/program_latency.py --questions 32 --dtype float32

Two `plait serve` processes in turn, on the same artifacts, index and engine settings:
- **stage after stage** (`--no-prompt-prefill`): each LM call's prompt is computed when the
  call comes (the prefix cache still restores what earlier calls computed);
- **prompt-aware** (the default): every predictor's instructions and demos are prefilled and
  pinned at start-up, and MultiHop's answer prompt is prefilled in the engine's idle time after
  each hop (`plait.modules.prefill`).
Both answer the same questions over HTTP (`POST /v1/programs/{name}`) from 1 and from 8
concurrent clients (other questions for each client count; each asked once per server), and
every output (answers, search queries, passages) must be the same in both servers (at fp32,
where a token's result does not depend on how its prompt was split into passes or batched).
Prints p50/p95 per program and client count, and the ratio of the p50s.

`--breakdown` measures, in process and at 1 client, the ceiling any overlap of stages can reach:
the time a call spends outside its LM calls (retrieval, DSPy) and how many of the prompt tokens
its LM calls compute (rather than restore from the prefix cache); those tokens follow the
retrieval just before their call, so no runtime can compute them earlier. The ceiling on the
p50 ratio is total / (total - time outside the LM calls).

The artifacts are "compiled" here from labeled rows: the answer predictor gets 4 demos
(question, answer) from the last HotPotQA dev rows and each hop's query writer 4 demos whose
query is the title of the row's first supporting paragraph; the questions asked are the first
rows, `--questions` of them per client count. The index is the HotPotQA paragraphs
(`.plait/bench/hotpotqa`, built if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy  # noqa: E402

import plait  # noqa: E402
from plait.compilers.artifact import load_artifact, save_artifact  # noqa: E402
from plait.pipelines.multihop import MultiHop  # noqa: E402
from plait.pipelines.rag import RAG  # noqa: E402
from plait.serve.server import wait_until_serving  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "hotpotqa"
INDEX = ROOT / ".plait" / "bench" / "hotpotqa"
PLAIT = [sys.executable, "-m", "plait.cli"]


def build_index() -> Path:
    if not (INDEX / "manifest.json").exists():
        subprocess.run(
            [*PLAIT, "index", "build", str(DATA / "corpus.jsonl"), "--out", str(INDEX)], check=True
        )
    return INDEX


def write_artifacts(folder: Path, rows: list[dict]) -> dict[str, Path]:
    demo_rows = rows[-4:]
    answers = [dspy.Example(question=r["question"], answer=r["answer"]) for r in demo_rows]
    queries = [
        dspy.Example(question=r["question"], context=[], query=r["supporting_facts"][0][0]) for r in demo_rows
    ]
    rag = RAG(index=str(INDEX), k=3)
    rag.answer.demos = answers
    multihop = MultiHop(index=str(INDEX), hops=2, k=2)
    multihop.answer.demos = answers
    for writer in multihop.write_query:
        writer.demos = queries
    paths = {"rag": folder / "rag.json", "multihop": folder / "multihop.json"}
    save_artifact(
        rag,
        paths["rag"],
        program_path="plait.pipelines.rag:RAG",
        model="smollm2-135m",
        init={"index": str(INDEX)},
    )
    save_artifact(
        multihop,
        paths["multihop"],
        program_path="plait.pipelines.multihop:MultiHop",
        model="smollm2-135m",
        init={"index": str(INDEX), "hops": 2, "k": 2},
    )
    return paths


def free_port() -> int:
    """A loopback port the OS has just handed out (free unless someone takes it first)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        return listener.getsockname()[1]


class Server:
    """`plait serve` in a subprocess, until the with-block ends."""

    def __init__(self, artifacts: dict[str, Path], args: argparse.Namespace, prefill: bool):
        self.port = free_port()
        command = [*PLAIT, "serve", *(f"{n}={p}" for n, p in artifacts.items()), "--port", str(self.port)]
        command += ["--max-tokens", str(args.max_tokens), "--no-traces", "--log-level", "warning"]
        command += ["--dtype", args.dtype] if args.dtype else []
        command += [] if prefill else ["--no-prompt-prefill"]
        self.command = command

    def __enter__(self) -> str:
        started = time.perf_counter()
        self.process = subprocess.Popen(self.command, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{self.port}"
        wait_until_serving(url, self.process)
        self.start_seconds = time.perf_counter() - started
        return url

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(30)


def ask(url: str, program: str, questions: list[str], clients: int) -> tuple[list[float], list[dict]]:
    """Each question once, from `clients` concurrent clients: (seconds per call, outputs)."""

    def one(question: str) -> tuple[float, dict]:
        started = time.perf_counter()
        response = httpx.post(f"{url}/v1/programs/{program}", json={"question": question}, timeout=600)
        response.raise_for_status()
        return time.perf_counter() - started, response.json()["outputs"]

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, questions))
    return [s for s, _ in results], [o for _, o in results]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class LMTimer(dspy.utils.callback.BaseCallback):
    """Seconds spent inside LM calls, summed until `reset`."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.seconds = 0.0
        self.calls = 0

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def on_lm_start(self, call_id: str, instance, inputs) -> None:
        self.started[call_id] = time.perf_counter()

    def on_lm_end(self, call_id: str, outputs, exception=None) -> None:
        self.seconds += time.perf_counter() - self.started.pop(call_id)
        self.calls += 1


def breakdown(artifacts: dict[str, Path], questions: list[str], args: argparse.Namespace) -> None:
    """Per program at 1 client: total, LM, outside-LM seconds (medians) and prompt tokens."""
    timer = LMTimer()
    lm = plait.LM(
        "smollm2-135m",
        max_tokens=args.max_tokens,
        cache=False,
        **({"dtype": args.dtype} if args.dtype else {}),
    )
    print(f"\nin process, 1 client, {len(questions) - 1} questions after a warm-up (medians per call)")
    print(
        f"{'program':<10}{'total s':>9}{'LM s':>8}{'LM calls':>9}{'outside LM':>17}"
        f"{'prompt tokens computed / all':>31}{'ceiling':>9}"
    )
    for name, path in artifacts.items():
        program = load_artifact(path).program
        with dspy.context(lm=lm, adapter=plait.ConstrainedAdapter(), callbacks=[timer]):
            program(question=questions[0])  # warm-up
            rows = []
            for question in questions[1:]:
                timer.reset()
                seen = len(lm.history)
                started = time.perf_counter()
                program(question=question)
                total = time.perf_counter() - started
                usage = [entry["usage"] for entry in lm.history[seen:]]
                prompt = sum(u.get("prompt_tokens", 0) for u in usage)
                restored = sum((u.get("prompt_tokens_details") or {}).get("cached_tokens", 0) for u in usage)
                rows.append((total, timer.seconds, timer.calls, prompt - restored, prompt))
        total, in_lm, calls, computed, prompt = (statistics.median(column) for column in zip(*rows))
        outside = total - in_lm
        print(
            f"{name:<10}{total:>9.3f}{in_lm:>8.3f}{calls:>9.0f}"
            f"{outside * 1000:>9.1f} ms {100 * outside / total:>4.1f}%"
            f"{computed:>19.0f} / {prompt:<9.0f}{total / (total - outside):>8.3f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", help="the engine precision ('': the default, int4)")
    parser.add_argument("--breakdown", action="store_true", help="only the in-process ceiling (see above)")
    args = parser.parse_args()

    rows = [json.loads(line) for line in open(DATA / "dev.jsonl")]
    # each client count asks questions of its own: a prompt asked before would be restored from
    # the prefix cache, and a cache with less room (pinned prefixes) would restore less of it
    asked = {c: rows[i * args.questions : (i + 1) * args.questions] for i, c in enumerate(args.clients)}
    warm_up = rows[len(args.clients) * args.questions]["question"]
    build_index()
    if args.breakdown:
        with tempfile.TemporaryDirectory() as folder:
            artifacts = write_artifacts(Path(folder), rows)
            breakdown(artifacts, [r["question"] for r in rows[: args.questions + 1]], args)
        return
    results: dict[tuple[str, str, int], list[float]] = {}
    outputs: dict[tuple[str, str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as folder:
        artifacts = write_artifacts(Path(folder), rows)
        for mode, prefill in (("stage after stage", False), ("prompt-aware", True)):
            server = Server(artifacts, args, prefill)
            with server as url:
                print(f"{mode}: serving after {server.start_seconds:.1f} s", flush=True)
                for program in artifacts:
                    ask(url, program, [warm_up], 1)  # warm-up: imports, first passes
                    for clients in args.clients:
                        seconds, outs = ask(url, program, [r["question"] for r in asked[clients]], clients)
                        results[mode, program, clients] = seconds
                        outputs[mode, program, clients] = outs

    precision = args.dtype or "int4"
    print(f"\n{args.questions} HotPotQA questions, SmolLM2-135M ({precision}), max_tokens {args.max_tokens}")
    header = f"{'stage after stage p50/p95 s':>30}{'prompt-aware p50/p95 s':>26}{'p50 ratio':>11}"
    print(f"{'program':<10}{'clients':>8}{header}  same outputs")
    for program in ("rag", "multihop"):
        for clients in args.clients:
            base = results["stage after stage", program, clients]
            fast = results["prompt-aware", program, clients]
            same = outputs["stage after stage", program, clients] == outputs["prompt-aware", program, clients]
            b50, f50 = statistics.median(base), statistics.median(fast)
            print(
                f"{program:<10}{clients:>8}{b50:>18.3f} / {percentile(base, 0.95):.3f}"
                f"{f50:>16.3f} / {percentile(fast, 0.95):.3f}{b50 / f50:>10.2f}x  {same}"
            )


if __name__ == "__main__":
    main()
